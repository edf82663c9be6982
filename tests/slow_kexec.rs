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

use std::path::PathBuf;
use std::process::Command;

use slow::{release_bins, run_script};

/// The release binaries plus `luo-standin` (the liveupdate crate's stand-in for systemd's
/// `LUOSession=`, which only the inherited case uses).
fn release_bins_with_standin() -> PathBuf {
    let bins = release_bins();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "liveupdate",
            "--bin",
            "luo-standin",
        ])
        .arg("--target-dir")
        .arg(slow::target_dir())
        .current_dir(slow::repo_root())
        .status()
        .expect("cannot run cargo");
    assert!(
        status.success(),
        "cargo build of luo-standin failed: {status}"
    );
    assert!(
        bins.join("luo-standin").is_file(),
        "luo-standin is missing from {}",
        bins.display()
    );
    bins
}

/// Runs `scripts/e2e-kexec --case <case>` and asserts it passed; returns its output.
fn run_e2e(case: &str) -> String {
    let bins = if case == "inherited" {
        release_bins_with_standin()
    } else {
        release_bins()
    };
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

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn session_inherited_the_systemd_way_carries_the_guest_across_a_real_kexec() {
    let output = run_e2e("inherited");

    assert!(
        output.contains("not the inherited session"),
        "no 400 for an update into another session"
    );
    assert!(
        output.contains("takes no further live update"),
        "no 409 for a second update into the inherited session"
    );
    assert!(
        output.contains("probe verified") && output.contains("errors=0"),
        "the probe did not verify its RAM after the restore"
    );
}
