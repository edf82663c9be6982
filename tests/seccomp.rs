//! Seccomp confinement (`--seccomp`, docs/security.md), on this host's KVM with the probe guest:
//! a thread of each kind makes a syscall outside its filter through the test hook
//! `CHV_TEST_SECCOMP_VIOLATE` (a `chroot` of a path that does not exist), and the VMM is killed
//! by SIGSYS (`true`, the default), carries on with the kernel logging it (`log`), or sees the
//! call fail with EPERM (`errno`).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{ProbeVm, VmmProcess, assert_guest_runs_on, require_kvm, scratch_dir};

const BOOT: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(10);
const AUDIT: Duration = Duration::from_secs(5);
const HOOK: &str = "CHV_TEST_SECCOMP_VIOLATE";
/// `chroot` on x86_64: the syscall the hook makes.
const CHROOT: u32 = 161;

/// Boots the probe guest (with a virtio-rng device, so a queue worker runs too) with `seccomp`
/// and the hook set to make a `kind` thread break its filter.
fn boot(dir: &Path, seccomp: &[&str], kind: &str) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let mut extra = vec!["--rng", "src=/dev/urandom", "-v"];
    extra.extend_from_slice(seccomp);
    VmmProcess::probe_with(
        dir,
        &ProbeVm {
            extra: &extra,
            env: &[(HOOK, kind)],
            ..ProbeVm::default()
        },
    )
}

/// The kernel's audit records of seccomp for `pid` (`type=1326`) stamped at or after `since`,
/// if this host lets us read its log; `None` when it does not (then only the process's fate is
/// checked). The time matters: pids wrap around, and a host that ran these tests before keeps a
/// killed VMM's record under a pid that a later VMM may get.
fn audit_records(pid: u32, since: SystemTime) -> Option<Vec<String>> {
    let output = Command::new("dmesg").output().ok()?;
    if !output.status.success() {
        eprintln!("dmesg is not readable here: the kernel's audit records are not checked");
        return None;
    }
    let pid = format!(" pid={pid} ");
    let since_ms = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    Some(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.contains("type=1326") && line.contains(&pid))
            .filter(|line| audit_time_ms(line).is_some_and(|stamped| stamped >= since_ms))
            .map(str::to_string)
            .collect(),
    )
}

/// Now, on the audit records' clock. The kernel stamps them with its coarse wall clock, which
/// can lag a few ms behind ours: a second back covers that, and no pid comes round again in a
/// second.
fn audit_clock_now() -> SystemTime {
    SystemTime::now() - Duration::from_secs(1)
}

/// The wall-clock time of an audit record, in ms since the epoch: `audit(SECONDS.MILLIS:SERIAL)`.
fn audit_time_ms(record: &str) -> Option<u128> {
    let stamp = record.split("audit(").nth(1)?.split(':').next()?;
    let (seconds, millis) = stamp.split_once('.')?;
    Some(seconds.parse::<u128>().ok()? * 1000 + millis.parse::<u128>().ok()?)
}

/// Asserts the kernel's audit recorded `pid`'s chroot, where the kernel log is readable. The
/// audit thread prints its records a moment after the fact: wait for it a little.
fn assert_audited_chroot(pid: u32, since: SystemTime) {
    let chroot = format!(" syscall={CHROOT} ");
    let deadline = Instant::now() + AUDIT;
    loop {
        let Some(records) = audit_records(pid, since) else {
            return;
        };
        if records.iter().any(|record| record.contains(&chroot)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record of the chroot within {AUDIT:?}: {records:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_syscall_outside_the_filter_of_any_thread_kind_kills_the_vmm_with_sigsys() {
    require_kvm();
    for kind in ["vmm", "vcpu", "api", "worker"] {
        // Arrange
        let dir = scratch_dir(&format!("seccomp-kill-{kind}"));

        // Act: the default is --seccomp true.
        let started = audit_clock_now();
        let mut vmm = boot(&dir, &[], kind);
        let status = vmm.wait_status(BOOT);

        // Assert
        assert_eq!(
            status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {status:?}; stderr:\n{}",
            vmm.stderr()
        );
        assert_audited_chroot(vmm.pid(), started);
    }
}

#[test]
fn with_seccomp_log_the_kernel_logs_the_syscall_and_the_guest_carries_on() {
    require_kvm();
    // Arrange
    let dir = scratch_dir("seccomp-log");

    // Act
    let started = audit_clock_now();
    let mut vmm = boot(&dir, &["--seccomp", "log"], "vcpu");

    // Assert: the call went through (the kernel's own answer: the path does not exist), the
    // guest runs, and the kernel logged it.
    assert_guest_runs_on(&vmm, 0);
    assert!(vmm.is_running());
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("chroot from a thread of kind vcpu returned Err")
            && stderr.contains("code: 2,"),
        "{stderr}"
    );
    assert_audited_chroot(vmm.pid(), started);
}

#[test]
fn with_seccomp_errno_the_syscall_fails_with_eperm_and_the_guest_carries_on() {
    require_kvm();
    // Arrange
    let dir = scratch_dir("seccomp-errno");

    // Act
    let mut vmm = boot(&dir, &["--seccomp", "errno"], "worker");

    // Assert
    assert_guest_runs_on(&vmm, 0);
    assert!(vmm.is_running());
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("chroot from a thread of kind worker returned Err")
            && stderr.contains("code: 1,"),
        "{stderr}"
    );
}

#[test]
fn with_seccomp_false_nothing_is_filtered() {
    require_kvm();
    // Arrange
    let dir = scratch_dir("seccomp-false");

    // Act
    let started = audit_clock_now();
    let mut vmm = boot(&dir, &["--seccomp", "false"], "api");

    // Assert: the hook's call reached the kernel, and the kernel logged nothing about it.
    vmm.wait_for_api(EXIT);
    assert_guest_runs_on(&vmm, 0);
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("chroot from a thread of kind api returned Err")
            && stderr.contains("code: 2,"),
        "{stderr}"
    );
    if let Some(records) = audit_records(vmm.pid(), started) {
        assert!(records.is_empty(), "{records:?}");
    }
}
