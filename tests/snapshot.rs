//! Snapshot to a directory and restore from it on real KVM, proved with the probe guest: the
//! guest runs on after its snapshot, carries on from the snapshot point in every VMM that
//! restores it (API and command-line forms, again and again), and a directory that is not a
//! whole snapshot of this format is refused without leaving a VM behind.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::{
    ProbeStatus, ProbeVm, VmmProcess, assert_events_in_order, messages, read_events_until,
    require_kvm, scratch_dir,
};

const START: Duration = Duration::from_secs(10);
const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
const EXIT: Duration = Duration::from_secs(10);
const EVENT_WAIT: Duration = Duration::from_secs(10);
const CMDLINE: &str = "fill=1 status_ms=100 blk_io=1";

/// A 1 MiB disk image with a marker in sector 0 (the probe reads sector 0 with `blk_io=1`).
fn disk_image(dir: &Path) -> String {
    let path = dir.join("disk.img");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"SNAPSHOT-DISK").unwrap();
    file.set_len(1 << 20).unwrap();
    format!("path={}", path.display())
}

/// Boots the probe (2 vCPUs, `memory`, [`CMDLINE`], a disk) in `dir` with an event monitor;
/// returns it after its first status line, with the index after that line.
fn boot_probe(dir: &Path, memory: &str, env: &[(&str, &str)]) -> (VmmProcess, usize) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = disk_image(dir);
    let events = format!("path={}", dir.join("events.json").display());
    let vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cpus: 2,
            memory,
            cmdline: CMDLINE,
            extra: &["--disk", &disk, "--event-monitor", &events],
            env,
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_banner(0, BOOT);
    let (next, _) = vmm.next_status(next, LINE);
    (vmm, next)
}

/// A VMM with an API socket (and an event monitor) in `dir`, and no VM.
fn empty_vmm(dir: &Path) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("api.sock");
    let events = format!("path={}", dir.join("events.json").display());
    let mut vmm = VmmProcess::spawn(
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--event-monitor",
            &events,
        ],
        dir,
    );
    vmm.wait_for_api(START);
    vmm
}

/// A VMM started with `--restore <restore>` (and an API socket) in `dir`.
fn restoring_vmm(dir: &Path, restore: &str) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("api.sock");
    let events = format!("path={}", dir.join("events.json").display());
    VmmProcess::spawn(
        &[
            "--api-socket",
            socket.to_str().unwrap(),
            "--event-monitor",
            &events,
            "--restore",
            restore,
        ],
        dir,
    )
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn snapshot_body(dir: &Path) -> String {
    serde_json::json!({ "destination_url": file_url(dir) }).to_string()
}

fn restore_body(dir: &Path, resume: bool) -> String {
    serde_json::json!({ "source_url": file_url(dir), "resume": resume }).to_string()
}

/// The last status line printed so far.
fn last_status(vmm: &VmmProcess) -> ProbeStatus {
    vmm.lines()
        .iter()
        .rev()
        .find_map(|line| ProbeStatus::parse(line))
        .expect("no status line yet")
}

/// The next `count` status lines after line `skip`.
fn statuses(vmm: &VmmProcess, skip: usize, count: usize) -> Vec<ProbeStatus> {
    let mut next = skip;
    (0..count)
        .map(|_| {
            let (after, status) = vmm.next_status(next, LINE);
            next = after;
            status
        })
        .collect()
}

/// Asserts a restored guest carried on from the snapshot point: its status lines continue the
/// numbering from the snapshot (between `from_seq`, the last line before the snapshot, and
/// `to_seq`, the last one when it was answered), it did not boot again, and it runs without
/// errors, its disk reads going on.
fn assert_carried_on_from_snapshot(vmm: &VmmProcess, from_seq: u64, to_seq: u64) {
    let after = statuses(vmm, 0, 5);
    let context = format!("seq {from_seq}..={to_seq} at the snapshot, then {after:?}");
    let first = after[0].get("seq");
    assert!(
        first > from_seq && first <= to_seq + 2,
        "status lines do not continue from the snapshot: {context}"
    );
    assert!(
        !vmm.lines().iter().any(|l| l.contains("probe: start")),
        "the guest booted again: {:?}",
        vmm.lines()
    );
    assert!(
        after[4].get("blk_ok") > after[0].get("blk_ok"),
        "disk reads stalled: {context}"
    );
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("blk_err"), 0, "{context}");
        assert_eq!(status.get("tsc_back"), 0, "{context}");
        assert_eq!(status.get("cpus"), 2, "{context}");
    }
}

#[test]
fn a_running_guest_runs_on_after_its_snapshot_and_carries_on_from_it_in_every_restore() {
    require_kvm();
    let dir = scratch_dir("snap-restore");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (original, _) = boot_probe(&dir.join("original"), "1G", &[]);
    let config_at_boot = original.vm_info()["config"].clone();

    // Act: snapshot the running guest.
    let before = last_status(&original);
    let response = original.api("PUT", "vm.snapshot", Some(&snapshot_body(&snap)));
    let at_answer = last_status(&original);
    let running_on = statuses(&original, original.lines().len(), 3);

    // Assert: it answered 204, the guest ran on, the events say how long it was paused.
    assert_eq!(response.status, 204, "{}", messages(&response));
    assert_eq!(original.vm_state(), "Running");
    assert!(running_on[2].get("seq") > at_answer.get("seq"));
    assert!(
        running_on.iter().all(|s| s.get("errors") == 0),
        "{running_on:?}"
    );
    let events_path = dir.join("original/events.json");
    let events = read_events_until(&events_path, ("vm", "snapshotted"), EVENT_WAIT);
    assert_events_in_order(&events, &[("vm", "snapshotting"), ("vm", "snapshotted")]);
    let text = std::fs::read_to_string(&events_path).unwrap();
    assert!(text.contains("guest_paused_us"), "{text}");

    // The directory: config, state, sparse memory, manifest.
    let memory = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(memory.len(), 1 << 30);
    let allocated = memory.blocks() * 512;
    assert!(
        allocated < 64 << 20,
        "memory file of a guest that touched little has {allocated} bytes allocated"
    );
    for name in ["config.json", "state", "manifest.json"] {
        assert!(snap.join(name).is_file(), "{name} missing");
    }
    let saved_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved_config, config_at_boot);
    let shutdown = original.ch_remote(&["shutdown-vmm"]);
    assert!(shutdown.status.success(), "{shutdown:?}");
    let (from, to) = (before.get("seq"), at_answer.get("seq"));

    // Restore 1: vm.restore on a VMM without a VM, resumed.
    let second = empty_vmm(&dir.join("second"));
    let restored = second.api("PUT", "vm.restore", Some(&restore_body(&snap, true)));
    assert_eq!(restored.status, 204, "{}", messages(&restored));
    assert_carried_on_from_snapshot(&second, from, to);
    assert_eq!(second.vm_state(), "Running");
    assert_eq!(second.vm_info()["config"], config_at_boot);
    let events = read_events_until(
        &dir.join("second/events.json"),
        ("vm", "resumed"),
        EVENT_WAIT,
    );
    assert_events_in_order(
        &events,
        &[
            ("vm", "restoring"),
            ("vm", "restored"),
            ("vm", "resuming"),
            ("vm", "resumed"),
        ],
    );
    drop(second);

    // Restore 2: the command line, the same directory again; paused by default.
    let mut third = restoring_vmm(
        &dir.join("third"),
        &format!("source_url={}", file_url(&snap)),
    );
    third.wait_for_api(START);
    assert_eq!(third.vm_state(), "Paused");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        third
            .lines()
            .iter()
            .all(|l| ProbeStatus::parse(l).is_none()),
        "a paused restore ran: {:?}",
        third.lines()
    );
    let resumed = third.ch_remote(&["resume"]);
    assert!(resumed.status.success(), "{resumed:?}");
    assert_carried_on_from_snapshot(&third, from, to);

    // Restore 3: the command line with resume=on.
    let fourth = restoring_vmm(
        &dir.join("fourth"),
        &format!("source_url={},resume=on", file_url(&snap)),
    );
    assert_carried_on_from_snapshot(&fourth, from, to);
}

#[test]
fn a_paused_vm_is_snapshotted_with_ch_remote_and_stays_paused() {
    require_kvm();
    let dir = scratch_dir("snap-paused");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let (vmm, _) = boot_probe(&dir.join("vm"), "256M", &[]);
    assert!(vmm.ch_remote(&["pause"]).status.success());
    let lines_when_paused = vmm.lines().len();

    let snapshot = vmm.ch_remote(&["snapshot", &file_url(&snap)]);
    std::thread::sleep(Duration::from_millis(500));

    assert!(snapshot.status.success(), "{snapshot:?}");
    assert_eq!(vmm.vm_state(), "Paused");
    assert!(
        vmm.lines()[lines_when_paused..]
            .iter()
            .all(|l| ProbeStatus::parse(l).is_none()),
        "the paused guest ran during its snapshot: {:?}",
        vmm.lines()
    );
    assert!(snap.join("manifest.json").is_file());
    assert!(vmm.ch_remote(&["resume"]).status.success());
    let after = statuses(&vmm, lines_when_paused, 2);
    assert!(after.iter().all(|s| s.get("errors") == 0), "{after:?}");
}

#[test]
fn snapshot_destinations_that_are_missing_or_taken_are_refused_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("snap-dest");
    let taken = dir.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("memory"), b"someone else's").unwrap();
    let (vmm, _) = boot_probe(&dir.join("vm"), "64M", &[]);

    let missing = vmm.api(
        "PUT",
        "vm.snapshot",
        Some(&snapshot_body(&dir.join("missing"))),
    );
    let occupied = vmm.api("PUT", "vm.snapshot", Some(&snapshot_body(&taken)));
    let not_a_file_url = vmm.api(
        "PUT",
        "vm.snapshot",
        Some(r#"{"destination_url":"/tmp/snap"}"#),
    );

    assert_eq!(missing.status, 400, "{}", messages(&missing));
    assert!(
        messages(&missing).contains("does not exist"),
        "{}",
        messages(&missing)
    );
    assert_eq!(occupied.status, 400, "{}", messages(&occupied));
    assert!(
        messages(&occupied).contains("exists already"),
        "{}",
        messages(&occupied)
    );
    assert_eq!(not_a_file_url.status, 400);
    assert_eq!(
        std::fs::read(taken.join("memory")).unwrap(),
        b"someone else's"
    );
    assert_eq!(std::fs::read_dir(&taken).unwrap().count(), 1);
    assert_eq!(vmm.vm_state(), "Running");
    let after = statuses(&vmm, vmm.lines().len(), 2);
    assert!(after[1].get("seq") > after[0].get("seq"));
}

#[test]
fn a_snapshot_that_fails_while_saving_leaves_no_files_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("snap-fail");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    let env = [("CHV_TEST_LIVE_UPDATE_FAIL_AT", "save")];
    let (vmm, _) = boot_probe(&dir.join("vm"), "64M", &env);

    let failed = vmm.api("PUT", "vm.snapshot", Some(&snapshot_body(&snap)));

    assert_eq!(failed.status, 500);
    assert!(
        messages(&failed).contains("injected failure in save"),
        "{}",
        messages(&failed)
    );
    assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 0);
    assert_eq!(vmm.vm_state(), "Running");
    let after = statuses(&vmm, vmm.lines().len(), 3);
    assert!(after[2].get("pages") > after[0].get("pages"), "{after:?}");
    assert!(after.iter().all(|s| s.get("errors") == 0), "{after:?}");
}

/// Copies the snapshot in `from` to a new directory `to` (the memory file stays sparse).
fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let status = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(entry.path())
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Asserts `vm.restore` of `snap` is refused with 400 naming `expected`, and leaves no VM.
fn assert_restore_refused(vmm: &VmmProcess, snap: &Path, expected: &str) {
    let response = vmm.api("PUT", "vm.restore", Some(&restore_body(snap, true)));

    assert_eq!(
        response.status,
        400,
        "{}: {}",
        snap.display(),
        messages(&response)
    );
    assert!(
        messages(&response).contains(expected),
        "{}: {} does not say {expected:?}",
        snap.display(),
        messages(&response)
    );
    let info = vmm.api("GET", "vm.info", None);
    assert_eq!(info.status, 404, "a refused restore left a VM behind");
}

#[test]
fn broken_snapshots_are_refused_clearly_and_leave_no_vm() {
    require_kvm();
    let dir = scratch_dir("snap-broken");
    let good = dir.join("good");
    std::fs::create_dir_all(&good).unwrap();
    let (original, _) = boot_probe(&dir.join("original"), "64M", &[]);
    let response = original.api("PUT", "vm.snapshot", Some(&snapshot_body(&good)));
    assert_eq!(response.status, 204, "{}", messages(&response));
    drop(original);
    // Arrange: one flaw per copy.
    let corrupt = dir.join("corrupt-state");
    copy_snapshot(&good, &corrupt);
    let state = std::fs::OpenOptions::new()
        .write(true)
        .open(corrupt.join("state"))
        .unwrap();
    state.write_all_at(b"\xff\xff\xff\xff", 100).unwrap();
    let truncated = dir.join("truncated-memory");
    copy_snapshot(&good, &truncated);
    File::options()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let other_version = dir.join("other-version");
    copy_snapshot(&good, &other_version);
    let manifest = std::fs::read_to_string(other_version.join("manifest.json")).unwrap();
    let manifest = manifest.replace("\"format_version\": 1,", "\"format_version\": 99,");
    std::fs::write(other_version.join("manifest.json"), manifest).unwrap();
    let missing_file = dir.join("missing-file");
    copy_snapshot(&good, &missing_file);
    std::fs::remove_file(missing_file.join("state")).unwrap();
    let vmm = empty_vmm(&dir.join("restorer"));

    // Act and assert: each is refused, saying why, with no VM left.
    assert_restore_refused(&vmm, &corrupt, "is corrupt");
    assert_restore_refused(
        &vmm,
        &truncated,
        "has 33554432 bytes, the manifest says 67108864",
    );
    assert_restore_refused(&vmm, &other_version, "format version 99 is not supported");
    assert_restore_refused(&vmm, &missing_file, "state is missing");
    assert_restore_refused(&vmm, &dir.join("nowhere"), "does not exist");
    assert_restore_refused(&vmm, &dir, "holds no snapshot");

    // The same VMM then restores the good snapshot.
    let restored = vmm.api("PUT", "vm.restore", Some(&restore_body(&good, true)));
    assert_eq!(restored.status, 204, "{}", messages(&restored));
    let after = statuses(&vmm, 0, 2);
    assert!(after.iter().all(|s| s.get("errors") == 0), "{after:?}");
}

#[test]
fn the_command_line_refuses_a_broken_snapshot_and_exits_non_zero() {
    require_kvm();
    let dir = scratch_dir("snap-broken-cli");
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(
        snap.join("manifest.json"),
        r#"{"format_version": 2, "files": []}"#,
    )
    .unwrap();

    let mut vmm = restoring_vmm(
        &dir.join("vmm"),
        &format!("source_url={},resume=on", file_url(&snap)),
    );
    let code = vmm.wait_exit(EXIT);

    assert_ne!(code, Some(0));
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("Cannot restore the VM from snapshot")
            && stderr.contains("format version 2 is not supported"),
        "{stderr}"
    );
}
