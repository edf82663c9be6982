//! The VM lifecycle driven over the REST API of a VMM started with only `--api-socket`: create,
//! boot, pause, resume, shutdown, reboot, delete, and the wrong-state answers in between.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{VmmProcess, probe_guest, scratch_dir};

const START: Duration = Duration::from_secs(10);
const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);

/// A VMM with an API socket and no VM.
fn api_only_vmm(dir: &Path) -> VmmProcess {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm: run on a host with KVM (modprobe kvm_intel or kvm_amd)"
    );
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], dir);
    vmm.wait_for_api(START);
    vmm
}

/// A VmConfig for the probe guest whose serial goes to the VMM's stdout (seen by the harness).
fn probe_config() -> String {
    serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": probe_guest(), "cmdline": "fill=1 status_ms=300"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
    .to_string()
}

/// A VMM whose probe VM was created and booted over the API, after its first status line.
fn running_probe_vm(dir: &Path) -> (VmmProcess, usize) {
    let vmm = api_only_vmm(dir);
    assert_eq!(
        vmm.api("PUT", "vm.create", Some(&probe_config())).status,
        204
    );
    assert_eq!(vmm.api("PUT", "vm.boot", None).status, 204);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (next, _) = vmm.next_status(next, LINE);
    (vmm, next)
}

#[test]
fn info_before_create_is_404_with_a_json_array_body() {
    let dir = scratch_dir("info-before-create");
    let vmm = api_only_vmm(&dir);

    let response = vmm.api("GET", "vm.info", None);

    assert_eq!(response.status, 404);
    let body: Vec<String> = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("body is not a JSON array of strings: {e}: {response:?}"));
    assert!(!body.is_empty());
}

#[test]
fn ch_remote_create_makes_a_created_vm() {
    let dir = scratch_dir("create");
    let vmm = api_only_vmm(&dir);
    let config = dir.join("vm.json");
    std::fs::write(&config, probe_config()).unwrap();

    let output = vmm.ch_remote(&["create", config.to_str().unwrap()]);

    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    assert_eq!(vmm.vm_state(), "Created");
}

#[test]
fn create_answers_204_and_boot_runs_the_guest() {
    let dir = scratch_dir("create-boot");
    let vmm = api_only_vmm(&dir);

    let created = vmm.api("PUT", "vm.create", Some(&probe_config()));
    let booted = vmm.api("PUT", "vm.boot", None);

    assert_eq!(created.status, 204, "{:?}", created.error_messages());
    assert_eq!(booted.status, 204, "{:?}", booted.error_messages());
    assert_eq!(vmm.vm_state(), "Running");
    let (next, banner) = vmm.next_banner(0, BOOT);
    assert_eq!(banner["cpus"], "2");
    let (next, first) = vmm.next_status(next, LINE);
    let (_, second) = vmm.next_status(next, LINE);
    assert!(second.get("pages") > first.get("pages"));
}

#[test]
fn requests_in_the_wrong_state_are_409() {
    let dir = scratch_dir("conflicts");
    let (vmm, _) = running_probe_vm(&dir);

    let boot_again = vmm.api("PUT", "vm.boot", None);
    let resume_running = vmm.api("PUT", "vm.resume", None);
    let first_pause = vmm.api("PUT", "vm.pause", None);
    let second_pause = vmm.api("PUT", "vm.pause", None);

    assert_eq!(boot_again.status, 409, "{:?}", boot_again.error_messages());
    assert_eq!(
        resume_running.status,
        409,
        "{:?}",
        resume_running.error_messages()
    );
    assert_eq!(
        first_pause.status,
        204,
        "{:?}",
        first_pause.error_messages()
    );
    assert_eq!(
        second_pause.status,
        409,
        "{:?}",
        second_pause.error_messages()
    );
    assert_eq!(vmm.vm_state(), "Paused");
}

#[test]
fn shutdown_stops_the_vm_and_boot_starts_it_again() {
    let dir = scratch_dir("shutdown-boot");
    let (vmm, _) = running_probe_vm(&dir);

    let shutdown = vmm.api("PUT", "vm.shutdown", None);
    let state_after_shutdown = vmm.vm_state();
    let lines_before_boot = vmm.lines().len();
    let boot = vmm.api("PUT", "vm.boot", None);

    assert_eq!(shutdown.status, 204, "{:?}", shutdown.error_messages());
    assert_eq!(state_after_shutdown, "Shutdown");
    assert_eq!(boot.status, 204, "{:?}", boot.error_messages());
    assert_eq!(vmm.vm_state(), "Running");
    let (next, _) = vmm.next_banner(lines_before_boot, BOOT);
    let (_, status) = vmm.next_status(next, LINE);
    assert_eq!(status.get("seq"), 1);
}

#[test]
fn reboot_starts_the_guest_again() {
    let dir = scratch_dir("reboot");
    let (vmm, next) = running_probe_vm(&dir);

    let reboot = vmm.api("PUT", "vm.reboot", None);

    assert_eq!(reboot.status, 204, "{:?}", reboot.error_messages());
    let (next, _) = vmm.next_banner(next, BOOT);
    let (_, status) = vmm.next_status(next, LINE);
    assert_eq!(status.get("seq"), 1);
    assert_eq!(vmm.vm_state(), "Running");
}

#[test]
fn delete_removes_the_vm() {
    let dir = scratch_dir("delete");
    let (vmm, _) = running_probe_vm(&dir);

    let delete = vmm.api("PUT", "vm.delete", None);

    assert_eq!(delete.status, 204, "{:?}", delete.error_messages());
    assert_eq!(vmm.api("GET", "vm.info", None).status, 404);
}

#[test]
fn ping_reports_versions_features_and_the_vmm_pid() {
    let dir = scratch_dir("ping");
    let vmm = api_only_vmm(&dir);

    let output = vmm.ch_remote(&["ping"]);

    assert!(output.status.success(), "{output:?}");
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(body["build_version"].is_string(), "{body}");
    assert!(body["version"].is_string(), "{body}");
    assert!(body["features"].is_array(), "{body}");
    assert_eq!(body["pid"], vmm.pid());
}

#[test]
fn shutdown_vmm_exits_0_and_removes_the_socket() {
    let dir = scratch_dir("shutdown-vmm");
    let (mut vmm, _) = running_probe_vm(&dir);
    let socket = vmm.api_socket.clone().unwrap();

    let output = vmm.ch_remote(&["shutdown-vmm"]);
    let code = vmm.wait_exit(Duration::from_secs(10));

    assert_eq!(code, Some(0), "stderr:\n{}", vmm.stderr());
    assert!(!socket.exists(), "{} still exists", socket.display());
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn shutdown_vmm_always_answers_before_the_process_exits() {
    // The answer and the exit race; a few rounds make a lost answer show up reliably.
    for round in 0..10 {
        let dir = scratch_dir(&format!("shutdown-vmm-answer-{round}"));
        let mut vmm = api_only_vmm(&dir);
        let socket = vmm.api_socket.clone().unwrap();

        let response = common::request(&socket, "PUT", "vmm.shutdown", None);
        let code = vmm.wait_exit(START);

        assert!(
            matches!(response, Ok(ref r) if r.status == 204),
            "round {round}: vmm.shutdown got {response:?} instead of 204"
        );
        assert_eq!(code, Some(0));
    }
}

#[test]
fn api_socket_is_private_to_its_owner() {
    let dir = scratch_dir("socket-mode");
    let vmm = api_only_vmm(&dir);

    let metadata = std::fs::metadata(vmm.api_socket.as_ref().unwrap()).unwrap();

    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
}

#[test]
fn second_vmm_on_the_same_socket_fails_and_the_first_keeps_serving() {
    let dir = scratch_dir("socket-in-use");
    let mut first = api_only_vmm(&dir);
    let second_dir = dir.join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let socket = first.api_socket.clone().unwrap();

    let mut second = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &second_dir);
    let code = second.wait_exit(START);

    assert_ne!(code, Some(0));
    let message = second.stderr();
    assert!(message.contains("in use"), "{message}");
    assert!(message.contains(socket.to_str().unwrap()), "{message}");
    assert!(first.is_running());
    assert_eq!(first.api("GET", "vmm.ping", None).status, 200);
}
