//! The one trait every piece of VM state implements to take part in a live update.
//!
//! The machine (see [`crate::machine`]) drives participants through the phases in the order it
//! was given them: `prepare` on all (guest running), then `pause` on all, then `save` on all
//! (guest paused), and `resume` in reverse order if anything fails. Restore is not a method: the
//! successor builds each component from its saved `State` plus the files it preserved, through
//! that component's own constructor.
//!
//! A participant's files (memfds, device fds) cross the handover in the session, each under a
//! token the participant records in its `State`; the `State` itself is plain data.

use std::fmt::Debug;
use std::os::fd::BorrowedFd;

use thiserror::Error;

use crate::session::{Session, SessionError, Token};
use crate::state::Versioned;

/// Why a participant could not take part.
#[derive(Debug, Error)]
pub enum ParticipantError {
    /// A session operation failed.
    #[error("Session operation failed")]
    Session(#[source] SessionError),
    /// The participant cannot be carried across this update (e.g. a device the kernel cannot hand
    /// over); the update is refused before the guest is paused.
    #[error("{id} cannot be live-updated: {reason}")]
    Unsupported {
        /// The participant.
        id: String,
        /// Why not.
        reason: String,
    },
    /// Capturing or applying state failed.
    #[error("{id}: {reason}")]
    Failed {
        /// The participant.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// A saved state could not be read back (version, shape, validation).
    #[error("State of {id} is invalid")]
    BadState {
        /// The participant.
        id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Hands files to the session under fresh tokens. Token 0 is reserved for the state blob.
#[derive(Debug)]
pub struct FileSink<'a> {
    session: &'a mut dyn Session,
    next_token: Token,
}

/// The token of the state blob's memfd in every session.
pub const STATE_TOKEN: Token = 0;
/// Tokens below this one are reserved for files a successor looks for by a fixed token (the
/// state blob, guest RAM); the sink hands out tokens from here on.
pub const FIRST_FREE_TOKEN: Token = 16;

impl<'a> FileSink<'a> {
    /// A sink that allocates tokens from [`FIRST_FREE_TOKEN`] upwards.
    pub fn new(session: &'a mut dyn Session) -> Self {
        Self::starting_at(session, FIRST_FREE_TOKEN)
    }

    /// A sink that allocates tokens from `next_token` upwards (the machine keeps counting
    /// across prepare and freeze).
    pub(crate) fn starting_at(session: &'a mut dyn Session, next_token: Token) -> Self {
        Self {
            session,
            next_token,
        }
    }

    /// The token the next file will get.
    pub(crate) fn next_token(&self) -> Token {
        self.next_token
    }

    /// Preserves `fd` and returns its token (record it in the participant's state).
    pub fn preserve(&mut self, fd: BorrowedFd<'_>) -> Result<Token, ParticipantError> {
        let token = self.next_token;
        self.session
            .preserve_fd(fd, token)
            .map_err(ParticipantError::Session)?;
        self.next_token += 1;
        Ok(token)
    }

    /// Preserves `fd` under a reserved token, one of those below [`FIRST_FREE_TOKEN`] other than
    /// [`STATE_TOKEN`], that a successor knows without reading the state.
    pub fn preserve_reserved(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
    ) -> Result<(), ParticipantError> {
        if token == STATE_TOKEN || token >= FIRST_FREE_TOKEN {
            return Err(ParticipantError::Failed {
                id: "session".into(),
                reason: format!("token {token} is not a reserved token"),
            });
        }
        self.session
            .preserve_fd(fd, token)
            .map_err(ParticipantError::Session)
    }

    /// Restart mode only: attaches `fd` (a socket, an eventfd: any kind of file, see
    /// [`Session::attach_fd`]) for the successor and returns its token (record it in the
    /// participant's state). Elsewhere it fails with [`SessionError::AttachmentsUnsupported`],
    /// so a participant that needs it refuses the update in prepare.
    pub fn attach(&mut self, fd: BorrowedFd<'_>) -> Result<Token, ParticipantError> {
        let token = self.next_token;
        self.session
            .attach_fd(fd, token)
            .map_err(ParticipantError::Session)?;
        self.next_token += 1;
        Ok(token)
    }

    /// Whether the host's processes outlive the session (see [`Session::processes_outlive`]):
    /// a participant whose [`Self::attach`] is refused may then leave its peer process to the
    /// successor (a snapshot); otherwise a kexec may come and the peer will be gone.
    pub fn processes_outlive(&self) -> bool {
        self.session.processes_outlive()
    }

    /// Whether a successor may already run (see [`Session::successor_may_run_ahead`]).
    pub fn successor_may_run_ahead(&self) -> bool {
        self.session.successor_may_run_ahead()
    }

    /// Preserves `fd` under the reserved [`STATE_TOKEN`].
    pub(crate) fn preserve_state(&mut self, fd: BorrowedFd<'_>) -> Result<(), ParticipantError> {
        self.session
            .preserve_fd(fd, STATE_TOKEN)
            .map_err(ParticipantError::Session)
    }
}

/// One piece of VM state that takes part in a live update.
pub trait Participant {
    /// What is saved: plain data, no fds (files go through the [`FileSink`], their tokens here),
    /// recorded in the state blob under its type's version.
    type State: Versioned + Debug + Clone + PartialEq;

    /// Stable id, e.g. `memory`, `vcpu/0`, `irqchip`, `serial/com1`.
    fn id(&self) -> String;
    /// Guest still running: do the slow work (preserve guest RAM), refuse early if unsupported.
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError>;
    /// Stop changing guest-visible state (vCPUs, device queues). Pause starts here.
    fn pause(&mut self) -> Result<(), ParticipantError>;
    /// Guest paused everywhere: capture the state; may preserve more files.
    fn save(&mut self, files: &mut FileSink<'_>) -> Result<Self::State, ParticipantError>;
    /// The update was cancelled: carry on exactly as before `pause`.
    fn resume(&mut self) -> Result<(), ParticipantError>;
}

/// A participant with its `State` type erased, so the machine can hold a list of them.
pub trait AnyParticipant {
    /// See [`Participant::id`].
    fn id(&self) -> String;
    /// See [`Participant::prepare`].
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError>;
    /// See [`Participant::pause`].
    fn pause(&mut self) -> Result<(), ParticipantError>;
    /// Saves and wraps the state in its envelope.
    fn save(
        &mut self,
        files: &mut FileSink<'_>,
    ) -> Result<crate::state::Envelope, ParticipantError>;
    /// See [`Participant::resume`].
    fn resume(&mut self) -> Result<(), ParticipantError>;
}

impl<P: Participant> AnyParticipant for P {
    fn id(&self) -> String {
        Participant::id(self)
    }
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Participant::prepare(self, files)
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Participant::pause(self)
    }
    fn save(
        &mut self,
        files: &mut FileSink<'_>,
    ) -> Result<crate::state::Envelope, ParticipantError> {
        let state = Participant::save(self, files)?;
        let id = Participant::id(self);
        crate::state::Envelope::wrap(&id, &state).map_err(|e| ParticipantError::BadState {
            id,
            source: Box::new(e),
        })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Participant::resume(self)
    }
}
