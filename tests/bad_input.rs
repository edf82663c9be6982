//! Bad input from the user, a file or an API client: a clear error, never a panic, and a running
//! VM is not disturbed. (Unknown flags, `--memory size=abc`, `--serial` with a bad mode, a missing
//! kernel file and `hugepages=on` on the command line are covered in `cli.rs`.)
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{VmmProcess, probe_guest, require_kvm, scratch_dir};

const EXIT: Duration = Duration::from_secs(10);
const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);

/// Runs the VMM to its exit; returns (exit code, stderr).
fn run_to_exit(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let mut vmm = VmmProcess::spawn(args, dir);
    let code = vmm.wait_exit(EXIT);
    (code, vmm.stderr())
}

/// Boots `kernel` from the command line and expects a clean failure; returns stderr.
fn boot_fails(kernel: &Path, dir: &Path) -> String {
    let (code, stderr) = run_to_exit(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "size=64M",
            "--serial",
            "tty",
            "--console",
            "off",
        ],
        dir,
    );
    assert_ne!(code, Some(0), "stderr:\n{stderr}");
    assert!(code.is_some(), "killed by a signal; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn kernel_of_random_bytes_is_refused_as_no_known_format() {
    require_kvm();
    let dir = scratch_dir("random-kernel");
    let kernel = dir.join("random.img");
    let mut bytes = vec![0u8; 64 << 10];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    std::fs::write(&kernel, &bytes).unwrap();

    let stderr = boot_fails(&kernel, &dir);

    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("elf") && lower.contains("bzimage"),
        "no 'not an ELF or bzImage' message: {stderr}"
    );
}

/// Links a minimal static ELF at 1 MiB with no PVH note.
fn elf_without_pvh_note(dir: &Path) -> PathBuf {
    let source = dir.join("tiny.S");
    std::fs::write(
        &source,
        ".globl _start\n.text\n_start:\n  hlt\n  jmp _start\n",
    )
    .unwrap();
    let object = dir.join("tiny.o");
    let elf = dir.join("tiny.elf");
    let tool = |program: &str, args: &[&str]| {
        let output = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} ({e}): apt-get install gcc binutils"));
        assert!(
            output.status.success(),
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    tool(
        "gcc",
        &[
            "-c",
            source.to_str().unwrap(),
            "-o",
            object.to_str().unwrap(),
        ],
    );
    tool(
        "ld",
        &[
            "-static",
            "-nostdlib",
            "-Ttext=0x100000",
            "-e",
            "_start",
            object.to_str().unwrap(),
            "-o",
            elf.to_str().unwrap(),
        ],
    );
    elf
}

#[test]
fn elf_without_pvh_note_is_refused_clearly() {
    require_kvm();
    let dir = scratch_dir("no-pvh-note");
    let kernel = elf_without_pvh_note(&dir);

    let stderr = boot_fails(&kernel, &dir);

    assert!(
        stderr.contains("PVH"),
        "message does not say the PVH entry is missing: {stderr}"
    );
}

#[test]
fn host_program_as_kernel_is_refused_clearly() {
    require_kvm();
    let dir = scratch_dir("bin-true");

    let stderr = boot_fails(Path::new("/bin/true"), &dir);

    assert!(stderr.contains("cloud-hypervisor: Error:"), "{stderr}");
    assert!(
        stderr.contains("PVH") || stderr.to_lowercase().contains("elf"),
        "message does not say what is wrong with the ELF: {stderr}"
    );
}

#[test]
fn zero_boot_vcpus_is_refused() {
    let dir = scratch_dir("cpus-zero");
    let kernel = probe_guest();

    let (code, stderr) = run_to_exit(
        &["--kernel", kernel.to_str().unwrap(), "--cpus", "boot=0"],
        &dir,
    );

    assert_ne!(code, Some(0));
    assert!(stderr.contains("boot=0"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn one_mib_of_memory_is_refused() {
    let dir = scratch_dir("memory-1m");
    let kernel = probe_guest();

    let (code, stderr) = run_to_exit(
        &["--kernel", kernel.to_str().unwrap(), "--memory", "size=1M"],
        &dir,
    );

    assert_ne!(code, Some(0));
    assert!(stderr.contains("Invalid memory size"), "{stderr}");
    assert!(stderr.contains("64 MiB"), "{stderr}");
}

/// A VMM with an API socket and no VM.
fn api_only_vmm(dir: &Path) -> VmmProcess {
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], dir);
    vmm.wait_for_api(EXIT);
    vmm
}

fn json_messages(response: &common::Response) -> Vec<String> {
    serde_json::from_slice(&response.body).unwrap_or_else(|e| {
        panic!(
            "error body is not a JSON array of strings ({e}): {}",
            String::from_utf8_lossy(&response.body)
        )
    })
}

#[test]
fn create_with_malformed_json_is_400_with_a_json_body() {
    let dir = scratch_dir("create-bad-json");
    let vmm = api_only_vmm(&dir);

    let response = vmm.api("PUT", "vm.create", Some("{\"payload\": {\"kernel\": "));

    assert_eq!(response.status, 400);
    assert!(!json_messages(&response).is_empty());
    assert_eq!(vmm.api("GET", "vm.info", None).status, 404);
}

#[test]
fn create_with_hugepages_is_400_naming_live_update() {
    let dir = scratch_dir("create-hugepages");
    let vmm = api_only_vmm(&dir);
    let config = serde_json::json!({
        "memory": {"size": 64u64 << 20, "hugepages": true},
        "payload": {"kernel": probe_guest()},
    });

    let response = vmm.api("PUT", "vm.create", Some(&config.to_string()));

    assert_eq!(response.status, 400);
    let messages = json_messages(&response).join(" ");
    assert!(messages.contains("memory.hugepages"), "{messages}");
    assert!(messages.contains("live update"), "{messages}");
}

#[test]
fn boot_with_a_vanished_kernel_fails_and_the_vmm_keeps_serving() {
    require_kvm();
    let dir = scratch_dir("boot-missing-kernel");
    let vmm = api_only_vmm(&dir);
    // The kernel exists at create time (create checks it) and is gone at boot.
    let kernel = dir.join("vanishing.elf");
    std::fs::copy(probe_guest(), &kernel).unwrap();
    let config = serde_json::json!({
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": kernel},
        "console": {"mode": "Off"},
    });
    assert_eq!(
        vmm.api("PUT", "vm.create", Some(&config.to_string()))
            .status,
        204
    );
    std::fs::remove_file(&kernel).unwrap();

    let response = vmm.api("PUT", "vm.boot", None);

    assert!((400..600).contains(&response.status), "{response:?}");
    let messages = json_messages(&response).join(" ");
    assert!(messages.contains("vanishing.elf"), "{messages}");
    assert_eq!(vmm.api("GET", "vmm.ping", None).status, 200);
}

/// Sends raw bytes on a new API connection, ends the request side, returns the response.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of a raw HTTP response.
fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

#[test]
fn malformed_http_gets_4xx_while_the_guest_keeps_running() {
    require_kvm();
    let dir = scratch_dir("malformed-http");
    let vmm = VmmProcess::probe(1, "64M", "fill=1 status_ms=300", &dir, &[]);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (next, before) = vmm.next_status(next, LINE);
    let socket = vmm.api_socket.clone().unwrap();

    let garbage = raw_exchange(&socket, b"\x00\x01\xfe\xff garbage \x7f\r\n\r\n");
    let no_version = raw_exchange(&socket, b"GET /api/v1/vmm.ping\r\n\r\n");
    let huge_body = raw_exchange(
        &socket,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999\r\n\r\n",
    );

    assert_eq!(status_of(&garbage), 400, "{garbage:?}");
    assert_eq!(status_of(&no_version), 400, "{no_version:?}");
    assert_eq!(status_of(&huge_body), 413, "{huge_body:?}");
    for response in [&garbage, &no_version, &huge_body] {
        let (_, body) = response.split_once("\r\n\r\n").unwrap();
        let messages: Vec<String> = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("body is not a JSON array ({e}): {response:?}"));
        assert!(!messages.is_empty());
    }
    let (next, first) = vmm.next_status(next, LINE);
    let (_, second) = vmm.next_status(next, LINE);
    assert!(first.get("seq") > before.get("seq"));
    assert!(second.get("pages") > first.get("pages"));
    assert_eq!(second.get("errors"), 0);
    assert_eq!(vmm.vm_state(), "Running");
}
