//! The golden states: snapshots of probe-guest VMs saved by earlier builds
//! (`tests/data/golden-states/<name>/`, made by `scripts/make-golden-states`, each naming the
//! commit that saved it in `made-by`). This build must restore every one of them into a fresh
//! VMM and run it on with errors=0: the saved state is a contract between versions. (That no
//! saved type changes its shape under the same version is checked by `vmm`'s `state_schemas`
//! test, against the shapes recorded beside these states.) A state with a vfio-user device is
//! restored against a fresh device server at its saved socket.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Agent, ProbeStatus, VmmProcess, require_kvm, scratch_dir};

const LINE: Duration = Duration::from_secs(10);
/// Where the saved configurations find their host files (disk image, console file), as
/// `scripts/make-golden-states` laid them out.
const HOST_DIR: &str = "/tmp/chv-golden-states";
const PAGE: usize = 4096;

fn fixture(name: &str) -> PathBuf {
    common::repo_root()
        .join("tests/data/golden-states")
        .join(name)
}

/// Expands `memory.pages` (magic, RAM size, then offset and bytes of each non-zero page) into
/// the sparse RAM image `memory`.
fn unpack_memory(pages: &Path, memory: &Path) {
    let mut packed = Vec::new();
    File::open(pages).unwrap().read_to_end(&mut packed).unwrap();
    assert_eq!(&packed[..8], b"CHVPAGES", "{}", pages.display());
    let size = u64::from_le_bytes(packed[8..16].try_into().unwrap());
    let out = File::create(memory).unwrap();
    out.set_len(size).unwrap();
    for record in packed[16..].chunks(8 + PAGE) {
        assert_eq!(record.len(), 8 + PAGE, "{} is truncated", pages.display());
        let offset = u64::from_le_bytes(record[..8].try_into().unwrap());
        out.write_all_at(&record[8..], offset).unwrap();
    }
}

/// Lays golden state `name` out as a snapshot directory under `dir`, and its host files where
/// its configuration names them; returns the snapshot directory.
fn unpack(name: &str, dir: &Path) -> PathBuf {
    let from = fixture(name);
    let snap = dir.join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    for file in ["config.json", "state", "manifest.json"] {
        std::fs::copy(from.join(file), snap.join(file)).unwrap();
    }
    unpack_memory(&from.join("memory.pages"), &snap.join("memory"));
    let host = Path::new(HOST_DIR).join(name);
    let _ = std::fs::remove_dir_all(&host);
    std::fs::create_dir_all(&host).unwrap();
    let mut disk = b"GOLDEN-DISK".to_vec();
    disk.resize(1 << 20, 0);
    std::fs::write(host.join("disk.img"), disk).unwrap();
    snap
}

/// Restores golden state `name` in a new VMM (resumed) and asserts the guest carries on: its
/// status lines go on without a new boot, with no memory, disk or clock errors, its disk reads
/// going on.
fn assert_restores_and_runs(name: &str) {
    require_kvm();
    let dir = scratch_dir(&format!("golden-{name}"));

    let vmm = restore(name, &dir, &[]);

    assert_runs_on(name, &vmm, 0);
}

/// Restores golden state `name` in a new VMM (resumed) under `dir`, with `extra` options.
fn restore(name: &str, dir: &Path, extra: &[&str]) -> VmmProcess {
    spawn_restored(&unpack(name, dir), dir, extra)
}

/// A new VMM under `dir` restoring (resumed) the unpacked snapshot `snap`, with `extra` options.
fn spawn_restored(snap: &Path, dir: &Path, extra: &[&str]) -> VmmProcess {
    let socket = dir.join("api.sock");
    let source = format!("source_url=file://{},resume=on", snap.display());
    let mut args = vec![
        "--api-socket",
        socket.to_str().unwrap(),
        "--restore",
        &source,
    ];
    args.extend_from_slice(extra);
    VmmProcess::spawn(&args, dir)
}

/// Asserts the restored guest carries on (see [`assert_restores_and_runs`]) in the status lines
/// after output line `skip`.
fn assert_runs_on(name: &str, vmm: &VmmProcess, skip: usize) {
    let mut next = skip;
    let statuses: Vec<ProbeStatus> = (0..5)
        .map(|_| {
            let (after, status) = vmm.next_status(next, LINE);
            next = after;
            status
        })
        .collect();

    let context = format!("{name}: {statuses:?}\n{}", vmm.stderr());
    // A host whose KVM does not keep a guest's TSC (the VMM warns) gives the guest the host's,
    // behind the saved one on a host up for less time: each vCPU sees it go back once, and the
    // probe carries on from there. Elsewhere it never goes back.
    let tsc_not_kept = vmm
        .stderr()
        .lines()
        .any(|l| l.contains("KVM did not keep the guest's TSC") && l.contains("jumps back"));
    let tsc_back_at_most = if tsc_not_kept { 2 } else { 0 };
    assert!(
        !vmm.lines().iter().any(|l| l.contains("probe: start")),
        "the guest booted again: {context}"
    );
    assert!(statuses[4].get("seq") > statuses[0].get("seq"), "{context}");
    assert!(
        statuses[4].get("blk_ok") > statuses[0].get("blk_ok"),
        "disk reads stalled: {context}"
    );
    for status in &statuses {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("blk_err"), 0, "{context}");
        assert!(status.get("tsc_back") <= tsc_back_at_most, "{context}");
        assert_eq!(status.get("cpus"), 2, "{context}");
    }
    assert_eq!(
        statuses[4].get("tsc_back"),
        statuses[0].get("tsc_back"),
        "the guest's TSC went back after the restore: {context}"
    );
}

/// The probe with a disk, the virtio console and rng, exercised at boot (`virtio=1`).
#[test]
fn a_probe_vm_with_block_console_and_rng_saved_by_an_earlier_build_runs_on() {
    assert_restores_and_runs("probe-virtio");
}

/// The probe with a vsock device hot-added and then removed (released by the guest).
#[test]
fn a_vm_with_a_hot_added_and_removed_device_saved_by_an_earlier_build_runs_on() {
    assert_restores_and_runs("hotplug");
}

/// Release 0.1.0 saved no placement: it put the devices in the order of the configuration,
/// a removed one's place and MSI vectors included. This build drops a removed device's vectors
/// when it restores such a state, so the VM cannot be written back in 0.1.0's format: the
/// update is refused (409, saying why) before anything runs, and the guest runs on.
#[test]
fn a_vm_whose_devices_left_the_old_order_is_not_written_in_that_releases_format() {
    require_kvm();
    let dir = scratch_dir("golden-hotplug-format");
    let agent = Agent::start(&dir);
    let vmm = restore("hotplug", &dir, &["--liveupdate", &agent.arg()]);
    assert_runs_on("hotplug", &vmm, 0);
    let body = serde_json::json!({"session": "golden-back", "state_format": "0.1.0"}).to_string();

    let refused = vmm.api("PUT", "vm.live-update", Some(&body));
    let refused_at = vmm.lines().len();

    assert_eq!(refused.status, 409, "{:?}", refused.error_messages());
    let messages = refused.error_messages().join(": ");
    assert!(
        messages.contains(
            "Cannot write the VM's state as release 0.1.0 reads it: that release places the \
             devices in the order of the configuration"
        ),
        "{messages}"
    );
    assert_runs_on("hotplug", &vmm, refused_at);
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
}

/// The probe driving the vfio-user test device (`userdev=1`), its server `persist=on`. A
/// snapshot leaves the device's own state in its server, long gone by now: as
/// `docs/snapshot.md` says, a restore connects to whatever serves the saved socket, here a
/// fresh `vfio-user-testdev --persist` that finds the device at power-on, with its DMA engine
/// pointed at the guest's buffer (`testdev-enable`, recorded from the probe's banner). The
/// device's DMA must reach the restored guest. Its MSIs cannot be expected: the guest enabled
/// MSI in the old server's configuration space, and the fresh server's has it off.
#[test]
fn a_vm_with_a_vfio_user_device_saved_by_an_earlier_build_runs_on_against_a_fresh_server() {
    require_kvm();
    let name = "vfio-user";
    let dir = scratch_dir("golden-vfio-user");
    let snap = unpack(name, &dir);
    let enable = std::fs::read_to_string(fixture(name).join("testdev-enable")).unwrap();
    let _server = common::TestDev::start(
        &Path::new(HOST_DIR).join(name),
        "testdev",
        &["--persist", "--enable", enable.trim()],
    );

    let vmm = spawn_restored(&snap, &dir, &[]);

    assert_runs_on(name, &vmm, 0);
    // The first line was on its way out at the snapshot (the fresh device counts from 0).
    let (next, _) = common::next_userdev(&vmm, 0);
    let (next, first) = common::next_userdev(&vmm, next);
    let (_, second) = common::next_userdev(&vmm, next);
    let context = format!("{:?}\n{}", vmm.lines(), vmm.stderr());
    assert!(
        common::field(&second, "counter") > common::field(&first, "counter"),
        "the device's DMA does not reach the guest: {context}"
    );
    assert_eq!(common::field(&second, "client"), 1, "{context}");
}
