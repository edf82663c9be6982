//! The fault injector in the agent (see [`crate::fault`]): `ch-luod` armed with `kill@STEP`
//! kills itself on the request that marks STEP, before answering it.

use std::sync::OnceLock;

use super::protocol::Request;
use super::state::AgentState;
use crate::fault::{Fault, FaultKind, FaultStep};
use crate::participant::STATE_TOKEN;

static ARMED: OnceLock<Fault> = OnceLock::new();

/// Arms `fault` in this agent; only `kill@STEP` exists for the agent.
pub fn arm(fault: Fault) -> Result<(), String> {
    if fault.kind != FaultKind::Kill {
        return Err(format!(
            "ch-luod takes kill@STEP only, not fail@{}: an agent's failures are its replies",
            fault.step
        ));
    }
    ARMED
        .set(fault)
        .map_err(|_| "the agent's fault is armed already".to_string())
}

/// The steps `request` marks, as the agent sees them: the first preserve (guest RAM) is
/// prepare, `wait_successor` comes right before the pause, preserving the state blob ends save,
/// then `handover` (`preserve_and_handover` is both); a `retrieve_session` of a handed-over
/// session is retrieve, a `retrieve_fd` is restore, then `resumed` and `finish`.
fn steps_of(request: &Request, state: &AgentState) -> &'static [FaultStep] {
    match request {
        Request::Preserve { token, .. } if *token == STATE_TOKEN => &[FaultStep::Save],
        Request::Preserve { .. } => &[FaultStep::Prepare],
        Request::WaitSuccessor { .. } => &[FaultStep::Pause],
        Request::Handover { .. } => &[FaultStep::Handover],
        Request::PreserveAndHandover { .. } => &[FaultStep::Save, FaultStep::Handover],
        Request::RetrieveSession { name } if state.is_handed_over(name) => &[FaultStep::Retrieve],
        Request::RetrieveFd { .. } => &[FaultStep::Restore],
        Request::TakeSession { name, .. } if state.is_handed_over(name) => {
            &[FaultStep::Retrieve, FaultStep::Restore]
        }
        Request::Resumed { .. } => &[FaultStep::Resume],
        Request::Finish { .. } => &[FaultStep::Finish],
        _ => &[],
    }
}

/// Called before the agent handles `request`: dies here if armed for one of its steps.
pub(super) fn before(request: &Request, state: &AgentState) {
    if let Some(fault) = ARMED.get()
        && steps_of(request, state).contains(&fault.step)
    {
        // Only kill is ever armed, so this does not return.
        let _ = crate::fault::reached_with(Some(*fault), fault.step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::tests::{OWNER, create, handover, ok, restart_state};

    #[test]
    fn each_step_is_marked_by_its_request() {
        let (mut state, _) = restart_state();
        let name = || "vm".to_string();
        let preserve = |token| Request::Preserve {
            name: name(),
            token,
        };
        let before_handover = [
            (preserve(1), FaultStep::Prepare),
            (
                Request::WaitSuccessor {
                    name: name(),
                    timeout_ms: 0,
                },
                FaultStep::Pause,
            ),
            (preserve(STATE_TOKEN), FaultStep::Save),
            (Request::Handover { name: name() }, FaultStep::Handover),
        ];
        let state_with_handover = Request::PreserveAndHandover {
            name: name(),
            token: STATE_TOKEN,
        };
        let after_handover = [
            (
                Request::RetrieveSession { name: name() },
                FaultStep::Retrieve,
            ),
            (
                Request::RetrieveFd {
                    name: name(),
                    token: 0,
                },
                FaultStep::Restore,
            ),
            (
                Request::Resumed {
                    name: name(),
                    pid: 1,
                },
                FaultStep::Resume,
            ),
            (Request::Finish { name: name() }, FaultStep::Finish),
        ];
        let waiting = Request::RetrieveSession { name: name() };
        let taking = Request::TakeSession {
            name: name(),
            state_token: STATE_TOKEN,
            timeout_ms: 0,
        };

        ok(&mut state, create("vm"), OWNER, None);
        let not_yet = steps_of(&waiting, &state);
        let not_yet_taken = steps_of(&taking, &state);
        for (request, step) in &before_handover {
            assert_eq!(steps_of(request, &state), [*step], "{request:?}");
        }
        assert_eq!(
            steps_of(&state_with_handover, &state),
            [FaultStep::Save, FaultStep::Handover]
        );
        ok(&mut state, handover("vm"), OWNER, None);
        for (request, step) in &after_handover {
            assert_eq!(steps_of(request, &state), [*step], "{request:?}");
        }
        assert_eq!(
            steps_of(&taking, &state),
            [FaultStep::Retrieve, FaultStep::Restore]
        );
        assert!(
            not_yet.is_empty() && not_yet_taken.is_empty(),
            "a successor polling before the handover"
        );
        assert!(steps_of(&Request::List, &state).is_empty());
    }

    #[test]
    fn the_agent_takes_kill_only() {
        let error = arm(Fault {
            kind: FaultKind::Fail,
            step: FaultStep::Retrieve,
        })
        .unwrap_err();

        assert!(error.contains("kill@STEP only"), "{error}");
        assert!(ARMED.get().is_none());
    }
}
