//! `vm.add-user-device` on real KVM with the real `vfio-user-testdev`: cold-add before boot,
//! hot-add to a running probe guest (which finds the device by rescanning PCI, `userdev=2`),
//! the device carried by a reboot and a live update, and each error leaving the guest as it was.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Agent, Response, TestDev, VmmProcess, assert_events_in_order, assert_guest_runs_on, field,
    messages, next_started, next_userdev, probe_guest, read_events, require_kvm, scratch_dir,
};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
/// The probe drives the device and rescans PCI for it while it is absent.
const RESCAN: &str = "fill=1 status_ms=200 userdev=2";
/// Slot of the first added device: slot 1 is the virtio-rng (no disk, console off).
const FIRST_FREE_BDF: &str = "0000:00:02.0";

/// A UNIX socket that accepts connections and closes them at once: not a vfio-user server.
struct NotVfioUser {
    socket: PathBuf,
    _listener: std::thread::JoinHandle<()>,
}

impl NotVfioUser {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("not-vfio-user.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let handle = std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        Self {
            socket,
            _listener: handle,
        }
    }
}

fn add(vmm: &VmmProcess, body: &str) -> Response {
    vmm.api("PUT", "vm.add-user-device", Some(body))
}

fn json(response: &Response) -> serde_json::Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&response.body)))
}

/// The ids of the configured vfio-user devices, from `vm.info`.
fn user_device_ids(vmm: &VmmProcess) -> Vec<String> {
    let info = vmm.vm_info();
    info["config"]["user_devices"]
        .as_array()
        .map(|devices| {
            devices
                .iter()
                .map(|d| d["id"].as_str().unwrap_or("<none>").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Boots the probe guest with `RESCAN` and waits until it reported the device absent.
fn running_probe(dir: &Path, extra: &[&str]) -> (VmmProcess, usize) {
    let vmm = VmmProcess::probe(1, "128M", RESCAN, dir, extra);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let mut index = next;
    vmm.wait_for(next, LINE, |line| {
        index += 1;
        line.contains("probe: userdev absent").then_some(())
    });
    (vmm, index)
}

#[test]
fn cold_added_device_joins_the_config_and_is_attached_at_boot() {
    require_kvm();
    let dir = scratch_dir("userdev-cold");
    let dev = TestDev::start(&dir, "dev", &[]);
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &dir);
    vmm.wait_for_api(Duration::from_secs(10));
    let config = serde_json::json!({
        "payload": {"kernel": probe_guest(), "cmdline": "fill=1 status_ms=200 userdev=1"},
        "memory": {"size": 128u64 << 20},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    let created = vmm.api("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(created.status, 204, "{}", messages(&created));

    let argument = format!("socket={},id=cold0", dev.socket.display());
    let added = vmm.ch_remote(&["add-user-device", &argument]);
    let ids_before_boot = user_device_ids(&vmm);
    let booted = vmm.api("PUT", "vm.boot", None);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let (next, started) = next_started(&vmm, next);
    let (next, first) = next_userdev(&vmm, next);
    let (_, second) = next_userdev(&vmm, next);

    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    assert!(added.stdout.is_empty(), "a cold add prints nothing (204)");
    assert_eq!(ids_before_boot, ["cold0"]);
    assert_eq!(booted.status, 204, "{}", messages(&booted));
    assert_eq!(started["slot"], "2", "{started:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
}

#[test]
fn hot_added_device_is_found_by_a_guest_rescan_and_driven() {
    require_kvm();
    let dir = scratch_dir("userdev-hot");
    let events = format!("path={}", dir.join("events.json").display());
    let (vmm, next) = running_probe(&dir, &["--event-monitor", &events]);
    let dev = TestDev::start(&dir, "dev", &[]);

    let added = add(&vmm, &dev.body("hot0"));
    let (next, started) = next_started(&vmm, next);
    let (next, first) = next_userdev(&vmm, next);
    let (next, second) = next_userdev(&vmm, next);

    assert_eq!(added.status, 200, "{}", messages(&added));
    assert_eq!(
        json(&added),
        serde_json::json!({"id": "hot0", "bdf": FIRST_FREE_BDF})
    );
    assert_eq!(started["slot"], "2", "{started:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert!(
        field(&second, "irqs") > field(&first, "irqs"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
    assert_eq!(user_device_ids(&vmm), ["hot0"]);
    assert_events_in_order(
        &read_events(&dir.join("events.json")),
        &[("vm", "booted"), ("vm", "device-added")],
    );
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn ch_remote_hot_add_prints_id_and_bdf_and_generates_an_id() {
    require_kvm();
    let dir = scratch_dir("userdev-chremote");
    let (vmm, _) = running_probe(&dir, &[]);
    let dev = TestDev::start(&dir, "dev", &[]);

    let argument = format!("socket={}", dev.socket.display());
    let output = vmm.ch_remote(&["add-user-device", &argument]);

    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"id": "_user_device0", "bdf": FIRST_FREE_BDF})
    );
    assert_eq!(user_device_ids(&vmm), ["_user_device0"]);
}

#[test]
fn hot_added_device_is_attached_again_after_a_reboot() {
    require_kvm();
    let dir = scratch_dir("userdev-reboot");
    let (vmm, next) = running_probe(&dir, &[]);
    let dev = TestDev::start(&dir, "dev", &[]);
    let added = add(&vmm, &dev.body("hot0"));
    assert_eq!(added.status, 200, "{}", messages(&added));
    let (next, _) = next_started(&vmm, next);

    let rebooted = vmm.api("PUT", "vm.reboot", None);
    // Searched anywhere in the line: the old guest may have been cut mid-line.
    let mut index = next;
    vmm.wait_for(next, BOOT, |line| {
        index += 1;
        line.contains("probe: start ").then_some(())
    });
    let second_boot = index;
    let (next, started) = next_started(&vmm, second_boot);
    let (next, first) = next_userdev(&vmm, next);
    let (_, second) = next_userdev(&vmm, next);

    assert_eq!(rebooted.status, 204, "{}", messages(&rebooted));
    // Found by the boot scan this time, not by a rescan after an `absent`.
    let boot_lines = &vmm.lines()[second_boot..next];
    assert!(
        !boot_lines.iter().any(|l| l.contains("userdev absent")),
        "{boot_lines:?}"
    );
    assert_eq!(started["slot"], "2", "{started:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
}

#[test]
fn missing_socket_is_a_bad_request_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("userdev-missing");
    let (vmm, next) = running_probe(&dir, &[]);
    let body = serde_json::json!({"socket": dir.join("nobody.sock")}).to_string();

    let refused = add(&vmm, &body);

    assert_eq!(refused.status, 400, "{}", messages(&refused));
    assert!(
        messages(&refused).contains("does not exist"),
        "{}",
        messages(&refused)
    );
    assert!(user_device_ids(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn socket_not_speaking_vfio_user_is_refused_and_leaves_nothing_behind() {
    require_kvm();
    let dir = scratch_dir("userdev-notvfio");
    let (vmm, next) = running_probe(&dir, &[]);
    let fake = NotVfioUser::start(&dir);
    let dev = TestDev::start(&dir, "dev", &[]);
    let bad = serde_json::json!({"socket": fake.socket, "id": "bad"}).to_string();

    let refused = add(&vmm, &bad);
    let ids_after_refusal = user_device_ids(&vmm);
    // The slot, BAR space and id the failed add touched are free for the next device.
    let added = add(&vmm, &dev.body("bad"));
    let (next, started) = next_started(&vmm, next);
    let (next, first) = next_userdev(&vmm, next);
    let (next, second) = next_userdev(&vmm, next);

    assert_eq!(refused.status, 400, "{}", messages(&refused));
    assert!(
        messages(&refused).contains("Cannot attach the vfio-user device"),
        "{}",
        messages(&refused)
    );
    assert!(ids_after_refusal.is_empty(), "{ids_after_refusal:?}");
    assert_eq!(added.status, 200, "{}", messages(&added));
    assert_eq!(json(&added)["bdf"], FIRST_FREE_BDF);
    assert_eq!(started["slot"], "2", "{started:?}");
    assert!(
        field(&second, "counter") > field(&first, "counter"),
        "{first:?} {second:?}"
    );
    assert_eq!(field(&second, "msi_pending"), 1, "{second:?}");
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn duplicate_id_is_a_conflict_and_the_first_device_keeps_running() {
    require_kvm();
    let dir = scratch_dir("userdev-dup");
    let (vmm, next) = running_probe(&dir, &[]);
    let first_dev = TestDev::start(&dir, "first", &[]);
    let second_dev = TestDev::start(&dir, "second", &[]);
    let added = add(&vmm, &first_dev.body("dev"));
    assert_eq!(added.status, 200, "{}", messages(&added));
    let (next, _) = next_started(&vmm, next);

    let refused = add(&vmm, &second_dev.body("dev"));
    let (next, before) = next_userdev(&vmm, next);
    let (next, after) = next_userdev(&vmm, next);

    assert_eq!(refused.status, 409, "{}", messages(&refused));
    assert!(
        messages(&refused).contains("Duplicate device id 'dev'"),
        "{}",
        messages(&refused)
    );
    assert_eq!(user_device_ids(&vmm), ["dev"]);
    assert!(
        field(&after, "counter") > field(&before, "counter"),
        "{before:?} {after:?}"
    );
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn bad_body_is_a_bad_request_and_no_vm_is_not_found() {
    require_kvm();
    let dir = scratch_dir("userdev-badbody");
    let socket = dir.join("api.sock");
    let mut empty = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &dir);
    empty.wait_for_api(Duration::from_secs(10));
    let running_dir = dir.join("running");
    std::fs::create_dir_all(&running_dir).unwrap();
    let (vmm, next) = running_probe(&running_dir, &[]);

    let no_vm = add(&empty, r#"{"socket": "/tmp/x.sock"}"#);
    let not_json = add(&vmm, "{socket");
    let no_socket = add(&vmm, r#"{"id": "dev"}"#);
    let no_body = vmm.api("PUT", "vm.add-user-device", None);

    assert_eq!(no_vm.status, 404, "{}", messages(&no_vm));
    assert_eq!(messages(&no_vm), "VM is not created");
    assert_eq!(not_json.status, 400, "{}", messages(&not_json));
    assert!(
        messages(&not_json).contains("Invalid UserDeviceConfig JSON"),
        "{}",
        messages(&not_json)
    );
    assert_eq!(no_socket.status, 400, "{}", messages(&no_socket));
    assert!(
        messages(&no_socket).contains("socket"),
        "{}",
        messages(&no_socket)
    );
    assert_eq!(no_body.status, 400, "{}", messages(&no_body));
    assert!(user_device_ids(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn restart_live_update_carries_a_hot_added_device_after_a_failed_add() {
    require_kvm();
    let dir = scratch_dir("userdev-lu");
    let agent = Agent::start(&dir);
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let liveupdate = agent.arg();
    let (old, next) = running_probe(&old_dir, &["--liveupdate", &liveupdate]);
    let fake = NotVfioUser::start(&dir);
    let dev = TestDev::start(&dir, "dev", &["--persist"]);
    // A failed add first: the MSI group it claimed must not shift the saved interrupt state.
    let bad = serde_json::json!({"socket": fake.socket}).to_string();
    assert_eq!(add(&old, &bad).status, 400);
    let body = serde_json::json!({"socket": dev.socket, "id": "hot0", "persist": true});
    let added = add(&old, &body.to_string());
    assert_eq!(added.status, 200, "{}", messages(&added));
    let (next, _) = next_started(&old, next);
    let (_, _) = next_userdev(&old, next);

    old.live_update("hotdev");
    let successor = VmmProcess::successor(&agent, "hotdev", &dir.join("new"), &[]);
    let (next, first) = next_userdev(&successor, 0);
    let (next, later) = next_userdev(&successor, next);
    let (_, status) = successor.next_status(next, LINE);
    let info = successor.vm_info();
    // The successor places a further device above the BARs it took over.
    let second_dev = TestDev::start(&dir, "second", &[]);
    let second = add(&successor, &second_dev.body("hot1"));

    assert!(
        !successor.lines().iter().any(|l| l.contains("probe: start")),
        "the guest restarted: {:?}",
        successor.lines()
    );
    assert_eq!(info["config"]["user_devices"][0]["id"], "hot0", "{info}");
    assert!(
        field(&later, "counter") > field(&first, "counter"),
        "{first:?} {later:?}"
    );
    assert!(
        field(&later, "irqs") > field(&first, "irqs"),
        "{first:?} {later:?}"
    );
    assert_eq!(field(&later, "msi_pending"), 1, "{later:?}");
    assert_eq!(status.get("errors"), 0, "{status:?}");
    assert_eq!(second.status, 200, "{}", messages(&second));
    assert_eq!(json(&second)["bdf"], "0000:00:03.0");
}

/// Each device's `pci_bdf` in `vm.info`'s device tree, by node id.
fn device_bdfs(vmm: &VmmProcess) -> std::collections::BTreeMap<String, String> {
    let info = vmm.vm_info();
    let tree = info["device_tree"].as_object().cloned().unwrap_or_default();
    tree.into_iter()
        .filter_map(|(id, node)| Some((id, node["pci_bdf"].as_str()?.to_string())))
        .collect()
}

#[test]
fn devices_keep_their_slots_and_msi_vectors_through_a_live_update_whatever_the_hot_plug_order() {
    // Arrange: a vfio-user device hot-added before a vsock device (a rebuild in build order
    // would put the virtio device first), then the vsock device removed from the slot after it.
    require_kvm();
    let dir = scratch_dir("userdev-placement");
    let agent = Agent::start(&dir);
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let liveupdate = agent.arg();
    let old = VmmProcess::probe(
        1,
        "128M",
        "fill=1 status_ms=200 userdev=2 hotplug=1",
        &old_dir,
        &["--liveupdate", &liveupdate],
    );
    let (next, _banner) = old.next_banner(0, BOOT);
    let dev = TestDev::start(&dir, "dev", &["--persist"]);
    let body = serde_json::json!({"socket": dev.socket, "id": "hot0", "persist": true});
    let added = add(&old, &body.to_string());
    assert_eq!(added.status, 200, "{}", messages(&added));
    assert_eq!(json(&added)["bdf"], FIRST_FREE_BDF);
    let (next, _) = next_started(&old, next);
    let vsock = serde_json::json!({"cid": 7, "socket": dir.join("v.sock"), "id": "vs0"});
    let vsock_added = old.api("PUT", "vm.add-vsock", Some(&vsock.to_string()));
    assert_eq!(vsock_added.status, 200, "{}", messages(&vsock_added));
    assert_eq!(json(&vsock_added)["bdf"], "0000:00:03.0");
    let (next, _) = old.next_probe_line(next, LINE, "hotplug", |f| {
        f.get("slot").is_some_and(|s| s == "3")
    });
    let removed = old.api("PUT", "vm.remove-device", Some(r#"{"id": "vs0"}"#));
    assert_eq!(removed.status, 204, "{}", messages(&removed));
    let deadline = std::time::Instant::now() + LINE;
    while !old.vm_info()["config"]["vsock"].is_null() {
        assert!(std::time::Instant::now() < deadline, "{}", old.vm_info());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, before_update) = next_userdev(&old, next);
    let placed_before = device_bdfs(&old);

    // Act
    old.live_update("placement");
    let successor = VmmProcess::successor(&agent, "placement", &dir.join("new"), &[]);
    let (next, first) = next_userdev(&successor, 0);
    let (next, later) = next_userdev(&successor, next);
    let (_, status) = successor.next_status(next, LINE);
    let placed_after = device_bdfs(&successor);

    // Assert: every device where it was (the removed one nowhere), the guest never restarted,
    // and the device's MSI still reaches the guest (its vector is the one the guest routed).
    assert_eq!(placed_after, placed_before);
    assert_eq!(placed_after["hot0"], FIRST_FREE_BDF, "{placed_after:?}");
    assert_eq!(
        placed_after["_virtio-pci-_rng"], "0000:00:01.0",
        "{placed_after:?}"
    );
    assert!(
        !placed_after.contains_key("_virtio-pci-vs0"),
        "{placed_after:?}"
    );
    assert!(
        !successor.lines().iter().any(|l| l.contains("probe: start")),
        "the guest restarted: {:?}",
        successor.lines()
    );
    assert!(
        field(&first, "irqs") >= field(&before_update, "irqs"),
        "{before_update:?} {first:?}"
    );
    assert!(
        field(&later, "irqs") > field(&first, "irqs"),
        "{first:?} {later:?}"
    );
    assert_eq!(status.get("errors"), 0, "{status:?}");
}
