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

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// What to install when a test-bed script fails for want of a tool.
const PREREQUISITES: &str = "The slow group needs root, /dev/kvm, apt access (for linux-source-7.2 \
and busybox-static) and the Debian packages qemu-system-x86 build-essential flex bison bc \
libelf-dev libssl-dev cpio xz-utils kmod, which the scripts install when missing";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built in (`<target>/<profile>/cloud-hypervisor`).
fn target_dir() -> PathBuf {
    let debug_bin = Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
    debug_bin
        .parent()
        .and_then(Path::parent)
        .expect("binary path has a target directory")
        .to_path_buf()
}

/// Builds `cloud-hypervisor`, `ch-remote` and `ch-luod` in release mode once per test process
/// and returns the directory holding them.
fn release_bins() -> PathBuf {
    static BINS: OnceLock<PathBuf> = OnceLock::new();
    BINS.get_or_init(|| {
        let target = target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bins", "--target-dir"])
            .arg(&target)
            .current_dir(repo_root())
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "cargo build --release failed: {status}");
        let bins = target.join("release");
        for name in ["cloud-hypervisor", "ch-remote", "ch-luod"] {
            assert!(
                bins.join(name).is_file(),
                "{name} is missing from {}",
                bins.display()
            );
        }
        bins
    })
    .clone()
}

/// The output of one script run, kept in a log file under the target directory.
struct ScriptRun {
    output: String,
    log: PathBuf,
    seconds: f64,
}

/// Runs `scripts/<script> <args>` with stdout and stderr into a log file; panics with the
/// end of the log when it fails.
fn run_script(script: &str, args: &[&Path]) -> ScriptRun {
    let dir = target_dir().join("slow-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join(format!("{script}.log"));
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let start = Instant::now();
    let status = Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/{script}: {e}"));
    let seconds = start.elapsed().as_secs_f64();
    let output = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    if !status.success() {
        let lines: Vec<&str> = output.lines().collect();
        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
        panic!(
            "scripts/{script} failed ({status}) after {seconds:.0} s; full log: {}\n\
             --- last lines ---\n{tail}\n---\n{PREREQUISITES}",
            log.display()
        );
    }
    ScriptRun {
        output,
        log,
        seconds,
    }
}

/// The lines of `run` that hold `marker`, for the test's own report.
fn report(run: &ScriptRun, marker: &str) {
    eprintln!("{:.1} s in all; log: {}", run.seconds, run.log.display());
    for line in run.output.lines().filter(|l| l.contains(marker)) {
        eprintln!("{line}");
    }
}

#[test]
#[ignore = "slow group: run with scripts/test --slow"]
fn linux_guest_boots_under_our_vmm_and_answers_on_its_serial_console() {
    // Arrange
    let vmm = release_bins().join("cloud-hypervisor");

    // Act
    let run = run_script("test-nested-linux", &[&vmm]);

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
    let run = run_script("test-nested-live-update", &[&bins]);

    // Assert
    assert!(
        run.output.contains("NESTED-LIVE-UPDATE-PASS"),
        "no NESTED-LIVE-UPDATE-PASS in {}",
        run.log.display()
    );
    report(&run, "LIVE-UPDATE");
}
