//! Kernel mode's handover: the kexec barrier.
//!
//! A VMM's `handover` freezes its session and is answered only when the outcome is known: the
//! agent holds the reply while a `kexec` request (from `ch-luod kexec`, root only) loads the
//! next kernel with `kexec_file_load`, waits until every outgoing session is frozen (the
//! barrier), and calls `reboot(LINUX_REBOOT_CMD_KEXEC)`. On success no reply is ever sent: the
//! machine is gone, with the frozen VMMs still waiting. If the load fails, the barrier times
//! out, or the reboot returns, the image is unloaded and every frozen session's `handover` is
//! answered with a `kexec_failed` error and the session unfrozen; each VMM then cancels its
//! update (its guest resumes on it) and the `kexec` request gets the error too. A `handover`
//! that sees no `kexec` start within [`HANDOVER_WAIT`] is refused the same way, so no guest stays
//! paused for a kexec that never comes. A session created while a kexec is under way joins its
//! barrier; `kexec` may also name sessions that must exist (VMMs not started yet).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use super::protocol::{ErrorKind, Response, WireError};
use super::state::{AgentState, HandoverMode, no_session};
use crate::sys::kexec;

/// Longest a frozen session's `handover` waits for a `kexec` to start.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(60);
/// Barrier timeout when the request gives none.
pub const DEFAULT_BARRIER_TIMEOUT: Duration = Duration::from_secs(30);

/// The next kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KexecImage {
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The new kernel's command line.
    pub cmdline: String,
}

/// What can be told about a target before loading it: its command line must turn LUO on
/// (`liveupdate=` true) and must not turn KHO off (`kho=` false), or the new kernel drops every
/// session. Whether the target kernel has LUO at all, KHO on by default, and a LUO format and
/// file handlers that read this kernel's sessions cannot be known before it boots; whether the
/// image is a kernel this one can load is `kexec_file_load`'s to say.
pub fn check_target(image: &KexecImage) -> Result<(), String> {
    let value = |name: &str| {
        image
            .cmdline
            .split_ascii_whitespace()
            .filter_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .next_back()
    };
    match value("liveupdate").map(kernel_bool) {
        Some(Some(true)) => {}
        Some(Some(false)) => {
            return Err(format!(
                "The next kernel's command line turns live update off (liveupdate=off): it would drop every session. Command line: {:?}",
                image.cmdline
            ));
        }
        _ => {
            return Err(format!(
                "The next kernel's command line lacks liveupdate=on: without it the new kernel would drop every session. Command line: {:?}",
                image.cmdline
            ));
        }
    }
    if value("kho").map(kernel_bool) == Some(Some(false)) {
        return Err(format!(
            "The next kernel's command line turns Kexec HandOver off (kho=off): the new kernel would drop every session. Command line: {:?}",
            image.cmdline
        ));
    }
    Ok(())
}

/// A kernel boolean parameter's value as the kernel reads it (`kstrtobool`): `None` if it is
/// none.
fn kernel_bool(value: &str) -> Option<bool> {
    let bytes = value.as_bytes();
    match (bytes.first(), bytes.get(1)) {
        (Some(b'y' | b'Y' | b't' | b'T' | b'1'), _) => Some(true),
        (Some(b'n' | b'N' | b'f' | b'F' | b'0'), _) => Some(false),
        (Some(b'o' | b'O'), Some(b'n' | b'N')) => Some(true),
        (Some(b'o' | b'O'), Some(b'f' | b'F')) => Some(false),
        _ => None,
    }
}

/// The system calls behind a kexec (a fake in tests). Shared, so the image is loaded without
/// holding the agent's state (loading takes a while; VMMs go on preparing meanwhile).
pub trait KexecOps: Send + Sync {
    /// Loads `image` for the next reboot.
    fn load(&self, image: &KexecImage) -> io::Result<()>;
    /// Unloads the loaded image.
    fn unload(&self) -> io::Result<()>;
    /// Reboots into the loaded image; returns only on failure.
    fn reboot(&self) -> io::Error;
}

/// How the agent holds its [`KexecOps`].
pub type SharedKexecOps = Arc<dyn KexecOps>;

/// The real thing: `kexec_file_load` and `reboot`.
#[derive(Debug, Default)]
pub struct SystemKexec;

impl KexecOps for SystemKexec {
    fn load(&self, image: &KexecImage) -> io::Result<()> {
        let open = |path: &PathBuf| {
            File::open(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let kernel = open(&image.kernel)?;
        let initrd = image.initrd.as_ref().map(open).transpose()?;
        kexec::kexec_file_load(
            kernel.as_fd(),
            initrd.as_ref().map(AsFd::as_fd),
            &image.cmdline,
        )
    }

    fn unload(&self) -> io::Result<()> {
        kexec::kexec_file_unload()
    }

    fn reboot(&self) -> io::Error {
        kexec::reboot_kexec()
    }
}

/// Where a kexec stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KexecPhase {
    /// None under way.
    Idle,
    /// The image is being loaded.
    Loading,
    /// Image loaded; waiting until every outgoing session is frozen.
    Barrier,
}

/// Kernel mode's kexec barrier (see [`super::kexec`]); the server does the waiting.
impl AgentState {
    fn kexec_error(message: impl Into<String>) -> WireError {
        WireError::new(ErrorKind::KexecFailed, message)
    }

    /// Whether this agent runs in kernel mode (handover means kexec).
    pub fn is_kernel_mode(&self) -> bool {
        matches!(self.handover, HandoverMode::Kexec(_))
    }

    /// Whether no kexec is under way.
    pub fn kexec_idle(&self) -> bool {
        self.kexec == KexecPhase::Idle
    }

    /// The kexec's phase as `kexec_status` names it.
    pub fn kexec_phase_name(&self) -> &'static str {
        match self.kexec {
            KexecPhase::Idle => "idle",
            KexecPhase::Loading => "loading",
            KexecPhase::Barrier => "loaded",
        }
    }

    /// The answer to the frozen session `name`'s held `handover`, once there is one: the
    /// failure of the kexec it waited for, or the session's disappearance (cancelled).
    pub fn handover_verdict(&mut self, name: &str) -> Option<Response> {
        let Some(held) = self.outgoing.get_mut(name) else {
            return Some(Response::Error(no_session(name, "outgoing")));
        };
        held.verdict.take().map(Response::Error)
    }

    /// Gives up the held `handover` of `name` (no kexec started within [`HANDOVER_WAIT`]):
    /// unfreezes the session so its VMM can cancel and resume.
    pub fn abandon_handover(&mut self, name: &str) -> Response {
        if let Some(held) = self.outgoing.get_mut(name) {
            held.frozen = false;
        }
        warn!("session {name:?}: no kexec within {HANDOVER_WAIT:?}; unfrozen");
        Response::Error(Self::kexec_error(format!(
            "No kexec started within {}s; session {name:?} is no longer frozen",
            HANDOVER_WAIT.as_secs()
        )))
    }

    /// Starts a kexec in one go, state held throughout: [`Self::begin_kexec`], load,
    /// [`Self::kexec_loaded`].
    pub fn start_kexec(&mut self, uid: u32, image: &KexecImage) -> Result<(), WireError> {
        let ops = self.begin_kexec(uid, image)?;
        let loaded = ops.load(image);
        self.kexec_loaded(image, loaded)
    }

    /// Starts a kexec of `image` for `uid` (root or the agent's own user); a second one is
    /// refused until it fails, and so is a target that cannot take the sessions
    /// ([`check_target`]). Returns the operations to load the image with (without holding the
    /// state).
    pub fn begin_kexec(
        &mut self,
        uid: u32,
        image: &KexecImage,
    ) -> Result<SharedKexecOps, WireError> {
        if uid != 0 && uid != self.agent_uid {
            return Err(WireError::new(
                ErrorKind::PermissionDenied,
                "Only root or the agent's user may start a kexec",
            ));
        }
        check_target(image).map_err(|why| {
            warn!("kexec refused: {why}");
            Self::kexec_error(why)
        })?;
        if self.kexec != KexecPhase::Idle {
            return Err(WireError::new(
                ErrorKind::Busy,
                "A kexec is under way already",
            ));
        }
        let HandoverMode::Kexec(ops) = &self.handover else {
            return Err(WireError::new(
                ErrorKind::NotSupported,
                "kexec needs kernel mode (ch-luod without --emulate)",
            ));
        };
        self.kexec = KexecPhase::Loading;
        Ok(ops.clone())
    }

    /// The image is loaded (`Ok`) or failed to load: the barrier begins, or the kexec fails
    /// (failing every frozen session's handover).
    pub fn kexec_loaded(
        &mut self,
        image: &KexecImage,
        loaded: io::Result<()>,
    ) -> Result<(), WireError> {
        if let Err(e) = loaded {
            let message = format!(
                "Cannot load {} with kexec_file_load: {e}",
                image.kernel.display()
            );
            return Err(self.fail_kexec(message));
        }
        info!(
            "kexec: {} loaded; waiting for every session to freeze",
            image.kernel.display()
        );
        self.kexec = KexecPhase::Barrier;
        Ok(())
    }

    /// Sessions the barrier waits for: outgoing ones not frozen yet, and those of `expected`
    /// not created yet (sorted, no duplicates).
    pub fn unfrozen_sessions(&self, expected: &[String]) -> Vec<String> {
        let mut pending: Vec<String> = self
            .outgoing
            .iter()
            .filter(|(_, held)| !held.frozen)
            .map(|(name, _)| name.clone())
            .chain(
                expected
                    .iter()
                    .filter(|name| !self.outgoing.contains_key(*name))
                    .cloned(),
            )
            .collect();
        pending.sort();
        pending.dedup();
        pending
    }

    /// Ends a failed kexec: unloads the image and fails every frozen session's handover (the
    /// sessions are unfrozen, their VMMs cancel and resume their guests).
    pub fn fail_kexec(&mut self, message: String) -> WireError {
        if let HandoverMode::Kexec(ops) = &self.handover
            && let Err(e) = ops.unload()
        {
            warn!("kexec: cannot unload the image: {e}");
        }
        warn!("kexec failed: {message}");
        // Dropped with its session: the next kexec preserves a new one.
        self.manifest = None;
        for held in self.outgoing.values_mut().filter(|held| held.frozen) {
            held.frozen = false;
            held.verdict = Some(Self::kexec_error(format!(
                "The kexec failed, the session is not handed over: {message}"
            )));
        }
        self.kexec = KexecPhase::Idle;
        Self::kexec_error(message)
    }

    /// Every session is frozen: reboots into the loaded kernel. Returns only on failure,
    /// with the error (the kexec is failed as by [`Self::fail_kexec`]).
    pub fn reboot(&mut self) -> WireError {
        let HandoverMode::Kexec(ops) = &self.handover else {
            return Self::kexec_error("kexec needs kernel mode");
        };
        let ops = ops.clone();
        self.preserve_manifest();
        info!(
            "kexec: {} session(s) frozen; rebooting",
            self.outgoing.len()
        );
        let error = ops.reboot();
        self.fail_kexec(format!("reboot(LINUX_REBOOT_CMD_KEXEC) failed: {error}"))
    }
}
