//! vfio-user on real KVM: the VMM attaches `vfio-user-testdev`, which DMAs an advancing counter
//! into guest RAM while the probe guest runs; a missing server is a clear startup error. A
//! restart-mode live update hands the connection and the MSI eventfd to the successor: the
//! server sees no reconnect, the counter runs on through the pause, and the probe, counting
//! the device's MSIs one by one, takes every interrupt the device raised. A snapshot of a VM
//! whose device server persists is restored against the same server, the device going on;
//! without persist it is refused.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Agent, TestDev, VmmProcess, field, next_userdev, probe_fields, require_kvm, scratch_dir,
};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
const QUICK: &str = "fill=1 status_ms=300";
/// Where the test device DMAs: above the probe's pattern area (fill=1 keeps it small) and clear
/// of the boot data in low memory.
const DMA_ADDR: u64 = 0x300_0000;

/// The test device with DMA enabled at `DMA_ADDR` at `rate` records a second.
fn dma_testdev(dir: &Path, rate: u32) -> TestDev {
    TestDev::start(
        dir,
        "testdev",
        &[
            "--rate",
            &rate.to_string(),
            "--enable",
            &format!("{DMA_ADDR:#x},16"),
        ],
    )
}

/// The VMM's guest RAM memfd (offset = guest physical address below 3 GiB).
fn guest_ram(pid: u32) -> File {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    let memfd = std::fs::read_dir(&fds)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|fd| {
            std::fs::read_link(fd)
                .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:guest-ram"))
        })
        .unwrap_or_else(|| panic!("no /memfd:guest-ram link in {}", fds.display()));
    File::open(memfd).unwrap()
}

/// The device's record: (counter, timestamp in ns since the epoch).
fn read_record(ram: &File) -> (u64, u64) {
    let mut bytes = [0u8; 16];
    ram.read_exact_at(&mut bytes, DMA_ADDR).unwrap();
    (
        u64::from_le_bytes(bytes[..8].try_into().unwrap()),
        u64::from_le_bytes(bytes[8..].try_into().unwrap()),
    )
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

#[test]
fn attached_testdev_dma_advances_counter_in_guest_ram_while_guest_runs() {
    require_kvm();
    let dir = scratch_dir("vfio-user-dma");
    let dev = dma_testdev(&dir, 1000);
    let vmm = VmmProcess::probe(1, "128M", QUICK, &dir, &["--user-device", &dev.arg()]);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let ram = guest_ram(vmm.pid());

    let (first, _) = read_record(&ram);
    sleep(Duration::from_millis(500));
    let (second, stamp) = read_record(&ram);
    let (_, status) = vmm.next_status(next, LINE);

    assert!(first > 0, "no DMA before the guest booted: {first}");
    assert!(
        second > first + 50,
        "counter barely moved: {first} -> {second}"
    );
    let age = now_ns().saturating_sub(stamp);
    assert!(age < 1_000_000_000, "timestamp {age} ns old");
    assert_eq!(status.get("errors"), 0, "{status:?}");
}

#[test]
fn missing_server_is_a_clear_startup_error() {
    require_kvm();
    let dir = scratch_dir("vfio-user-missing");
    let socket = format!("socket={}", dir.join("nobody.sock").display());
    let mut vmm = VmmProcess::probe(1, "128M", QUICK, &dir, &["--user-device", &socket]);

    let code = vmm.wait_exit(Duration::from_secs(10));

    assert_ne!(code, Some(0));
    assert!(code.is_some(), "the VMM kept running without its device");
    let stderr = vmm.stderr();
    assert!(
        stderr.contains("Cannot attach the vfio-user device"),
        "{stderr}"
    );
}

#[test]
fn probe_guest_drives_testdev_dma_and_receives_its_msi() {
    require_kvm();
    let dir = scratch_dir("vfio-user-guest");
    let dev = TestDev::start(&dir, "testdev", &[]);
    let cmdline = format!("{QUICK} userdev=1");
    let vmm = VmmProcess::probe(1, "128M", &cmdline, &dir, &["--user-device", &dev.arg()]);
    let (next, _banner) = vmm.next_banner(0, BOOT);

    let started = vmm.wait_for(next, LINE, |line| probe_fields(line, "userdev started"));
    let (next, first) = next_userdev(&vmm, next);
    let (next, second) = next_userdev(&vmm, next);
    let (_, status) = vmm.next_status(next, LINE);

    assert!(started.contains_key("bar"), "{started:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert!(
        field(&second, "irqs") > field(&first, "irqs"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
    assert_eq!(status.get("errors"), 0, "{status:?}");
}

#[test]
fn killed_server_leaves_the_guest_running() {
    require_kvm();
    let dir = scratch_dir("vfio-user-killed");
    let mut dev = TestDev::start(&dir, "testdev", &[]);
    let cmdline = format!("{QUICK} userdev=1");
    let mut vmm = VmmProcess::probe(1, "128M", &cmdline, &dir, &["--user-device", &dev.arg()]);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let (next, before) = next_userdev(&vmm, next);

    dev.kill();
    let (next, _) = next_userdev(&vmm, next);
    let (next, stopped) = next_userdev(&vmm, next);
    let (next, still) = next_userdev(&vmm, next);
    let (_, status) = vmm.next_status(next, LINE);

    assert!(field(&before, "counter") > 0, "{before:?}");
    // The device is gone: its buffer stops moving and its registers read as all ones.
    assert_eq!(field(&stopped, "counter"), field(&still, "counter"));
    assert_eq!(field(&still, "irqs"), u64::from(u32::MAX), "{still:?}");
    assert_eq!(status.get("errors"), 0, "{status:?}");
    assert!(vmm.is_running(), "the VMM exited with its device");
    let stderr = vmm.stderr();
    assert_eq!(stderr.matches("connection lost").count(), 1, "{stderr}");
}

#[test]
fn guest_reboot_reconnects_and_dma_starts_again() {
    require_kvm();
    let dir = scratch_dir("vfio-user-reboot");
    let dev = TestDev::start(&dir, "testdev", &[]);
    let cmdline = format!("{QUICK} userdev=1 reboot_after=2");
    let mut vmm = VmmProcess::probe(1, "128M", &cmdline, &dir, &["--user-device", &dev.arg()]);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let (next, before) = next_userdev(&vmm, next);

    let (next, _second_boot) = vmm.next_banner(next, BOOT);
    let (next, first) = next_userdev(&vmm, next);
    let (_, second) = next_userdev(&vmm, next);

    assert!(field(&before, "counter") > 0, "{before:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
    assert!(vmm.is_running(), "{}", vmm.stderr());
}

/// The last complete counting `userdev` line of a VMM that has exited (its last line may be
/// cut short where the guest was paused; `client` is the last field).
fn last_counted(vmm: &VmmProcess) -> std::collections::BTreeMap<String, String> {
    vmm.lines()
        .iter()
        .rev()
        .filter_map(|line| probe_fields(line, "userdev"))
        .find(|fields| fields.contains_key("client"))
        .unwrap_or_else(|| panic!("no userdev line in {:?}", vmm.lines()))
}

/// The probe command line that counts the device's MSIs one by one (acknowledge mode).
const COUNTING: &str = "fill=1 status_ms=100 userdev=1 userdev_ack=1";

/// Boots the counting probe with the agent and the (non-persisting) device, environment `env`.
fn counting_vmm(agent: &Agent, dev: &TestDev, dir: &Path, env: &[(&str, &str)]) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let kernel = common::probe_guest();
    let socket = dir.join("api.sock");
    let liveupdate = agent.arg();
    let device = dev.arg();
    let args = [
        "--api-socket",
        socket.to_str().unwrap(),
        "--liveupdate",
        &liveupdate,
        "--cpus",
        "boot=1",
        "--memory",
        "size=128M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        COUNTING,
        "--serial",
        "tty",
        "--console",
        "off",
        "--user-device",
        &device,
    ];
    VmmProcess::spawn_with_env(&args, dir, env)
}

/// Reads `count` userdev lines from line `skip` on; each must show the guest's MSI count
/// equal to the device's, or one behind with an interrupt in flight, and the first client.
fn counted_lines(
    vmm: &VmmProcess,
    skip: usize,
    count: usize,
) -> (usize, Vec<std::collections::BTreeMap<String, String>>) {
    let mut next = skip;
    let mut lines = Vec::new();
    for _ in 0..count {
        let (after, fields) = next_userdev(vmm, next);
        let (msis, irqs) = (field(&fields, "msis"), field(&fields, "irqs"));
        assert!(
            irqs == msis || irqs == msis + 1,
            "the guest took {msis} MSIs, the device raised {irqs}: {fields:?}"
        );
        assert_eq!(
            field(&fields, "client"),
            1,
            "the server saw a reconnect: {fields:?}"
        );
        lines.push(fields);
        next = after;
    }
    (next, lines)
}

#[test]
fn restart_live_update_hands_the_connection_over_without_a_disconnect_or_a_lost_interrupt() {
    require_kvm();
    let dir = scratch_dir("vfio-user-handover");
    let agent = Agent::start(&dir);
    // Not --persist: a reconnect would reset the device and stop its DMA.
    let mut dev = TestDev::start(&dir, "testdev", &[]);
    let old = counting_vmm(&agent, &dev, &dir.join("old"), &[]);
    let (next, _) = old.next_banner(0, BOOT);
    let (_, warmup) = counted_lines(&old, next, 3);

    let timings = old.live_update("userdev");
    let mut old = old;
    let old_exit = old.wait_exit(Duration::from_secs(10));
    // A pause of well over one interrupt period (100 ms): the device raises an interrupt
    // while no VMM runs the guest, and it must wait in the handed-over eventfd.
    sleep(Duration::from_millis(300));
    let successor = VmmProcess::successor(&agent, "userdev", &dir.join("new"), &[]);
    let before = last_counted(&old);
    let (_, first_status) = successor.next_status(0, LINE);
    let (next, after) = counted_lines(&successor, 0, 5);
    let (_, status) = successor.next_status(next, LINE);

    assert_eq!(old_exit, Some(0), "{}", old.stderr());
    assert!(
        field(&warmup[2], "msis") > field(&warmup[0], "msis"),
        "the guest takes no MSIs: {warmup:?}"
    );
    assert!(
        !successor.lines().iter().any(|l| l.contains("probe: start")),
        "the guest restarted: {:?}",
        successor.lines()
    );
    // The device kept DMA-ing through the pause, into the RAM both VMMs map.
    let (first, last) = (&after[0], &after[after.len() - 1]);
    let advanced = field(first, "counter") - field(&before, "counter");
    assert!(advanced > 0, "{before:?} {first:?}");
    assert!(
        field(last, "counter") > field(first, "counter"),
        "{after:?}"
    );
    // No interrupt lost for good: the acknowledge chain goes on (a lost MSI would stop it
    // with the device one ahead forever), and the counts match on every line.
    assert!(
        field(last, "msis") >= field(&before, "msis") + 3,
        "MSIs stopped: {before:?} {after:?}"
    );
    assert_eq!(status.get("errors"), 0, "{status:?}");
    assert!(dev.is_running(), "the server died");
    eprintln!(
        "vfio-user handover: counter {} -> {} (advanced {advanced} at 1000/s), MSIs taken {} -> {} \
         (device {} -> {}), guest pause (first stall_us after the update) {}, timings_us {timings}",
        field(&before, "counter"),
        field(first, "counter"),
        field(&before, "msis"),
        field(last, "msis"),
        field(&before, "irqs"),
        field(last, "irqs"),
        first_status.get("stall_us"),
    );
}

#[test]
fn cancelled_update_gives_the_device_back_to_the_old_vmm() {
    require_kvm();
    let dir = scratch_dir("vfio-user-cancel");
    let agent = Agent::start(&dir);
    let dev = TestDev::start(&dir, "testdev", &[]);
    let env = [("CHV_TEST_LIVE_UPDATE_FAIL_AT", "save")];
    let vmm = counting_vmm(&agent, &dev, &dir, &env);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (_, before) = counted_lines(&vmm, next, 1);

    let refused = vmm.try_live_update("cancelled");
    let after_update = vmm.lines().len();
    let (_, after) = counted_lines(&vmm, after_update, 6);

    assert!(!refused.is_success(), "{refused:?}");
    let messages = String::from_utf8_lossy(&refused.body).to_string();
    assert!(messages.contains("injected failure"), "{messages}");
    assert!(
        field(&after[5], "msis") >= field(&before[0], "msis") + 3,
        "MSIs stopped after the cancel: {before:?} {after:?}"
    );
    assert!(
        field(&after[5], "counter") > field(&after[0], "counter"),
        "{after:?}"
    );
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());
}

#[test]
fn live_update_after_the_server_died_is_refused_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("vfio-user-dead");
    let agent = Agent::start(&dir);
    let mut dev = TestDev::start(&dir, "testdev", &["--persist"]);
    let liveupdate = agent.arg();
    let device = format!("{},persist=on", dev.arg());
    let extra = ["--liveupdate", &liveupdate, "--user-device", &device];
    let vmm = VmmProcess::probe(1, "128M", QUICK, &dir, &extra);
    let (_, _banner) = vmm.next_banner(0, BOOT);

    dev.kill();
    let refused = vmm.try_live_update("dead");
    let after = vmm.lines().len();
    let (next, first) = vmm.next_status(after, LINE);
    let (_, second) = vmm.next_status(next, LINE);

    assert!(!refused.is_success(), "{refused:?}");
    let messages = String::from_utf8_lossy(&refused.body).to_string();
    assert!(messages.contains("does not answer"), "{messages}");
    assert!(second.get("seq") > first.get("seq"), "{first:?} {second:?}");
    assert_eq!(second.get("errors"), 0, "{second:?}");
}

/// The snapshot's `vm.snapshot` body, into `dir` (created).
fn snapshot_into(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    serde_json::json!({ "destination_url": format!("file://{}", dir.display()) }).to_string()
}

/// A snapshot leaves a device whose server persists with the snapshotted VM, which runs on
/// with it; a restore in a new VMM (the first one gone) connects to the same server again,
/// without a reset: the guest carries on from the snapshot and the device goes on, its DMA
/// reaching the restored guest's RAM and its interrupts raised to the new VMM.
#[test]
fn a_vm_with_a_persisting_device_is_snapshotted_and_restored_against_the_same_server() {
    require_kvm();
    let dir = scratch_dir("vfio-user-snapshot");
    let mut dev = TestDev::start(&dir, "testdev", &["--persist"]);
    let device = format!("{},persist=on", dev.arg());
    let cmdline = format!("{QUICK} userdev=1");
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let mut old = VmmProcess::probe(1, "128M", &cmdline, &old_dir, &["--user-device", &device]);
    let (next, _) = old.next_banner(0, BOOT);
    let (next, _) = next_userdev(&old, next);
    let (_, at_snapshot) = old.next_status(next, LINE);
    let snap = dir.join("snap");

    let snapshot = old.api("PUT", "vm.snapshot", Some(&snapshot_into(&snap)));
    let answered = old.lines().len();
    let (next, ran_on) = next_userdev(&old, answered);
    let (_, ran_on_later) = next_userdev(&old, next);
    let shutdown = old.api("PUT", "vmm.shutdown", None);
    old.wait_exit(Duration::from_secs(10));
    let before = last_counted(&old);
    let restore = format!("source_url=file://{},resume=on", snap.display());
    let new_dir = dir.join("new");
    std::fs::create_dir_all(&new_dir).unwrap();
    let new_socket = new_dir.join("api.sock");
    let restored = VmmProcess::spawn(
        &[
            "--api-socket",
            new_socket.to_str().unwrap(),
            "--restore",
            &restore,
        ],
        &new_dir,
    );
    let (next, first_status) = restored.next_status(0, LINE);
    let (next, first) = next_userdev(&restored, next);
    let (next, second) = next_userdev(&restored, next);
    let (_, status) = restored.next_status(next, LINE);

    assert_eq!(snapshot.status, 204, "{}", common::messages(&snapshot));
    assert!(shutdown.is_success(), "{}", common::messages(&shutdown));
    // The snapshotted VM ran on with its device.
    assert!(
        field(&ran_on_later, "counter") > field(&ran_on, "counter"),
        "{ran_on:?} {ran_on_later:?}"
    );
    let context = format!(
        "{first_status:?} {first:?} {second:?}\n{}",
        restored.stderr()
    );
    assert!(
        !restored.lines().iter().any(|l| l.contains("probe: start")),
        "the guest booted again: {context}"
    );
    assert!(
        first_status.get("seq") > at_snapshot.get("seq"),
        "status lines do not continue from the snapshot ({at_snapshot:?}): {context}"
    );
    assert_eq!(status.get("errors"), 0, "{status:?}");
    // Not reset: the counter goes on from where the server was, past anything the first VM
    // saw, and the device counts on the interrupts it raises (to the new VMM's eventfd).
    assert!(
        field(&first, "counter") > field(&before, "counter"),
        "{before:?} {context}"
    );
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "DMA stopped: {context}"
    );
    assert!(
        field(&second, "irqs") > field(&before, "irqs"),
        "{before:?} {context}"
    );
    assert!(
        field(&second, "irqs") > field(&first, "irqs"),
        "interrupts stopped: {context}"
    );
    assert_eq!(field(&second, "client"), 2, "one reconnect: {context}");
    assert!(dev.is_running(), "the server died");
}

/// A device whose server finds it at power-on for every new client cannot be snapshotted: a
/// restore would reset it under the guest. The snapshot is refused, naming the device and
/// what to do, and leaves no file; the guest and the device run on.
#[test]
fn a_snapshot_of_a_vm_with_a_device_without_persist_is_refused_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("vfio-user-snapshot-refused");
    let dev = TestDev::start(&dir, "testdev", &[]);
    let cmdline = format!("{QUICK} userdev=1");
    let vmm = VmmProcess::probe(1, "128M", &cmdline, &dir, &["--user-device", &dev.arg()]);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (_, _) = next_userdev(&vmm, next);
    let snap = dir.join("snap");

    let refused = vmm.api("PUT", "vm.snapshot", Some(&snapshot_into(&snap)));
    let answered = vmm.lines().len();
    let (next, first) = next_userdev(&vmm, answered);
    let (_, second) = next_userdev(&vmm, next);

    assert_eq!(refused.status, 500, "{refused:?}");
    let messages = common::messages(&refused);
    assert!(
        messages.contains("vfio-user/0")
            && messages.contains(&dev.socket.display().to_string())
            && messages.contains("add the device with persist=on"),
        "{messages}"
    );
    assert_eq!(std::fs::read_dir(&snap).unwrap().count(), 0, "files left");
    common::assert_guest_runs_on(&vmm, answered);
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "client"), 1, "the server saw a reconnect");
}
