//! The VMM side: [`AgentClient`] speaks the protocol; [`AgentSession`] and [`AgentProvider`] put
//! it behind the [`Session`]/[`SessionProvider`] traits, so VMM code uses a session the same way
//! whether it is local or held by the agent.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::AgentError;
use super::protocol::{self, ErrorKind, Request, Response, SessionInfo};
use crate::session::{Session, SessionError, SessionProvider, Token};

/// Longest wait for the rest of a reply once it has started.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to `ch-luod`.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    path: PathBuf,
}

impl AgentClient {
    /// Connects to the agent listening at `path`.
    pub fn connect(path: &Path) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            stream,
            path: path.to_path_buf(),
        })
    }

    /// The agent's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for one more message (a reply in several parts, as a handoff); an error reply
    /// becomes [`AgentError::Remote`].
    pub fn receive(&mut self) -> Result<(Response, Option<OwnedFd>), AgentError> {
        let received = protocol::recv(&self.stream, REPLY_TIMEOUT)?.ok_or_else(|| {
            AgentError::Protocol(protocol::ProtocolError::Io {
                operation: "read",
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the agent hung up"),
            })
        })?;
        match protocol::decode_body::<Response>(&received.body)? {
            Response::Error(error) => Err(AgentError::Remote {
                kind: error.kind,
                message: error.message,
            }),
            response => Ok((response, received.fd)),
        }
    }

    /// Sends `request` (with `fd`, if any) and waits for the reply; an error reply becomes
    /// [`AgentError::Remote`].
    pub fn request(
        &mut self,
        request: &Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Response, Option<OwnedFd>), AgentError> {
        protocol::send(&self.stream, request, fd)?;
        self.receive()
    }

    fn expect_ok(&mut self, request: &Request) -> Result<(), AgentError> {
        match self.request(request, None)? {
            (Response::Ok, None) => Ok(()),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Checks the agent is alive; returns its mode ("kernel" or "restart").
    pub fn ping(&mut self) -> Result<String, AgentError> {
        match self.request(&Request::Ping, None)? {
            (Response::Pong { mode, .. }, None) => Ok(mode),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Where a kexec stands at a kernel-mode agent: `idle`, `loading` or `loaded`.
    pub fn kexec_status(&mut self) -> Result<String, AgentError> {
        match self.request(&Request::KexecStatus, None)? {
            (Response::KexecStatus { phase }, None) => Ok(phase),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Creates an outgoing session owned by this process's uid.
    pub fn create_session(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::CreateSession { name: name.into() })
    }

    /// Preserves `fd` in outgoing session `name` under `token`.
    pub fn preserve(
        &mut self,
        name: &str,
        fd: BorrowedFd<'_>,
        token: Token,
    ) -> Result<(), AgentError> {
        let request = Request::Preserve {
            name: name.into(),
            token,
        };
        match self.request(&request, Some(fd))? {
            (Response::Ok, None) => Ok(()),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Hands session `name` over (restart mode). In kernel mode the agent freezes it and
    /// answers only if the kexec fails (a `kexec_failed` error) or none starts in time; on
    /// success the call never returns (the machine reboots).
    pub fn handover(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Handover { name: name.into() })
    }

    /// Kernel mode, root only: loads `image` and reboots into it once every outgoing session,
    /// and every session named in `sessions`, is frozen, waiting at most `barrier_timeout`.
    /// Returns only on failure.
    pub fn kexec(
        &mut self,
        image: &super::KexecImage,
        sessions: &[String],
        barrier_timeout: std::time::Duration,
    ) -> AgentError {
        let request = Request::Kexec {
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            cmdline: image.cmdline.clone(),
            timeout_ms: u64::try_from(barrier_timeout.as_millis()).unwrap_or(u64::MAX),
            sessions: sessions.to_vec(),
        };
        match self.request(&request, None) {
            Ok((other, _)) => AgentError::UnexpectedReply(format!("{other:?}")),
            Err(error) => error,
        }
    }

    /// Discards outgoing session `name`, unpreserving its files.
    pub fn cancel(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Cancel { name: name.into() })
    }

    /// Waits up to `timeout` until session `name` is handed over (see
    /// [`Request::WaitHandover`]); a `no_such_session` error when it was not.
    pub fn wait_handover(
        &mut self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<(), AgentError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.expect_ok(&Request::WaitHandover {
            name: name.into(),
            timeout_ms,
        })
    }

    /// Successor started ahead: waits up to `timeout` until the old VMM has preserved `token` in
    /// outgoing session `name` (see [`Request::WaitPrepared`]).
    pub fn wait_prepared(
        &mut self,
        name: &str,
        token: Token,
        timeout: std::time::Duration,
    ) -> Result<(), AgentError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.expect_ok(&Request::WaitPrepared {
            name: name.into(),
            token,
            timeout_ms,
        })
    }

    /// Successor: its VM is built on the session's guest RAM.
    pub fn successor_ready(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::SuccessorReady { name: name.into() })
    }

    /// Old VMM: waits up to `timeout` for a successor that asked for session `name` to be
    /// ready. Returns whether one was waiting and whether it is ready.
    pub fn wait_successor(
        &mut self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<(bool, bool), AgentError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.request(
            &Request::WaitSuccessor {
                name: name.into(),
                timeout_ms,
            },
            None,
        )? {
            (Response::Successor { waiting, ready }, None) => Ok((waiting, ready)),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Retrieves incoming session `name`; the agent keeps it for this uid.
    pub fn retrieve_session(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::RetrieveSession { name: name.into() })
    }

    /// Restart mode: a copy of a file preserved in the caller's outgoing session (see
    /// [`Request::Peek`]).
    pub fn peek(&mut self, name: &str, token: Token) -> Result<OwnedFd, AgentError> {
        let request = Request::Peek {
            name: name.to_string(),
            token,
        };
        match self.request(&request, None)? {
            (Response::Ok, Some(fd)) => Ok(fd),
            (response, _) => Err(AgentError::UnexpectedReply(format!("{response:?}"))),
        }
    }

    /// Retrieves the file under `token` of retrieved session `name`.
    pub fn retrieve_fd(&mut self, name: &str, token: Token) -> Result<OwnedFd, AgentError> {
        let request = Request::RetrieveFd {
            name: name.into(),
            token,
        };
        match self.request(&request, None)? {
            (Response::Ok, Some(fd)) => Ok(fd),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Restart mode: attaches `fd` (any kind of file) to outgoing session `name` under `token`
    /// (see [`Request::Attach`]). A kernel-mode agent refuses with `not_supported`.
    pub fn attach(
        &mut self,
        name: &str,
        fd: BorrowedFd<'_>,
        token: Token,
    ) -> Result<(), AgentError> {
        let request = Request::Attach {
            name: name.into(),
            token,
        };
        match self.request(&request, Some(fd))? {
            (Response::Ok, None) => Ok(()),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// The fd attached under `token` to retrieved session `name`.
    pub fn retrieve_attachment(&mut self, name: &str, token: Token) -> Result<OwnedFd, AgentError> {
        let request = Request::RetrieveAttachment {
            name: name.into(),
            token,
        };
        match self.request(&request, None)? {
            (Response::Ok, Some(fd)) => Ok(fd),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Every fd attached to retrieved session `name`, by token.
    pub fn retrieve_attachments(
        &mut self,
        name: &str,
    ) -> Result<BTreeMap<Token, OwnedFd>, AgentError> {
        let tokens = self
            .list()?
            .into_iter()
            .find(|info| info.name == name && info.direction == super::Direction::Incoming)
            .map(|info| info.attachments)
            .unwrap_or_default();
        let mut fds = BTreeMap::new();
        for token in tokens {
            fds.insert(token, self.retrieve_attachment(name, token)?);
        }
        Ok(fds)
    }

    /// Tells the agent that this process is about to resume the guest of retrieved session
    /// `name`: the agent releases it and refuses it to anyone from then on (see
    /// [`Request::Resumed`]).
    pub fn resumed(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Resumed {
            name: name.into(),
            pid: std::process::id(),
        })
    }

    /// Finishes retrieved session `name`.
    pub fn finish(&mut self, name: &str) -> Result<(), AgentError> {
        self.expect_ok(&Request::Finish { name: name.into() })
    }

    /// The sessions the agent holds.
    pub fn list(&mut self) -> Result<Vec<SessionInfo>, AgentError> {
        match self.request(&Request::List, None)? {
            (Response::Sessions { sessions }, None) => Ok(sessions),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }
}

/// Maps an agent error back to the session error it stands for (same kind, same meaning).
pub fn to_session_error(error: AgentError, name: &str, token: Option<Token>) -> SessionError {
    let kind = match &error {
        AgentError::Remote { kind, .. } => *kind,
        _ => ErrorKind::Unknown,
    };
    let name = name.to_string();
    match (kind, token) {
        (ErrorKind::NotAvailable, _) => SessionError::NotAvailable,
        (ErrorKind::Busy, _) => SessionError::Busy,
        (ErrorKind::IncomingCorrupt, _) => SessionError::IncomingCorrupt,
        (ErrorKind::InvalidName, _) => SessionError::InvalidName { name },
        (ErrorKind::SessionExists, _) => SessionError::SessionExists { name },
        (ErrorKind::NoSuchSession, _) => SessionError::NoSuchSession { name },
        (ErrorKind::TokenExists, Some(token)) => SessionError::TokenExists { token },
        (ErrorKind::NoSuchToken, Some(token)) => SessionError::NoSuchToken { token },
        (ErrorKind::AlreadyRetrieved, Some(token)) => SessionError::AlreadyRetrieved { token },
        (ErrorKind::Unpreservable, _) => SessionError::Unpreservable,
        (ErrorKind::AlreadyPreserved, _) => SessionError::AlreadyPreserved,
        (ErrorKind::NotFinishable, _) => SessionError::NotFinishable,
        _ => SessionError::Os {
            operation: "session agent request",
            source: io::Error::other(error),
        },
    }
}

/// A session held by the agent, used through one shared connection.
#[derive(Debug)]
pub struct AgentSession {
    client: Arc<Mutex<AgentClient>>,
    name: String,
}

impl AgentSession {
    /// Session `name` on `client`'s agent (created or retrieved already).
    pub fn new(client: Arc<Mutex<AgentClient>>, name: &str) -> Self {
        Self {
            client,
            name: name.to_string(),
        }
    }

    fn with_client<T>(
        &self,
        token: Option<Token>,
        op: impl FnOnce(&mut AgentClient, &str) -> Result<T, AgentError>,
    ) -> Result<T, SessionError> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        op(&mut client, &self.name).map_err(|e| to_session_error(e, &self.name, token))
    }

    /// Hands the session over (restart mode).
    pub fn handover(&mut self) -> Result<(), SessionError> {
        self.with_client(None, AgentClient::handover)
    }

    /// Discards the (outgoing) session and unpreserves its files.
    pub fn cancel(&mut self) -> Result<(), SessionError> {
        self.with_client(None, AgentClient::cancel)
    }
}

impl Session for AgentSession {
    fn name(&self) -> Result<String, SessionError> {
        Ok(self.name.clone())
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        self.with_client(Some(token), |client, name| client.preserve(name, fd, token))
    }

    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        self.with_client(Some(token), |client, name| client.retrieve_fd(name, token))
    }

    fn finish(&mut self) -> Result<(), SessionError> {
        self.with_client(None, AgentClient::finish)
    }

    fn mark_resumed(&mut self) -> Result<(), SessionError> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        match client.resumed(&self.name) {
            // An agent older than `resumed`: it keeps the session until finish, as before.
            Err(e) if e.kind() == Some(ErrorKind::BadRequest) => {
                log::warn!(
                    "The agent cannot record that session {:?} resumed ({e}); it is not protected \
                     against a stale restore until finished",
                    self.name
                );
                Ok(())
            }
            result => result.map_err(|e| to_session_error(e, &self.name, None)),
        }
    }

    fn attach_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        let mut client = self.client.lock().unwrap_or_else(PoisonError::into_inner);
        client
            .attach(&self.name, fd, token)
            .map_err(|e| match e.kind() {
                // A kernel-mode agent: nothing but memfds crosses a kexec.
                Some(ErrorKind::NotSupported) => SessionError::AttachmentsUnsupported,
                _ => to_session_error(e, &self.name, Some(token)),
            })
    }

    fn retrieve_attachments(&mut self) -> Result<BTreeMap<Token, OwnedFd>, SessionError> {
        self.with_client(None, AgentClient::retrieve_attachments)
    }
}

/// A [`SessionProvider`] whose sessions the agent holds.
#[derive(Debug, Clone)]
pub struct AgentProvider {
    client: Arc<Mutex<AgentClient>>,
}

impl AgentProvider {
    /// Connects to the agent at `path`.
    pub fn connect(path: &Path) -> Result<Self, AgentError> {
        Ok(Self::new(AgentClient::connect(path)?))
    }

    /// A provider over an existing connection.
    pub fn new(client: AgentClient) -> Self {
        Self {
            client: Arc::new(Mutex::new(client)),
        }
    }
}

impl SessionProvider for AgentProvider {
    fn create_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        let session = AgentSession::new(Arc::clone(&self.client), name);
        session.with_client(None, AgentClient::create_session)?;
        Ok(Box::new(session))
    }

    fn retrieve_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        let session = AgentSession::new(Arc::clone(&self.client), name);
        session.with_client(None, AgentClient::retrieve_session)?;
        Ok(Box::new(session))
    }
}
