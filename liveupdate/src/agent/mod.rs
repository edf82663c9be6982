//! `ch-luod`, the host's session agent, and the client VMMs use to reach it.
//!
//! # Why an agent
//! `/dev/liveupdate` admits one opener per host, and an outgoing session is discarded when its
//! last fd closes, so something that outlives every VMM must own the device and hold the
//! sessions until the handover. `ch-luod` does: it performs every session operation on behalf of
//! the VMMs, which never hold session fds. Kernel mode (`ch-luod --socket PATH`) uses
//! `/dev/liveupdate`; restart mode (`--emulate`) uses the userspace holder
//! ([`crate::emulated::EmulatedProvider`]), where `handover` stands in for the kexec.
//!
//! # Protocol ([`protocol`])
//! A UNIX stream socket (default [`DEFAULT_SOCKET`], mode 0600 or 0660). Each message is one
//! `sendmsg`: a 12-byte header (`b"LUOD"`, version, flags, body length), a JSON body of at most
//! [`protocol::MAX_BODY_LEN`] bytes, and at most one fd as `SCM_RIGHTS`. Requests, tagged by
//! `"op"`: `ping`, `create_session{name}`, `preserve{name,token}` + fd, `handover{name}`,
//! `cancel{name}`, `kexec{kernel,initrd,cmdline,timeout_ms}` (kernel mode, see [`kexec`]),
//! `retrieve_session{name}`, `retrieve_fd{name,token}` (reply carries the fd),
//! `take_session{name,state_token,timeout_ms}` (both at once, after a wait for the handover),
//! `resumed{name,pid}` (the successor is about to run the guest: see Faults below),
//! `finish{name}`, `list`, `attach{name,token}` + fd and `retrieve_attachment{name,token}` (see
//! Attachments below), `wait_pause_slot{name,timeout_ms}` (see Pause slots below),
//! `upgrade{mode}` and `upgrade_done` (a new agent binary taking over, see [`upgrade`]).
//! Replies, tagged by `"reply"`: `ok`, `pong{mode,version}`, `pause_slot{granted}`,
//! `taken{state,attachments}` (+ the state's fd),
//! `sessions{sessions}`, `handoff{names}` and `handoff_fd{name}` + fd, `error{kind,message}`
//! with a stable snake_case
//! [`protocol::ErrorKind`]. A body that is not a valid request gets a `bad_request` reply and the
//! connection goes on; a bad header, an oversized body or more than one fd gets a `bad_request`
//! reply and the connection is closed (the stream cannot be trusted to be in step any more).
//! Once a message has started it must be complete within [`server::MESSAGE_TIMEOUT`].
//!
//! # Retrieval
//! The agent retrieves an incoming session and each of its files from the provider once, and
//! keeps them until FINISH: until then its owner may retrieve the session and any file again
//! (the same open file), so a VMM that refuses the state leaves the session whole for a build
//! that can read it. (The providers themselves hand each file out at most once.)
//!
//! # Attachments (restart mode)
//! A VMM may attach fds of any kind (the connection to an outside device server, an interrupt
//! eventfd) to its outgoing session under tokens of their own. The agent only holds them: they
//! never reach a kernel, which is why kernel mode refuses them (`not_supported`) and a VMM
//! learns in prepare, guest still running, that such a device cannot be carried. At the
//! handover they move with the session; once the successor has retrieved the session it takes
//! them (`list` shows their tokens, `retrieve_attachment` gives each, again and again, as for
//! files); `cancel` and `finish` close the agent's copies. The other end of a socket sees
//! nothing as long as one copy is open, so a device server never sees the VMM change.
//!
//! # Ownership
//! Each connection's uid comes from `SO_PEERCRED`. A session remembers the uid that created it;
//! only that uid may preserve into it, hand it over, cancel it, retrieve it, retrieve its files
//! and finish it (else `permission_denied`). Across a kexec the owners come with the agent's
//! manifest (below); an incoming session no manifest names (the last kernel's agent was an
//! older one, or wrote none) may be retrieved by root or the agent's own uid only.
//!
//! # Across a kexec (kernel mode, [`manifest`])
//! Right before the reboot the agent preserves a session of its own naming every frozen
//! session, its owner and its memfds. The next kernel's agent reads it as it starts: it takes
//! those sessions for their owners and retrieves their memfds (guest RAM, whose page cache LUO
//! rebuilds folio by folio in that call) on a thread of its own, ahead of the VMMs that will
//! ask for them, instead of in their restores.
//!
//! Sessions belong to the agent, not to connections: a connection may close and another one
//! carry on. `cancel` is how the owner drops an outgoing session.
//!
//! # Faults (`docs/faults.md`)
//! The agent watches the process that created each outgoing session (a pidfd): if it exits
//! before the handover (and the session is not frozen for a kexec), its guest died with it, so
//! the session is dropped rather than left pinning RAM. A successor calls `resumed` right before
//! its vCPUs start: the agent then releases the session, as `finish` would, and remembers why;
//! from then on a request for that session (retrieve, its files, a wait) gets a `stale` error
//! saying who resumed it and when, or that its VMM died before the handover, so no successor
//! waits in vain or restores state the guest has moved past. The successor's own `finish` after
//! `resumed` is answered `ok`; a new session of the same name clears the record.
//!
//! # Pause slots (restart mode)
//! A host that updates all its VMs at once would pause every guest at once, and each pause
//! would wait for CPUs the others hold. An old VMM whose successor is ready therefore asks for
//! one of a few pause slots right before it pauses (`ch-luod --pause-slots N`, by default half
//! the host's CPUs), its guest running on while it waits; the slot is free again once the
//! successor has resumed the guest, the update is cancelled, or its lease ran out
//! (`--pause-slot-lease-ms`). See [`pause_slots`].
//!
//! # Not a single point of loss
//! Under systemd (`contrib/systemd/ch-luod.service`) the agent keeps every session in the
//! unit's file descriptor store and takes them back when systemd starts it again
//! ([`fdstore`]); without systemd, `ch-luod --upgrade` hands them to a new binary ([`upgrade`]).
//! `docs/systemd.md` says what a crash costs otherwise.

mod attachments;
pub mod client;
mod ended;
pub mod faults;
pub mod fdstore;
pub mod kexec;
pub mod manifest;
pub mod pause_slots;
pub mod protocol;
pub mod server;
pub mod state;
mod sys;
pub mod upgrade;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use client::{AgentClient, AgentProvider, AgentSession, HeldBack, Taken};
pub use kexec::{KexecImage, KexecOps, SystemKexec};
pub use protocol::{Direction, ErrorKind, Request, Response, SessionInfo};
pub use server::{AgentServer, ShutdownHandle};
pub use state::{AgentState, HandoverMode};

/// Where `ch-luod` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ch-luod.sock";

/// Errors of the agent and its client.
#[derive(Debug, Error)]
pub enum AgentError {
    /// Nobody listens at the socket path.
    #[error("Cannot connect to the session agent at {path} (is ch-luod running?)")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Setting up the agent's socket failed.
    #[error("Cannot {operation} {path}")]
    Setup {
        /// What was being done.
        operation: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another agent serves this socket path.
    #[error("Another ch-luod is serving {path}")]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket path has no file name.
    #[error("Invalid socket path {path}")]
    BadSocketPath {
        /// The path.
        path: PathBuf,
    },
    /// A message could not be sent, received or decoded.
    #[error("Session agent protocol error")]
    Protocol(#[from] protocol::ProtocolError),
    /// The agent refused the request.
    #[error("{message}")]
    Remote {
        /// Machine-readable kind.
        kind: ErrorKind,
        /// The agent's message.
        message: String,
    },
    /// The agent answered with a reply that does not fit the request.
    #[error("Unexpected reply from the agent: {0}")]
    UnexpectedReply(String),
    /// Blocking or waiting for termination signals failed.
    #[error("Signal handling failed")]
    Signal(#[source] io::Error),
}

impl AgentError {
    /// The remote error kind, if the agent refused the request.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            AgentError::Remote { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// The effective uid of this process (the agent's own uid, see [`AgentState::new`]).
pub fn effective_uid() -> u32 {
    sys::effective_uid()
}

/// Blocks SIGTERM and SIGINT in the calling thread and the threads it spawns afterwards, so
/// [`wait_for_termination`] can take them. Call first thing in `main`.
pub fn block_termination_signals() -> Result<(), AgentError> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::block_signal(signal)
            .map_err(|e| AgentError::Signal(io::Error::other(format!("{e:?}"))))?;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked beforehand with [`block_termination_signals`]) and
/// returns its number.
pub fn wait_for_termination() -> Result<i32, AgentError> {
    sys::wait_for_signal(&[libc::SIGTERM, libc::SIGINT]).map_err(AgentError::Signal)
}
