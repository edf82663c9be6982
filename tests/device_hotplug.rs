//! `vm.add-device` and `vm.remove-device` (kernel VFIO) on real KVM, for what needs no device
//! bound to vfio-pci: each refusal (missing path, a host device bound to another driver, a
//! taken id, no VM, a bad body) leaves a running probe guest undisturbed and nothing
//! half-registered; a cold-add joins the configuration, and the boot that then cannot open the
//! device fails naming it while the VMM stays up; a removal before boot takes the device out of
//! the configuration. A real hot-add, boot and hot-unplug are in `slow_vfio.rs` (QEMU test bed).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Response, TestDev, VmmProcess, assert_guest_runs_on, messages, next_started, probe_guest,
    require_kvm, scratch_dir,
};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
/// The probe rescans PCI for a vfio-user device while it is absent (to show a free slot).
const RESCAN: &str = "fill=1 status_ms=200 userdev=2";
/// Slot of the first added device: slot 1 is the virtio-rng (no disk, console off).
const FIRST_FREE_BDF: &str = "0000:00:02.0";

/// A host PCI function bound to a driver other than vfio*, with that driver's name ("none"
/// for no driver). On a host without one, a directory that is no PCI device at all: VFIO
/// refuses it the same way (no driver).
fn device_not_bound_to_vfio(dir: &Path) -> (PathBuf, String) {
    let driver_of = |device: &Path| {
        std::fs::read_link(device.join("driver"))
            .ok()
            .and_then(|link| link.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "none".to_string())
    };
    let host = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .map(|path| {
            let driver = driver_of(&path);
            (path, driver)
        })
        .filter(|(_, driver)| !driver.starts_with("vfio"))
        // One with a driver shows the driver's name in the error.
        .max_by_key(|(_, driver)| driver != "none");
    host.unwrap_or_else(|| {
        let fake = dir.join("not-a-pci-device");
        std::fs::create_dir_all(&fake).unwrap();
        (fake, "none".to_string())
    })
}

fn add(vmm: &VmmProcess, body: &str) -> Response {
    vmm.api("PUT", "vm.add-device", Some(body))
}

fn path_body(path: &Path, id: Option<&str>) -> String {
    match id {
        Some(id) => serde_json::json!({ "path": path, "id": id }),
        None => serde_json::json!({ "path": path }),
    }
    .to_string()
}

/// The configured VFIO devices (`config.devices` of `vm.info`), as (path, id).
fn vfio_devices(vmm: &VmmProcess) -> Vec<(String, String)> {
    let info = vmm.vm_info();
    info["config"]["devices"]
        .as_array()
        .map(|devices| {
            devices
                .iter()
                .map(|d| {
                    let text = |key: &str| d[key].as_str().unwrap_or("<none>").to_string();
                    (text("path"), text("id"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Boots the probe guest with `RESCAN` and waits until it reported the vfio-user device
/// absent; returns the VMM and the line index after that report.
fn running_probe(dir: &Path) -> (VmmProcess, usize) {
    let vmm = VmmProcess::probe(1, "128M", RESCAN, dir, &[]);
    let (next, _banner) = vmm.next_banner(0, BOOT);
    let mut index = next;
    vmm.wait_for(next, LINE, |line| {
        index += 1;
        line.contains("probe: userdev absent").then_some(())
    });
    (vmm, index)
}

#[test]
fn nonexistent_path_is_a_bad_request_and_the_guest_runs_on() {
    require_kvm();
    let dir = scratch_dir("vfiodev-missing");
    let (vmm, next) = running_probe(&dir);
    let missing = Path::new("/sys/bus/pci/devices/0000:ff:1f.7");

    let refused = add(&vmm, &path_body(missing, Some("pt0")));

    assert_eq!(refused.status, 400, "{}", messages(&refused));
    assert!(
        messages(&refused).contains("does not exist")
            && messages(&refused).contains("0000:ff:1f.7"),
        "{}",
        messages(&refused)
    );
    assert!(vfio_devices(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn device_not_bound_to_vfio_pci_is_refused_naming_its_driver_and_leaves_its_slot_free() {
    require_kvm();
    let dir = scratch_dir("vfiodev-unbound");
    let (vmm, next) = running_probe(&dir);
    let (path, driver) = device_not_bound_to_vfio(&dir);
    let dev = TestDev::start(&dir, "dev", &[]);

    let refused = add(&vmm, &path_body(&path, Some("pt0")));
    let devices_after_refusal = vfio_devices(&vmm);
    // The slot, BAR space, MSI group and id the refused add touched are free for the next.
    let added = vmm.api("PUT", "vm.add-user-device", Some(&dev.body("pt0")));
    let (next, started) = next_started(&vmm, next);

    assert_eq!(refused.status, 400, "{}", messages(&refused));
    let text = messages(&refused);
    assert!(text.contains("not bound to vfio-pci"), "{text}");
    assert!(text.contains(&format!("its driver: {driver}")), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(
        devices_after_refusal.is_empty(),
        "{devices_after_refusal:?}"
    );
    assert_eq!(added.status, 200, "{}", messages(&added));
    let reply: serde_json::Value = serde_json::from_slice(&added.body).unwrap();
    assert_eq!(
        reply,
        serde_json::json!({"id": "pt0", "bdf": FIRST_FREE_BDF})
    );
    assert_eq!(started["slot"], "2", "{started:?}");
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn refused_add_on_a_paused_vm_leaves_it_paused_and_it_resumes() {
    require_kvm();
    let dir = scratch_dir("vfiodev-paused");
    let (vmm, next) = running_probe(&dir);
    let (path, _) = device_not_bound_to_vfio(&dir);
    assert_eq!(vmm.api("PUT", "vm.pause", None).status, 204);

    let refused = add(&vmm, &path_body(&path, None));
    let state = vmm.vm_state();
    let resumed = vmm.api("PUT", "vm.resume", None);

    assert_eq!(refused.status, 400, "{}", messages(&refused));
    assert_eq!(state, "Paused");
    assert_eq!(resumed.status, 204, "{}", messages(&resumed));
    assert!(vfio_devices(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn duplicate_id_is_a_conflict_and_the_first_device_keeps_running() {
    require_kvm();
    let dir = scratch_dir("vfiodev-dup");
    let (vmm, next) = running_probe(&dir);
    let dev = TestDev::start(&dir, "dev", &[]);
    let added = vmm.api("PUT", "vm.add-user-device", Some(&dev.body("dev")));
    assert_eq!(added.status, 200, "{}", messages(&added));
    let (next, _) = next_started(&vmm, next);
    let (path, _) = device_not_bound_to_vfio(&dir);

    let refused = add(&vmm, &path_body(&path, Some("dev")));

    assert_eq!(refused.status, 409, "{}", messages(&refused));
    assert!(
        messages(&refused).contains("Duplicate device id 'dev'"),
        "{}",
        messages(&refused)
    );
    assert!(vfio_devices(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn bad_body_is_a_bad_request_and_no_vm_is_not_found() {
    require_kvm();
    let dir = scratch_dir("vfiodev-badbody");
    let socket = dir.join("api.sock");
    let mut empty = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &dir);
    empty.wait_for_api(Duration::from_secs(10));
    let running_dir = dir.join("running");
    std::fs::create_dir_all(&running_dir).unwrap();
    let (vmm, next) = running_probe(&running_dir);

    let no_vm = add(&empty, r#"{"path": "/sys/bus/pci/devices/0000:00:00.0"}"#);
    let not_json = add(&vmm, "{path");
    let no_path = add(&vmm, r#"{"id": "pt0"}"#);
    let empty_id = add(&vmm, r#"{"path": "/sys", "id": ""}"#);
    let no_body = vmm.api("PUT", "vm.add-device", None);

    assert_eq!(no_vm.status, 404, "{}", messages(&no_vm));
    assert_eq!(messages(&no_vm), "VM is not created");
    assert_eq!(not_json.status, 400, "{}", messages(&not_json));
    assert!(
        messages(&not_json).contains("Invalid DeviceConfig JSON"),
        "{}",
        messages(&not_json)
    );
    assert_eq!(no_path.status, 400, "{}", messages(&no_path));
    assert!(
        messages(&no_path).contains("path"),
        "{}",
        messages(&no_path)
    );
    assert_eq!(empty_id.status, 400, "{}", messages(&empty_id));
    assert_eq!(no_body.status, 400, "{}", messages(&no_body));
    assert!(vfio_devices(&vmm).is_empty());
    assert_guest_runs_on(&vmm, next);
}

#[test]
fn cold_added_device_joins_the_config_and_a_boot_that_cannot_open_it_fails_naming_it() {
    require_kvm();
    let dir = scratch_dir("vfiodev-cold");
    let (path, driver) = device_not_bound_to_vfio(&dir);
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &dir);
    vmm.wait_for_api(Duration::from_secs(10));
    let config = serde_json::json!({
        "payload": {"kernel": probe_guest(), "cmdline": "fill=1 status_ms=200"},
        "memory": {"size": 128u64 << 20},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    let created = vmm.api("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(created.status, 204, "{}", messages(&created));

    // More devices: any existing path does before boot.
    let [second, third] = ["second-device", "third-device"].map(|name| dir.join(name));
    std::fs::create_dir_all(&second).unwrap();
    std::fs::create_dir_all(&third).unwrap();

    let argument = format!("path={},id=pt0", path.display());
    let named = vmm.ch_remote(&["add-device", &argument]);
    let generated = vmm.ch_remote(&["add-device", &format!("path={}", second.display())]);
    let taken = add(&vmm, &path_body(&third, Some("pt0")));
    let same_device = add(&vmm, &path_body(&path, Some("pt9")));
    let missing = add(&vmm, &path_body(&dir.join("no-such-device"), None));
    let devices = vfio_devices(&vmm);
    let booted = vmm.api("PUT", "vm.boot", None);
    let ping = vmm.api("GET", "vmm.ping", None);
    let state = vmm.vm_state();

    assert!(
        named.status.success() && generated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&named.stderr),
        String::from_utf8_lossy(&generated.stderr)
    );
    assert!(named.stdout.is_empty(), "a cold add prints nothing (204)");
    assert_eq!(taken.status, 409, "{}", messages(&taken));
    assert!(
        messages(&taken).contains("Duplicate device id 'pt0'"),
        "{}",
        messages(&taken)
    );
    assert_eq!(same_device.status, 409, "{}", messages(&same_device));
    assert!(
        messages(&same_device).contains("Duplicate VFIO device path"),
        "{}",
        messages(&same_device)
    );
    assert_eq!(missing.status, 400, "{}", messages(&missing));
    let path_text = path.display().to_string();
    assert_eq!(
        devices,
        [
            (path_text.clone(), "pt0".to_string()),
            (second.display().to_string(), "_vfio_device1".to_string()),
        ]
    );
    assert_eq!(booted.status, 500, "{}", messages(&booted));
    let text = messages(&booted);
    assert!(text.contains(&path_text), "{text}");
    assert!(
        text.contains(&format!("not bound to vfio-pci (its driver: {driver})")),
        "{text}"
    );
    assert_eq!(ping.status, 200);
    assert!(vmm.is_running());
    assert_eq!(state, "Created");
}

#[test]
fn removed_device_leaves_the_config_before_boot_and_others_keep_their_ids() {
    require_kvm();
    let dir = scratch_dir("vfiodev-remove");
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], &dir);
    vmm.wait_for_api(Duration::from_secs(10));
    let no_vm = vmm.api("PUT", "vm.remove-device", Some(r#"{"id": "pt0"}"#));
    let config = serde_json::json!({
        "payload": {"kernel": probe_guest(), "cmdline": "fill=1"},
        "memory": {"size": 64u64 << 20},
        "disks": [{"path": probe_guest(), "readonly": true, "id": "disk0"}],
    });
    let created = vmm.api("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(created.status, 204, "{}", messages(&created));
    let [first, second] = ["first-device", "second-device"].map(|name| dir.join(name));
    std::fs::create_dir_all(&first).unwrap();
    std::fs::create_dir_all(&second).unwrap();
    for path in [&first, &second] {
        let added = add(&vmm, &path_body(path, None));
        assert_eq!(added.status, 204, "{}", messages(&added));
    }

    let removed = vmm.ch_remote(&["remove-device", "_vfio_device0"]);
    let unknown = vmm.api("PUT", "vm.remove-device", Some(r#"{"id": "nothing"}"#));
    let disk = vmm.api("PUT", "vm.remove-device", Some(r#"{"id": "disk0"}"#));
    let again = vmm.api(
        "PUT",
        "vm.remove-device",
        Some(r#"{"id": "_vfio_device0"}"#),
    );
    let readded = add(&vmm, &path_body(&first, None));

    assert_eq!(no_vm.status, 404, "{}", messages(&no_vm));
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert_eq!(unknown.status, 404, "{}", messages(&unknown));
    assert!(messages(&unknown).contains("No device with id nothing"));
    assert_eq!(disk.status, 400, "{}", messages(&disk));
    assert!(messages(&disk).contains("only kernel VFIO devices"));
    assert_eq!(again.status, 404, "removed once: {}", messages(&again));
    assert_eq!(readded.status, 204, "{}", messages(&readded));
    // The second device keeps the id it had; the first came back as a new device, last.
    assert_eq!(
        vfio_devices(&vmm),
        [
            (second.display().to_string(), "_vfio_device1".to_string()),
            (first.display().to_string(), "_vfio_device2".to_string()),
        ]
    );
}
