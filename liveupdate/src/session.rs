//! One session interface, two providers: the kernel (`/dev/liveupdate`) and a userspace holder
//! with the same semantics (restart mode).
//!
//! Semantics both providers keep (see `../shared/reference/luo.md` §1-2):
//! - session names are unique among *outgoing* sessions (EEXIST); at most 63 bytes, not empty;
//! - files are preserved into an outgoing session under a caller-chosen token, unique within the
//!   session (EEXIST);
//! - an outgoing session whose last handle closes before the handover is discarded with its
//!   files;
//! - after the handover (kexec, or its userspace stand-in) the session is *incoming*: it can be
//!   retrieved once by name, its files retrieved by token, then finished;
//! - preserve on an incoming session, retrieve or finish on an outgoing one: EINVAL.
//!
//! Restart mode adds *attachments*: fds of any kind (a socket, an eventfd) that the session
//! agent (`ch-luod --emulate`) keeps beside the session and gives to the successor with it. They
//! never reach a kernel (LUO carries memfds only), so they exist only in restart mode; every
//! other session refuses them ([`SessionError::AttachmentsUnsupported`]). They are dropped when
//! the session is cancelled or finished.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};

use thiserror::Error;

/// A file's key inside a session.
pub type Token = u64;

/// Longest session name, in bytes (the kernel's 64-byte buffer holds the terminating NUL).
pub const MAX_SESSION_NAME_LEN: usize = 63;

/// Errors of session operations, named for what went wrong rather than for the errno.
#[derive(Debug, Error)]
pub enum SessionError {
    /// `/dev/liveupdate` does not exist: a kernel without LUO, or booted without `liveupdate=on`.
    #[error("/dev/liveupdate is missing: the kernel needs CONFIG_LIVEUPDATE and liveupdate=on")]
    NotAvailable,
    /// Another process holds `/dev/liveupdate` open (it is exclusive).
    #[error("/dev/liveupdate is busy: another process (e.g. a session agent) owns it")]
    Busy,
    /// The kernel could not deserialize the incoming sessions after a kexec.
    #[error("The kernel failed to restore the incoming live-update sessions")]
    IncomingCorrupt,
    /// Empty name, name too long, or a name with a NUL byte.
    #[error("Invalid session name {name:?}: 1 to 63 bytes, no NUL")]
    InvalidName {
        /// The refused name.
        name: String,
    },
    /// An outgoing session with this name exists already.
    #[error("Session {name:?} exists already")]
    SessionExists {
        /// The name.
        name: String,
    },
    /// No incoming session has this name, or it was retrieved already.
    #[error("No incoming session {name:?} (never handed over, or retrieved already)")]
    NoSuchSession {
        /// The name.
        name: String,
    },
    /// The token is used already in this session.
    #[error("Token {token:#x} is used already in this session")]
    TokenExists {
        /// The token.
        token: Token,
    },
    /// No file under this token.
    #[error("No file under token {token:#x}")]
    NoSuchToken {
        /// The token.
        token: Token,
    },
    /// The file under this token was retrieved already (userspace holder: a file is retrieved at
    /// most once; the kernel would return another fd for it, see `emulated.rs`).
    #[error("The file under token {token:#x} was retrieved already")]
    AlreadyRetrieved {
        /// The token.
        token: Token,
    },
    /// The file cannot be preserved (not a shmem memfd, a hugetlb memfd, a device LUO cannot carry).
    #[error("This kind of file cannot be preserved")]
    Unpreservable,
    /// The file is preserved already (in this or another session).
    #[error("The file is preserved already")]
    AlreadyPreserved,
    /// The operation does not fit the session's direction (e.g. preserve on an incoming session).
    #[error("{operation} is not allowed on an {direction} session")]
    WrongDirection {
        /// The refused operation.
        operation: &'static str,
        /// "incoming" or "outgoing".
        direction: &'static str,
    },
    /// This session cannot carry fd attachments (sockets, eventfds): only the session agent
    /// in restart mode holds them.
    #[error("fd attachments exist only in restart mode (ch-luod --emulate)")]
    AttachmentsUnsupported,
    /// A file of the session is not ready to be finished (e.g. a dependency not yet restored).
    #[error("The session cannot be finished yet")]
    NotFinishable,
    /// Any other failure, with the OS error.
    #[error("{operation} failed")]
    Os {
        /// The operation.
        operation: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Checks a session name as the kernel does.
pub fn check_name(name: &str) -> Result<(), SessionError> {
    if name.is_empty() || name.len() > MAX_SESSION_NAME_LEN || name.contains('\0') {
        return Err(SessionError::InvalidName {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// One LUO session (outgoing or incoming).
pub trait Session: Send + std::fmt::Debug {
    /// The session's name.
    fn name(&self) -> Result<String, SessionError>;
    /// Outgoing: preserves `fd` under `token` (the provider keeps its own reference).
    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError>;
    /// Incoming: the file preserved under `token`.
    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError>;
    /// Incoming: releases the session once every file is restored.
    fn finish(&mut self) -> Result<(), SessionError>;
    /// Incoming: the guest is about to run on (its vCPUs start next), so the saved state goes
    /// stale: a holder that could give the session to another successor must refuse to from
    /// now on. Nothing to do where no one else can take the session.
    fn mark_resumed(&mut self) -> Result<(), SessionError> {
        Ok(())
    }
    /// Outgoing, restart mode only: attaches `fd` (any kind of file) under `token`, a key of
    /// its own (not shared with preserved files). Refused by sessions that cannot hold it.
    fn attach_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        let _ = (fd, token);
        Err(SessionError::AttachmentsUnsupported)
    }
    /// Incoming: every fd the previous VMM attached, by token (none where attachments cannot
    /// exist).
    fn retrieve_attachments(&mut self) -> Result<BTreeMap<Token, OwnedFd>, SessionError> {
        Ok(BTreeMap::new())
    }
    /// Whether the host's other processes (a device's server, a socket's peer) still run when
    /// this session is taken up again, so that a participant may leave such a peer to its
    /// successor to find again instead of handing fds over: true for a session taken up on the
    /// same running host kernel while its VM runs on meanwhile (a snapshot); false where a kexec
    /// may come between, which no process outlives (the default: nothing is assumed).
    fn processes_outlive(&self) -> bool {
        false
    }
    /// Whether a successor may already run, building its VM on the files preserved so far
    /// while the guest still runs (restart mode), so that a participant may leave it files
    /// that spare it work in the pause; false where the successor can start only after a kexec
    /// (the default: nothing is assumed).
    fn successor_may_run_ahead(&self) -> bool {
        false
    }
    /// New descriptors of what keeps this session alive, each under a name its provider's
    /// [`SessionProvider::adopt`] understands (the session agent keeps them in systemd's fd
    /// store and passes them to its successor).
    fn export_fds(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        Err(not_exportable("export_fds"))
    }
}

/// Where a session taken back with [`SessionProvider::adopt`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptAs {
    /// Outgoing: files may still be preserved into it; a handle is returned.
    Outgoing,
    /// Handed over, not yet retrieved (restart mode): the provider keeps it, no handle.
    HandedOver,
    /// Retrieved and not finished: a handle is returned.
    Retrieved,
}

fn not_exportable(operation: &'static str) -> SessionError {
    SessionError::Os {
        operation,
        source: io::Error::new(
            io::ErrorKind::Unsupported,
            "this provider cannot pass its sessions to another process",
        ),
    }
}

/// Where sessions come from.
pub trait SessionProvider: Send {
    /// Creates an outgoing session.
    fn create_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError>;
    /// Retrieves an incoming session (once).
    fn retrieve_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError>;
    /// New descriptors of what the provider itself holds (e.g. `/dev/liveupdate`), named.
    fn export_fds(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        Ok(Vec::new())
    }
    /// Takes back a session from the fds its [`Session::export_fds`] gave (in another process).
    fn adopt(
        &mut self,
        name: &str,
        side: AdoptAs,
        fds: Vec<(String, OwnedFd)>,
    ) -> Result<Option<Box<dyn Session>>, SessionError> {
        let _ = (name, side, fds);
        Err(not_exportable("adopt"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_1_to_63_bytes_are_valid() {
        check_name("a").unwrap();
        check_name(&"x".repeat(63)).unwrap();
    }

    #[test]
    fn empty_long_or_nul_names_are_refused() {
        for name in ["", &"x".repeat(64), "a\0b"] {
            assert!(
                matches!(check_name(name), Err(SessionError::InvalidName { .. })),
                "{name:?}"
            );
        }
    }
}
