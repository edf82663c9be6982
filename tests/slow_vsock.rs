//! The slow group, vsock: `scripts/test-nested-vsock` boots the QEMU test bed (TCG, nested KVM)
//! once and runs the small Linux guest under our VMM with `--vsock cid=3,socket=...`
//! (`guest/vsock/stage.sh`; `guest/vsock/vsock-tool.c` streams deterministic, checksummed
//! bytes and checks every echoed byte). One guest boot covers, in order:
//!
//! - restart mode: a host client's stream into the guest's listener (through `CONNECT 1234`,
//!   4 MiB) and the guest's stream to a host listener at `SOCKET_5000` (3 MiB) both run while
//!   the VMM is live-updated: each stays one connection, echo flows during the update call,
//!   every byte comes back once and in order, and the successor's device counts no reset;
//! - kexec mode (a real kexec of the test kernel): right after `vm/restored`, a NEW host
//!   connection through `CONNECT 1234` reaches the guest's listener of before the kexec at once
//!   and carries 4 MiB intact; the two connections held open across the kexec (one each way)
//!   end in the guest with a reset, after carrying their bytes intact, instead of hanging; a
//!   NEW guest connection to the host carries 2 MiB intact.
//!
//! What a guest agent must do across a kexec-mode update: reconnect. No host process or host
//! socket survives a kexec, so every vsock connection is reset in the guest (the restoring VMM
//! sends a transport reset); the guest's listening sockets stay and accept new connections at
//! once, and connections to the host work again as soon as the host side listens again. Across
//! a restart-mode update nothing of this is needed: connections go on untouched.
//!
//! Ignored by default; `scripts/test --slow` runs it (`cargo test --test slow_vsock -- --ignored`).
//! It fails, never skips, when QEMU, a kernel or any tool is missing (the script installs what
//! it can and names the rest). It prints the pauses, the echo during the update and throughput.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod slow;

use slow::{release_bins, report, run_script};

#[test]
#[ignore = "slow group: run with scripts/test --slow"]
fn vsock_streams_survive_a_restart_mode_update_and_reconnect_at_once_after_a_kexec() {
    // Arrange
    let bins = release_bins();
    let serial = slow::target_dir()
        .join("slow-tests")
        .join("test-nested-vsock.serial.log");
    let args = [bins.as_os_str(), "--log".as_ref(), serial.as_os_str()];

    // Act
    let run = run_script("test-nested-vsock", &args, "test-nested-vsock");

    // Assert: the stage checks every stream, reset and counter and fails otherwise; these make
    // sure each part ran.
    assert!(
        run.output.contains("VSOCK-E2E-PASS"),
        "no VSOCK-E2E-PASS in {}",
        run.log.display()
    );
    for needle in [
        "VSOCK-E2E R: during the live-update call the host client got",
        "VSOCK-E2E R: host->guest: VSOCK-SEND tag=hr result=ok",
        "VSOCK-E2E R: guest->host: VSOCK-SEND tag=gr result=ok",
        "VSOCK-E2E R: pause_us=",
        "VSOCK-E2E K: new host->guest connection: VSOCK-SEND tag=hn result=ok",
        "VSOCK-E2E K: the guest's end of the held host connection: VSOCK-CONN tag=1234 n=2 result=reset",
        "VSOCK-E2E K: the guest's held connection to the host: VSOCK-SEND tag=gk result=reset",
        "VSOCK-E2E K: new guest->host connection: VSOCK-SEND tag=gn result=ok",
        "VSOCK-E2E K: restored after",
    ] {
        assert!(
            run.output.contains(needle),
            "no '{needle}' in {}",
            run.log.display()
        );
    }
    report(&run, "VSOCK-E2E ");
}
