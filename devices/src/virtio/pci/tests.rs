//! Transport tests: a driver (`virtio::test_driver::PciDriver`) drives an rng device through
//! config space and BAR 0 exactly as Linux would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::pci::PciDevice;
use crate::pci::msix::tests::{MsiEvent, RecordingMsi};
use crate::virtio::rng::{Rng, RngConfig};
use crate::virtio::test_driver::{
    Desc, PciDriver, TestQueue, VIRTIO_F_VERSION_1, common as reg, guest_memory, pattern_file,
    status,
};

const BAR: u64 = 0xc000_0000;

struct Fixture {
    mem: GuestMemoryMmap,
    msi: Arc<RecordingMsi>,
    dev: VirtioPciDevice<Rng>,
    tq: TestQueue,
    _source: TempFile,
}

fn fixture() -> Fixture {
    let source = pattern_file(4096);
    let mem = guest_memory(0x10_0000);
    let msi = Arc::new(RecordingMsi::default());
    let rng = Rng::new(&RngConfig {
        src: source.as_path().to_path_buf(),
    })
    .unwrap();
    let dev = VirtioPciDevice::new(rng, mem.clone(), msi.clone(), BAR).unwrap();
    let tq = TestQueue::new(GuestAddress(0x1000), 16);
    Fixture {
        mem,
        msi,
        dev,
        tq,
        _source: source,
    }
}

fn live_fixture() -> Fixture {
    let mut f = fixture();
    PciDriver::new(&mut f.dev).bring_up(&[&f.tq]);
    f.msi.take();
    f
}

#[test]
fn pci_identity_follows_virtio_spec() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);

    let ids = driver.config_read(0, 4);
    let class_rev = driver.config_read(8, 4);
    let subsystem = driver.config_read(0x2c, 4);
    let bar0 = driver.config_read(0x10, 4);

    assert_eq!(ids, 0x1044_1af4);
    assert_eq!(class_rev, 0xff00_0001);
    assert_eq!(subsystem, 0x0040_1af4);
    assert_eq!(bar0, 0xc000_0004);
}

#[test]
fn capabilities_announce_every_region() {
    let mut f = fixture();

    let driver = PciDriver::new(&mut f.dev);

    assert_eq!(driver.layout.common, COMMON_CFG_OFFSET);
    assert_eq!(driver.layout.isr, ISR_OFFSET);
    assert_eq!(driver.layout.device, DEVICE_CFG_OFFSET);
    assert_eq!(driver.layout.notify, NOTIFY_OFFSET);
    assert_eq!(driver.layout.notify_multiplier, 4);
    assert_ne!(driver.layout.msix_cap, 0);
}

#[test]
fn msix_capability_reports_one_vector_per_queue_plus_config() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);
    let cap = driver.layout.msix_cap;

    let control = driver.config_read(cap + 2, 2);
    let table = driver.config_read(cap + 4, 4);
    let pba = driver.config_read(cap + 8, 4);

    assert_eq!(control & 0x7ff, 1);
    assert_eq!(
        (table, pba),
        (MSIX_TABLE_OFFSET as u32, MSIX_PBA_OFFSET as u32)
    );
}

#[test]
fn offered_features_include_version_1_event_idx_and_indirect() {
    let mut f = fixture();

    let features = PciDriver::new(&mut f.dev).device_features();

    assert_eq!(features, VIRTIO_F_VERSION_1 | (1 << 29) | (1 << 28));
}

#[test]
fn features_ok_is_refused_without_version_1() {
    let mut f = fixture();

    let status = PciDriver::new(&mut f.dev).negotiate(0);

    assert_eq!(status & status::FEATURES_OK, 0);
}

#[test]
fn features_ok_is_refused_for_unoffered_feature() {
    let mut f = fixture();

    let status = PciDriver::new(&mut f.dev).negotiate(VIRTIO_F_VERSION_1 | 1);

    assert_eq!(status & status::FEATURES_OK, 0);
}

#[test]
fn features_ok_is_kept_for_offered_features() {
    let mut f = fixture();

    let status = PciDriver::new(&mut f.dev).negotiate(VIRTIO_F_VERSION_1);

    assert_ne!(status & status::FEATURES_OK, 0);
    assert_eq!(f.dev.driver_features(), VIRTIO_F_VERSION_1);
}

#[test]
fn reset_returns_queues_and_negotiation_to_power_on() {
    let mut f = live_fixture();
    let mut driver = PciDriver::new(&mut f.dev);

    driver.set_status(0);
    driver.common_write(reg::QUEUE_SELECT, 2, 0);
    let after = (
        driver.status(),
        driver.common_read(reg::QUEUE_ENABLE, 2),
        driver.common_read(reg::QUEUE_SIZE, 2),
        driver.common_read(reg::QUEUE_MSIX_VECTOR, 2),
        driver.common_read(reg::QUEUE_DESC, 4),
    );

    assert_eq!(after, (0, 0, 256, u64::from(VIRTIO_MSI_NO_VECTOR), 0));
    assert_eq!(f.dev.driver_features(), 0);
}

#[test]
fn queue_registers_read_back_what_driver_wrote() {
    let mut f = live_fixture();
    let mut driver = PciDriver::new(&mut f.dev);

    driver.common_write(reg::QUEUE_SELECT, 2, 0);
    let read = (
        driver.common_read(reg::NUM_QUEUES, 2),
        driver.common_read(reg::QUEUE_SIZE, 2),
        driver.common_read(reg::QUEUE_ENABLE, 2),
        driver.common_read(reg::QUEUE_MSIX_VECTOR, 2),
        driver.common_read(reg::QUEUE_DRIVER, 8),
        driver.common_read(reg::QUEUE_DEVICE, 4),
    );

    assert_eq!(read, (1, 16, 1, 1, f.tq.avail_ring(), f.tq.used_ring()));
}

#[test]
fn out_of_range_msix_vector_reads_back_as_no_vector() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);

    driver.common_write(reg::CONFIG_MSIX_VECTOR, 2, 7);

    assert_eq!(
        driver.common_read(reg::CONFIG_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
}

#[test]
fn rng_request_through_transport_fills_buffer_and_triggers_queue_vector() {
    let mut f = live_fixture();
    let head = f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 32)]);

    PciDriver::new(&mut f.dev).notify(0);
    let mut buf = [0u8; 32];
    f.mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();

    assert_eq!(f.tq.used_idx(&f.mem), 1);
    assert_eq!(f.tq.used_entry(&f.mem, 0), (u32::from(head), 32));
    assert_eq!(buf.to_vec(), (0..32).collect::<Vec<u8>>());
    assert_eq!(f.msi.take(), vec![MsiEvent::Trigger(1)]);
    assert_eq!(f.dev.counters()["entropy_bytes"], 32);
}

#[test]
fn bring_up_configures_every_vector_with_its_message() {
    let mut f = fixture();

    PciDriver::new(&mut f.dev).bring_up(&[&f.tq]);
    let configured: Vec<MsiEvent> = f.msi.take();

    let message = |data| {
        Some(crate::interrupt::MsiMessage {
            address: 0xfee0_0000,
            data,
        })
    };
    assert_eq!(
        configured,
        vec![
            MsiEvent::Configure(0, message(0)),
            MsiEvent::Configure(1, message(1))
        ]
    );
}

#[test]
fn event_idx_suppresses_interrupt_until_used_event_is_passed() {
    let mut f = live_fixture();
    // The driver asks for an interrupt only after the second used entry.
    f.tq.set_used_event(&f.mem, 1);
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 8)]);
    PciDriver::new(&mut f.dev).notify(0);
    let after_first = f.msi.take();

    f.tq.add_chain(&f.mem, &[Desc::writable(0x8100, 8)]);
    PciDriver::new(&mut f.dev).notify(0);

    assert_eq!(after_first, vec![]);
    assert_eq!(f.msi.take(), vec![MsiEvent::Trigger(1)]);
}

#[test]
fn event_idx_publishes_avail_event_after_processing() {
    let mut f = live_fixture();
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 8)]);

    PciDriver::new(&mut f.dev).notify(0);
    let avail_event: u16 = f
        .mem
        .read_obj(GuestAddress(f.tq.used_ring() + 4 + 8 * 16))
        .unwrap();

    assert_eq!(avail_event, 1);
}

#[test]
fn masked_queue_vector_is_delivered_when_unmasked() {
    let mut f = live_fixture();
    let mut driver = PciDriver::new(&mut f.dev);
    driver.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 8)]);
    driver.notify(0);
    let pba_while_masked = driver.read(MSIX_PBA_OFFSET, 1);

    driver.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);

    assert_eq!(pba_while_masked, 0b10);
    assert_eq!(f.msi.triggers(), vec![1]);
}

#[test]
fn without_msix_isr_bit_is_set_and_cleared_by_read() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);
    let features = driver.device_features();
    driver.negotiate(features);
    driver.setup_queue(0, &f.tq, VIRTIO_MSI_NO_VECTOR);
    driver
        .set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 8)]);
    driver.notify(0);

    let first = driver.read(ISR_OFFSET, 1);
    let second = driver.read(ISR_OFFSET, 1);

    assert_eq!((first, second), (1, 0));
}

#[test]
fn queue_outside_guest_memory_sets_needs_reset_at_driver_ok() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);
    let features = driver.device_features();
    driver.negotiate(features);
    let bad = TestQueue::new(GuestAddress(0x20_0000), 16);
    driver.setup_queue(0, &bad, 0);

    driver
        .set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    driver.notify(0);

    assert_ne!(driver.status() & status::NEEDS_RESET, 0);
}

#[test]
fn driver_ok_without_features_ok_sets_needs_reset() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);

    driver.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);

    assert_ne!(driver.status() & status::NEEDS_RESET, 0);
}

#[test]
fn notify_before_driver_ok_is_ignored() {
    let mut f = fixture();
    let mut driver = PciDriver::new(&mut f.dev);
    driver.negotiate(VIRTIO_F_VERSION_1);
    driver.setup_queue(0, &f.tq, 0);
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 8)]);

    driver.notify(0);

    assert_eq!(f.tq.used_idx(&f.mem), 0);
}

#[test]
fn config_change_bumps_generation_and_triggers_config_vector() {
    let mut f = live_fixture();

    f.dev.notify_config_change();

    assert_eq!(
        PciDriver::new(&mut f.dev).common_read(reg::CONFIG_GENERATION, 1),
        1
    );
    assert_eq!(f.msi.take(), vec![MsiEvent::Trigger(0)]);
}

#[test]
fn worker_processes_queue_on_ioeventfd() {
    let f = live_fixture();
    let (mem, msi, mut tq) = (f.mem.clone(), f.msi.clone(), f.tq.clone());
    let dev = Arc::new(Mutex::new(f.dev));
    let worker = spawn_queue_worker(dev.clone()).unwrap();

    tq.add_chain(&mem, &[Desc::writable(0x8000, 16)]);
    let offsets: Vec<u64> = dev
        .lock()
        .unwrap()
        .ioeventfds()
        .iter()
        .map(|(o, _)| *o)
        .collect();
    dev.lock().unwrap().ioeventfds()[0].1.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tq.used_idx(&mem) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.stop();

    assert_eq!(offsets, vec![NOTIFY_OFFSET]);
    assert_eq!(tq.used_idx(&mem), 1);
    assert_eq!(msi.triggers(), vec![1]);
}

#[test]
fn a_stopped_worker_holds_nothing_of_its_device() {
    let f = live_fixture();
    let dev = Arc::new(Mutex::new(f.dev));
    let worker = spawn_queue_worker(dev.clone()).unwrap();
    let held_while_running = Arc::strong_count(&dev);

    worker.stop();

    assert_eq!(held_while_running, 2);
    assert_eq!(
        Arc::strong_count(&dev),
        1,
        "the worker still holds the device"
    );
}

#[test]
fn worker_start_processes_requests_queued_while_stopped() {
    let f = live_fixture();
    let (mem, mut tq) = (f.mem.clone(), f.tq.clone());
    let dev = Arc::new(Mutex::new(f.dev));
    tq.add_chain(&mem, &[Desc::writable(0x8000, 16)]);

    let worker = spawn_queue_worker(dev).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while tq.used_idx(&mem) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    worker.stop();

    assert_eq!(tq.used_idx(&mem), 1);
}

#[test]
fn state_round_trip_mid_operation_continues_with_next_indices() {
    let mut f = live_fixture();
    f.tq.add_chain(&f.mem, &[Desc::writable(0x8000, 16)]);
    PciDriver::new(&mut f.dev).notify(0);
    let state = f.dev.state();
    let json = serde_json::to_string(&state).unwrap();
    let decoded: VirtioPciState<crate::virtio::rng::RngState> =
        serde_json::from_str(&json).unwrap();
    let source = pattern_file(64);
    let rng = Rng::new(&RngConfig {
        src: source.as_path().to_path_buf(),
    })
    .unwrap();
    let msi = Arc::new(RecordingMsi::default());

    let mut restored =
        VirtioPciDevice::from_state(rng, decoded, f.mem.clone(), msi.clone()).unwrap();
    let reconfigured = msi.take();
    // The driver consumed the first used entry and wants an interrupt for the next one.
    f.tq.set_used_event(&f.mem, 1);
    let head = f.tq.add_chain(&f.mem, &[Desc::writable(0x9000, 8)]);
    PciDriver::new(&mut restored).notify(0);

    assert_eq!(restored.state().queues[0].next_avail, 2);
    assert_eq!(f.tq.used_idx(&f.mem), 2);
    assert_eq!(f.tq.used_entry(&f.mem, 1), (u32::from(head), 8));
    assert_eq!(restored.counters()["entropy_bytes"], 24);
    assert_eq!(reconfigured.len(), 2);
    assert_eq!(msi.take(), vec![MsiEvent::Trigger(1)]);
    assert_eq!(restored.bars(), f.dev.bars());
}

#[test]
fn state_with_wrong_queue_count_is_refused() {
    let f = live_fixture();
    let mut state = f.dev.state();
    state.queues.push(state.queues[0]);
    let source = pattern_file(8);
    let rng = Rng::new(&RngConfig {
        src: source.as_path().to_path_buf(),
    })
    .unwrap();

    let result = VirtioPciDevice::from_state(rng, state, f.mem.clone(), f.msi.clone());

    assert!(matches!(result, Err(VirtioPciError::StateMismatch { .. })));
}

#[test]
fn state_with_misaligned_ring_is_refused() {
    let f = live_fixture();
    let mut state = f.dev.state();
    state.queues[0].used_ring = 0x1001;
    let source = pattern_file(8);
    let rng = Rng::new(&RngConfig {
        src: source.as_path().to_path_buf(),
    })
    .unwrap();

    let result = VirtioPciDevice::from_state(rng, state, f.mem.clone(), f.msi.clone());

    assert!(matches!(
        result,
        Err(VirtioPciError::QueueState { queue: 0, .. })
    ));
}

#[derive(Default)]
struct RecordingRelocator {
    moves: Mutex<Vec<(u64, u64, u64)>>,
}

impl crate::pci::BarRelocator for RecordingRelocator {
    fn move_bar(&self, old_base: u64, new_base: u64, len: u64) -> std::io::Result<()> {
        self.moves.lock().unwrap().push((old_base, new_base, len));
        Ok(())
    }
}

#[test]
fn root_sizes_and_moves_64bit_bar_of_transport() {
    use crate::bus::BusDevice;
    let f = fixture();
    let relocator = Arc::new(RecordingRelocator::default());
    let mut root = crate::pci::PciRoot::new(Some(relocator.clone()));
    let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(f.dev));
    let slot = root.add_device(dev.clone()).unwrap();
    let mut access = |reg: u32, value: Option<u32>| {
        root.write(
            0,
            &((1u32 << 31) | (u32::from(slot) << 11) | reg).to_le_bytes(),
        );
        if let Some(value) = value {
            root.write(4, &value.to_le_bytes());
        }
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        u32::from_le_bytes(data)
    };

    let size_low = access(0x10, Some(u32::MAX));
    let size_high = access(0x14, Some(u32::MAX));
    access(0x10, Some(0xc000_0000));
    access(0x14, Some(0));
    let no_moves = relocator.moves.lock().unwrap().clone();
    access(0x10, Some(0xd000_0000));

    assert_eq!((size_low, size_high), (0xffff_8004, u32::MAX));
    assert_eq!(no_moves, vec![]);
    assert_eq!(
        relocator.moves.lock().unwrap().clone(),
        vec![(BAR, 0xd000_0000, BAR_SIZE)]
    );
    assert_eq!(dev.lock().unwrap().bars()[0].address, 0xd000_0000);
}

#[test]
fn state_with_accepted_feature_no_longer_offered_is_refused() {
    let f = live_fixture();
    let mut state = f.dev.state();
    state.driver_features |= 1 << 5;
    let source = pattern_file(8);
    let rng = Rng::new(&RngConfig {
        src: source.as_path().to_path_buf(),
    })
    .unwrap();

    let result = VirtioPciDevice::from_state(rng, state, f.mem.clone(), f.msi.clone());

    assert!(matches!(result, Err(VirtioPciError::StateMismatch { .. })));
}

/// A device state at version 2 (test-only), whose version 1 counted in a `u32` and had no name.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct GadgetState {
    count: u64,
    name: String,
}

/// Version 1 of [`GadgetState`], frozen.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct GadgetStateV1 {
    count: u32,
}

impl liveupdate::state::Versioned for GadgetState {
    const VERSION: u16 = 2;

    fn read_older(
        version: u16,
        bytes: &[u8],
    ) -> Option<Result<Self, liveupdate::state::DecodeError>> {
        (version == 1).then(|| liveupdate::state::upgrade::<GadgetStateV1, Self>(bytes))
    }
}

impl liveupdate::state::Versioned for GadgetStateV1 {
    const VERSION: u16 = 1;
}

impl From<GadgetStateV1> for GadgetState {
    fn from(old: GadgetStateV1) -> Self {
        Self {
            count: u64::from(old.count),
            name: "unnamed".into(),
        }
    }
}

#[test]
fn an_older_device_state_is_upgraded_inside_its_transport_state() {
    // Arrange: a live transport's state carrying a version 1 device state, as an older build
    // saved it.
    let f = live_fixture();
    let mut json = serde_json::to_value(f.dev.state()).unwrap();
    json["device"] = serde_json::json!({ "count": 7 });
    let old: VirtioPciState<GadgetStateV1> = serde_json::from_value(json).unwrap();
    let envelope = liveupdate::state::Envelope::wrap("virtio/gadget", &old).unwrap();
    let blob = liveupdate::state::encode(vec![envelope]).unwrap();
    let mut states = liveupdate::state::decode(&blob).unwrap();

    let state: VirtioPciState<GadgetState> = states.take("virtio/gadget").unwrap();

    assert_eq!(
        state.device,
        GadgetState {
            count: 7,
            name: "unnamed".into()
        }
    );
    assert_eq!(state.queues, old.queues);
    assert_eq!(state.pci, old.pci);
    assert_eq!(state.msix, old.msix);
    assert_eq!(state.driver_features, old.driver_features);
}
