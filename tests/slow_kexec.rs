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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// What to install when the script fails for want of a tool.
const PREREQUISITES: &str = "The kexec test needs root, /dev/kvm, apt access (for linux-source-7.2 \
and busybox-static) and the Debian packages qemu-system-x86 build-essential flex bison bc \
libelf-dev libssl-dev cpio xz-utils kmod perl, which the scripts install when missing";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built in (`<target>/<profile>/cloud-hypervisor`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .parent()
        .and_then(Path::parent)
        .expect("binary path has a target directory")
        .to_path_buf()
}

/// Builds the release binaries (a no-op when they are up to date); returns their directory.
fn release_bins() -> PathBuf {
    let target = target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bins", "--target-dir"])
        .arg(&target)
        .current_dir(repo_root())
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cargo build --release failed: {status}");
    target.join("release")
}

/// Runs `scripts/e2e-kexec --case <case>` and asserts it passed; returns its output.
fn run_e2e(case: &str) -> String {
    // Arrange
    let bins = release_bins();
    let dir = target_dir().join("slow-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join(format!("e2e-kexec-{case}.log"));
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let serial = dir.join(format!("e2e-kexec-{case}.serial.log"));

    // Act
    let start = Instant::now();
    let status = Command::new(repo_root().join("scripts/e2e-kexec"))
        .arg(&bins)
        .args(["--case", case, "--log"])
        .arg(&serial)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/e2e-kexec: {e}"));
    let seconds = start.elapsed().as_secs_f64();
    let output = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();

    // Assert
    let lines: Vec<&str> = output.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    assert!(
        status.success() && output.contains("E2E-KEXEC-PASS"),
        "scripts/e2e-kexec --case {case} failed ({status}) after {seconds:.0} s; full log: {}\n\
         --- last lines ---\n{tail}\n---\n{PREREQUISITES}",
        log.display()
    );
    eprintln!("{case}: {seconds:.1} s in all; log: {}", log.display());
    output
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
