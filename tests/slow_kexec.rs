//! The slow group, kexec: `scripts/e2e-kexec` live-updates the probe guest across a real kexec of
//! the LUO test kernel inside QEMU (TCG, nested KVM). Ignored by default; run it with
//! `cargo test --test slow_kexec -- --ignored`. It fails, never skips, when QEMU, the test
//! kernel or any tool is missing (the script installs what it can and names the rest).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod slow;

use slow::{release_bins, run_script};

/// Runs `scripts/e2e-kexec --case <case>` and asserts it passed; returns its output.
fn run_e2e(case: &str) -> String {
    let bins = release_bins();
    let serial = slow::target_dir()
        .join("slow-tests")
        .join(format!("e2e-kexec-{case}.serial.log"));
    let args = [
        bins.as_os_str(),
        "--case".as_ref(),
        case.as_ref(),
        "--log".as_ref(),
        serial.as_os_str(),
    ];

    let run = run_script("e2e-kexec", &args, &format!("e2e-kexec-{case}"));

    assert!(
        run.output.contains("E2E-KEXEC-PASS"),
        "no E2E-KEXEC-PASS in {}",
        run.log.display()
    );
    eprintln!(
        "{case}: {:.1} s in all; log: {}",
        run.seconds,
        run.log.display()
    );
    run.output
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn probe_guest_survives_a_live_update_across_a_real_kexec() {
    let output = run_e2e("kexec");

    for line in output
        .lines()
        .skip_while(|l| !l.starts_with("E2E-KEXEC timings"))
    {
        eprintln!("{line}");
    }
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn a_failing_kexec_file_load_cancels_the_update_and_the_guest_runs_on() {
    run_e2e("bad-kernel");
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn without_liveupdate_on_the_agent_refuses_to_start_clearly() {
    run_e2e("no-luo");
}
