//! Confines the VMM's threads with seccomp: each kind of thread (the control loop, vCPUs, the API
//! server, device workers) installs its own allow-list of syscalls when it starts, and a syscall
//! outside it is refused as `--seccomp` says (`docs/security.md`).
//!
//! Filters stack: a thread keeps its creator's filter and adds its own, so a thread may only do
//! what every filter on its chain allows. The control loop's list is therefore the union of all
//! the others plus its own (see [`allowlists`]), and every other thread is created by a thread
//! that runs under it.

pub mod allowlists;
mod sys;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Test hook: names a thread kind (`vmm`, `vcpu`, `api`, `worker`) that, right after installing
/// its filter, makes a syscall outside every allow-list (`chroot` of a path that does not
/// exist), so tests can see what `--seccomp` does with it.
pub const VIOLATE_ENV: &str = "CHV_TEST_SECCOMP_VIOLATE";

/// What the kernel does with a syscall outside the thread's allow-list (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// `true`: the whole process is killed, as by SIGSYS (`SECCOMP_RET_KILL_PROCESS`).
    Kill,
    /// `log`: the syscall is logged by the kernel's audit and then allowed (`SECCOMP_RET_LOG`).
    Log,
    /// `errno`: the syscall fails with EPERM (`SECCOMP_RET_ERRNO`).
    Errno,
    /// `false`: no filter at all.
    Off,
}

impl FromStr for SeccompMode {
    type Err = ConfineError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "true" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "errno" => Ok(Self::Errno),
            "false" => Ok(Self::Off),
            other => Err(ConfineError::BadMode(other.to_string())),
        }
    }
}

impl SeccompMode {
    fn mismatch_action(self) -> SeccompAction {
        match self {
            Self::Kill => SeccompAction::KillProcess,
            Self::Log => SeccompAction::Log,
            // EPERM is what a denied operation returns anywhere else; callers handle it.
            Self::Errno => SeccompAction::Errno(libc::EPERM.unsigned_abs()),
            Self::Off => SeccompAction::Allow,
        }
    }
}

/// The kinds of thread of the VMM, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread's control loop, and the threads doing its work in the background (the
    /// live-update restore, the local-migration receiver's agent): builds, saves, restores and
    /// hands over VMs.
    Vmm,
    /// A vCPU: runs the guest and emulates the device registers it touches.
    Vcpu,
    /// The REST API server: accepts clients and parses their requests.
    Api,
    /// A device's host side: virtio queue workers, console and terminal input.
    Worker,
}

impl ThreadKind {
    /// Every kind, in a fixed order.
    pub const ALL: [Self; 4] = [Self::Vmm, Self::Vcpu, Self::Api, Self::Worker];

    /// The name used in logs and in [`VIOLATE_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Worker => "worker",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why confinement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// `--seccomp` got a value cloud-hypervisor does not take either.
    #[error("--seccomp {0:?}: expected true, false, log or errno")]
    BadMode(String),
    /// The test hook names no thread kind.
    #[error("{VIOLATE_ENV}={0:?}: expected vmm, vcpu, api or worker")]
    BadHook(String),
    /// An allow-list did not compile to BPF.
    #[error("Cannot build the seccomp filter of the {kind} threads")]
    Build {
        /// The thread kind whose filter failed.
        kind: ThreadKind,
        /// What seccompiler said.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error(
        "Cannot install the seccomp filter of the {kind} threads (the kernel needs \
         CONFIG_SECCOMP_FILTER; --seccomp false runs without filters)"
    )]
    Install {
        /// The thread kind whose filter failed.
        kind: ThreadKind,
        /// What seccompiler (the kernel) said.
        #[source]
        source: seccompiler::Error,
    },
    /// [`init`] ran twice.
    #[error("Seccomp filters were set up already")]
    AlreadySet,
}

/// The largest heap of a glibc malloc arena other than the main one (`HEAP_MAX_SIZE` on 64-bit).
const MALLOC_HEAP_MAX: libc::c_int = 64 << 20;

/// The compiled filters, set once by [`init`].
struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
    violate: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every thread kind's filter for `mode` (nothing for [`SeccompMode::Off`]), so that
/// threads only have to install them. Call once, at start, before [`confine_thread`].
pub fn init(mode: SeccompMode) -> Result<(), ConfineError> {
    let violate = match std::env::var(VIOLATE_ENV) {
        Ok(name) => Some(
            ThreadKind::ALL
                .into_iter()
                .find(|kind| kind.name() == name)
                .ok_or(ConfineError::BadHook(name))?,
        ),
        Err(_) => None,
    };
    let mut programs = BTreeMap::new();
    if mode != SeccompMode::Off {
        // glibc's malloc opens files the first time it needs some figures (`sys`): fix them now,
        // the arena limit to glibc's own default (8 per CPU).
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
        if !sys::set_malloc_arena_max(arenas) || !sys::set_malloc_trim_threshold(MALLOC_HEAP_MAX) {
            log::warn!("Cannot set malloc's parameters: a thread may be killed opening a file");
        }
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind, mode)?);
            log::debug!(
                "Seccomp filter of the {kind} threads: {} syscalls",
                allowlists::syscall_count(kind)
            );
        }
    }
    FILTERS
        .set(Filters {
            mode,
            programs,
            violate,
        })
        .map_err(|_| ConfineError::AlreadySet)
}

fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, ConfineError> {
    let build = |source| ConfineError::Build { kind, source };
    let filter = SeccompFilter::new(
        allowlists::rules(kind).map_err(build)?,
        mode.mismatch_action(),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs `kind`'s filter on the calling thread (a no-op without [`init`] or with
/// `--seccomp false`). Threads call it first thing.
pub fn confine_thread(kind: ThreadKind) -> Result<(), ConfineError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    if let Some(program) = filters.programs.get(&kind) {
        seccompiler::apply_filter(program)
            .map_err(|source| ConfineError::Install { kind, source })?;
        log::debug!(
            "Seccomp filter installed on a thread of kind {kind} ({:?})",
            filters.mode
        );
    }
    if filters.violate == Some(kind) {
        violate(kind);
    }
    Ok(())
}

/// [`confine_thread`] for a thread that has no caller to report to: a thread that cannot be
/// confined must not run unconfined, so the process ends.
pub fn confine_thread_or_exit(kind: ThreadKind) {
    if let Err(e) = confine_thread(kind) {
        log::error!("{e}: {}", error_chain(&e));
        std::process::exit(1);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = String::new();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&cause.to_string());
        source = cause.source();
        if source.is_some() {
            text.push_str(": ");
        }
    }
    text
}

/// The test hook: a syscall no allow-list has. Harmless if let through (the path does not
/// exist), so `log` shows the kernel's ENOENT and `errno` shows EPERM.
fn violate(kind: ThreadKind) {
    log::warn!("{VIOLATE_ENV}: a thread of kind {kind} calls chroot, outside its seccomp filter");
    let result = std::os::unix::fs::chroot("/nonexistent/chv-seccomp-test");
    log::warn!("{VIOLATE_ENV}: chroot from a thread of kind {kind} returned {result:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_hypervisors_values_are_the_modes_and_others_are_refused() {
        assert_eq!("true".parse::<SeccompMode>().ok(), Some(SeccompMode::Kill));
        assert_eq!("log".parse::<SeccompMode>().ok(), Some(SeccompMode::Log));
        assert_eq!(
            "errno".parse::<SeccompMode>().ok(),
            Some(SeccompMode::Errno)
        );
        assert_eq!("false".parse::<SeccompMode>().ok(), Some(SeccompMode::Off));

        let refused = "maybe".parse::<SeccompMode>().err().map(|e| e.to_string());

        assert_eq!(
            refused.as_deref(),
            Some("--seccomp \"maybe\": expected true, false, log or errno")
        );
    }

    #[test]
    fn every_kind_compiles_for_every_mode() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Errno] {
                let program = compile(kind, mode);

                assert!(program.is_ok(), "{kind} {mode:?}: {program:?}");
            }
        }
    }
}
