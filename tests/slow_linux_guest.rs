//! The slow group: a real Linux guest under our VMM, inside QEMU (TCG) with nested KVM, because
//! this host's paravirtualised KVM cannot run Linux (docs/testbed.md). Every test is ignored by
//! default; `scripts/test --slow` runs them one at a time. The first run builds the test kernel
//! and the guest (about 15 minutes); later runs take seconds each.
//!
//! Each test builds the release binaries it needs (a no-op when `scripts/test` or an earlier
//! test already did), runs a test-bed script and fails with the end of its output when the
//! script fails, including when QEMU or a kernel cannot be built: those never skip.
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
fn linux_guest_boots_under_our_vmm_and_answers_on_its_serial_console() {
    // Arrange
    let vmm = release_bins().join("cloud-hypervisor");

    // Act
    let run = run_script("test-nested-linux", &[vmm.as_os_str()], "test-nested-linux");

    // Assert
    assert!(
        run.output.contains("NESTED-LINUX-PASS"),
        "no NESTED-LINUX-PASS in {}",
        run.log.display()
    );
    report(&run, "NESTED-LINUX-PASS");
}

#[test]
#[ignore = "slow group: run with scripts/test --slow"]
fn linux_guest_survives_a_restart_mode_live_update() {
    // Arrange
    let bins = release_bins();

    // Act
    let run = run_script(
        "test-nested-live-update",
        &[bins.as_os_str()],
        "test-nested-live-update",
    );

    // Assert
    assert!(
        run.output.contains("NESTED-LIVE-UPDATE-PASS"),
        "no NESTED-LIVE-UPDATE-PASS in {}",
        run.log.display()
    );
    report(&run, "LIVE-UPDATE");
}
