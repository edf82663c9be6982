//! The agent's wire format: one message per `sendmsg`, a 12-byte header and a JSON body, with at
//! most one file descriptor as `SCM_RIGHTS`.
//!
//! Header (little endian): `b"LUOD"`, version `u16` (= [`VERSION`]), flags `u16` (= 0: a flag
//! this side does not know is refused rather than ignored), body length `u32` (at most
//! [`MAX_BODY_LEN`]). The body is one [`Request`] or one [`Response`], tagged by `"op"` and
//! `"reply"` respectively. `tests/fuzz_protocol.rs` fuzzes both and the reading of frames.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::session::{SessionError, Token};

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"LUOD";
/// Protocol version in the header.
pub const VERSION: u16 = 1;
/// Size of the header.
pub const HEADER_LEN: usize = 12;
/// Largest accepted body (a `list` of many sessions fits easily).
pub const MAX_BODY_LEN: usize = 256 * 1024;
/// Most file descriptors in one message.
pub const MAX_FDS: usize = 1;

/// Why a message could not be read or written.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The header does not start with [`MAGIC`].
    #[error("Bad magic: not a ch-luod message")]
    BadMagic,
    /// The header names another protocol version.
    #[error("Unsupported protocol version {0}")]
    BadVersion(u16),
    /// The header sets flags (none is defined yet).
    #[error("Unknown header flags {0:#06x}")]
    BadFlags(u16),
    /// The body is longer than [`MAX_BODY_LEN`].
    #[error("Message body of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// More than [`MAX_FDS`] descriptors came with a message (they were closed).
    #[error("Too many file descriptors in one message")]
    TooManyFds,
    /// The body is not a valid message.
    #[error("Malformed message body")]
    BadBody(#[source] serde_json::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("Connection closed in the middle of a message")]
    Truncated,
    /// Reading or writing the socket failed (including a read timeout).
    #[error("Socket {operation} failed")]
    Io {
        /// "read" or "write".
        operation: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// A VMM's request; the agent answers each with one [`Response`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and mode check.
    Ping,
    /// Creates an outgoing session owned by the caller's uid.
    CreateSession {
        /// Session name.
        name: String,
    },
    /// Preserves the attached fd in an outgoing session under `token`.
    Preserve {
        /// Session name.
        name: String,
        /// The file's token.
        token: Token,
    },
    /// Hands an outgoing session over (restart mode) or freezes it for the kexec (kernel mode).
    Handover {
        /// Session name.
        name: String,
    },
    /// `preserve` of the attached fd under `token`, then `handover`, in one round trip (the
    /// state blob goes with the handover while the guest is paused). A preserve that fails
    /// hands nothing over.
    PreserveAndHandover {
        /// Session name.
        name: String,
        /// The file's token.
        token: Token,
    },
    /// Discards an outgoing (or frozen) session and unpreserves its files.
    Cancel {
        /// Session name.
        name: String,
    },
    /// Restart mode only: a copy of the file preserved under `token` in the caller's outgoing
    /// session, before the handover, so a successor VMM started ahead can map guest RAM and
    /// build its VM while the guest still runs. The reply carries the fd. (Both processes run
    /// on the same kernel; across a kexec files exist only after the handover.)
    Peek {
        /// Session name.
        name: String,
        /// The file's token.
        token: Token,
    },
    /// Restart mode, from a successor started ahead: waits until outgoing session `name` holds
    /// a file under `token` (the old VMM has prepared it), is handed over or gone, at most
    /// `timeout_ms` (capped at [`MAX_WAIT_MS`]); then `ok` if the file is there (to `peek`),
    /// else a `no_such_session` or `no_such_token` error. Marks the caller as a waiting
    /// successor, as `peek` does. Spares a successor asking again and again meanwhile.
    WaitPrepared {
        /// Session name.
        name: String,
        /// The file's token.
        token: Token,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// Waits until outgoing session `name` has been handed over (or was already), at most
    /// `timeout_ms` (capped at [`MAX_WAIT_MS`]); then `ok`, else a `no_such_session` error. Lets a
    /// successor started ahead of the update take the session the moment it is handed over.
    WaitHandover {
        /// Session name.
        name: String,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// From the old VMM after its handover (restart mode): waits until the agent holds session
    /// `name` no more (its successor resumed or finished it, or it was dropped), at most
    /// `timeout_ms` (capped at [`MAX_WAIT_MS`]); then `ok`, else a `busy` error. The old VMM
    /// tears its VM down only then, not beside the successor's restore on the same CPUs.
    WaitReleased {
        /// Session name.
        name: String,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// Restart mode, from a successor started ahead: its VM is built on the session's guest RAM
    /// (after a `peek`), so the old VMM may pause the guest.
    SuccessorReady {
        /// Session name.
        name: String,
    },
    /// From the old VMM after prepare: if a successor has asked for this session (`peek`),
    /// waits up to `timeout_ms` (capped at [`MAX_WAIT_MS`]) until it is ready, so that it
    /// builds its VM while the guest still runs. Answered with `successor`.
    WaitSuccessor {
        /// Session name.
        name: String,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// From the old VMM, its successor ready, right before it pauses the guest (restart mode):
    /// waits up to `timeout_ms` (capped at [`MAX_WAIT_MS`]) for a pause slot, so that only a
    /// few guests are paused at once (see [`super::pause_slots`]). Answered with `pause_slot`;
    /// not granted, the VMM pauses all the same.
    WaitPauseSlot {
        /// Session name.
        name: String,
        /// How long to wait, in milliseconds.
        timeout_ms: u64,
    },
    /// Retrieves an incoming session; the agent keeps it for the caller.
    RetrieveSession {
        /// Session name.
        name: String,
    },
    /// Retrieves the file under `token` of a retrieved session; the reply carries the fd.
    RetrieveFd {
        /// Session name.
        name: String,
        /// The file's token.
        token: Token,
    },
    /// What a successor asks first, in one request and one answer (`taken`, carrying the
    /// state file if there is one): waits up to `timeout_ms` (capped at [`MAX_WAIT_MS`]) for
    /// the handover, as `wait_handover`, then retrieves the session and its file under
    /// `state_token`, as `retrieve_session` and `retrieve_fd`. An error answers the retrieve.
    TakeSession {
        /// Session name.
        name: String,
        /// The token of the file the successor reads first (its saved state).
        state_token: Token,
        /// How long to wait for the handover, in milliseconds (0: not at all).
        timeout_ms: u64,
    },
    /// From a successor, once its VM is rebuilt and before its vCPUs start: the guest is about
    /// to run on, so the session's saved state goes stale. The agent releases the session (as
    /// `finish`) and from then on refuses to give it to anyone (a `stale` error naming `pid`
    /// and the time); the successor's later `finish` is still answered `ok`.
    Resumed {
        /// Session name.
        name: String,
        /// The successor's pid, for the refusal's message.
        pid: u32,
    },
    /// Finishes a retrieved session and releases it.
    Finish {
        /// Session name.
        name: String,
    },
    /// Lists the sessions the agent holds.
    List,
    /// Restart mode only: attaches the fd that comes with the request (any kind: a socket, an
    /// eventfd) to outgoing session `name` under `token` (a key of its own, apart from the
    /// preserved files' tokens). It is never given to a kernel: the agent holds it, it moves
    /// with the session at the handover, and it is closed when the session is cancelled or
    /// finished. At most [`MAX_ATTACHMENTS`] per session.
    Attach {
        /// Session name.
        name: String,
        /// The attachment's token.
        token: Token,
    },
    /// The fd attached under `token` to retrieved session `name`; the reply carries it (a new
    /// descriptor of the same open file: the agent keeps its own until FINISH).
    RetrieveAttachment {
        /// Session name.
        name: String,
        /// The attachment's token.
        token: Token,
    },
    /// Where a kexec stands (kernel mode): answered with `kexec_status`.
    KexecStatus,
    /// Kernel mode, root only: checks the target's command line, loads `kernel` (and
    /// `initrd`) with `cmdline` through `kexec_file_load`, waits at most `timeout_ms` until
    /// every outgoing session is frozen, then reboots into it. Answered only on failure (see
    /// [`super::kexec`]).
    Kexec {
        /// The next kernel's image.
        kernel: std::path::PathBuf,
        /// Its initramfs, if any.
        initrd: Option<std::path::PathBuf>,
        /// Its command line.
        cmdline: String,
        /// The barrier's timeout, in milliseconds.
        timeout_ms: u64,
        /// Sessions that must exist (and be frozen) before the reboot, besides every outgoing
        /// one: covers VMMs that have not created their session yet.
        #[serde(default)]
        sessions: Vec<String>,
    },
    /// From a new agent binary (root or the agent's uid) taking over in place: the running
    /// agent, of the same `mode`, stops accepting and answers with `handoff` followed by one
    /// `handoff_fd` per entry (see [`super::upgrade`]). Refused (`busy`) while another
    /// connection is open, e.g. an update in flight.
    Upgrade {
        /// "kernel" or "restart": the new agent's mode.
        mode: String,
    },
    /// From the new agent once it holds every session: the old one answers `ok` and exits
    /// without removing the socket. Any other message (or a hang-up) makes it serve on.
    UpgradeDone,
}

impl Request {
    /// Whether this request must carry exactly one fd.
    pub fn takes_fd(&self) -> bool {
        matches!(
            self,
            Request::Preserve { .. } | Request::PreserveAndHandover { .. } | Request::Attach { .. }
        )
    }
}

/// Most fds attached to one session (each is an open file the agent holds).
pub const MAX_ATTACHMENTS: usize = 64;

/// Longest single `wait_handover` the agent grants.
pub const MAX_WAIT_MS: u64 = 60_000;

/// Where a session stands, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Created; files may be preserved.
    Outgoing,
    /// Kernel mode: handover requested, held frozen until the kexec.
    Frozen,
    /// Restart mode: handed over, waiting to be retrieved.
    HandedOver,
    /// Retrieved; files may be retrieved, then the session finished.
    Incoming,
}

/// One session in a `list` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session name.
    pub name: String,
    /// Where it stands.
    pub direction: Direction,
    /// The uid that owns it (`None`: unknown, e.g. an incoming session from before a kexec).
    pub owner_uid: Option<u32>,
    /// Tokens preserved (outgoing) or retrieved so far (incoming).
    pub tokens: Vec<Token>,
    /// Tokens of the fds attached (restart mode); absent from older agents' replies.
    #[serde(default)]
    pub attachments: Vec<Token>,
}

/// Stable, machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// [`SessionError::NotAvailable`].
    NotAvailable,
    /// [`SessionError::Busy`], or the agent has too many connections.
    Busy,
    /// [`SessionError::IncomingCorrupt`].
    IncomingCorrupt,
    /// [`SessionError::InvalidName`].
    InvalidName,
    /// [`SessionError::SessionExists`].
    SessionExists,
    /// [`SessionError::NoSuchSession`], or no session of that name in the needed state.
    NoSuchSession,
    /// [`SessionError::TokenExists`].
    TokenExists,
    /// [`SessionError::NoSuchToken`].
    NoSuchToken,
    /// [`SessionError::AlreadyRetrieved`].
    AlreadyRetrieved,
    /// [`SessionError::Unpreservable`].
    Unpreservable,
    /// [`SessionError::AlreadyPreserved`].
    AlreadyPreserved,
    /// [`SessionError::WrongDirection`].
    WrongDirection,
    /// [`SessionError::NotFinishable`].
    NotFinishable,
    /// [`SessionError::Os`].
    Os,
    /// The caller's uid does not own the session.
    PermissionDenied,
    /// The operation is not available in this agent's mode (e.g. handover in kernel mode).
    NotSupported,
    /// The session is frozen: nothing may be preserved into it any more.
    Frozen,
    /// The request could not be decoded (bad header, JSON, size or fd count).
    BadRequest,
    /// The kexec failed (load, barrier timeout or reboot); frozen sessions were not handed over.
    KexecFailed,
    /// The session is gone and must not be restored: resumed by a successor already (its
    /// saved state is stale), or abandoned by a VMM that died before handing it over. The
    /// message says which, by whom and when.
    Stale,
    /// A kind this client does not know (a newer agent).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    /// The kind of a session error.
    pub fn of(error: &SessionError) -> Self {
        match error {
            SessionError::NotAvailable => Self::NotAvailable,
            SessionError::Busy => Self::Busy,
            SessionError::IncomingCorrupt => Self::IncomingCorrupt,
            SessionError::InvalidName { .. } => Self::InvalidName,
            SessionError::SessionExists { .. } => Self::SessionExists,
            SessionError::NoSuchSession { .. } => Self::NoSuchSession,
            SessionError::TokenExists { .. } => Self::TokenExists,
            SessionError::NoSuchToken { .. } => Self::NoSuchToken,
            SessionError::AlreadyRetrieved { .. } => Self::AlreadyRetrieved,
            SessionError::Unpreservable => Self::Unpreservable,
            SessionError::AlreadyPreserved => Self::AlreadyPreserved,
            SessionError::WrongDirection { .. } => Self::WrongDirection,
            SessionError::NotFinishable => Self::NotFinishable,
            SessionError::AttachmentsUnsupported => Self::NotSupported,
            SessionError::Os { .. } => Self::Os,
        }
    }
}

/// An error as it travels: a stable kind and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Machine-readable kind.
    pub kind: ErrorKind,
    /// Message, with its causes joined by ": ".
    pub message: String,
}

impl WireError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A session error with its whole source chain in the message.
    pub fn from_session(error: &SessionError) -> Self {
        Self::new(ErrorKind::of(error), error_chain(error))
    }
}

/// `error` and its sources, joined by ": ".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The agent's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Success with nothing to return (a `retrieve_fd` success carries the fd).
    Ok,
    /// Answer to `ping`.
    Pong {
        /// "kernel" or "restart".
        mode: String,
        /// The agent's protocol version.
        version: u16,
    },
    /// Answer to `wait_successor`.
    Successor {
        /// A successor asked for the session.
        waiting: bool,
        /// It said it is ready.
        ready: bool,
    },
    /// Answer to `wait_pause_slot`.
    PauseSlot {
        /// The session holds a slot (false: none came free within the wait).
        granted: bool,
    },
    /// Answer to `kexec_status`.
    KexecStatus {
        /// `idle` (no next kernel loaded), `loading` or `loaded` (the barrier waits for the
        /// sessions to freeze).
        phase: String,
    },
    /// Answer to `upgrade`: the names of the entries that follow, in order.
    Handoff {
        /// Entry names (see [`super::fdstore`]).
        names: Vec<String>,
    },
    /// One entry of a handoff; the message carries its fd.
    HandoffFd {
        /// The entry's name.
        name: String,
    },
    /// Answer to `take_session`: the session is retrieved.
    Taken {
        /// The message carries the state file (false: the session has none under the token;
        /// a `retrieve_fd` then gives the reason).
        state: bool,
        /// The tokens of the session's attachments.
        attachments: Vec<Token>,
    },
    /// Answer to `list`.
    Sessions {
        /// The sessions, sorted by name.
        sessions: Vec<SessionInfo>,
    },
    /// Failure.
    Error(WireError),
}

/// Encodes `message` as header + JSON body.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(message).map_err(ProtocolError::BadBody)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&len| len as usize <= MAX_BODY_LEN)
        .ok_or(ProtocolError::TooLarge(body.len()))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&VERSION.to_le_bytes());
    frame.extend_from_slice(&0u16.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a header and returns the body length it announces.
pub fn decode_header(header: &[u8; HEADER_LEN]) -> Result<usize, ProtocolError> {
    if header[..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != VERSION {
        return Err(ProtocolError::BadVersion(version));
    }
    let flags = u16::from_le_bytes([header[6], header[7]]);
    if flags != 0 {
        return Err(ProtocolError::BadFlags(flags));
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len > MAX_BODY_LEN {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a JSON body; a field the message does not hold is refused.
pub fn decode_body<T: DeserializeOwned + Serialize>(body: &[u8]) -> Result<T, ProtocolError> {
    let message = serde_json::from_slice(body).map_err(ProtocolError::BadBody)?;
    refuse_dropped_fields(body, &message).map_err(ProtocolError::BadBody)?;
    Ok(message)
}

/// serde ignores `deny_unknown_fields` for the unit variants of an internally tagged enum
/// (`{"op":"ping","x":1}` reads as `ping`): a field of the body that the decoded message does
/// not have was dropped, and is refused like any unknown field.
fn refuse_dropped_fields<T: Serialize>(body: &[u8], message: &T) -> Result<(), serde_json::Error> {
    let serde_json::Value::Object(fields) = serde_json::from_slice(body)? else {
        return Ok(());
    };
    let serde_json::Value::Object(kept) = serde_json::to_value(message)? else {
        return Ok(());
    };
    match fields.keys().find(|field| !kept.contains_key(*field)) {
        Some(field) => Err(serde::de::Error::custom(format_args!(
            "unknown field `{field}`"
        ))),
        None => Ok(()),
    }
}

/// Sends `message` and `fd` in one `sendmsg`.
pub fn send<T: Serialize>(
    stream: &UnixStream,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ProtocolError> {
    let frame = encode(message)?;
    let fds: Vec<_> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let sent = stream
        .send_with_fds(&[frame.as_slice()], &fds)
        .map_err(|e| write_error(io::Error::from_raw_os_error(e.errno())))?;
    // A stream socket may take part of a large frame; the fd went with the first byte.
    if sent < frame.len() {
        io::Write::write_all(&mut &*stream, &frame[sent..]).map_err(write_error)?;
    }
    Ok(())
}

fn write_error(source: io::Error) -> ProtocolError {
    ProtocolError::Io {
        operation: "write",
        source,
    }
}

fn read_error(source: io::Error) -> ProtocolError {
    if source.kind() == io::ErrorKind::UnexpectedEof {
        return ProtocolError::Truncated;
    }
    ProtocolError::Io {
        operation: "read",
        source,
    }
}

/// A received message: the raw body and the fd that came with it.
#[derive(Debug)]
pub struct Received {
    /// The JSON body (not yet decoded, so a bad body can still get an error reply).
    pub body: Vec<u8>,
    /// The descriptor sent with the message, if any.
    pub fd: Option<OwnedFd>,
}

/// Receives one message; `Ok(None)` when the peer closed the connection between messages.
///
/// Waiting for a message has no time limit; once its first byte is in, the rest must arrive
/// within `rest_timeout` (so a stalled peer cannot hold the reader forever).
pub fn recv(
    stream: &UnixStream,
    rest_timeout: Duration,
) -> Result<Option<Received>, ProtocolError> {
    stream.set_read_timeout(None).map_err(read_error)?;
    super::sys::wait_readable(&[stream.as_fd()], None).map_err(read_error)?;
    let mut header = [0u8; HEADER_LEN];
    // Room for more fds than allowed, so that one too many is seen rather than silently lost.
    let (got, mut fds) = match crate::sys::recv_with_fds(stream, &mut header, MAX_FDS + 3) {
        Ok(received) => received,
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(ProtocolError::TooManyFds),
        Err(e) => return Err(read_error(e)),
    };
    if got == 0 {
        return Ok(None);
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds);
    }
    let fd = fds.pop();
    stream
        .set_read_timeout(Some(rest_timeout))
        .map_err(read_error)?;
    let mut reader = stream;
    reader.read_exact(&mut header[got..]).map_err(read_error)?;
    let len = decode_header(&header)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(read_error)?;
    Ok(Some(Received { body, fd }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_encode_and_decode() {
        let requests = [
            Request::Ping,
            Request::CreateSession { name: "vm0".into() },
            Request::Preserve {
                name: "vm0".into(),
                token: u64::MAX,
            },
            Request::Handover { name: "vm0".into() },
            Request::Cancel { name: "vm0".into() },
            Request::RetrieveSession { name: "vm0".into() },
            Request::RetrieveFd {
                name: "vm0".into(),
                token: 7,
            },
            Request::TakeSession {
                name: "vm0".into(),
                state_token: 1,
                timeout_ms: 500,
            },
            Request::Resumed {
                name: "vm0".into(),
                pid: 4242,
            },
            Request::WaitReleased {
                name: "vm0".into(),
                timeout_ms: 1000,
            },
            Request::Finish { name: "vm0".into() },
            Request::List,
            Request::Attach {
                name: "vm0".into(),
                token: 2,
            },
            Request::RetrieveAttachment {
                name: "vm0".into(),
                token: 2,
            },
        ];
        for request in requests {
            let frame = encode(&request).unwrap();
            let header: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();

            let len = decode_header(&header).unwrap();
            let decoded: Request = decode_body(&frame[HEADER_LEN..]).unwrap();

            assert_eq!(len, frame.len() - HEADER_LEN);
            assert_eq!(decoded, request);
        }
    }

    #[test]
    fn request_body_is_tagged_json() {
        let frame = encode(&Request::Preserve {
            name: "vm0".into(),
            token: 3,
        })
        .unwrap();

        let body = std::str::from_utf8(&frame[HEADER_LEN..]).unwrap();

        assert_eq!(body, r#"{"op":"preserve","name":"vm0","token":3}"#);
        assert_eq!(&frame[..8], b"LUOD\x01\x00\x00\x00");
    }

    #[test]
    fn error_response_carries_kind_as_snake_case_string() {
        let response = Response::Error(WireError::new(ErrorKind::PermissionDenied, "no"));

        let json = serde_json::to_string(&response).unwrap();

        assert_eq!(
            json,
            r#"{"reply":"error","kind":"permission_denied","message":"no"}"#
        );
        assert_eq!(decode_body::<Response>(json.as_bytes()).unwrap(), response);
    }

    #[test]
    fn a_field_a_reply_does_not_have_is_refused() {
        for body in [
            &br#"{"reply":"ok","sessions":[]}"#[..],
            br#"{"reply":"error","kind":"busy","message":"m","x":1}"#,
        ] {
            let result = decode_body::<Response>(body);

            assert!(
                matches!(&result, Err(ProtocolError::BadBody(e)) if e.to_string().contains("unknown field")),
                "{result:?}"
            );
        }
    }

    #[test]
    fn unknown_error_kind_decodes_as_unknown() {
        let json = br#"{"reply":"error","kind":"from_the_future","message":"m"}"#;

        let response: Response = decode_body(json).unwrap();

        assert_eq!(
            response,
            Response::Error(WireError::new(ErrorKind::Unknown, "m"))
        );
    }

    #[test]
    fn attach_takes_an_fd_and_retrieve_attachment_does_not() {
        let attach = Request::Attach {
            name: "vm0".into(),
            token: 1,
        };
        let retrieve = Request::RetrieveAttachment {
            name: "vm0".into(),
            token: 1,
        };

        let json = String::from_utf8(encode(&attach).unwrap()[HEADER_LEN..].to_vec()).unwrap();

        assert!(attach.takes_fd());
        assert!(!retrieve.takes_fd());
        assert_eq!(json, r#"{"op":"attach","name":"vm0","token":1}"#);
    }

    #[test]
    fn session_info_from_an_older_agent_has_no_attachments() {
        let json = br#"{"name":"a","direction":"outgoing","owner_uid":1,"tokens":[3]}"#;

        let info: SessionInfo = decode_body(json).unwrap();

        assert_eq!(info.tokens, [3]);
        assert!(info.attachments.is_empty());
    }

    #[test]
    fn oversized_body_length_is_refused_in_header() {
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[8..].copy_from_slice(&u32::MAX.to_le_bytes());

        let result = decode_header(&header);

        assert!(
            matches!(result, Err(ProtocolError::TooLarge(_))),
            "{result:?}"
        );
    }

    #[test]
    fn bad_magic_and_version_are_refused() {
        let mut header = *b"NOPE\x01\x00\x00\x00\x00\x00\x00\x00";
        assert!(matches!(
            decode_header(&header),
            Err(ProtocolError::BadMagic)
        ));

        header[..4].copy_from_slice(&MAGIC);
        header[4] = 9;
        assert!(matches!(
            decode_header(&header),
            Err(ProtocolError::BadVersion(9))
        ));
    }

    #[test]
    fn unknown_flags_are_refused() {
        let mut header: [u8; HEADER_LEN] = encode(&Request::Ping).unwrap()[..HEADER_LEN]
            .try_into()
            .unwrap();
        header[7] = 0x80;

        let result = decode_header(&header);

        assert!(
            matches!(result, Err(ProtocolError::BadFlags(0x8000))),
            "{result:?}"
        );
    }

    #[test]
    fn encoding_an_oversized_message_fails() {
        let request = Request::CreateSession {
            name: "x".repeat(MAX_BODY_LEN + 1),
        };

        let result = encode(&request);

        assert!(
            matches!(result, Err(ProtocolError::TooLarge(_))),
            "{result:?}"
        );
    }

    #[test]
    fn bad_json_and_unknown_fields_are_refused() {
        for body in [
            &b"{not json"[..],
            br#"{"op":"explode"}"#,
            br#"{"op":"create_session","name":"a","extra":1}"#,
            br#"{"op":"preserve","name":"a"}"#,
            br#"{"op":"ping","name":null}"#,
            br#"{"op":"list","filter":"a"}"#,
        ] {
            let result = decode_body::<Request>(body);
            assert!(
                matches!(result, Err(ProtocolError::BadBody(_))),
                "{result:?}"
            );
        }
    }

    #[test]
    fn message_with_fd_round_trips_over_a_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        let request = Request::Preserve {
            name: "s".into(),
            token: 1,
        };

        send(&a, &request, Some(std::os::fd::AsFd::as_fd(&file))).unwrap();
        let received = recv(&b, Duration::from_secs(5)).unwrap().unwrap();

        assert_eq!(decode_body::<Request>(&received.body).unwrap(), request);
        assert!(received.fd.is_some());
    }

    #[test]
    fn more_than_one_fd_in_a_message_is_refused() {
        for count in [2, 6] {
            let (a, b) = UnixStream::pair().unwrap();
            let files: Vec<_> = (0..count)
                .map(|_| std::fs::File::open("/proc/self/exe").unwrap())
                .collect();
            let raw: Vec<_> = files.iter().map(AsRawFd::as_raw_fd).collect();
            let frame = encode(&Request::Ping).unwrap();
            a.send_with_fds(&[frame.as_slice()], &raw).unwrap();

            let result = recv(&b, Duration::from_secs(5));

            assert!(
                matches!(result, Err(ProtocolError::TooManyFds)),
                "{count}: {result:?}"
            );
        }
    }

    #[test]
    fn stalled_partial_message_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        io::Write::write_all(&mut &a, &MAGIC).unwrap();

        let result = recv(&b, Duration::from_millis(50));

        assert!(
            matches!(result, Err(ProtocolError::Io { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn close_between_messages_is_end_of_stream() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);

        let result = recv(&b, Duration::from_secs(1)).unwrap();

        assert!(result.is_none());
    }
}
