//! Live update through a session fd the service manager passed (`--liveupdate inherit=NAME`,
//! systemd's `LUOSession=`; see docs/systemd.md). No agent is involved.
//!
//! At boot the session is outgoing: `vm.live-update` prepares and freezes the VM straight into
//! it and leaves the guest paused in this process; the service manager keeps its own fd of the
//! session and carries it across the kexec once this VMM has stopped. Nothing here finishes or
//! drops anything that would cancel the preservation (closing our fd does not: the service
//! manager's fd keeps the session).
//!
//! LUO cannot unpreserve a file, so the session takes one update: once a file is in it, a
//! second `vm.live-update` is refused (409). If the guest is resumed (or rebooted, shut down,
//! deleted) after a successful update because no kexec came, the state saved in the session is
//! overwritten first, so a later kexec carries a state no restore accepts, rather than a stale
//! one beside newer RAM.
//!
//! After the kexec the session is incoming: `--restore source_url=luo://NAME` restores from it
//! and FINISHes it.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use liveupdate::inherited::{InheritedError, InheritedSession, take_session};
use liveupdate::kernel::KernelSession;
use liveupdate::machine::Timings;
use liveupdate::session::{Session, SessionError, Token};
use log::{info, warn};

use super::{LiveUpdateError, state_memfd};
use crate::config::VmConfig;
use crate::state_format::StateFormat;
use crate::vm::Vm;

/// What the inherited session has been used for.
#[derive(Debug)]
enum Use {
    /// Nothing yet: an update may go into it.
    Fresh,
    /// It holds this VM's update; `state` is the saved state's memfd, to void it on a resume.
    Updated { state: File },
    /// It holds files no restore should use (a failed attempt, or a resume after an update).
    Spent { why: &'static str },
    /// It was retrieved for this VM's restore (incoming: it takes no files).
    Restored,
}

/// The session passed by the service manager, and what it was used for.
#[derive(Debug)]
pub struct Inherited {
    session: InheritedSession,
    used: Use,
}

impl Inherited {
    /// Takes the session fd named `name` this process inherited (`LISTEN_FDS`). Call it from
    /// `main` before any thread starts: it unsets `LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`.
    pub fn take(name: &str) -> Result<Self, InheritedError> {
        let session = take_session(Some(name))?;
        info!(
            "Inherited live-update session {:?} (kernel name {:?})",
            session.fd_name(),
            session.kernel_name()
        );
        Ok(Self::new(session))
    }

    /// Wraps a session already taken.
    pub fn new(session: InheritedSession) -> Self {
        Self {
            session,
            used: Use::Fresh,
        }
    }

    /// The name the session was passed under.
    pub fn fd_name(&self) -> &str {
        self.session.fd_name()
    }

    fn check_name(&self, asked: &str) -> Result<(), LiveUpdateError> {
        if self.session.is_named(asked) {
            return Ok(());
        }
        Err(LiveUpdateError::WrongSession {
            asked: asked.to_string(),
            fd_name: self.session.fd_name().to_string(),
            kernel_name: self.session.kernel_name().to_string(),
        })
    }

    /// Checks that an update into session `asked` may start: 400 if it names another session,
    /// 409 if this one was used already.
    pub fn check_update(&self, asked: &str) -> Result<(), LiveUpdateError> {
        self.check_name(asked)?;
        let why = match &self.used {
            Use::Fresh => return Ok(()),
            Use::Updated { .. } => {
                "it holds this VM's live update already: stop the VMM for the kexec, or vm.resume to go on here"
            }
            Use::Spent { why } => why,
            Use::Restored => {
                "it was retrieved for this VM's restore, and an incoming session takes no files"
            }
        };
        Err(LiveUpdateError::SessionUsed {
            session: self.session.fd_name().to_string(),
            why,
        })
    }

    /// Prepares and freezes `vm` into the session. On success the guest stays paused here and
    /// the session is left for the service manager to carry; on failure the guest runs on.
    pub fn run_outgoing(
        &mut self,
        vm: &mut Vm,
        config: &VmConfig,
        format: StateFormat,
        asked: &str,
    ) -> Result<Timings, LiveUpdateError> {
        self.check_update(asked)?;
        let session_error = |source| {
            LiveUpdateError::Session(SessionError::Os {
                operation: "dup of the inherited session fd",
                source,
            })
        };
        let session = self.session.try_clone_session().map_err(session_error)?;
        let preserved = Arc::new(AtomicUsize::new(0));
        let counted = CountingSession {
            inner: session,
            preserved: preserved.clone(),
        };
        let state_file = state_memfd().map_err(LiveUpdateError::StateFile)?;
        let state = state_file.try_clone().map_err(LiveUpdateError::StateFile)?;
        // The service manager carries the session: handing over is keeping still.
        let result = vm.live_update(
            config,
            format,
            Box::new(counted),
            state_file,
            || Ok(()),
            |_| Ok(()),
        );
        match result {
            Ok(timings) => {
                self.used = Use::Updated { state };
                info!(
                    "VM frozen into inherited session {:?}: {:?}; the guest stays paused until the VMM stops",
                    self.session.fd_name(),
                    timings.steps
                );
                Ok(timings)
            }
            Err(error) => {
                if preserved.load(Ordering::Relaxed) > 0 {
                    self.used = Use::Spent {
                        why: "an earlier live-update attempt left files in it (LUO cannot unpreserve them)",
                    };
                }
                Err(LiveUpdateError::Vm(error))
            }
        }
    }

    /// Before the paused VM moves on here (resume, reboot, shutdown, delete) after an update:
    /// voids the state saved in the session, so a later kexec carries no state a restore would
    /// take (guest RAM moves on, or the VM is gone). Does nothing if no update was made.
    pub fn void_update(&mut self) {
        let Use::Updated { state } = &mut self.used else {
            return;
        };
        match void_state(state) {
            Ok(()) => warn!(
                "The VM moves on after its live update: the state in session {:?} is voided; a kexec now restores nothing",
                self.session.fd_name()
            ),
            Err(e) => warn!("Cannot void the saved state in the inherited session: {e}"),
        }
        self.used = Use::Spent {
            why: "the VM moved on here after its live update (the saved state is void)",
        };
    }

    /// The session for a restore from `asked` (its fd name or kernel name).
    pub fn incoming_session(&mut self, asked: &str) -> Result<KernelSession, LiveUpdateError> {
        self.check_name(asked)?;
        let session = self.session.try_clone_session().map_err(|source| {
            LiveUpdateError::Session(SessionError::Os {
                operation: "dup of the inherited session fd",
                source,
            })
        })?;
        self.used = Use::Restored;
        Ok(session)
    }
}

/// Overwrites the state blob's header, so restore refuses it (bad magic). The memfd is
/// preserved, but writes within its size still land.
fn void_state(state: &mut File) -> std::io::Result<()> {
    state.seek(SeekFrom::Start(0))?;
    state.write_all(b"VOIDSTAT")?;
    state.flush()
}

/// The inherited session, counting the files preserved into it.
#[derive(Debug)]
struct CountingSession {
    inner: KernelSession,
    preserved: Arc<AtomicUsize>,
}

impl Session for CountingSession {
    fn name(&self) -> Result<String, SessionError> {
        self.inner.name()
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        self.inner.preserve_fd(fd, token)?;
        self.preserved.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        self.inner.retrieve_fd(token)
    }

    fn finish(&mut self) -> Result<(), SessionError> {
        self.inner.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use liveupdate::state::{self, StateError};

    use super::*;

    fn inherited() -> Inherited {
        // A memfd stands in for the session fd: the naming and use rules need no kernel.
        let fd = liveupdate::sys::memfd_create("session", 0).unwrap();
        Inherited::new(InheritedSession::new(
            "vm",
            "unit-1a2b-vm",
            KernelSession::from_fd(fd),
        ))
    }

    #[test]
    fn update_into_the_fd_name_or_kernel_name_may_start() {
        let inherited = inherited();

        inherited.check_update("vm").unwrap();
        inherited.check_update("unit-1a2b-vm").unwrap();
    }

    #[test]
    fn update_into_another_session_is_a_400_naming_both_names() {
        let err = inherited().check_update("other").unwrap_err();

        assert_eq!(err.status(), 400);
        let message = err.to_string();
        assert!(
            message.contains("\"other\"")
                && message.contains("\"vm\"")
                && message.contains("unit-1a2b-vm"),
            "{message}"
        );
    }

    #[test]
    fn second_update_after_a_successful_one_is_a_409() {
        let mut inherited = inherited();
        inherited.used = Use::Updated {
            state: liveupdate::sys::memfd_create("state", 0).unwrap().into(),
        };

        let err = inherited.check_update("vm").unwrap_err();

        assert_eq!(err.status(), 409);
        assert!(
            err.to_string().contains("holds this VM's live update"),
            "{err}"
        );
    }

    #[test]
    fn resume_after_an_update_voids_the_state_and_spends_the_session() {
        let mut inherited = inherited();
        let mut state: File = liveupdate::sys::memfd_create("state", 0).unwrap().into();
        state
            .write_all(&state::encode(Vec::new()).unwrap())
            .unwrap();
        let mut reader = state.try_clone().unwrap();
        inherited.used = Use::Updated { state };

        inherited.void_update();

        let mut blob = Vec::new();
        reader.seek(SeekFrom::Start(0)).unwrap();
        reader.read_to_end(&mut blob).unwrap();
        assert!(matches!(state::decode(&blob), Err(StateError::BadMagic)));
        let err = inherited.check_update("vm").unwrap_err();
        assert_eq!(err.status(), 409);
        assert!(err.to_string().contains("moved on"), "{err}");
    }

    #[test]
    fn resume_without_an_update_leaves_the_session_fresh() {
        let mut inherited = inherited();

        inherited.void_update();

        inherited.check_update("vm").unwrap();
    }

    #[test]
    fn restore_takes_the_session_by_name_and_forbids_updates_into_it() {
        let mut inherited = inherited();

        let wrong = inherited.incoming_session("other").unwrap_err();
        inherited.incoming_session("vm").unwrap();

        assert!(matches!(wrong, LiveUpdateError::WrongSession { .. }));
        let err = inherited.check_update("vm").unwrap_err();
        assert!(err.to_string().contains("restore"), "{err}");
    }
}
