//! Restart-mode live update on real KVM, proved with the probe guest: the old VMM hands the VM
//! over through `ch-luod --emulate`, a fresh successor process takes it over on the same RAM, and
//! the guest never notices beyond a stall. Failures cancel and leave the guest running; a state the
//! successor cannot read is refused and kept.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, ProbeStatus, ProbeVm, VmmProcess, require_kvm, scratch_dir};
use liveupdate::agent::Direction;
use liveupdate::state::{FORMAT_VERSION, MAGIC};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
/// A successor restores well within this (most of it is process start and KVM set-up).
const TAKEOVER: Duration = Duration::from_secs(20);
const EXIT: Duration = Duration::from_secs(10);
/// How long an event may lag behind the guest line it follows.
const EVENT_WAIT: Duration = Duration::from_secs(10);
const CMDLINE: &str = "fill=1 status_ms=100 blk_io=1";
/// The state blob's token and guest RAM's token in every session.
const STATE_TOKEN: u64 = 0;
const RAM_TOKEN: u64 = 1;

/// A 1 MiB disk image with a marker in sector 0.
fn disk_image(dir: &Path) -> String {
    let path = dir.join("disk.img");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"LIVE-UPDATE-DISK").unwrap();
    file.set_len(1 << 20).unwrap();
    format!("path={}", path.display())
}

/// Boots the probe (1 GiB, `cmdline`) with the agent configured and returns it after its banner
/// and first status line: (process, index after that line).
fn boot_old(
    agent: &Agent,
    dir: &Path,
    cpus: u8,
    cmdline: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (VmmProcess, usize) {
    std::fs::create_dir_all(dir).unwrap();
    let agent = agent.arg();
    let mut args = vec!["--liveupdate", agent.as_str()];
    args.extend_from_slice(extra);
    let vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cpus,
            memory: "1G",
            cmdline,
            extra: &args,
            env,
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_banner(0, BOOT);
    let (next, _) = vmm.next_status(next, LINE);
    (vmm, next)
}

/// The last complete status line the process printed. The last line a VMM printed before it
/// exited may be cut short (the guest was paused mid-line); `last_key` is the line's last field.
fn last_complete_status(vmm: &VmmProcess, last_key: &str) -> ProbeStatus {
    vmm.lines()
        .iter()
        .rev()
        .filter_map(|line| ProbeStatus::parse(line))
        .find(|status| status.fields.contains_key(last_key))
        .unwrap_or_else(|| panic!("no complete status line in {:?}", vmm.lines()))
}

/// The next `count` status lines after line `skip`; returns them and the index after the last.
fn statuses(
    vmm: &VmmProcess,
    skip: usize,
    count: usize,
    timeout: Duration,
) -> (Vec<ProbeStatus>, usize) {
    let mut next = skip;
    let mut found = Vec::new();
    for _ in 0..count {
        let (after, status) = vmm.next_status(next, timeout);
        next = after;
        found.push(status);
    }
    (found, next)
}

/// At least three status lines of a successor, and more (up to 20, i.e. 2 s) until `blk_ok`
/// passes `blk_ok_before`: a read may be slow under host load, but not for seconds.
fn statuses_until_blk_progress(successor: &VmmProcess, blk_ok_before: u64) -> Vec<ProbeStatus> {
    let (mut found, mut next) = statuses(successor, 0, 3, TAKEOVER);
    while found.len() < 20 && found[found.len() - 1].get("blk_ok") <= blk_ok_before {
        let (after, status) = successor.next_status(next, LINE);
        next = after;
        found.push(status);
    }
    found
}

fn wait_until_connected(successor: &mut VmmProcess) {
    successor.wait_until_connected(TAKEOVER);
}

/// Asserts one update kept the guest going: `before` is the old VMM's last complete status,
/// `after` the successor's first status lines.
fn assert_guest_carried_on(update: usize, cpus: u8, before: &ProbeStatus, after: &[ProbeStatus]) {
    let first = &after[0];
    let last = &after[after.len() - 1];
    let context = format!("update {update}: before {before:?}, after {after:?}");
    // A line the guest was printing at the pause may be split between the two VMMs.
    assert!(
        first.get("seq") > before.get("seq") && first.get("seq") <= before.get("seq") + 2,
        "status lines do not continue: {context}"
    );
    assert!(
        last.get("pages") > before.get("pages"),
        "pages stalled: {context}"
    );
    assert!(
        last.get("blk_ok") > before.get("blk_ok"),
        "blk_ok stalled: {context}"
    );
    for status in after {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("tsc_back"), 0, "{context}");
        assert_eq!(status.get("blk_err"), 0, "{context}");
        assert_eq!(status.get("cpus"), u64::from(cpus), "{context}");
    }
}

fn assert_survives_20_live_updates(name: &str, cpus: u8) {
    require_kvm();
    let dir = scratch_dir(name);
    let agent = Agent::start(&dir);
    let disk = disk_image(&dir);
    let (mut vmm, _) = boot_old(
        &agent,
        &dir.join("gen0"),
        cpus,
        CMDLINE,
        &["--disk", &disk],
        &[],
    );
    let config_at_boot = vmm.vm_info()["config"].clone();
    let started = Instant::now();

    for update in 1..=20 {
        let session = format!("{name}-{update}");
        let successor_dir = dir.join(format!("gen{update}"));
        // Half the successors wait for the handover (they log its RAM mapped ahead), half
        // start after it.
        let early = (update % 2 == 0).then(|| {
            let mut successor = VmmProcess::successor(&agent, &session, &successor_dir, &["-v"]);
            wait_until_connected(&mut successor);
            successor
        });
        let waited = early.is_some();
        let timings = vmm.live_update(&session);
        let old_exit = vmm.wait_exit(EXIT);
        let before = last_complete_status(&vmm, "blk_err");
        let successor =
            early.unwrap_or_else(|| VmmProcess::successor(&agent, &session, &successor_dir, &[]));
        let after = statuses_until_blk_progress(&successor, before.get("blk_ok"));

        assert_eq!(
            old_exit,
            Some(0),
            "update {update}: old VMM stderr:\n{}",
            vmm.stderr()
        );
        assert!(timings.is_object(), "update {update}: timings {timings}");
        let banners = successor
            .lines()
            .iter()
            .filter(|l| l.contains("probe: start"))
            .count();
        assert_eq!(
            banners,
            0,
            "update {update}: the guest restarted: {:?}",
            successor.lines()
        );
        assert_guest_carried_on(update, cpus, &before, &after);
        // Whether it mapped RAM ahead depends on scheduling; it is informative only.
        let mapped_ahead = successor.stderr().contains("mapped ahead of the handover");
        eprintln!(
            "{name} update {update} (successor {}, RAM mapped ahead: {mapped_ahead}): \
             seq {} -> {}, stall_us {}, status lines until blk_ok rose {}, timings_us {timings}",
            if waited { "first" } else { "after" },
            before.get("seq"),
            after[0].get("seq"),
            after[0].get("stall_us"),
            after.len(),
        );
        vmm = successor;
    }
    let elapsed = started.elapsed();

    let remote = vmm.ch_remote(&["info"]);
    assert!(remote.status.success(), "{remote:?}");
    let info: serde_json::Value = serde_json::from_slice(&remote.stdout).unwrap();
    assert_eq!(info["state"], "Running", "{info}");
    assert_eq!(info["config"], config_at_boot, "{info}");
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
    eprintln!("{name}: 20 live updates took {elapsed:?}");
}

#[test]
fn probe_guest_survives_20_live_updates_on_1_vcpu() {
    assert_survives_20_live_updates("lu20-1cpu", 1);
}

#[test]
fn probe_guest_survives_20_live_updates_on_4_vcpus() {
    assert_survives_20_live_updates("lu20-4cpu", 4);
}

#[test]
fn with_a_successor_ready_ahead_the_answer_comes_once_it_has_taken_the_guest() {
    require_kvm();
    let dir = scratch_dir("answer-after-resume");
    let agent = Agent::start(&dir);
    let (vmm, _) = boot_old(&agent, &dir.join("old"), 1, CMDLINE, &["-v"], &[]);
    let mut successor = VmmProcess::successor(&agent, "answered", &dir.join("new"), &["-v"]);
    wait_until_connected(&mut successor);
    // Past its first look, into its wait for the RAM: the old VMM then waits for it.
    wait_for_log(&successor, "Waiting up to");
    std::thread::sleep(Duration::from_millis(100));

    let timings = vmm.live_update("answered");
    // The successor releases the session right before its vCPUs run (`resumed`).
    let held_at_answer = agent.sessions();

    assert!(timings.is_object(), "{timings}");
    assert!(
        vmm.stderr().contains("is ready"),
        "the successor was not ready before the pause:\n{}",
        vmm.stderr()
    );
    assert!(
        held_at_answer.is_empty(),
        "answered while the agent still held the session: {held_at_answer:?}\n{}",
        successor.stderr()
    );
    wait_until_restored(&successor);
}

#[test]
fn a_successor_ready_ahead_has_the_disks_msi_routes_before_the_pause_and_the_disk_works_on() {
    require_kvm();
    let dir = scratch_dir("routes-ahead");
    let agent = Agent::start(&dir);
    let disk = disk_image(&dir);
    let (vmm, _) = boot_old(
        &agent,
        &dir.join("old"),
        1,
        CMDLINE,
        &["--disk", &disk],
        &[],
    );
    let mut successor = VmmProcess::successor(&agent, "routed", &dir.join("new"), &["-v"]);
    wait_until_connected(&mut successor);
    wait_for_log(&successor, "Waiting up to");
    let before = last_complete_status(&vmm, "blk_err");

    let timings = vmm.live_update("routed");
    let after = statuses_until_blk_progress(&successor, before.get("blk_ok"));

    assert!(timings.is_object(), "{timings}");
    let stderr = successor.stderr();
    let set_ahead = stderr
        .lines()
        .find(|line| line.contains("MSI routes of session \"routed\" set ahead"));
    // The disk's MSI-X vectors are one group (the probe has no other PCI device).
    assert!(
        set_ahead.is_some_and(|line| !line.contains("(0 groups)")),
        "no routes set ahead:\n{stderr}"
    );
    assert_guest_carried_on(1, 1, &before, &after);
}

#[test]
fn a_guest_runs_on_until_the_agent_has_a_pause_slot_for_it_then_pauses_for_its_update() {
    require_kvm();
    let dir = scratch_dir("pause-slot");
    let agent = Agent::start_with_args(
        &dir,
        &["--pause-slots", "1", "--pause-slot-lease-ms", "60000"],
    );
    // Another guest's update holds the host's one pause slot.
    let mut other = agent.client();
    other.create_session("other").unwrap();
    assert!(other.wait_pause_slot("other", Duration::ZERO).unwrap());
    let (vmm, next) = boot_old(&agent, &dir.join("old"), 1, CMDLINE, &["-v"], &[]);
    let mut successor = VmmProcess::successor(&agent, "slotted", &dir.join("new"), &["-v"]);
    wait_until_connected(&mut successor);
    wait_for_log(&successor, "Waiting up to");

    std::thread::scope(|scope| {
        let update = scope.spawn(|| vmm.live_update("slotted"));
        wait_for_log(&vmm, "is ready");
        // The guest runs on in the old VMM meanwhile: status lines keep coming.
        let (next, _) = vmm.next_status(next, LINE);
        let (_, _) = vmm.next_status(next, LINE);
        let waited = !update.is_finished() && !successor.stderr().contains("VM restored");

        other.cancel("other").unwrap();
        let timings = update.join().unwrap();

        assert!(waited, "updated while another guest held the pause slot");
        assert!(timings.is_object(), "{timings}");
    });
    wait_until_restored(&successor);
}

/// The nice value of each thread of process `pid`, by thread name.
fn thread_nice_values(pid: u32) -> Vec<(String, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            let (head, fields) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_string();
            // Field 19 of stat is the nice value; the first after the name is field 3.
            let nice = fields.split_whitespace().nth(16)?.parse().ok()?;
            Some((name, nice))
        })
        .collect()
}

#[test]
fn the_pause_runs_at_a_raised_priority_and_the_successors_threads_go_back_to_their_own() {
    require_kvm();
    let dir = scratch_dir("pause-priority");
    let agent = Agent::start(&dir);
    let (vmm, _) = boot_old(&agent, &dir.join("old"), 2, CMDLINE, &["-v"], &[]);
    let mut successor = VmmProcess::successor(&agent, "raised", &dir.join("new"), &["-v"]);
    wait_until_connected(&mut successor);
    wait_for_log(&successor, "Waiting up to");

    let timings = vmm.live_update("raised");
    wait_until_restored(&successor);
    let (next, _) = successor.next_status(0, LINE);
    successor.next_status(next, LINE);

    assert!(timings.is_object(), "{timings}");
    // The agent answers in every pause: it runs raised for good (ch-luod --nice, -10).
    let agent_nice = thread_nice_values(agent.pid());
    assert!(
        agent_nice.iter().all(|(_, nice)| *nice == -10),
        "{agent_nice:?}"
    );
    // The old VMM's driving thread and 2 vCPU threads, the successor's restoring thread and
    // its 2 vCPU threads made ahead.
    for (who, log) in [("old", vmm.stderr()), ("successor", successor.stderr())] {
        assert!(
            log.contains("3 threads raised to nice -10 for the pause"),
            "{who}:\n{log}"
        );
    }
    // The guest runs on at the successor's own priority, and nothing it started since (device
    // threads, queue workers) inherited the raised one.
    let successor_nice = thread_nice_values(successor.pid());
    assert!(successor_nice.iter().any(|(name, _)| name == "vcpu1"));
    assert!(
        successor_nice.iter().all(|(_, nice)| *nice == 0),
        "{successor_nice:?}"
    );
}

fn wait_until_restored(successor: &VmmProcess) {
    wait_for_log(successor, "VM restored from session");
}

/// Waits until `vmm` has logged `text`.
fn wait_for_log(vmm: &VmmProcess, text: &str) {
    let deadline = Instant::now() + TAKEOVER;
    while !vmm.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} within {TAKEOVER:?}:\n{}",
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_clock_keeps_real_time_across_an_update() {
    require_kvm();
    let dir = scratch_dir("lu-clock");
    let agent = Agent::start(&dir);
    let (mut old, next) = boot_old(
        &agent,
        &dir.join("old"),
        2,
        "fill=1 status_ms=100",
        &[],
        &[],
    );
    let (_, before) = old.next_status(next.max(old.lines().len()), LINE);
    let before_at = Instant::now();

    old.live_update("clock");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    // Long enough that a guest TSC carried over unadjusted would lag far behind.
    std::thread::sleep(Duration::from_secs(2));
    let successor = VmmProcess::successor(&agent, "clock", &dir.join("new"), &[]);
    let (after, _) = statuses(&successor, 0, 2, TAKEOVER);
    let after_at = Instant::now();

    let host_ms = u64::try_from((after_at - before_at).as_millis()).unwrap();
    let first_ms = after[0].get("uptime_ms");
    let guest_ms = after[1].get("uptime_ms") - before.get("uptime_ms");
    assert!(
        first_ms > before.get("uptime_ms"),
        "uptime went backwards: {before:?} {after:?}"
    );
    assert!(
        guest_ms >= 1800 + 100,
        "guest saw only {guest_ms} ms over a >2 s gap"
    );
    assert!(
        guest_ms + 500 >= host_ms,
        "guest uptime advanced {guest_ms} ms while the host saw {host_ms} ms"
    );
    assert!(
        guest_ms <= host_ms + 200,
        "guest uptime advanced {guest_ms} ms, more than the host's {host_ms} ms"
    );
    eprintln!(
        "clock: host {host_ms} ms, guest {guest_ms} ms, first stall_us {}",
        after[0].get("stall_us")
    );
    for status in &after {
        assert_eq!(status.get("tsc_back"), 0, "{after:?}");
        assert_eq!(status.get("errors"), 0, "{after:?}");
    }
}

#[test]
fn serial_input_reaches_the_guest_after_an_update() {
    require_kvm();
    let dir = scratch_dir("lu-input");
    let agent = Agent::start(&dir);
    let (mut old, _) = boot_old(
        &agent,
        &dir.join("old"),
        1,
        "fill=1 status_ms=100",
        &[],
        &[],
    );
    old.live_update("input");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let mut successor = VmmProcess::successor(&agent, "input", &dir.join("new"), &[]);
    let (next, _) = successor.next_status(0, TAKEOVER);

    successor.type_input(b"Z");

    successor.wait_for(next, LINE, |line| {
        line.contains("probe: input 0x5a").then_some(())
    });
}

/// Injects a failure at `step` in the old VMM and checks the update is cancelled cleanly.
fn assert_failure_at_cancels(step: &str) {
    require_kvm();
    let dir = scratch_dir(&format!("lu-fail-{step}"));
    let agent = Agent::start(&dir);
    let env = [("CHV_TEST_LIVE_UPDATE_FAIL_AT", step)];
    let (mut vmm, _) = boot_old(
        &agent,
        &dir.join("old"),
        2,
        "fill=1 status_ms=100",
        &[],
        &env,
    );

    let failed = vmm.try_live_update("doomed");
    let after_failure = vmm.lines().len();
    let (running_on, _) = statuses(&vmm, after_failure, 3, LINE);
    let state = vmm.vm_state();
    let sessions = agent.sessions();
    // The hook stays armed in this process, so the same name is tried again: it must fail the
    // same way, not be refused as a name in use.
    let again = vmm.try_live_update("doomed");

    assert!(
        !failed.is_success(),
        "update succeeded despite the failure at {step}"
    );
    let messages = serde_json::from_slice::<Vec<String>>(&failed.body)
        .unwrap_or_else(|e| panic!("error body is not a JSON list of messages: {e}: {failed:?}"))
        .join(" | ");
    assert!(
        messages.contains(&format!("injected failure in {step}")),
        "error body does not name the failure: {messages}"
    );
    assert!(
        running_on
            .windows(2)
            .all(|w| w[1].get("seq") > w[0].get("seq")),
        "{running_on:?}"
    );
    assert!(
        running_on[2].get("pages") > running_on[0].get("pages"),
        "{running_on:?}"
    );
    assert!(
        running_on.iter().all(|s| s.get("errors") == 0),
        "{running_on:?}"
    );
    assert_eq!(state, "Running");
    assert!(sessions.is_empty(), "sessions left behind: {sessions:?}");
    assert_eq!(again.status, failed.status, "{:?}", again.error_messages());
    assert!(vmm.is_running(), "{}", vmm.stderr());
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
}

#[test]
fn failure_injected_during_freeze_cancels_and_the_guest_runs_on_in_the_old_vmm() {
    assert_failure_at_cancels("pause");
    assert_failure_at_cancels("save");
}

#[test]
fn a_cancelled_update_frees_its_name_for_a_successful_update() {
    // The failure hook is read from the VMM's environment, so the same VMM cannot retry
    // without it: a second VMM on the same agent takes the cancelled session's name.
    require_kvm();
    let dir = scratch_dir("lu-retry");
    let agent = Agent::start(&dir);
    let env = [("CHV_TEST_LIVE_UPDATE_FAIL_AT", "save")];
    let (hooked, _) = boot_old(
        &agent,
        &dir.join("hooked"),
        1,
        "fill=1 status_ms=100",
        &[],
        &env,
    );
    let failed = hooked.try_live_update("retry");
    let (mut clean, _) = boot_old(
        &agent,
        &dir.join("clean"),
        1,
        "fill=1 status_ms=100",
        &[],
        &[],
    );

    clean.live_update("retry");
    let successor = VmmProcess::successor(&agent, "retry", &dir.join("new"), &[]);
    let (after, _) = statuses(&successor, 0, 2, TAKEOVER);

    assert!(!failed.is_success(), "the hooked update succeeded");
    assert_eq!(clean.wait_exit(EXIT), Some(0), "{}", clean.stderr());
    assert!(after[1].get("seq") > after[0].get("seq"), "{after:?}");
    assert_eq!(after[1].get("errors"), 0, "{after:?}");
    assert_eq!(hooked.vm_state(), "Running");
}

/// CRC-64/XZ (reflected ECMA-182 polynomial, all-ones init and final XOR), as the state blob
/// uses; checked against a real blob below.
fn crc64_xz(bytes: &[u8]) -> u64 {
    let mut crc = u64::MAX;
    for &byte in bytes {
        crc ^= u64::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xC96C_5795_D787_0F42
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid blob with no states, from the real encoder.
fn valid_blob() -> Vec<u8> {
    let blob = liveupdate::state::encode(Vec::new()).unwrap();
    let (content, checksum) = blob.split_at(blob.len() - 8);
    assert_eq!(
        crc64_xz(content).to_le_bytes(),
        checksum,
        "test CRC disagrees with the encoder"
    );
    blob
}

/// A blob in format `FORMAT_VERSION + 1`, written by hand with a correct checksum.
fn newer_format_blob() -> Vec<u8> {
    let payload = br#"{"envelopes":[]}"#;
    let mut blob = Vec::new();
    blob.extend_from_slice(&MAGIC);
    blob.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    blob.extend_from_slice(&[0; 6]);
    blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    blob.extend_from_slice(payload);
    let checksum = crc64_xz(&blob);
    blob.extend_from_slice(&checksum.to_le_bytes());
    blob
}

fn memfd_with(bytes: &[u8], len: u64) -> File {
    let mut file = File::from(liveupdate::sys::memfd_create("lu-test", 0).unwrap());
    file.write_all(bytes).unwrap();
    file.set_len(len.max(bytes.len() as u64)).unwrap();
    file
}

/// Hands over session `name` holding `blob` as its state and a small RAM memfd.
fn hand_over_crafted_session(agent: &Agent, name: &str, blob: &[u8]) {
    let state = memfd_with(blob, 0);
    let ram = memfd_with(&[], 2 << 20);
    let mut client = agent.client();
    client.create_session(name).unwrap();
    client.preserve(name, state.as_fd(), STATE_TOKEN).unwrap();
    client.preserve(name, ram.as_fd(), RAM_TOKEN).unwrap();
    client.handover(name).unwrap();
}

/// Starts a successor on a crafted session whose state is `blob`; asserts it refuses it with
/// `expected` in its error, and that the session stays at the agent with the same state file.
fn assert_state_refused_and_kept(tag: &str, blob: &[u8], expected: &[&str]) {
    let dir = scratch_dir(tag);
    let agent = Agent::start(&dir);
    hand_over_crafted_session(&agent, tag, blob);

    let mut successor = VmmProcess::successor(&agent, tag, &dir.join("new"), &[]);
    let code = successor.wait_exit(TAKEOVER);
    let stderr = successor.stderr();
    let sessions = agent.sessions();
    let mut other = agent.client();
    other.retrieve_session(tag).unwrap();
    let mut state = File::from(other.retrieve_fd(tag, STATE_TOKEN).unwrap());
    let mut kept = Vec::new();
    state.seek(SeekFrom::Start(0)).unwrap();
    state.read_to_end(&mut kept).unwrap();

    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stderr:\n{stderr}"
    );
    for word in expected {
        assert!(
            stderr.contains(word),
            "stderr does not say {word:?}:\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].name, tag, "{sessions:?}");
    assert_eq!(sessions[0].direction, Direction::Incoming, "{sessions:?}");
    assert_eq!(kept, blob, "the state file changed");
}

#[test]
fn corrupt_state_is_refused_and_the_session_is_kept() {
    let mut blob = valid_blob();
    // Flip a bit in the payload: the checksum no longer matches.
    blob[30] ^= 0x01;

    assert_state_refused_and_kept("lu-corrupt", &blob, &["corrupt", "checksum"]);
}

#[test]
fn state_from_a_newer_format_is_refused_and_the_session_is_kept() {
    let blob = newer_format_blob();
    let found = (FORMAT_VERSION + 1).to_string();
    let supported = FORMAT_VERSION.to_string();

    assert_state_refused_and_kept(
        "lu-newer",
        &blob,
        &[
            "newer",
            &format!("format {found}"),
            &format!("up to {supported}"),
        ],
    );
}

/// An agent, and the probe (1 vCPU, no devices) booted with it: a VM whose update is refused.
fn boot_to_refuse(name: &str) -> (Agent, VmmProcess) {
    require_kvm();
    let dir = scratch_dir(name);
    let agent = Agent::start(&dir);
    let (vmm, _) = boot_old(
        &agent,
        &dir.join("old"),
        1,
        "fill=1 status_ms=100",
        &[],
        &[],
    );
    (agent, vmm)
}

#[test]
fn a_session_name_in_use_is_refused_with_409() {
    let (agent, vmm) = boot_to_refuse("lu-409");
    let mut holder = agent.client();
    holder.create_session("taken").unwrap();

    let refused = vmm.try_live_update("taken");
    let (running_on, _) = statuses(&vmm, vmm.lines().len(), 2, LINE);

    assert_eq!(refused.status, 409, "{:?}", refused.error_messages());
    assert!(
        running_on[1].get("seq") > running_on[0].get("seq"),
        "{running_on:?}"
    );
    assert!(
        running_on[1].get("pages") > running_on[0].get("pages"),
        "{running_on:?}"
    );
    assert_eq!(vmm.vm_state(), "Running");
    let sessions = agent.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0].direction, Direction::Outgoing, "{sessions:?}");
    assert!(
        sessions[0].tokens.is_empty(),
        "the refused update preserved files: {sessions:?}"
    );
}

/// `ch-remote live-update --state-format 0.1.0` writes the state as release 0.1.0 reads it
/// (the PCI root without placement, version 1): this build's successor reads it through the
/// upgrade, placing the devices in build order, and the guest runs on.
#[test]
fn an_update_written_in_an_earlier_releases_format_runs_on_in_a_successor() {
    // Arrange: the probe with a disk (so a virtio device must land where it was).
    require_kvm();
    let dir = scratch_dir("lu-format");
    let agent = Agent::start(&dir);
    let disk = disk_image(&dir);
    let (mut vmm, _) = boot_old(
        &agent,
        &dir.join("old"),
        2,
        CMDLINE,
        &["--disk", &disk],
        &[],
    );

    // Act
    let update = vmm.ch_remote(&[
        "live-update",
        "--session",
        "lu-format",
        "--state-format",
        "0.1.0",
    ]);
    let old_exit = vmm.wait_exit(EXIT);
    let before = last_complete_status(&vmm, "blk_err");
    let successor = VmmProcess::successor(&agent, "lu-format", &dir.join("new"), &["-v"]);
    let after = statuses_until_blk_progress(&successor, before.get("blk_ok"));

    // Assert
    assert!(update.status.success(), "{update:?}\n{}", vmm.stderr());
    assert_eq!(old_exit, Some(0), "{}", vmm.stderr());
    assert!(
        successor
            .stderr()
            .contains("State of pci/root is of version 1: upgrading to 2"),
        "the state was not written in 0.1.0's format: {}",
        successor.stderr()
    );
    assert_guest_carried_on(1, 2, &before, &after);
}

/// A release this build cannot write is a 400 naming the ones it can; nothing was started.
#[test]
fn an_unknown_state_format_is_refused_with_400_and_the_guest_runs_on() {
    let (agent, vmm) = boot_to_refuse("lu-format-unknown");
    let body = serde_json::json!({"session": "lu-unknown", "state_format": "0.0.9"}).to_string();

    let refused = vmm.api("PUT", "vm.live-update", Some(&body));
    let (running_on, _) = statuses(&vmm, vmm.lines().len(), 2, LINE);

    assert_eq!(refused.status, 400, "{:?}", refused.error_messages());
    let messages = refused.error_messages().join(": ");
    assert!(
        messages.contains("state_format \"0.0.9\" is not a release") && messages.contains("0.1.0"),
        "{messages}"
    );
    assert!(
        running_on[1].get("seq") > running_on[0].get("seq"),
        "{running_on:?}"
    );
    assert_eq!(vmm.vm_state(), "Running");
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
}

#[test]
fn an_agent_upgraded_in_place_between_handover_and_restore_loses_nothing() {
    // Arrange: the old VMM hands the guest over and exits; no successor yet.
    require_kvm();
    let dir = scratch_dir("lu-agent-upgrade");
    let mut agent = Agent::start(&dir);
    let (mut vmm, _) = boot_old(&agent, &dir.join("old"), 1, CMDLINE, &[], &[]);
    vmm.live_update("upgraded");
    assert_eq!(vmm.wait_exit(EXIT), Some(0), "{}", vmm.stderr());
    let before = last_complete_status(&vmm, "blk_err");

    // Act: a new agent binary takes the session over, then the successor restores from it.
    agent.upgrade();
    let successor = VmmProcess::successor(&agent, "upgraded", &dir.join("successor"), &[]);
    let (after, _) = statuses(&successor, 0, 3, TAKEOVER);

    // Assert: the guest carried on with all its RAM, and the new agent holds nothing more.
    let first = &after[0];
    assert!(
        first.get("seq") > before.get("seq") && first.get("seq") <= before.get("seq") + 2,
        "status lines do not continue: {before:?} -> {after:?}"
    );
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{after:?}");
    }
    assert!(
        after[after.len() - 1].get("pages") > before.get("pages"),
        "{after:?}"
    );
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
    let memfds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:"))
        .count();
    assert_eq!(
        memfds, 0,
        "the agent still holds memfds of the finished session"
    );
    // A running VMM keeps no connection to the agent: it can be upgraded again right away.
    agent.upgrade();
    assert_eq!(agent.client().ping().unwrap(), "restart");
}

#[test]
fn a_successor_waiting_for_its_handover_answers_its_api() {
    let dir = scratch_dir("lu-waiting-api");
    let agent = Agent::start(&dir);
    let mut successor = VmmProcess::successor(&agent, "later", &dir.join("successor"), &["-v"]);

    successor.wait_for_api(Duration::from_secs(10));
    let ping = successor.api("GET", "vmm.ping", None);
    let info = successor.api("GET", "vm.info", None);
    let shutdown = successor.api("PUT", "vmm.shutdown", None);
    let code = successor.wait_exit(Duration::from_secs(10));

    assert_eq!(ping.status, 200);
    assert_eq!(info.status, 200);
    let info: serde_json::Value = serde_json::from_slice(&info.body).unwrap();
    assert_eq!(info["state"], "Restoring", "{info}");
    assert_eq!(info["restoring"]["source_url"], "luo://later", "{info}");
    assert!(shutdown.is_success(), "{}", shutdown.status);
    assert_eq!(code, Some(0), "stderr:\n{}", successor.stderr());
    assert!(
        successor
            .stderr()
            .contains("Waiting up to 120s for session \"later\" to be handed over"),
        "the successor does not say it waits:\n{}",
        successor.stderr()
    );
}

#[test]
fn a_successor_gives_up_after_its_timeout_saying_what_the_agent_knows() {
    // Arrange: one successor for a session nobody creates, one for a session created and never
    // handed over.
    let dir = scratch_dir("lu-timeout");
    let agent = Agent::start(&dir);
    let mut creator = agent.client();
    creator.create_session("created").unwrap();
    let spawn = |session: &str| {
        let sub = dir.join(session);
        std::fs::create_dir_all(&sub).unwrap();
        let source = format!("source_url=luo://{session},timeout=1");
        let agent_arg = agent.arg();
        VmmProcess::spawn(&["--liveupdate", &agent_arg, "--restore", &source], &sub)
    };
    let started = Instant::now();
    let mut nobody = spawn("nobody");
    let mut created = spawn("created");

    // Act
    let nobody_code = nobody.wait_exit(Duration::from_secs(20));
    let created_code = created.wait_exit(Duration::from_secs(20));

    // Assert: both fail after about a second, each saying why.
    assert!(nobody_code.is_some_and(|c| c != 0), "{nobody_code:?}");
    assert!(created_code.is_some_and(|c| c != 0), "{created_code:?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        nobody
            .stderr()
            .contains("not handed over within 1s (the agent has no session of that name)"),
        "{}",
        nobody.stderr()
    );
    assert!(
        created.stderr().contains(
            "not handed over within 1s (the agent holds it; the old VMM has not handed it over)"
        ),
        "{}",
        created.stderr()
    );
}

#[test]
fn successor_without_a_handover_fails_clearly() {
    let dir = scratch_dir("lu-no-agent");
    let started = Instant::now();

    let mut successor = VmmProcess::spawn(
        &[
            "--liveupdate",
            "agent=/nonexistent/agent.sock",
            "--restore",
            "source_url=luo://nothing",
        ],
        &dir,
    );
    let code = successor.wait_exit(Duration::from_secs(10));

    let stderr = successor.stderr();
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("/nonexistent/agent.sock"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// The `properties` of the first `event` in an event-monitor file.
fn event_properties(path: &Path, event: &str) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(Result::unwrap)
        .find(|e| e["event"] == event)
        .and_then(|e| serde_json::from_value(e["properties"].clone()).ok())
        .unwrap_or_else(|| panic!("no {event} event with properties in:\n{text}"))
}

#[test]
fn event_monitors_of_both_vmms_carry_the_update_with_step_timings() {
    require_kvm();
    let dir = scratch_dir("lu-events");
    let agent = Agent::start(&dir);
    let old_events = dir.join("old-events.json");
    let new_events = dir.join("new-events.json");
    let old_arg = format!("path={}", old_events.display());
    let new_arg = format!("path={}", new_events.display());
    let (mut old, _) = boot_old(
        &agent,
        &dir.join("old"),
        1,
        "fill=1 status_ms=100",
        &["--event-monitor", &old_arg],
        &[],
    );

    let timings = old.live_update("events");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let successor = VmmProcess::successor(
        &agent,
        "events",
        &dir.join("new"),
        &["--event-monitor", &new_arg],
    );
    successor.next_status(0, TAKEOVER);

    let old_list = common::read_events(&old_events);
    common::assert_events_in_order(
        &old_list,
        &[
            ("vm", "booted"),
            ("vm", "live-update-started"),
            ("vm", "live-update-handed-over"),
        ],
    );
    let handed_over = event_properties(&old_events, "live-update-handed-over");
    for step in ["prepare_us", "pause_us", "save_us", "handover_us"] {
        let value = handed_over
            .get(step)
            .unwrap_or_else(|| panic!("no {step}: {handed_over:?}"));
        let us: u64 = value.parse().unwrap();
        assert_eq!(
            timings[step.trim_end_matches("_us")],
            us,
            "API and event disagree: {timings}"
        );
    }
    let new_list = common::read_events_until(&new_events, ("vm", "restored"), EVENT_WAIT);
    common::assert_events_in_order(&new_list, &[("vm", "restoring"), ("vm", "restored")]);
    let restored = event_properties(&new_events, "restored");
    for step in ["retrieve_us", "restore_us", "pause_us"] {
        let value = restored
            .get(step)
            .unwrap_or_else(|| panic!("no {step}: {restored:?}"));
        value.parse::<u64>().unwrap();
    }
}

// Local migration, cloud-hypervisor's way (`receive-migration` on an empty VMM, then
// `send-migration ...,local=on` on the running one): the same restart-mode path, by another API.

/// An empty VMM (API and event monitor only) in `dir`, ready for `receive-migration`.
fn empty_receiver(dir: &Path) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let api = format!("path={}", dir.join("api.sock").display());
    let events = format!("path={}", dir.join("events.json").display());
    let mut vmm = VmmProcess::spawn(&["--api-socket", &api, "--event-monitor", &events], dir);
    vmm.wait_for_api(TAKEOVER);
    vmm
}

/// Runs `ch-remote receive-migration receiver_url=unix:<socket>` on `receiver` in a thread
/// (it returns once the VM runs there) and waits until the socket is served.
fn start_receive(
    receiver: &VmmProcess,
    socket: &Path,
) -> std::thread::JoinHandle<std::process::Output> {
    let api = receiver.api_socket.clone().unwrap();
    let url = format!("receiver_url=unix:{}", socket.display());
    let call = std::thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ch-remote"))
            .arg("--api-socket")
            .arg(api)
            .args(["receive-migration", &url])
            .output()
            .unwrap()
    });
    let deadline = Instant::now() + TAKEOVER;
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never served",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    call
}

/// The property `key` of the first `vm/<event>` in the event file at `path`.
fn event_property(path: &Path, event: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .find(|e| e["source"] == "vm" && e["event"] == event)
        .and_then(|e| e["properties"][key].as_str().map(str::to_string))
}

#[test]
fn probe_guest_survives_20_local_migrations_between_vmm_processes() {
    // Arrange: a guest writing RAM and its disk, with no session agent anywhere.
    require_kvm();
    let dir = scratch_dir("lm-20");
    let disk = disk_image(&dir);
    std::fs::create_dir_all(dir.join("gen0")).unwrap();
    let mut vmm = VmmProcess::probe_with(
        &dir.join("gen0"),
        &ProbeVm {
            cpus: 2,
            memory: "1G",
            cmdline: CMDLINE,
            extra: &["--disk", &disk],
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_banner(0, BOOT);
    vmm.next_status(next, LINE);
    let config_at_boot = vmm.vm_info()["config"].clone();
    let mut pauses_us = Vec::new();

    for migration in 1..=20 {
        // Act
        let receiver_dir = dir.join(format!("gen{migration}"));
        let receiver = empty_receiver(&receiver_dir);
        let socket = receiver_dir.join("migration.sock");
        let receive = start_receive(&receiver, &socket);
        let url = format!("destination_url=unix:{},local=on", socket.display());
        let sent = vmm.ch_remote(&["send-migration", &url]);
        let received = receive.join().unwrap();
        let old_exit = vmm.wait_exit(EXIT);

        // Assert: both calls succeed, the sender exits, the guest carries on in the receiver.
        assert!(
            sent.status.success(),
            "migration {migration}: send-migration: {sent:?}\nstderr:\n{}",
            vmm.stderr()
        );
        assert!(
            received.status.success(),
            "migration {migration}: receive-migration: {received:?}\nstderr:\n{}",
            receiver.stderr()
        );
        assert_eq!(old_exit, Some(0), "migration {migration}: {}", vmm.stderr());
        let before = last_complete_status(&vmm, "blk_err");
        let after = statuses_until_blk_progress(&receiver, before.get("blk_ok"));
        assert_guest_carried_on(migration, 2, &before, &after);
        assert!(
            !socket.exists(),
            "migration {migration}: the receiver still serves {}",
            socket.display()
        );
        let events = common::read_events(&receiver_dir.join("events.json"));
        common::assert_events_in_order(
            &events,
            &[
                ("vm", "migration-receive-ready"),
                ("vm", "restored"),
                ("vm", "migration-receive-finished"),
            ],
        );
        let pause = event_property(&receiver_dir.join("events.json"), "restored", "pause_us")
            .and_then(|us| us.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("migration {migration}: no pause_us in {events:?}"));
        pauses_us.push(pause);
        vmm = receiver;
    }

    assert_eq!(vmm.vm_state(), "Running");
    assert_eq!(vmm.vm_info()["config"], config_at_boot);
    pauses_us.sort_unstable();
    eprintln!(
        "20 local migrations: pause_us p50 {} max {} (restored events of the receivers)",
        pauses_us[pauses_us.len() / 2],
        pauses_us[pauses_us.len() - 1]
    );
}

#[test]
fn a_migration_this_vmm_cannot_do_is_refused_and_the_guest_runs_on() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("lm-refused");
    let vmm = VmmProcess::probe(1, "256M", "status_ms=100", &dir, &[]);
    let (next, _) = vmm.next_banner(0, BOOT);
    let nobody = dir.join("nobody.sock");
    let cases = [
        // A copy of guest RAM (to another host, or without local=on): not supported.
        (
            format!("destination_url=unix:{}", nobody.display()),
            "is not supported by this VMM",
        ),
        (
            "destination_url=tcp:127.0.0.1:6000".to_string(),
            "is not supported by this VMM",
        ),
        (
            format!(
                "destination_url=unix:{},local=on,preserve_source=on",
                nobody.display()
            ),
            "preserve_source=on",
        ),
        // Contradictions.
        (
            "destination_url=tcp:127.0.0.1:6000,local=on".to_string(),
            "local migration needs a unix:<path> destination_url",
        ),
        // Nobody receives there.
        (
            format!("destination_url=unix:{},local=on", nobody.display()),
            nobody.to_str().unwrap(),
        ),
    ];

    for (argument, expected) in &cases {
        // Act
        let output = vmm.ch_remote(&["send-migration", argument]);

        // Assert
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{argument}: {output:?}");
        assert!(stderr.contains(expected), "{argument}: {stderr}");
    }
    let not_local = vmm.api(
        "PUT",
        "vm.send-migration",
        Some(r#"{"destination_url":"tcp:127.0.0.1:6000"}"#),
    );
    assert_eq!(not_local.status, 501, "{:?}", not_local.error_messages());
    let (_, after) = vmm.next_status(next, LINE);
    assert_eq!(after.get("errors"), 0);
    assert_eq!(vmm.vm_state(), "Running");
}

#[test]
fn receive_migration_is_refused_over_tcp_and_on_a_vmm_with_a_vm() {
    // Arrange
    require_kvm();
    let dir = scratch_dir("lm-receive-refused");
    let vmm = VmmProcess::probe(1, "256M", "status_ms=100", &dir, &[]);
    vmm.next_banner(0, BOOT);
    let empty = empty_receiver(&dir.join("empty"));

    // Act
    let with_vm = vmm.api(
        "PUT",
        "vm.receive-migration",
        Some(&format!(
            r#"{{"receiver_url":"unix:{}"}}"#,
            dir.join("r.sock").display()
        )),
    );
    let over_tcp = empty.api(
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url":"tcp:0.0.0.0:6000"}"#),
    );
    let bad_url = empty.api(
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url":"/no/scheme"}"#),
    );

    // Assert
    assert_eq!(with_vm.status, 409, "{:?}", with_vm.error_messages());
    assert_eq!(over_tcp.status, 501, "{:?}", over_tcp.error_messages());
    assert_eq!(bad_url.status, 400, "{:?}", bad_url.error_messages());
    assert!(!dir.join("r.sock").exists());
    assert_eq!(vmm.vm_state(), "Running");
}
