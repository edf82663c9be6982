//! The fault injector: a test hook, compiled in, that makes a live update fail or die at one
//! exact step, so every row of `docs/faults.md` can be proved by a test.
//!
//! `CHV_TEST_FAULT=<kind>@<step>` in a process's environment arms it for that process:
//! `fail@STEP` makes the step fail with an injected error (as a failing ioctl would), `kill@STEP`
//! makes the process kill itself with SIGKILL at that point (no cleanup, as the OOM killer
//! would). Steps: `prepare`, `pause`, `save`, `handover` (the old VMM), `retrieve`, `restore`,
//! `resume`, `finish` (the successor); `ch-luod` takes `kill@STEP` for any step, at the request
//! that marks it. Where exactly each step's point lies is in `docs/faults.md`.
//!
//! The older `CHV_TEST_LIVE_UPDATE_FAIL_AT=STEP` still means `fail@STEP`. A value that does not
//! parse is refused when the process starts ([`from_env`]), never ignored.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use thiserror::Error;

/// The variable that arms the injector.
pub const FAULT_ENV: &str = "CHV_TEST_FAULT";
/// The older variable: a step name, meaning `fail@STEP`.
pub const LEGACY_FAIL_ENV: &str = "CHV_TEST_LIVE_UPDATE_FAIL_AT";

/// What happens at the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The step fails with an injected error.
    Fail,
    /// The process kills itself with SIGKILL.
    Kill,
}

/// A step of a live update, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStep {
    /// Old VMM, guest running: long-lived resources (guest RAM) go into the session.
    Prepare,
    /// Old VMM: the guest and its devices pause.
    Pause,
    /// Old VMM, guest paused: every state is saved into the session.
    Save,
    /// Old VMM: the session goes to the agent for a successor.
    Handover,
    /// Successor: the session is taken from the agent.
    Retrieve,
    /// Successor: the VM is rebuilt from the saved states.
    Restore,
    /// Successor: the session is marked resumed and the vCPUs start.
    Resume,
    /// Successor: the session is released.
    Finish,
}

impl FaultStep {
    /// Every step, in order.
    pub const ALL: [FaultStep; 8] = [
        FaultStep::Prepare,
        FaultStep::Pause,
        FaultStep::Save,
        FaultStep::Handover,
        FaultStep::Retrieve,
        FaultStep::Restore,
        FaultStep::Resume,
        FaultStep::Finish,
    ];

    /// Its name in `CHV_TEST_FAULT`.
    pub fn name(self) -> &'static str {
        match self {
            FaultStep::Prepare => "prepare",
            FaultStep::Pause => "pause",
            FaultStep::Save => "save",
            FaultStep::Handover => "handover",
            FaultStep::Retrieve => "retrieve",
            FaultStep::Restore => "restore",
            FaultStep::Resume => "resume",
            FaultStep::Finish => "finish",
        }
    }
}

impl fmt::Display for FaultStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultStep {
    type Err = FaultError;

    fn from_str(text: &str) -> Result<Self, FaultError> {
        Self::ALL
            .into_iter()
            .find(|step| step.name() == text)
            .ok_or_else(|| FaultError::Step(text.to_string()))
    }
}

/// One armed fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Fail or kill.
    pub kind: FaultKind,
    /// Where.
    pub step: FaultStep,
}

impl FromStr for Fault {
    type Err = FaultError;

    fn from_str(text: &str) -> Result<Self, FaultError> {
        let (kind, step) = text
            .split_once('@')
            .ok_or_else(|| FaultError::Syntax(text.to_string()))?;
        let kind = match kind {
            "fail" => FaultKind::Fail,
            "kill" => FaultKind::Kill,
            other => return Err(FaultError::Kind(other.to_string())),
        };
        Ok(Self {
            kind,
            step: step.parse()?,
        })
    }
}

/// Why the injector's variable was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FaultError {
    /// Not `<kind>@<step>`.
    #[error("{FAULT_ENV}={0:?} is not <fail|kill>@<step>")]
    Syntax(String),
    /// An unknown kind.
    #[error("unknown fault kind {0:?} in {FAULT_ENV}: expected fail or kill")]
    Kind(String),
    /// An unknown step.
    #[error(
        "unknown live-update step {0:?} in {FAULT_ENV}: expected prepare, pause, save, handover, retrieve, restore, resume or finish"
    )]
    Step(String),
    /// Both variables set.
    #[error("set {FAULT_ENV} or {LEGACY_FAIL_ENV}, not both")]
    Both,
}

/// Reads the injector's variables; `None` when neither is set. Call at start, so a bad value
/// stops the process with this error before anything runs.
pub fn from_env() -> Result<Option<Fault>, FaultError> {
    parse(
        std::env::var(FAULT_ENV).ok().as_deref(),
        std::env::var(LEGACY_FAIL_ENV).ok().as_deref(),
    )
}

fn parse(fault: Option<&str>, legacy: Option<&str>) -> Result<Option<Fault>, FaultError> {
    match (fault, legacy) {
        (Some(_), Some(_)) => Err(FaultError::Both),
        (Some(text), None) => text.parse().map(Some),
        (None, Some(step)) => Ok(Some(Fault {
            kind: FaultKind::Fail,
            step: step.parse()?,
        })),
        (None, None) => Ok(None),
    }
}

/// This process's armed fault (read once; a bad value reads as none, [`from_env`] having
/// refused it at start).
pub fn armed() -> Option<Fault> {
    static ARMED: OnceLock<Option<Fault>> = OnceLock::new();
    *ARMED.get_or_init(|| from_env().ok().flatten())
}

/// Marks reaching `step` in this process: kills the process if `kill@step` is armed, returns the
/// injected error if `fail@step` is.
pub fn reached(step: FaultStep) -> Result<(), String> {
    reached_with(armed(), step)
}

/// Marks reaching `step` where only an injected error fits (before a request): returns it if
/// `fail@step` is armed.
pub fn fail_point(step: FaultStep) -> Result<(), String> {
    reached_with(armed().filter(|f| f.kind == FaultKind::Fail), step)
}

/// Marks reaching `step` where only a death fits (after a request took effect): kills the
/// process if `kill@step` is armed.
pub fn kill_point(step: FaultStep) {
    if let Some(fault) = armed().filter(|f| f.kind == FaultKind::Kill) {
        // Returns only when armed for another step.
        let _ = reached_with(Some(fault), step);
    }
}

/// [`reached`] with `fault` armed.
pub fn reached_with(fault: Option<Fault>, step: FaultStep) -> Result<(), String> {
    match fault {
        Some(Fault {
            kind: FaultKind::Kill,
            step: at,
        }) if at == step => {
            log::warn!("{FAULT_ENV}: killing this process at {step}");
            crate::sys::kill_self()
        }
        Some(Fault {
            kind: FaultKind::Fail,
            step: at,
        }) if at == step => Err(format!("injected failure in {step}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_at_step_parses() {
        let fault: Fault = "kill@restore".parse().unwrap();
        let fail: Fault = "fail@retrieve".parse().unwrap();

        assert_eq!(
            fault,
            Fault {
                kind: FaultKind::Kill,
                step: FaultStep::Restore
            }
        );
        assert_eq!(fail.kind, FaultKind::Fail);
        assert_eq!(fail.step, FaultStep::Retrieve);
    }

    #[test]
    fn bad_values_are_refused_with_what_was_expected() {
        let errors = [
            "restore".parse::<Fault>().unwrap_err(),
            "crash@restore".parse::<Fault>().unwrap_err(),
            "kill@resotre".parse::<Fault>().unwrap_err(),
            "kill@".parse::<Fault>().unwrap_err(),
        ];

        assert!(matches!(errors[0], FaultError::Syntax(_)));
        assert!(errors[1].to_string().contains("expected fail or kill"));
        assert!(errors[2].to_string().contains("\"resotre\""));
        assert!(matches!(errors[3], FaultError::Step(_)));
    }

    #[test]
    fn the_legacy_variable_means_fail_and_both_at_once_are_refused() {
        let legacy = parse(None, Some("save")).unwrap();
        let both = parse(Some("kill@save"), Some("save")).unwrap_err();
        let bad_legacy = parse(None, Some("kill@save")).unwrap_err();

        assert_eq!(
            legacy,
            Some(Fault {
                kind: FaultKind::Fail,
                step: FaultStep::Save
            })
        );
        assert_eq!(both, FaultError::Both);
        assert!(matches!(bad_legacy, FaultError::Step(_)));
    }

    #[test]
    fn only_the_armed_step_fails() {
        let fault = Some(Fault {
            kind: FaultKind::Fail,
            step: FaultStep::Resume,
        });

        let other = reached_with(fault, FaultStep::Restore);
        let armed = reached_with(fault, FaultStep::Resume);

        assert_eq!(other, Ok(()));
        assert_eq!(armed, Err("injected failure in resume".to_string()));
        assert_eq!(reached_with(None, FaultStep::Resume), Ok(()));
    }
}
