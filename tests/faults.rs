//! The fault table (`docs/faults.md`), one test per row: a live update of the probe guest in
//! restart mode with one process (old VMM, successor or `ch-luod`) made to fail or die with
//! SIGKILL at one step by the fault injector (`CHV_TEST_FAULT=<fail|kill>@<step>`), and the
//! outcome the table promises checked: the guest running on with errors=0, the session
//! restorable by another successor with nothing lost, a stale session refused, no session left
//! at the agent, or a successor that fails clearly instead of waiting.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Agent, ProbeStatus, ProbeVm, VmmProcess, request, require_kvm, scratch_dir};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
/// A successor restores, or gives up, well within this.
const TAKEOVER: Duration = Duration::from_secs(20);
const EXIT: Duration = Duration::from_secs(10);
const CMDLINE: &str = "fill=10 status_ms=100";
/// The last field of the probe's status line with no disk or network.
const LAST_KEY: &str = "uptime_ms";
const FAULT: &str = "CHV_TEST_FAULT";

/// Boots the probe (2 vCPUs, 256 MiB) with the agent configured and `env`, and returns it once
/// its first status line is out.
fn boot(agent: &Agent, dir: &Path, env: &[(&str, &str)]) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let agent = agent.arg();
    let vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cpus: 2,
            memory: "256M",
            cmdline: CMDLINE,
            extra: &["--liveupdate", agent.as_str()],
            env,
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_banner(0, BOOT);
    vmm.next_status(next, LINE);
    vmm
}

/// `vm.live-update` into `session`: the response, or `None` when the VMM died before answering.
fn live_update(vmm: &VmmProcess, session: &str) -> Option<common::Response> {
    let body = serde_json::json!({ "session": session }).to_string();
    request(
        vmm.api_socket.as_ref().unwrap(),
        "PUT",
        "vm.live-update",
        Some(body.as_bytes()),
    )
    .ok()
}

/// The next `count` status lines after line `skip`.
fn statuses(vmm: &VmmProcess, skip: usize, count: usize, timeout: Duration) -> Vec<ProbeStatus> {
    let mut next = skip;
    (0..count)
        .map(|_| {
            let (after, status) = vmm.next_status(next, timeout);
            next = after;
            status
        })
        .collect()
}

/// The last complete status line the process printed (the last may be cut by the pause).
fn last_complete_status(vmm: &VmmProcess) -> ProbeStatus {
    vmm.lines()
        .iter()
        .rev()
        .filter_map(|line| ProbeStatus::parse(line))
        .find(|status| status.fields.contains_key(LAST_KEY))
        .unwrap_or_else(|| panic!("no complete status line in {:?}", vmm.lines()))
}

/// Asserts the guest runs on in `vmm` after line `skip`: three more status lines, counting up,
/// its pattern pages moving and verified, errors=0.
fn assert_runs_on(vmm: &VmmProcess, skip: usize) {
    let after = statuses(vmm, skip, 3, LINE);
    assert!(
        after.windows(2).all(|w| w[1].get("seq") > w[0].get("seq")),
        "{after:?}"
    );
    assert!(after[2].get("pages") > after[0].get("pages"), "{after:?}");
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{after:?}");
        assert_eq!(status.get("tsc_back"), 0, "{after:?}");
    }
}

/// Asserts `successor` carries the guest on from `before` (the old VMM's last complete status):
/// no reboot, the status lines continue, pages move, errors=0.
fn assert_carried_on(successor: &VmmProcess, before: &ProbeStatus) {
    let after = statuses(successor, 0, 3, TAKEOVER);
    let context = format!("before {before:?}, after {after:?}");
    assert!(
        !successor
            .lines()
            .iter()
            .any(|line| line.contains("probe: start")),
        "the guest restarted: {context}"
    );
    // A line the guest was printing at the pause may be split between the two VMMs.
    assert!(
        after[0].get("seq") > before.get("seq") && after[0].get("seq") <= before.get("seq") + 2,
        "status lines do not continue: {context}"
    );
    assert!(
        after[2].get("pages") > after[0].get("pages"),
        "pages stalled: {context}"
    );
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("tsc_back"), 0, "{context}");
    }
}

/// Asserts `successor` gave up within [`TAKEOVER`] with an error naming `what`.
fn assert_fails_clearly(successor: &mut VmmProcess, what: &[&str]) {
    let code = successor.wait_exit(TAKEOVER);
    assert_exited_saying(successor, code, Some(1), what);
}

/// Asserts `vmm` exited with `expected` (`None`: killed by a signal) and said `what`.
fn assert_exited_saying(vmm: &VmmProcess, code: Option<i32>, expected: Option<i32>, what: &[&str]) {
    let stderr = vmm.stderr();
    assert_eq!(code, expected, "{stderr}");
    for said in what {
        assert!(stderr.contains(said), "{said:?} not in:\n{stderr}");
    }
}

fn assert_no_sessions(agent: &Agent) {
    let sessions = agent.sessions();
    assert!(sessions.is_empty(), "sessions left behind: {sessions:?}");
}

// ---- Old VMM ----

/// Old VMM, `fail@step`: the update is cancelled, the guest runs on in the old VMM, nothing is
/// left at the agent, and the error names the injected failure.
fn old_vmm_failure_cancels(step: &str) {
    // Arrange
    require_kvm();
    let dir = scratch_dir(&format!("fault-old-fail-{step}"));
    let agent = Agent::start(&dir);
    let fault = format!("fail@{step}");
    let mut vmm = boot(&agent, &dir.join("old"), &[(FAULT, &fault)]);

    // Act
    let response = live_update(&vmm, "doomed").expect("the old VMM died");
    let after = vmm.lines().len();

    // Assert
    assert!(!response.is_success(), "the update succeeded");
    let messages = response.error_messages().join(" | ");
    assert!(
        messages.contains(&format!("injected failure in {step}")),
        "{messages}"
    );
    assert_runs_on(&vmm, after);
    assert_eq!(vmm.vm_state(), "Running");
    assert!(vmm.is_running());
    assert_no_sessions(&agent);
}

#[test]
fn old_vmm_failing_at_prepare_keeps_the_guest_running() {
    old_vmm_failure_cancels("prepare");
}

#[test]
fn old_vmm_failing_at_pause_keeps_the_guest_running() {
    old_vmm_failure_cancels("pause");
}

#[test]
fn old_vmm_failing_at_save_keeps_the_guest_running() {
    old_vmm_failure_cancels("save");
}

#[test]
fn old_vmm_failing_at_handover_keeps_the_guest_running() {
    old_vmm_failure_cancels("handover");
}

/// Old VMM killed at `step`, before the handover: the guest dies with it (no state is whole
/// anywhere else); the agent drops the session, and a successor waiting for it fails naming
/// what happened instead of waiting.
fn old_vmm_killed_before_handover(step: &str) {
    // Arrange
    require_kvm();
    let dir = scratch_dir(&format!("fault-old-kill-{step}"));
    let agent = Agent::start(&dir);
    let fault = format!("kill@{step}");
    let session = format!("killed-{step}");
    let mut vmm = boot(&agent, &dir.join("old"), &[(FAULT, &fault)]);
    let mut successor = VmmProcess::successor(&agent, &session, &dir.join("new"), &[]);
    successor.wait_until_connected(TAKEOVER);
    let old_pid = vmm.pid();

    // Act
    let response = live_update(&vmm, &session);
    let old_exit = vmm.wait_exit(EXIT);

    // Assert
    assert!(response.is_none(), "the old VMM answered: {response:?}");
    assert_eq!(old_exit, None, "the old VMM was not killed by a signal");
    assert_fails_clearly(
        &mut successor,
        &[
            &format!("Session {session:?} was abandoned"),
            &format!("pid {old_pid}"),
        ],
    );
    assert_no_sessions(&agent);
}

#[test]
fn old_vmm_killed_at_prepare_leaves_no_session_and_the_waiting_successor_says_why() {
    old_vmm_killed_before_handover("prepare");
}

#[test]
fn old_vmm_killed_at_pause_leaves_no_session_and_the_waiting_successor_says_why() {
    old_vmm_killed_before_handover("pause");
}

#[test]
fn old_vmm_killed_at_save_leaves_no_session_and_the_waiting_successor_says_why() {
    old_vmm_killed_before_handover("save");
}

#[test]
fn the_session_of_a_killed_old_vmm_is_dropped_without_anyone_asking() {
    // Arrange: no successor, so no request reaches the agent after the kill.
    require_kvm();
    let dir = scratch_dir("fault-old-kill-unasked");
    let agent = Agent::start(&dir);
    let mut vmm = boot(&agent, &dir.join("old"), &[(FAULT, "kill@save")]);
    let dropped = "session \"unasked\" dropped: its VMM";

    // Act
    live_update(&vmm, "unasked");
    vmm.wait_exit(EXIT);
    let deadline = std::time::Instant::now() + EXIT;
    let log = loop {
        let log = std::fs::read_to_string(dir.join("agent.log")).unwrap();
        if log.contains(dropped) || std::time::Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    // Assert: the agent dropped it when the VMM's connection closed, unasked.
    assert!(log.contains(dropped), "{log}");
    assert_no_sessions(&agent);
}

#[test]
fn old_vmm_killed_right_after_the_handover_loses_nothing() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("fault-old-kill-handover");
    let agent = Agent::start(&dir);
    let mut vmm = boot(&agent, &dir.join("old"), &[(FAULT, "kill@handover")]);

    // Act
    let response = live_update(&vmm, "handed");
    let old_exit = vmm.wait_exit(EXIT);
    let before = last_complete_status(&vmm);
    let successor = VmmProcess::successor(&agent, "handed", &dir.join("new"), &[]);

    // Assert
    assert!(response.is_none(), "the old VMM answered: {response:?}");
    assert_eq!(old_exit, None, "the old VMM was not killed by a signal");
    assert_carried_on(&successor, &before);
    assert_no_sessions(&agent);
}

// ---- Successor ----

/// Hands a running guest over in session `session` and returns the old VMM's last complete
/// status.
fn hand_over(agent: &Agent, dir: &Path, session: &str) -> ProbeStatus {
    let mut old = boot(agent, &dir.join("old"), &[]);
    old.live_update(session);
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    last_complete_status(&old)
}

/// Successor faulted at `fault` before the guest resumed: it stops (exit code `exit`, `None`
/// when killed, saying `says`), the session stays whole, and another successor restores the
/// guest with nothing lost.
fn successor_fault_keeps_the_session(fault: &str, exit: Option<i32>, says: &str) {
    // Arrange
    require_kvm();
    let name = fault.replace('@', "-");
    let dir = scratch_dir(&format!("fault-new-{name}"));
    let agent = Agent::start(&dir);
    let before = hand_over(&agent, &dir, &name);

    // Act
    let mut first =
        VmmProcess::successor_with_env(&agent, &name, &dir.join("first"), &[], &[(FAULT, fault)]);
    let first_exit = first.wait_exit(TAKEOVER);
    let held = agent.sessions();
    let second = VmmProcess::successor(&agent, &name, &dir.join("second"), &[]);

    // Assert
    assert_exited_saying(&first, first_exit, exit, &[says]);
    assert_eq!(held.len(), 1, "the session is not held whole: {held:?}");
    assert_carried_on(&second, &before);
    assert_no_sessions(&agent);
}

#[test]
fn successor_failing_at_retrieve_leaves_the_session_for_another() {
    successor_fault_keeps_the_session(
        "fail@retrieve",
        Some(1),
        "Fault injected for a test: injected failure in retrieve",
    );
}

#[test]
fn successor_killed_at_retrieve_leaves_the_session_for_another() {
    successor_fault_keeps_the_session(
        "kill@retrieve",
        None,
        "CHV_TEST_FAULT: killing this process at retrieve",
    );
}

#[test]
fn successor_failing_at_restore_leaves_the_session_for_another() {
    successor_fault_keeps_the_session(
        "fail@restore",
        Some(1),
        "Fault injected for a test: injected failure in restore",
    );
}

#[test]
fn successor_killed_at_restore_leaves_the_session_for_another() {
    successor_fault_keeps_the_session(
        "kill@restore",
        None,
        "CHV_TEST_FAULT: killing this process at restore",
    );
}

#[test]
fn successor_failing_at_resume_leaves_the_session_for_another() {
    successor_fault_keeps_the_session(
        "fail@resume",
        Some(1),
        "Fault injected for a test: injected failure in resume",
    );
}

/// Successor killed at `step`, after it resumed the guest: the guest died with it, and the
/// stale saved state is refused to the next successor, naming who resumed it; nothing is held.
fn successor_killed_after_resume(step: &str) {
    // Arrange
    require_kvm();
    let dir = scratch_dir(&format!("fault-new-kill-{step}"));
    let agent = Agent::start(&dir);
    let session = format!("resumed-{step}");
    hand_over(&agent, &dir, &session);
    let fault = format!("kill@{step}");

    // Act
    let mut first = VmmProcess::successor_with_env(
        &agent,
        &session,
        &dir.join("first"),
        &[],
        &[(FAULT, &fault)],
    );
    let first_exit = first.wait_exit(TAKEOVER);
    let mut second = VmmProcess::successor(&agent, &session, &dir.join("second"), &[]);

    // Assert
    assert_eq!(first_exit, None, "not killed: {}", first.stderr());
    assert_fails_clearly(
        &mut second,
        &[
            &format!("restored and resumed by pid {}", first.pid()),
            "stale",
        ],
    );
    assert_no_sessions(&agent);
}

#[test]
fn successor_killed_at_resume_leaves_its_stale_state_refused() {
    successor_killed_after_resume("resume");
}

#[test]
fn successor_killed_at_finish_leaves_its_stale_state_refused() {
    successor_killed_after_resume("finish");
}

#[test]
fn successor_failing_at_finish_runs_the_guest_on_and_refuses_its_stale_state() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("fault-new-fail-finish");
    let agent = Agent::start(&dir);
    let before = hand_over(&agent, &dir, "unfinished");

    // Act
    let mut first = VmmProcess::successor_with_env(
        &agent,
        "unfinished",
        &dir.join("first"),
        &[],
        &[(FAULT, "fail@finish")],
    );
    assert_carried_on(&first, &before);
    let mut second = VmmProcess::successor(&agent, "unfinished", &dir.join("second"), &[]);

    // Assert
    assert_fails_clearly(
        &mut second,
        &[
            &format!("restored and resumed by pid {}", first.pid()),
            "stale",
        ],
    );
    assert!(first.is_running(), "{}", first.stderr());
    assert!(
        first.stderr().contains("Cannot finish session"),
        "{}",
        first.stderr()
    );
    assert_runs_on(&first, first.lines().len());
    assert_no_sessions(&agent);
}

// ---- Agent (no systemd: its sessions die with it) ----

/// Agent killed at `step`, before the handover: the old VMM notices (its next request fails),
/// cancels and runs the guest on.
fn agent_killed_before_handover(step: &str) {
    // Arrange
    require_kvm();
    let dir = scratch_dir(&format!("fault-agent-kill-{step}"));
    let fault = format!("kill@{step}");
    let mut agent = Agent::start_with_env(&dir, &[(FAULT, &fault)]);
    let mut vmm = boot(&agent, &dir.join("old"), &[]);

    // Act
    let response = live_update(&vmm, "orphan").expect("the old VMM died");
    let after = vmm.lines().len();

    // Assert
    assert!(!response.is_success(), "the update succeeded");
    assert_eq!(agent.wait_exit(EXIT), None, "the agent was not killed");
    assert_runs_on(&vmm, after);
    assert_eq!(vmm.vm_state(), "Running");
    assert!(vmm.is_running());
}

#[test]
fn agent_killed_at_prepare_leaves_the_guest_running_in_the_old_vmm() {
    agent_killed_before_handover("prepare");
}

#[test]
fn agent_killed_at_pause_leaves_the_guest_running_in_the_old_vmm() {
    agent_killed_before_handover("pause");
}

#[test]
fn agent_killed_at_save_leaves_the_guest_running_in_the_old_vmm() {
    agent_killed_before_handover("save");
}

#[test]
fn agent_killed_at_handover_leaves_the_guest_running_and_the_waiting_successor_fails() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("fault-agent-kill-handover");
    let mut agent = Agent::start_with_env(&dir, &[(FAULT, "kill@handover")]);
    let mut vmm = boot(&agent, &dir.join("old"), &[]);
    let mut successor = VmmProcess::successor(&agent, "orphan", &dir.join("new"), &[]);
    successor.wait_until_connected(TAKEOVER);

    // Act
    let response = live_update(&vmm, "orphan").expect("the old VMM died");
    let after = vmm.lines().len();

    // Assert
    assert!(!response.is_success(), "the update succeeded");
    assert_eq!(agent.wait_exit(EXIT), None, "the agent was not killed");
    assert_runs_on(&vmm, after);
    assert!(vmm.is_running());
    // Blocked in a wait at the agent, or between two requests: either way it names the agent.
    assert_fails_clearly(&mut successor, &["Session agent at"]);
}

/// Agent killed at `step`, after the old VMM handed over and exited: the guest is lost (no
/// systemd keeps the agent's sessions), and the successor fails clearly instead of waiting; so
/// does one started after.
fn agent_killed_after_handover(step: &str) {
    // Arrange
    require_kvm();
    let dir = scratch_dir(&format!("fault-agent-kill-{step}"));
    let fault = format!("kill@{step}");
    let mut agent = Agent::start_with_env(&dir, &[(FAULT, &fault)]);
    hand_over(&agent, &dir, "lost");

    // Act
    let mut successor = VmmProcess::successor(&agent, "lost", &dir.join("new"), &[]);
    let successor_exit = successor.wait_exit(TAKEOVER);
    let mut late = VmmProcess::successor(&agent, "lost", &dir.join("late"), &[]);
    let late_exit = late.wait_exit(TAKEOVER);

    // Assert
    assert_eq!(agent.wait_exit(EXIT), None, "the agent was not killed");
    assert_exited_saying(&successor, successor_exit, Some(1), &["the agent hung up"]);
    assert_exited_saying(&late, late_exit, Some(1), &["is ch-luod running?"]);
}

#[test]
fn agent_killed_at_retrieve_loses_the_guest_and_the_successor_fails_clearly() {
    agent_killed_after_handover("retrieve");
}

#[test]
fn agent_killed_at_restore_loses_the_guest_and_the_successor_fails_clearly() {
    agent_killed_after_handover("restore");
}

#[test]
fn agent_killed_at_resume_loses_the_guest_and_the_successor_does_not_resume_it() {
    agent_killed_after_handover("resume");
}

#[test]
fn agent_killed_at_finish_leaves_the_guest_running_in_the_successor() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("fault-agent-kill-finish");
    let mut agent = Agent::start_with_env(&dir, &[(FAULT, "kill@finish")]);
    let before = hand_over(&agent, &dir, "finishing");

    // Act
    let mut successor = VmmProcess::successor(&agent, "finishing", &dir.join("new"), &[]);
    assert_carried_on(&successor, &before);

    // Assert
    assert_eq!(agent.wait_exit(EXIT), None, "the agent was not killed");
    assert!(successor.is_running(), "{}", successor.stderr());
    assert!(
        successor.stderr().contains("Cannot finish session"),
        "{}",
        successor.stderr()
    );
}

// ---- The hook itself ----

#[test]
fn a_bad_fault_value_stops_the_vmm_and_the_agent_at_start() {
    let dir = scratch_dir("fault-bad-value");
    let vmm = std::process::Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .args(["--api-socket", dir.join("api.sock").to_str().unwrap()])
        .env(FAULT, "kill@resotre")
        .output()
        .unwrap();
    let agent = std::process::Command::new(env!("CARGO_BIN_EXE_ch-luod"))
        .args([
            "--emulate",
            "--socket",
            dir.join("agent.sock").to_str().unwrap(),
        ])
        .env(FAULT, "fail@retrieve")
        .output()
        .unwrap();

    let vmm_stderr = String::from_utf8_lossy(&vmm.stderr);
    let agent_stderr = String::from_utf8_lossy(&agent.stderr);
    assert_eq!(vmm.status.code(), Some(1), "{vmm_stderr}");
    assert!(
        vmm_stderr.contains("unknown live-update step \"resotre\""),
        "{vmm_stderr}"
    );
    assert_eq!(agent.status.code(), Some(1), "{agent_stderr}");
    assert!(agent_stderr.contains("kill@STEP only"), "{agent_stderr}");
}
