//! The `cloud-hypervisor` binary's command line: bad flags and bad values fail with clear
//! messages before any VM is built.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// An existing file to stand in for a kernel (never booted by these tests).
fn some_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")
}

#[test]
fn unknown_flag_fails_naming_it() {
    let output = run(&["--bogus"]);

    assert!(!output.status.success());
    assert!(stderr(&output).contains("--bogus"), "{}", stderr(&output));
}

#[test]
fn bad_memory_size_names_the_value() {
    let kernel = some_file();

    let output = run(&["--kernel", kernel.to_str().unwrap(), "--memory", "size=abc"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("--memory"), "{message}");
    assert!(message.contains("'abc'"), "{message}");
}

#[test]
fn hugepages_are_refused_with_the_live_update_reason() {
    let kernel = some_file();

    let output = run(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "size=1G,hugepages=on",
    ]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains("Live update needs shmem-backed RAM; hugepages=on is not supported"),
        "{message}"
    );
}

#[test]
fn missing_kernel_file_is_named() {
    let output = run(&["--kernel", "/nonexistent/vmlinux"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(
        message.contains("The kernel '/nonexistent/vmlinux' does not exist"),
        "{message}"
    );
}

#[test]
fn neither_kernel_nor_api_socket_is_an_error() {
    let output = run(&[]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("--api-socket"), "{message}");
}

#[test]
fn vm_options_without_kernel_are_an_error() {
    let output = run(&["--api-socket", "/tmp/unused.sock", "--memory", "size=1G"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("--kernel"), "{message}");
}

#[test]
fn bad_serial_mode_names_the_flag() {
    let kernel = some_file();

    let output = run(&["--kernel", kernel.to_str().unwrap(), "--serial", "loud"]);

    let message = stderr(&output);
    assert!(!output.status.success());
    assert!(message.contains("--serial"), "{message}");
}

#[test]
fn version_prints_the_name_and_succeeds() {
    let output = run(&["--version"]);

    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("cloud-hypervisor "));
}
