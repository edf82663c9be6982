//! `--liveupdate inherit=NAME`: the VMM takes its LUO session fd the systemd way (`LISTEN_FDS`)
//! and refuses, before anything runs, every environment that does not give it one. A shell
//! plays the service manager (fd 3, `LISTEN_PID=$$`, then exec); the real session fd and the
//! kexec are covered by `scripts/e2e-kexec --case inherited` (tests/slow_kexec.rs).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::process::{Command, Output};

/// Runs the VMM from `sh -c SCRIPT`, where `$VMM` is the binary and `$API` an API socket path.
fn run_from_shell(script: &str) -> Output {
    let api = std::env::temp_dir().join(format!("inherit-{}.sock", std::process::id()));
    Command::new("sh")
        .args(["-c", script])
        .env("VMM", env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .env("API", &api)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_FDNAMES")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_listen_fds_the_vmm_refuses_naming_luosession() {
    let output = run_from_shell(r#"exec "$VMM" --api-socket "path=$API" --liveupdate inherit=vm"#);

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("LISTEN_FDS is not set"), "{err}");
    assert!(err.contains("LUOSession="), "{err}");
}

#[test]
fn an_fd_that_is_no_luo_session_is_refused_by_number_and_name() {
    let output = run_from_shell(
        r#"exec 3</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=vm \
            exec "$VMM" --api-socket "path=$API" --liveupdate inherit=vm"#,
    );

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("fd 3 (name vm) is not a LUO session fd"),
        "{err}"
    );
}

#[test]
fn fds_passed_to_another_pid_are_refused() {
    let output = run_from_shell(
        r#"exec 3</dev/null; LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=vm \
            exec "$VMM" --api-socket "path=$API" --liveupdate inherit=vm"#,
    );

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("LISTEN_PID is 1, not this process"), "{err}");
}

#[test]
fn an_unknown_fd_name_is_refused_listing_the_names() {
    let output = run_from_shell(
        r#"exec 3</dev/null 4</dev/null; LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=store:other \
            exec "$VMM" --api-socket "path=$API" --liveupdate inherit=vm"#,
    );

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains(r#"No inherited fd is named "vm" (LISTEN_FDNAMES="store:other")"#),
        "{err}"
    );
}

#[test]
fn a_non_numeric_listen_fds_is_refused() {
    let output = run_from_shell(
        r#"LISTEN_PID=$$ LISTEN_FDS=one exec "$VMM" --api-socket "path=$API" --liveupdate inherit=vm"#,
    );

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains(r#"LISTEN_FDS="one" is not a number"#), "{err}");
}

#[test]
fn agent_and_inherit_together_are_refused() {
    let output = run_from_shell(
        r#"exec "$VMM" --api-socket "path=$API" --liveupdate agent=/run/ch-luod.sock,inherit=vm"#,
    );

    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("not both"), "{err}");
}
