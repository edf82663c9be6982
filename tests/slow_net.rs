//! The slow group, networking: `scripts/test-nested-net` boots the QEMU test bed (TCG, nested KVM)
//! once and runs the small Linux guest under our VMM with a virtio-net card on a multiqueue tap
//! (`num_queues=4`, 2 vCPUs), everything in a network namespace of the stage's own
//! (`guest/net/stage.sh`). One guest boot covers, in order:
//!
//! - a TCP stream from the test-bed host into the guest (4 MiB, md5 checked by the guest) that
//!   runs while the VMM is live-updated in restart mode: the same connection delivers every
//!   byte, the successor adopts the same tap (same ifindex, no `vm/net-recreated`);
//! - 8 parallel host->guest and 2 guest->host connections (one pinned to each vCPU): every
//!   checksum matches and the guest's per-queue interrupts (`virtio0-input.0/.1`,
//!   `virtio0-output.0/.1`) all rise, so both queue pairs carry traffic;
//! - a kexec-mode live update (a real kexec of the test kernel): the restoring VMM emits
//!   `vm/net-recreated` with the tap's name, the tap is back with its address, its 2 queues and
//!   its MAC, and the guest's own traffic reaches the host before the host sends anything.
//!
//! What a kexec can and cannot keep: no process or socket of the test-bed kernel survives it,
//! so a connection open from a test-bed process before the kexec is reset on the guest's next
//! send (the new kernel has no socket for it) after carrying its 64 KiB intact. A connection
//! whose other end is outside the test bed goes on: a peer on this machine, in a network
//! namespace the script makes (QEMU's NIC is a tap there, the test-bed kernel forwards to our
//! tap), streams into the guest from before the kexec to after it over one TCP connection, and
//! the guest receives exactly the bytes it sent (count and md5). Also: the guest's listening
//! socket of before the kexec takes a NEW host connection at once and receives 4 MiB intact; a
//! NEW guest->host connection delivers the guest's payload intact; ping answers right after the
//! restore; and both queue pairs carry traffic again on the re-created tap.
//!
//! Ignored by default; `scripts/test --slow` runs it (`cargo test --test slow_net -- --ignored`).
//! It fails, never skips, when QEMU, a kernel or any tool is missing (the script installs what
//! it can and names the rest). It prints the pauses, transfers, throughput and interrupt counts.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod slow;

use slow::{release_bins, report, run_script};

/// The lines of `output` holding `needle`.
fn lines_with<'a>(output: &'a str, needle: &str) -> Vec<&'a str> {
    output.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
#[ignore = "slow group: run with scripts/test --slow"]
fn tcp_into_a_linux_guest_survives_a_restart_mode_update_and_comes_back_after_a_kexec() {
    // Arrange
    let bins = release_bins();
    let serial = slow::target_dir()
        .join("slow-tests")
        .join("test-nested-net.serial.log");
    let args = [bins.as_os_str(), "--log".as_ref(), serial.as_os_str()];

    // Act
    let run = run_script("test-nested-net", &args, "test-nested-net");

    // Assert: the stage checks every transfer, event and counter and fails otherwise; these
    // make sure each part ran.
    assert!(
        run.output.contains("NET-E2E-PASS"),
        "no NET-E2E-PASS in {}",
        run.log.display()
    );
    for needle in [
        // Both stages (before and after the kexec) ran in a network namespace of their own.
        "NET-E2E-STAGE1 netns",
        "NET-E2E-STAGE2 netns",
        "NET-E2E R: the guest received",
        "NET-E2E R: pause_us=",
        "NET-E2E MQ after the restart-mode update: transfers:",
        "NET-E2E MQ after the kexec: transfers:",
        "NET-E2E K: vm/net-recreated tap=chvnet0",
        "NET-E2E K: the connection of before the kexec was reset",
        "NET-E2E K: first ping answer",
        "NET-E2E K: new host->guest connection",
        "NET-E2E K: new guest->host connection",
        // The outside peer's one connection lived through the kexec and lost nothing.
        "NET-E2E X: the outside peer's stream reaches the guest",
        "NET-E2E X: the outside peer's connection of before the kexec carries on",
        "NET-E2E X: the outside peer sent",
    ] {
        assert!(
            !lines_with(&run.output, needle).is_empty(),
            "no '{needle}' in {}",
            run.log.display()
        );
    }
    // Traffic on both queue pairs, after each update: the guest's interrupt count of every
    // queue rose (the stage prints `virtio0-<queue>: <before> -> <after> (+<rise>)`).
    for phase in ["after the restart-mode update", "after the kexec"] {
        for queue in ["input.0", "input.1", "output.0", "output.1"] {
            let needle = format!("{phase}: virtio0-{queue}: ");
            let lines = lines_with(&run.output, &needle);
            let rise = lines
                .first()
                .and_then(|line| line.rsplit_once("(+"))
                .and_then(|(_, rest)| rest.trim_end_matches(')').parse::<u64>().ok());
            assert!(
                rise.is_some_and(|rise| rise > 0),
                "no rise of virtio0-{queue} {phase} in {}",
                run.log.display()
            );
        }
    }
    report(&run, "NET-E2E ");
}

#[test]
fn only_a_crash_of_the_test_bed_itself_gets_a_second_run() {
    // The end of a run whose test-bed kernel oopsed (stamped by the serial driver), and of one
    // whose QEMU died.
    let panicked = include_str!("data/test-bed-kernel-fault.log");
    assert!(slow::test_bed_crashed(panicked));
    let qemu_died = "[ 16.1] serial-drive: command died of signal 11 before 'MANY-PASS' appeared\n";
    assert!(slow::test_bed_crashed(qemu_died));
    // And one whose kernel reset itself mid-stage: QEMU exited with no stage ended.
    let reset = "E2E-VFIO live-update edu1: {\"session\":\"edu1\"}\n\
        serial-drive: command exited (0) before 'E2E-VFIO-PASS' appeared (29.2 s)\n";
    assert!(slow::test_bed_crashed(reset));
    // A stage that ended without its pass marker is the stage's failure, not a crash.
    let stage_ended = "TESTBED-STAGE-EXIT rc=2\n\
        serial-drive: command exited (0) before 'E2E-VFIO-PASS' appeared (29.2 s)\n";
    assert!(!slow::test_bed_crashed(stage_ended));
    // A stage's own failure does not, nor does a guest's panic in a stage's report.
    let stage_failed = "[ 62.8] NET-E2E-FAIL: stage 1: no /XN2=[^:]*:END/ within 30 s\n\
        [ 62.9] serial-drive: fail marker 'NET-E2E-FAIL' seen after 61.8 s\n";
    assert!(!slow::test_bed_crashed(stage_failed));
    let guest_panicked = "[ 90.1] Kernel-panic (guest) - not syncing: Fatal exception\n";
    assert!(!slow::test_bed_crashed(guest_panicked));
    // A test bed whose console stayed silent past --stall (its stage bounds every wait).
    let silent = "[1204.4] serial-drive: no output for 300 s while waiting for 'NET-E2E-PASS' \
        (325.2 s): the command stalled\n";
    assert!(slow::test_bed_crashed(silent));
    // A silent test bed gets more runs than one that crashed otherwise: it stops often and
    // costs half a minute, where an oops may come late in a long run.
    assert_eq!(slow::runs_allowed(silent), slow::SILENT_TEST_BED_RUNS);
    assert_eq!(slow::runs_allowed(panicked), slow::TEST_BED_RUNS);
}

/// Runs `scripts/serial-drive --stall 1` on `sh -c SCRIPT`, waiting for a marker it never
/// prints; returns what the driver said on stderr.
fn serial_drive_with_stall(script: &str) -> String {
    let out = std::process::Command::new(slow::repo_root().join("scripts/serial-drive"))
        .args(["--stall", "1", "--timeout", "60", "--quiet"])
        .args(["--expect", "NEVER-PRINTED"])
        .args(["--", "sh", "-c", script])
        .output()
        .expect("cannot run scripts/serial-drive");
    assert!(
        !out.status.success(),
        "serial-drive passed without its marker"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_command_silent_past_the_stall_limit_is_reported_as_stalled_and_ended() {
    // Silent for 30 s after one line: the driver gives up after about 1 s of silence, and says
    // so, rather than waiting out the command or the overall timeout.
    let said = serial_drive_with_stall("echo started; exec sleep 30");
    assert!(said.contains("serial-drive: no output for 1 s"), "{said}");
    assert!(slow::test_bed_crashed(&said));
}

#[test]
fn a_command_that_keeps_printing_is_not_stalled() {
    // A line every 0.3 s for 3 s, then an exit without the marker: that is an early exit.
    let said =
        serial_drive_with_stall("for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.3; done");
    assert!(
        said.contains("serial-drive: command exited (0) before"),
        "{said}"
    );
    assert!(!said.contains("no output for"), "{said}");
}
