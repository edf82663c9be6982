//! Every participant's state survives save, encode, decode, restore and save again unchanged:
//! a VM saved, restored (paused) into a new VM and saved again gives the same states, but for
//! the clocks, which move on by design.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use liveupdate::emulated::EmulatedProvider;
use liveupdate::machine::Incoming;
use liveupdate::session::SessionProvider;
use liveupdate::state::{self, StateSet, Versioned};
use vmm::config::VmConfig;
use vmm::cpu::{MSR_IA32_TSC, VcpuState};
use vmm::device_manager::{PciRootState, PciRootStateV1};
use vmm::live_update::state_memfd;
use vmm::state_format::StateFormat;
use vmm::vm::Vm;

fn probe_config(dir: &std::path::Path) -> VmConfig {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let json = serde_json::json!({
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 128u64 << 20},
        "payload": {
            "kernel": common::probe_guest(),
            "cmdline": "fill=1 status_ms=100 virtio=1 blk_io=1",
        },
        "disks": [{"path": disk}],
        "serial": {"mode": "Null"},
        "console": {"mode": "Off"},
    });
    VmConfig::from_json(json.to_string().as_bytes()).unwrap()
}

/// Live-updates `vm` into session `name` of `provider`, in this build's state format, and
/// returns the state blob it wrote.
fn save(vm: &mut Vm, config: &VmConfig, provider: &EmulatedProvider, name: &str) -> StateSet {
    save_as(vm, config, StateFormat::current(), provider, name)
}

/// Like [`save`], writing the state as `format` reads it.
fn save_as(
    vm: &mut Vm,
    config: &VmConfig,
    format: StateFormat,
    provider: &EmulatedProvider,
    name: &str,
) -> StateSet {
    let session = provider.clone().create_session(name).unwrap();
    let state_file = state_memfd().unwrap();
    let mut copy = state_file.try_clone().unwrap();
    vm.check_state_format(config, format).unwrap();
    vm.live_update(
        config,
        format,
        session,
        state_file,
        || Ok(()),
        |_session| provider.handover(name).map_err(|e| e.to_string()),
    )
    .unwrap();
    let mut blob = Vec::new();
    copy.seek(SeekFrom::Start(0)).unwrap();
    copy.read_to_end(&mut blob).unwrap();
    state::decode(&blob).unwrap()
}

fn vcpu_without_tsc(set: &StateSet, id: &str) -> VcpuState {
    let envelope = set.envelope(id).unwrap();
    let mut state: VcpuState = postcard::from_bytes(&envelope.state).unwrap();
    for msr in &mut state.msrs {
        if msr.index == MSR_IA32_TSC {
            msr.data = 0;
        }
    }
    state
}

/// Restores the VM of session `name` (paused); its configuration too.
fn restore(provider: &EmulatedProvider, name: &str) -> (Vm, VmConfig) {
    let session = provider.clone().retrieve_session(name).unwrap();
    let mut incoming = Incoming::restore(session).map_err(|(_, e)| e).unwrap();
    let (vm, config, _) = Vm::restore(&mut incoming, None, Arc::new(|_| {}), false).unwrap();
    incoming.finish().unwrap();
    (vm, config)
}

/// Asserts that the states of `a` and `b` are the same but for the clocks, which move on by
/// design, and those of `except`.
fn assert_same_states(a: &StateSet, b: &StateSet, except: &[&str]) {
    assert_eq!(a.remaining(), b.remaining());
    for id in a.remaining() {
        match id.as_str() {
            "vcpus" | "clock" | "pit" => {}
            id if except.contains(&id) => {}
            id if id.starts_with("vcpu/") => {
                assert_eq!(vcpu_without_tsc(a, id), vcpu_without_tsc(b, id), "{id}");
            }
            id => assert_eq!(
                a.envelope(id).unwrap(),
                b.envelope(id).unwrap(),
                "state of {id} changed across save and restore"
            ),
        }
    }
}

/// Release 0.1.0's format differs from this build's in the PCI root alone (version 1, no
/// placement). A VM saved in it, restored by this build (placing the devices in build order),
/// saved in this build's format and restored again, saves the very same state in it again.
#[test]
fn a_vm_saved_in_release_0_1_0s_format_comes_back_to_the_same_state() {
    // Arrange
    let dir = common::scratch_dir("state-format-0.1.0");
    let config = probe_config(&dir);
    let provider = EmulatedProvider::new();
    let old_format = StateFormat::of_release("0.1.0").unwrap();
    let mut first = Vm::boot(&config, Arc::new(|_| {})).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // Act: 0.1.0's format, this build's, 0.1.0's again.
    let in_old = save_as(&mut first, &config, old_format, &provider, "old");
    drop(first);
    let (mut second, second_config) = restore(&provider, "old");
    let in_current = save(&mut second, &second_config, &provider, "current");
    drop(second);
    let (mut third, third_config) = restore(&provider, "current");
    let in_old_again = save_as(
        &mut third,
        &third_config,
        old_format,
        &provider,
        "old-again",
    );

    // Assert
    let root = |set: &StateSet| set.envelope("pci/root").unwrap().clone();
    assert_eq!(root(&in_old).version, PciRootStateV1::VERSION);
    assert_eq!(root(&in_current).version, PciRootState::VERSION);
    let placement = postcard::from_bytes::<PciRootState>(&root(&in_current).state)
        .unwrap()
        .placement
        .unwrap();
    let placed: Vec<(&str, u8)> = (placement.devices.iter())
        .map(|device| (device.id.as_str(), device.slot))
        .collect();
    assert_eq!(placed, [("virtio/_disk0", 1), ("virtio/_rng", 2)]);
    assert_eq!(root(&in_old_again), root(&in_old));
    assert_same_states(&in_old, &in_current, &["pci/root"]);
    assert_same_states(&in_old, &in_old_again, &[]);
}

#[test]
fn a_restored_vm_saves_the_same_states_it_was_restored_from() {
    let dir = common::scratch_dir("state-conformance");
    let config = probe_config(&dir);
    let provider = EmulatedProvider::new();
    let mut first = Vm::boot(&config, Arc::new(|_| {})).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let saved = save(&mut first, &config, &provider, "first");
    drop(first);
    let (mut second, restored_config) = restore(&provider, "first");
    let saved_again = save(&mut second, &restored_config, &provider, "second");

    assert_eq!(restored_config, config);
    assert_same_states(&saved, &saved_again, &[]);
}
