//! virtio-vsock with cloud-hypervisor's hybrid host side, on this host's KVM, with the probe
//! guest: bad configurations and bad host clients are refused without disturbing the VM.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{ProbeVm, VmmProcess, require_kvm, scratch_dir};

const BOOT: Duration = Duration::from_secs(30);
const EXIT: Duration = Duration::from_secs(10);

/// Boots the probe with `--vsock vsock` and waits for its first status line.
fn boot(dir: &Path, vsock: &str, cmdline: &str) -> (VmmProcess, usize) {
    std::fs::create_dir_all(dir).unwrap();
    let vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cmdline,
            extra: &["--vsock", vsock],
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_status(0, BOOT);
    (vmm, next)
}

/// Starts a VMM with `--vsock vsock` that must refuse it; returns its stderr.
fn refused(dir: &Path, vsock: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let mut vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cmdline: "fill=1",
            extra: &["--vsock", vsock],
            ..ProbeVm::default()
        },
    );
    let code = vmm.wait_exit(EXIT);
    assert_ne!(code, Some(0), "--vsock {vsock} was accepted");
    vmm.stderr()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn bad_vsock_options_are_refused_with_a_clear_error() {
    require_kvm();
    let dir = scratch_dir("vsock-bad");
    std::fs::create_dir_all(&dir).unwrap();
    let existing = dir.join("taken.sock");
    std::fs::write(&existing, b"").unwrap();
    let long = dir.join("v".repeat(100));
    let cases = [
        ("cid=2,socket=/tmp/x.sock".to_string(), "CID from 3"),
        (
            format!("cid=3,socket={}", existing.display()),
            "the path exists",
        ),
        (format!("cid=3,socket={}", long.display()), "1 to 96 bytes"),
        (
            "cid=3,socket=/nonexistent-dir/v.sock".to_string(),
            "not writable",
        ),
        ("cid=3".to_string(), "Missing key 'socket'"),
        (
            "cid=3,socket=/tmp/x.sock,colour=blue".to_string(),
            "Unknown key 'colour'",
        ),
    ];

    for (index, (vsock, expected)) in cases.iter().enumerate() {
        let stderr = refused(&dir.join(format!("case{index}")), vsock);

        assert!(
            stderr.contains(expected),
            "--vsock {vsock}: expected {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn a_second_vsock_device_is_refused_and_the_vm_runs_on() {
    require_kvm();
    let dir = scratch_dir("vsock-second");
    let socket = dir.join("v.sock");
    let (vmm, next) = boot(
        &dir,
        &format!("cid=3,socket={}", socket.display()),
        "fill=1",
    );
    let other = dir.join("w.sock");

    let body = serde_json::json!({"cid": 4, "socket": other}).to_string();
    let response = vmm.api("PUT", "vm.add-vsock", Some(&body));

    assert_eq!(response.status, 409, "{:?}", response.error_messages());
    assert!(
        common::messages(&response).contains("vsock device already"),
        "{}",
        common::messages(&response)
    );
    assert!(!other.exists());
    common::assert_guest_runs_on(&vmm, next);
    assert_eq!(vmm.vm_info()["config"]["vsock"]["cid"], 3);
}

#[test]
fn a_thousand_bad_host_clients_are_closed_and_leak_nothing() {
    require_kvm();
    let dir = scratch_dir("vsock-clients");
    let socket = dir.join("v.sock");
    let (vmm, next) = boot(
        &dir,
        &format!("cid=3,socket={}", socket.display()),
        "fill=1",
    );
    let before = open_fds(vmm.pid());
    let garbage = vec![b'x'; 100 * 1024];
    let lines: [&[u8]; 5] = [
        b"CONNECT\n",
        b"CONNECT 4294967296\n",
        b"CONNECT -1\n",
        b"HELLO\n",
        &garbage,
    ];

    for round in 0..1000 {
        let mut client = UnixStream::connect(&socket).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = client.write_all(lines[round % lines.len()]);
        let mut byte = [0u8; 1];
        let read = client.read(&mut byte);
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "round {round}: the VMM answered a bad CONNECT line"
        );
    }
    // A client that never finishes its line is dropped after a while; the others at once.
    let mut silent = UnixStream::connect(&socket).unwrap();
    silent.write_all(b"CONN").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8; 1];
    let read = silent.read(&mut byte);
    drop(silent);
    std::thread::sleep(Duration::from_millis(200));
    let after = open_fds(vmm.pid());

    assert!(
        matches!(read, Ok(0) | Err(_)),
        "a silent client was answered"
    );
    assert_eq!(after, before, "fds open before {before}, after {after}");
    common::assert_guest_runs_on(&vmm, next);
    let counters: serde_json::Value =
        serde_json::from_slice(&vmm.api("GET", "vm.counters", None).body).unwrap();
    assert!(
        counters["_vsock0"]["refused_connects"].as_u64().unwrap() >= 1000,
        "{counters}"
    );
}

#[test]
fn the_socket_file_goes_when_the_vmm_shuts_down() {
    require_kvm();
    let dir = scratch_dir("vsock-cleanup");
    let socket = dir.join("v.sock");
    let (mut vmm, _) = boot(
        &dir,
        &format!("cid=3,socket={}", socket.display()),
        "fill=1",
    );
    assert!(socket.exists());

    let response = vmm.api("PUT", "vmm.shutdown", None);
    assert!(response.is_success(), "{:?}", response.error_messages());
    vmm.wait_exit(EXIT);

    assert!(!socket.exists(), "the socket file outlived the VMM");
}
