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
use liveupdate::state::{self, StateSet};
use vmm::config::VmConfig;
use vmm::cpu::{MSR_IA32_TSC, VcpuState};
use vmm::live_update::state_memfd;
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

/// Live-updates `vm` into session `name` of `provider` and returns the state blob it wrote.
fn save(vm: &mut Vm, config: &VmConfig, provider: &EmulatedProvider, name: &str) -> StateSet {
    let session = provider.clone().create_session(name).unwrap();
    let state_file = state_memfd().unwrap();
    let mut copy = state_file.try_clone().unwrap();
    vm.live_update(
        config,
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

#[test]
fn a_restored_vm_saves_the_same_states_it_was_restored_from() {
    let dir = common::scratch_dir("state-conformance");
    let config = probe_config(&dir);
    let provider = EmulatedProvider::new();
    let on_event = Arc::new(|_| {});
    let mut first = Vm::boot(&config, on_event.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let saved = save(&mut first, &config, &provider, "first");
    drop(first);
    let session = provider.clone().retrieve_session("first").unwrap();
    let mut incoming = Incoming::restore(session).map_err(|(_, e)| e).unwrap();
    let (mut second, restored_config, _) =
        Vm::restore(&mut incoming, None, on_event, false).unwrap();
    incoming.finish().unwrap();
    let saved_again = save(&mut second, &restored_config, &provider, "second");

    assert_eq!(restored_config, config);
    assert_eq!(saved.remaining(), saved_again.remaining());
    for id in saved.remaining() {
        match id.as_str() {
            // The clocks move on by the time between the two saves, by design.
            "vcpus" | "clock" | "pit" => {}
            id if id.starts_with("vcpu/") => {
                assert_eq!(
                    vcpu_without_tsc(&saved, id),
                    vcpu_without_tsc(&saved_again, id),
                    "{id}"
                );
            }
            id => assert_eq!(
                saved.envelope(id).unwrap(),
                saved_again.envelope(id).unwrap(),
                "state of {id} changed across save and restore"
            ),
        }
    }
}
