//! The VMM side: [`AgentClient`] speaks the protocol; [`AgentSession`] and [`AgentProvider`] put
//! it behind the [`Session`]/[`SessionProvider`] traits, so VMM code uses a session the same way
//! whether it is local or held by the agent.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::AgentError;
use super::protocol::{self, ErrorKind, Request, Response, SessionInfo};
use crate::session::{Session, SessionError, SessionProvider, Token};

/// Longest wait for the rest of a reply once it has started.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply as [`AgentClient::request`] gives it.
pub type Reply = Result<(Response, Option<OwnedFd>), AgentError>;

fn expect_ok(reply: (Response, Option<OwnedFd>)) -> Result<(), AgentError> {
    match reply {
        (Response::Ok, None) => Ok(()),
        (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
    }
}

/// The agent closed the connection.
fn hung_up() -> AgentError {
    AgentError::Protocol(protocol::ProtocolError::Io {
        operation: "read",
        source: io::Error::new(io::ErrorKind::UnexpectedEof, "the agent hung up"),
    })
}

/// `error`, or [`hung_up`] if it says the agent is gone: an agent that ended with requests of
/// ours unread (sent together, see [`AgentClient::pipeline`]) resets the connection rather
/// than closing it, and a request still being sent then finds the pipe broken.
fn hung_up_or(error: protocol::ProtocolError) -> AgentError {
    match &error {
        protocol::ProtocolError::Io { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            hung_up()
        }
        _ => error.into(),
    }
}

/// The fd an `ok` reply carries.
fn expect_fd(reply: (Response, Option<OwnedFd>)) -> Result<OwnedFd, AgentError> {
    match reply {
        (Response::Ok, Some(fd)) => Ok(fd),
        (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
    }
}

/// The attachments' tokens of retrieved session `name`, as a `list` reply names them.
fn incoming_attachments(sessions: Vec<SessionInfo>, name: &str) -> Option<Vec<Token>> {
    sessions
        .into_iter()
        .find(|info| info.name == name && info.direction == super::Direction::Incoming)
        .map(|info| info.attachments)
}

/// What [`AgentClient::take_session`] read besides the session: kept by the [`AgentSession`]
/// until the successor asks for them.
#[derive(Debug)]
pub struct Taken {
    state_token: Token,
    /// The file under `state_token`, if the agent gave it (if not, the session asks again and
    /// reports the agent's reason then).
    state: Option<OwnedFd>,
    /// The attachments' tokens, if the list said.
    attachments: Option<Vec<Token>>,
}

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
        let received = match protocol::recv(&self.stream, REPLY_TIMEOUT) {
            Ok(received) => received.ok_or_else(hung_up)?,
            Err(error) => return Err(hung_up_or(error)),
        };
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
        expect_ok(self.request(request, None)?)
    }

    /// Sends `requests` back to back, then reads their replies in order: one round trip for
    /// all (the agent answers a connection's requests one at a time, in order). An error reply
    /// answers its own request only; any other failure leaves the connection out of step and
    /// fails the call.
    pub fn pipeline(&mut self, requests: &[Request]) -> Result<Vec<Reply>, AgentError> {
        for request in requests {
            protocol::send(&self.stream, request, None).map_err(hung_up_or)?;
        }
        requests
            .iter()
            .map(|_| match self.receive() {
                Err(error @ AgentError::Remote { .. }) => Ok(Err(error)),
                other => other.map(Ok),
            })
            .collect()
    }

    /// Retrieves session `name` and, in the same round trip, its file under `state_token` and
    /// the tokens of its attachments: what a successor reads first. `Ok(Err(reason))` if the
    /// session cannot be retrieved (e.g. not handed over yet); `Err` if the connection failed.
    /// With `wait`, first waits up to that long for the handover ([`Request::WaitHandover`]),
    /// in the same round trip too.
    pub fn take_session(
        &mut self,
        name: &str,
        state_token: Token,
        wait: Option<Duration>,
    ) -> Result<Result<Taken, AgentError>, AgentError> {
        let take = Request::TakeSession {
            name: name.into(),
            state_token,
            timeout_ms: wait.map_or(0, |wait| {
                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
            }),
        };
        match self.request(&take, None) {
            Ok((Response::Taken { state, attachments }, fd)) if state == fd.is_some() => {
                Ok(Ok(Taken {
                    state_token,
                    state: fd,
                    attachments: Some(attachments),
                }))
            }
            Ok((other, _)) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
            // An agent older than `take_session` answers that it is no request it knows.
            Err(e) if e.kind() == Some(ErrorKind::BadRequest) => {
                self.take_session_piecewise(name, state_token, wait)
            }
            Err(error @ AgentError::Remote { .. }) => Ok(Err(error)),
            Err(error) => Err(error),
        }
    }

    /// [`Self::take_session`] from an agent without `take_session`: its requests pipelined.
    pub(crate) fn take_session_piecewise(
        &mut self,
        name: &str,
        state_token: Token,
        wait: Option<Duration>,
    ) -> Result<Result<Taken, AgentError>, AgentError> {
        let mut requests = Vec::with_capacity(4);
        if let Some(wait) = wait {
            requests.push(Request::WaitHandover {
                name: name.into(),
                timeout_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            });
        }
        requests.extend([
            Request::RetrieveSession { name: name.into() },
            Request::RetrieveFd {
                name: name.into(),
                token: state_token,
            },
            Request::List,
        ]);
        let mut replies = self.pipeline(&requests)?.into_iter();
        let waited = match wait {
            Some(_) => replies.next(),
            None => None,
        };
        let (Some(retrieved), Some(state), Some(list)) =
            (replies.next(), replies.next(), replies.next())
        else {
            return Err(AgentError::UnexpectedReply(
                "fewer replies than requests".into(),
            ));
        };
        if let Err(error) = retrieved.and_then(expect_ok) {
            // Not handed over (yet) shows in the retrieve's reply; any other trouble with the
            // wait (an agent without it) matters more.
            return Ok(match waited {
                Some(Err(wait_error)) if wait_error.kind() != Some(ErrorKind::NoSuchSession) => {
                    Err(wait_error)
                }
                _ => Err(error),
            });
        }
        let state = state.and_then(expect_fd).ok();
        let attachments = match list {
            Ok((Response::Sessions { sessions }, None)) => incoming_attachments(sessions, name),
            _ => None,
        };
        Ok(Ok(Taken {
            state_token,
            state,
            attachments,
        }))
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

    /// Preserves `fd` under `token` in session `name` and hands the session over, in one round
    /// trip ([`Request::PreserveAndHandover`]); as [`Self::handover`] in kernel mode.
    pub fn preserve_and_handover(
        &mut self,
        name: &str,
        fd: BorrowedFd<'_>,
        token: Token,
    ) -> Result<(), AgentError> {
        expect_ok(self.request(
            &Request::PreserveAndHandover {
                name: name.into(),
                token,
            },
            Some(fd),
        )?)
    }

    /// Hands session `name` over with `held_back` (a file and its token, kept back by an
    /// [`AgentSession::holding_back`]) preserved first, in one round trip; an agent that does
    /// not know [`Request::PreserveAndHandover`] gets the two requests one after the other.
    pub fn hand_over(
        &mut self,
        name: &str,
        held_back: Option<(OwnedFd, Token)>,
    ) -> Result<(), AgentError> {
        let Some((fd, token)) = held_back else {
            return self.handover(name);
        };
        match self.preserve_and_handover(name, fd.as_fd(), token) {
            Err(e) if e.kind() == Some(ErrorKind::BadRequest) => {
                self.preserve(name, fd.as_fd(), token)?;
                self.handover(name)
            }
            result => result,
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

    /// Old VMM after its handover: waits up to `timeout` until the agent holds session `name` no
    /// more (see [`Request::WaitReleased`]); `busy` if it still does.
    pub fn wait_released(&mut self, name: &str, timeout: Duration) -> Result<(), AgentError> {
        self.expect_ok(&Request::WaitReleased {
            name: name.into(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
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

    /// Old VMM, its successor ready: waits up to `timeout` for a pause slot for session `name`
    /// (see [`crate::agent::pause_slots`]). Returns whether it got one.
    pub fn wait_pause_slot(
        &mut self,
        name: &str,
        timeout: std::time::Duration,
    ) -> Result<bool, AgentError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        match self.request(
            &Request::WaitPauseSlot {
                name: name.into(),
                timeout_ms,
            },
            None,
        )? {
            (Response::PauseSlot { granted }, None) => Ok(granted),
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
        expect_fd(self.request(&request, None)?)
    }

    /// Retrieves the file under `token` of retrieved session `name`.
    pub fn retrieve_fd(&mut self, name: &str, token: Token) -> Result<OwnedFd, AgentError> {
        let request = Request::RetrieveFd {
            name: name.into(),
            token,
        };
        expect_fd(self.request(&request, None)?)
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
        expect_fd(self.request(&request, None)?)
    }

    /// Every fd attached to retrieved session `name`, by token.
    pub fn retrieve_attachments(
        &mut self,
        name: &str,
    ) -> Result<BTreeMap<Token, OwnedFd>, AgentError> {
        let tokens = incoming_attachments(self.list()?, name).unwrap_or_default();
        self.retrieve_attachments_of(name, &tokens)
    }

    /// The fds attached under `tokens` to retrieved session `name`, in one round trip.
    fn retrieve_attachments_of(
        &mut self,
        name: &str,
        tokens: &[Token],
    ) -> Result<BTreeMap<Token, OwnedFd>, AgentError> {
        let requests: Vec<_> = tokens
            .iter()
            .map(|&token| Request::RetrieveAttachment {
                name: name.into(),
                token,
            })
            .collect();
        let mut fds = BTreeMap::new();
        for (&token, reply) in tokens.iter().zip(self.pipeline(&requests)?) {
            fds.insert(token, expect_fd(reply?)?);
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

/// Where an [`AgentSession`] keeps the file it holds back for the handover.
pub type HeldBack = Arc<Mutex<Option<OwnedFd>>>;

/// A session held by the agent, used through one shared connection.
#[derive(Debug)]
pub struct AgentSession {
    client: Arc<Mutex<AgentClient>>,
    name: String,
    /// Read with the session ([`AgentClient::take_session`]), given out once.
    taken: Option<Taken>,
    /// The token whose file is not preserved at once but kept here, for the handover.
    held_back: Option<(Token, HeldBack)>,
    /// Whether the agent runs restart-mode updates (see [`Session::successor_may_run_ahead`]).
    restart_mode: bool,
}

impl AgentSession {
    /// Session `name` on `client`'s agent (created or retrieved already).
    pub fn new(client: Arc<Mutex<AgentClient>>, name: &str) -> Self {
        Self {
            client,
            name: name.to_string(),
            taken: None,
            held_back: None,
            restart_mode: false,
        }
    }

    /// Says the agent runs restart-mode updates (its `ping` answered `restart`): a successor
    /// may be running ahead of the handover.
    pub fn in_restart_mode(mut self, restart_mode: bool) -> Self {
        self.restart_mode = restart_mode;
        self
    }

    /// Keeps the file preserved under `token` in `slot` instead of sending it to the agent:
    /// the handover sends it along ([`AgentClient::hand_over`]), one round trip fewer while
    /// the guest is paused (the state blob is the last file preserved before the handover).
    pub fn holding_back(mut self, token: Token, slot: HeldBack) -> Self {
        self.held_back = Some((token, slot));
        self
    }

    /// Session `name`, retrieved by [`AgentClient::take_session`] with what came with it.
    pub fn taken(client: Arc<Mutex<AgentClient>>, name: &str, taken: Taken) -> Self {
        Self {
            taken: Some(taken),
            ..Self::new(client, name)
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

    fn successor_may_run_ahead(&self) -> bool {
        self.restart_mode
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        if let Some((_, slot)) = self.held_back.as_ref().filter(|(held, _)| *held == token) {
            let copy = fd.try_clone_to_owned().map_err(|source| SessionError::Os {
                operation: "dup of a file held back for the handover",
                source,
            })?;
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(copy);
            return Ok(());
        }
        self.with_client(Some(token), |client, name| client.preserve(name, fd, token))
    }

    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        // Given once, as the agent gives a file once.
        let taken = self.taken.as_mut().filter(|t| t.state_token == token);
        if let Some(state) = taken.and_then(|t| t.state.take()) {
            return Ok(state);
        }
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
        match self.taken.as_mut().and_then(|t| t.attachments.take()) {
            Some(tokens) => self.with_client(None, |client, name| {
                client.retrieve_attachments_of(name, &tokens)
            }),
            None => self.with_client(None, AgentClient::retrieve_attachments),
        }
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
