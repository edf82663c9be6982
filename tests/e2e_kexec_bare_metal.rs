//! `scripts/e2e-kexec --bare-metal` kexecs the machine it runs on: it must refuse without the
//! explicit confirmation, and refuse clearly, changing nothing, on a host that cannot do it.
//! (Its real run needs a LUO-capable host; the test bed runs the same stages under QEMU.)
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const UNIT: &str = "/etc/systemd/system/chv-e2e-kexec-stage2.service";
const STAGE_DIR: &str = "/var/lib/chv-e2e-kexec";

/// Where cargo put this build's binaries (the script wants a directory holding them).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn e2e_kexec(args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/e2e-kexec");
    Command::new(script)
        .arg(bin_dir())
        .args(args)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// These tests check refusals; on a host with LUO the confirmed run would really kexec it.
fn assert_host_without_luo() {
    assert!(
        !Path::new("/dev/liveupdate").exists(),
        "this host has /dev/liveupdate: these tests expect a host without LUO, where the \
         confirmed bare-metal run must refuse (here it would kexec the machine)"
    );
}

#[test]
fn bare_metal_without_confirmation_refuses_and_says_it_would_kexec_this_host() {
    let unit_before = Path::new(UNIT).exists();

    let output = e2e_kexec(&["--bare-metal"]);

    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{message}");
    assert!(message.contains("kexecs THIS machine"), "{message}");
    assert!(message.contains("--yes-kexec-this-host"), "{message}");
    assert_eq!(Path::new(UNIT).exists(), unit_before, "unit file changed");
}

#[test]
fn confirmed_bare_metal_on_a_host_without_luo_names_what_the_kernel_needs_and_changes_nothing() {
    assert_host_without_luo();
    let unit_before = Path::new(UNIT).exists();
    let stage_dir_before = Path::new(STAGE_DIR).exists();

    let output = e2e_kexec(&["--bare-metal", "--yes-kexec-this-host"]);

    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("/dev/liveupdate is missing"), "{message}");
    assert!(message.contains("liveupdate=on"), "{message}");
    assert!(message.contains("CONFIG_LIVEUPDATE"), "{message}");
    assert_eq!(Path::new(UNIT).exists(), unit_before, "unit file changed");
    assert_eq!(
        Path::new(STAGE_DIR).exists(),
        stage_dir_before,
        "stage dir changed"
    );
}

#[test]
fn the_result_before_any_bare_metal_run_says_stage_two_has_not_run() {
    assert!(
        !Path::new(STAGE_DIR).join("stage2.log").exists(),
        "{STAGE_DIR}/stage2.log exists from an earlier bare-metal run; remove it"
    );

    let output = e2e_kexec(&["--bare-metal", "--result"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("stage 2 has not run"), "{message}");
}

#[test]
fn the_confirmation_without_bare_metal_is_refused() {
    let output = e2e_kexec(&["--yes-kexec-this-host"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("go with --bare-metal"), "{message}");
}
