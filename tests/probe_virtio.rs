//! The VMM's virtio-pci devices (blk, rng, console) on real KVM, driven by the probe guest's
//! polled virtio driver (`virtio=1`, `blk_io=1`): data reaches the guest, guest writes reach
//! the host files, a read-only disk refuses writes, and `vm.counters` counts it all.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ProbeStatus, ProbeVm, VmmProcess, require_kvm, scratch_dir};

/// Bound on every wait for a guest line (boot included).
const LINE: Duration = Duration::from_secs(30);
/// Small pattern: guest memory work is slow on this host's paravirtualised KVM.
const VIRTIO_CMDLINE: &str = "fill=1 status_ms=300 virtio=1";
const SECTOR: usize = 512;
/// 1 MiB image: 2048 sectors.
const IMAGE_SECTORS: u64 = 2048;
/// The first 16 bytes of sector 0 of every test image.
const SECTOR0_HEAD: &[u8; 16] = b"PROBE-DISK-\x00\x01\xfe\xff\x7f";
const HELLO: &str = "probe: hello from virtio-console\n";

/// A raw image with [`SECTOR0_HEAD`] at the start, the rest of sector 0 0xaa, the rest zero.
fn write_image(dir: &Path) -> PathBuf {
    let mut image = vec![0u8; IMAGE_SECTORS as usize * SECTOR];
    image[..SECTOR].fill(0xaa);
    image[..16].copy_from_slice(SECTOR0_HEAD);
    let path = dir.join("disk.img");
    std::fs::write(&path, &image).unwrap();
    path
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Boots the probe with 1 vCPU, 64 MiB, an API socket, `console` and `extra` arguments.
fn boot(dir: &Path, cmdline: &str, console: &str, extra: &[&str]) -> VmmProcess {
    require_kvm();
    VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cmdline,
            console,
            extra,
            ..ProbeVm::default()
        },
    )
}

/// Waits for the line `probe: <text>` (nothing after it; firmware text may precede it).
fn wait_line(vmm: &VmmProcess, text: &str) {
    let wanted = format!("probe: {text}");
    vmm.wait_for(0, LINE, |line| {
        line.trim_end().ends_with(&wanted).then_some(())
    });
}

/// Waits for the first line starting with `probe: <prefix>` and returns it.
fn wait_prefix(vmm: &VmmProcess, prefix: &str) -> String {
    let wanted = format!("probe: {prefix}");
    vmm.wait_for(0, LINE, |line| {
        line.find(&wanted)
            .map(|at| line[at..].trim_end().to_string())
    })
}

/// `vm.counters` through `ch-remote counters`: device id -> counter -> value.
fn counters(vmm: &VmmProcess) -> BTreeMap<String, BTreeMap<String, u64>> {
    let out = vmm.ch_remote(&["counters"]);
    assert!(
        out.status.success(),
        "ch-remote counters failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ch-remote counters printed no counter map ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn counter(all: &BTreeMap<String, BTreeMap<String, u64>>, device: &str, name: &str) -> u64 {
    *all.get(device)
        .and_then(|c| c.get(name))
        .unwrap_or_else(|| panic!("no counter {device}/{name} in {all:?}"))
}

#[test]
fn probe_reads_disk_capacity_and_sector0_and_writes_marker_to_host_file() {
    let dir = scratch_dir("virtio-blk-rw");
    let image = write_image(&dir);
    let disk = format!("path={}", image.display());
    let started = Instant::now();

    let vmm = boot(&dir, VIRTIO_CMDLINE, "off", &["--disk", &disk]);
    let blk = wait_prefix(&vmm, "virtio blk ok");
    let blk_at = started.elapsed();
    wait_line(&vmm, "virtio blk write ok");

    assert_eq!(
        blk,
        format!(
            "probe: virtio blk ok capacity={IMAGE_SECTORS} sector0={}",
            hex(SECTOR0_HEAD)
        )
    );
    let contents = std::fs::read(&image).unwrap();
    let mut marker = b"probe-wrote-1".to_vec();
    marker.resize(SECTOR, 0);
    assert_eq!(
        &contents[SECTOR..2 * SECTOR],
        &marker[..],
        "sector 1 of the host file"
    );
    assert_eq!(
        contents[..16],
        SECTOR0_HEAD[..],
        "sector 0 must be untouched"
    );
    eprintln!("virtio blk line {blk_at:?} after spawn");
}

#[test]
fn counters_report_the_probes_blk_reads_and_write() {
    let dir = scratch_dir("virtio-blk-counters");
    let image = write_image(&dir);
    let disk = format!("path={},id=probedisk", image.display());

    let vmm = boot(&dir, VIRTIO_CMDLINE, "off", &["--disk", &disk]);
    wait_line(&vmm, "virtio blk write ok");
    let all = counters(&vmm);

    // Sector 0, sector 1 (old marker), then the write of sector 1 and its read-back.
    assert_eq!(counter(&all, "probedisk", "read_ops"), 3, "{all:?}");
    assert_eq!(counter(&all, "probedisk", "read_bytes"), 3 * SECTOR as u64);
    assert_eq!(counter(&all, "probedisk", "write_ops"), 1, "{all:?}");
    assert_eq!(counter(&all, "probedisk", "write_bytes"), SECTOR as u64);
}

#[test]
fn readonly_disk_answers_write_with_ioerr_and_file_is_unchanged() {
    let dir = scratch_dir("virtio-blk-readonly");
    let image = write_image(&dir);
    let before = std::fs::read(&image).unwrap();
    let disk = format!("path={},readonly=on", image.display());

    let mut vmm = boot(&dir, VIRTIO_CMDLINE, "off", &["--disk", &disk]);
    let blk = wait_prefix(&vmm, "virtio blk ok");
    wait_line(&vmm, "virtio blk write error status=1");
    // The guest keeps running after the refused write.
    let (_, status) = vmm.next_status(0, LINE);

    assert!(blk.ends_with(&hex(SECTOR0_HEAD)), "{blk}");
    assert_eq!(status.get("errors"), 0, "{status:?}");
    assert!(vmm.is_running(), "VMM exited: {}", vmm.stderr());
    assert!(
        std::fs::read(&image).unwrap() == before,
        "read-only image was modified"
    );
}

#[test]
fn rng_request_gets_16_bytes_and_is_counted() {
    let dir = scratch_dir("virtio-rng");

    let vmm = boot(&dir, VIRTIO_CMDLINE, "off", &[]);
    wait_line(&vmm, "virtio rng ok bytes=16");
    let all = counters(&vmm);

    assert_eq!(counter(&all, "_rng", "entropy_bytes"), 16, "{all:?}");
    assert_eq!(counter(&all, "_rng", "requests"), 1, "{all:?}");
}

#[test]
fn console_transmit_reaches_the_console_file() {
    let dir = scratch_dir("virtio-console");
    let file = dir.join("console.txt");
    let console = format!("file={}", file.display());

    let vmm = boot(&dir, VIRTIO_CMDLINE, &console, &[]);
    wait_line(&vmm, "virtio console ok bytes=33");
    // The guest saw its buffer used; the host file must already hold the line.
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let all = counters(&vmm);

    assert_eq!(text, HELLO, "console.txt");
    assert_eq!(counter(&all, "_console", "tx_bytes"), HELLO.len() as u64);
}

#[test]
fn missing_disk_and_console_are_reported_absent() {
    let dir = scratch_dir("virtio-absent");

    let vmm = boot(&dir, VIRTIO_CMDLINE, "off", &[]);
    wait_prefix(&vmm, "virtio done ms=");
    let lines = vmm.lines();

    for wanted in ["probe: virtio blk absent", "probe: virtio console absent"] {
        assert!(
            lines.iter().any(|l| l.trim_end().ends_with(wanted)),
            "no {wanted:?} in {lines:#?}"
        );
    }
}

#[test]
fn blk_io_adds_one_successful_read_per_status_line() {
    let dir = scratch_dir("virtio-blk-io");
    let image = write_image(&dir);
    let disk = format!("path={}", image.display());

    let vmm = boot(
        &dir,
        "fill=1 status_ms=300 blk_io=1",
        "off",
        &["--disk", &disk],
    );
    let mut statuses: Vec<ProbeStatus> = Vec::new();
    let mut next = 0;
    for _ in 0..4 {
        let (after, status) = vmm.next_status(next, LINE);
        next = after;
        statuses.push(status);
    }
    let all = counters(&vmm);

    for status in &statuses {
        // A read not done within its tick is collected at the next one: at most one behind.
        let (ok, seq) = (status.get("blk_ok"), status.get("seq"));
        assert_eq!(status.get("blk_err"), 0, "{status:?}");
        assert!(ok <= seq && ok + 1 >= seq, "{status:?}");
    }
    assert!(
        statuses[3].get("blk_ok") > statuses[0].get("blk_ok"),
        "{statuses:?}"
    );
    assert!(
        counter(&all, "_disk0", "read_ops") >= statuses[3].get("blk_ok"),
        "{all:?}"
    );
    assert_eq!(counter(&all, "_disk0", "write_ops"), 0, "{all:?}");
}
