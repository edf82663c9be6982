//! Driver-side helpers for tests: guest memory, a split virtqueue laid out as a driver would,
//! descriptor chains pushed into it, used entries read back.
//!
//! Usage (device tests calling `process_queue` directly):
//! ```ignore
//! let mem = test_driver::guest_memory(0x10_0000);
//! let mut tq = test_driver::TestQueue::new(GuestAddress(0x1000), 16);
//! let mut queue = tq.create_queue(&mem);
//! let head = tq.add_chain(&mem, &[Desc::readable(0x8000, 16), Desc::writable(0x9000, 512)]);
//! device.process_queue(0, &mut queue, &mem).unwrap();
//! assert_eq!(tq.used_idx(&mem), 1);
//! assert_eq!(tq.used_entry(&mem, 0), (u32::from(head), 512));
//! ```
//! Through the transport, as Linux's virtio_pci_modern driver does it:
//! ```ignore
//! let msi = Arc::new(RecordingMsi::default()); // crate::pci::msix::tests
//! let mut dev = VirtioPciDevice::new(device, mem.clone(), msi.clone(), 0xc000_0000).unwrap();
//! let mut driver = PciDriver::new(&mut dev);           // finds the virtio capabilities
//! driver.bring_up(&[&tq]);                             // reset .. DRIVER_OK, MSI-X on
//! tq.add_chain(&mem, &[Desc::writable(0x8000, 16)]);
//! driver.notify(0);                                    // MMIO notify: processed at once
//! assert_eq!(msi.triggers(), vec![1]);                 // queue i uses vector i + 1
//! ```

// Helpers shared by every device test; not each test uses each one.
#![allow(dead_code)]

use std::io::Write;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::pci::PciDevice;

/// Descriptor flag: the chain continues at `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Anonymous guest memory of `size` bytes at guest address 0.
pub(crate) fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A temporary file holding the bytes 0, 1, 2, ... (wrapping), `len` of them.
pub(crate) fn pattern_file(len: usize) -> TempFile {
    let file = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
    file.as_file().write_all(&bytes).unwrap();
    file
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// True when the device writes the buffer (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

impl Desc {
    /// A buffer the device reads (driver to device).
    pub(crate) fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes (device to driver).
    pub(crate) fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            writable: true,
        }
    }
}

/// A split virtqueue in guest memory, driven from the driver's side.
///
/// Layout from `base`: descriptor table (16 bytes each), avail ring, then the used ring at the
/// next 4-byte boundary. Descriptors are handed out in order and wrap around the table.
#[derive(Clone, Debug)]
pub(crate) struct TestQueue {
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
}

impl TestQueue {
    /// Lays a queue of `size` entries (power of two) out at `base` (16-byte aligned).
    pub(crate) fn new(base: GuestAddress, size: u16) -> Self {
        let desc_bytes = 16 * u64::from(size);
        let avail_ring = base.0 + desc_bytes;
        // flags, idx, ring[size], used_event
        let avail_bytes = 6 + 2 * u64::from(size);
        let used_ring = (avail_ring + avail_bytes + 3) & !3;
        Self {
            size,
            desc_table: base,
            avail_ring: GuestAddress(avail_ring),
            used_ring: GuestAddress(used_ring),
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub(crate) fn desc_table(&self) -> u64 {
        self.desc_table.0
    }

    /// Guest address of the avail ring.
    pub(crate) fn avail_ring(&self) -> u64 {
        self.avail_ring.0
    }

    /// Guest address of the used ring.
    pub(crate) fn used_ring(&self) -> u64 {
        self.used_ring.0
    }

    /// First guest address after the used ring (where test buffers may start).
    pub(crate) fn end(&self) -> u64 {
        self.used_ring.0 + 6 + 8 * u64::from(self.size)
    }

    /// A ready `virtio_queue::Queue` pointing at this layout, as a device would get it from the
    /// transport after DRIVER_OK.
    pub(crate) fn create_queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut queue = Queue::new(self.size).unwrap();
        queue.try_set_desc_table_address(self.desc_table).unwrap();
        queue.try_set_avail_ring_address(self.avail_ring).unwrap();
        queue.try_set_used_ring_address(self.used_ring).unwrap();
        queue.set_ready(true);
        assert!(
            queue.is_valid(mem),
            "test queue layout does not fit in guest memory"
        );
        queue
    }

    /// Writes a descriptor chain and publishes its head in the avail ring; returns the head.
    pub(crate) fn add_chain(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u16 {
        assert!(!chain.is_empty() && chain.len() <= usize::from(self.size));
        let head = self.next_desc;
        for (i, desc) in chain.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if desc.writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let entry = self.desc_table.0 + 16 * u64::from(index);
            mem.write_obj(desc.addr, GuestAddress(entry)).unwrap();
            mem.write_obj(desc.len, GuestAddress(entry + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(entry + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(entry + 14))
                .unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail_ring.0 + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail_ring.0 + 2))
            .unwrap();
        head
    }

    /// The avail index the driver published so far.
    pub(crate) fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index the device published.
    pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used_ring.0 + 2)).unwrap()
    }

    /// Used entry number `i` (counted since the start, wrapping): (descriptor id, bytes written).
    pub(crate) fn used_entry(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let entry = self.used_ring.0 + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj(GuestAddress(entry)).unwrap();
        let len = mem.read_obj(GuestAddress(entry + 4)).unwrap();
        (id, len)
    }

    /// Sets `used_event` (EVENT_IDX): the driver wants an interrupt once the used index passes
    /// this value.
    pub(crate) fn set_used_event(&self, mem: &GuestMemoryMmap, used_event: u16) {
        let addr = self.avail_ring.0 + 4 + 2 * u64::from(self.size);
        mem.write_obj(used_event, GuestAddress(addr)).unwrap();
    }
}

/// Device status bits (virtio 1.x, 2.1).
pub(crate) mod status {
    pub(crate) const ACKNOWLEDGE: u8 = 1;
    pub(crate) const DRIVER: u8 = 2;
    pub(crate) const DRIVER_OK: u8 = 4;
    pub(crate) const FEATURES_OK: u8 = 8;
    pub(crate) const NEEDS_RESET: u8 = 0x40;
}

/// Common configuration register offsets (virtio 1.x, 4.1.4.3).
pub(crate) mod common {
    pub(crate) const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub(crate) const DEVICE_FEATURE: u64 = 0x04;
    pub(crate) const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub(crate) const DRIVER_FEATURE: u64 = 0x0c;
    pub(crate) const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub(crate) const NUM_QUEUES: u64 = 0x12;
    pub(crate) const DEVICE_STATUS: u64 = 0x14;
    pub(crate) const CONFIG_GENERATION: u64 = 0x15;
    pub(crate) const QUEUE_SELECT: u64 = 0x16;
    pub(crate) const QUEUE_SIZE: u64 = 0x18;
    pub(crate) const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub(crate) const QUEUE_ENABLE: u64 = 0x1c;
    pub(crate) const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub(crate) const QUEUE_DESC: u64 = 0x20;
    pub(crate) const QUEUE_DRIVER: u64 = 0x28;
    pub(crate) const QUEUE_DEVICE: u64 = 0x30;
}

/// MSI address the driver programs into every vector (data = vector number).
pub(crate) const MSI_ADDRESS: u64 = 0xfee0_0000;
/// Feature bit of a modern device.
pub(crate) const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Where a virtio-pci function put its regions, read from its vendor capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VirtioPciLayout {
    /// Offset of the common configuration in BAR 0.
    pub common: u64,
    /// Offset of the notification region in BAR 0.
    pub notify: u64,
    /// notify_off_multiplier.
    pub notify_multiplier: u32,
    /// Offset of the ISR byte in BAR 0.
    pub isr: u64,
    /// Offset of the device configuration in BAR 0.
    pub device: u64,
    /// Configuration-space offset of the MSI-X capability.
    pub msix_cap: usize,
}

/// A virtio-pci driver acting on a [`PciDevice`] through config space and BAR 0, in the order
/// Linux's virtio_pci_modern uses. It assumes every region is in BAR 0.
pub(crate) struct PciDriver<'a> {
    dev: &'a mut dyn PciDevice,
    /// Regions found in the capability list.
    pub layout: VirtioPciLayout,
}

impl<'a> PciDriver<'a> {
    /// Walks the capability list of `dev` to find its regions.
    pub(crate) fn new(dev: &'a mut dyn PciDevice) -> Self {
        let mut driver = Self {
            dev,
            layout: VirtioPciLayout::default(),
        };
        let mut cap = driver.config_read(0x34, 1) as usize;
        while cap != 0 {
            let id = driver.config_read(cap, 1) as u8;
            if id == 0x11 {
                driver.layout.msix_cap = cap;
            } else if id == 0x09 {
                let cfg_type = driver.config_read(cap + 3, 1);
                let offset = u64::from(driver.config_read(cap + 8, 4));
                match cfg_type {
                    1 => driver.layout.common = offset,
                    2 => {
                        driver.layout.notify = offset;
                        driver.layout.notify_multiplier = driver.config_read(cap + 16, 4);
                    }
                    3 => driver.layout.isr = offset,
                    4 => driver.layout.device = offset,
                    _ => {}
                }
            }
            cap = driver.config_read(cap + 1, 1) as usize;
        }
        driver
    }

    /// Reads `len` (1, 2, 4) bytes of config space.
    pub(crate) fn config_read(&mut self, offset: usize, len: usize) -> u32 {
        let mut data = [0u8; 4];
        self.dev.config_read(offset, &mut data[..len]);
        u32::from_le_bytes(data)
    }

    /// Writes `len` (1, 2, 4) bytes of config space.
    pub(crate) fn config_write(&mut self, offset: usize, len: usize, value: u32) {
        self.dev.config_write(offset, &value.to_le_bytes()[..len]);
    }

    /// Reads `len` bytes of BAR 0.
    pub(crate) fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.bar_read(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    /// Writes `len` bytes of BAR 0.
    pub(crate) fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    /// Reads a common configuration register.
    pub(crate) fn common_read(&mut self, register: u64, len: usize) -> u64 {
        self.read(self.layout.common + register, len)
    }

    /// Writes a common configuration register.
    pub(crate) fn common_write(&mut self, register: u64, len: usize, value: u64) {
        self.write(self.layout.common + register, len, value);
    }

    /// The device status register.
    pub(crate) fn status(&mut self) -> u8 {
        self.common_read(common::DEVICE_STATUS, 1) as u8
    }

    /// Writes the device status register.
    pub(crate) fn set_status(&mut self, status: u8) {
        self.common_write(common::DEVICE_STATUS, 1, u64::from(status));
    }

    /// Features the device offers (both halves).
    pub(crate) fn device_features(&mut self) -> u64 {
        self.common_write(common::DEVICE_FEATURE_SELECT, 4, 0);
        let low = self.common_read(common::DEVICE_FEATURE, 4);
        self.common_write(common::DEVICE_FEATURE_SELECT, 4, 1);
        let high = self.common_read(common::DEVICE_FEATURE, 4);
        low | (high << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, write `features`, FEATURES_OK; returns the status read back
    /// (FEATURES_OK clear means the device refused the features).
    pub(crate) fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(0);
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.common_write(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.common_write(common::DRIVER_FEATURE, 4, features & 0xffff_ffff);
        self.common_write(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.common_write(common::DRIVER_FEATURE, 4, features >> 32);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.status()
    }

    /// Enables MSI-X with vectors `0..count` pointing at [`MSI_ADDRESS`], data = vector,
    /// unmasked (function mask set while programming, as Linux does).
    pub(crate) fn enable_msix(&mut self, count: u16) {
        let control = self.layout.msix_cap + 2;
        self.config_write(control, 2, 0xc000);
        let table = u64::from(self.config_read(self.layout.msix_cap + 4, 4) & !7);
        for vector in 0..u64::from(count) {
            let entry = table + 16 * vector;
            self.write(entry, 4, MSI_ADDRESS & 0xffff_ffff);
            self.write(entry + 4, 4, MSI_ADDRESS >> 32);
            self.write(entry + 8, 4, vector);
            self.write(entry + 12, 4, 0);
        }
        self.config_write(control, 2, 0x8000);
    }

    /// Sets queue `index` up on `tq`'s layout with MSI-X `vector`, then enables it.
    pub(crate) fn setup_queue(&mut self, index: u16, tq: &TestQueue, vector: u16) {
        self.common_write(common::QUEUE_SELECT, 2, u64::from(index));
        self.common_write(common::QUEUE_SIZE, 2, u64::from(tq.size()));
        for (register, address) in [
            (common::QUEUE_DESC, tq.desc_table()),
            (common::QUEUE_DRIVER, tq.avail_ring()),
            (common::QUEUE_DEVICE, tq.used_ring()),
        ] {
            // Two 32-bit halves, like Linux's vp_iowrite64_twopart.
            self.common_write(register, 4, address & 0xffff_ffff);
            self.common_write(register + 4, 4, address >> 32);
        }
        self.common_write(common::QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        self.common_write(common::QUEUE_ENABLE, 2, 1);
    }

    /// The whole Linux bring-up: accept every offered feature, MSI-X on (config vector 0,
    /// queue i on vector i + 1), set up `queues` in order, DRIVER_OK. Returns the features.
    pub(crate) fn bring_up(&mut self, queues: &[&TestQueue]) -> u64 {
        let features = self.device_features();
        let status = self.negotiate(features);
        assert_ne!(
            status & status::FEATURES_OK,
            0,
            "device refused its own features"
        );
        self.enable_msix(queues.len() as u16 + 1);
        self.common_write(common::CONFIG_MSIX_VECTOR, 2, 0);
        for (index, tq) in queues.iter().enumerate() {
            self.setup_queue(index as u16, tq, index as u16 + 1);
        }
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        features
    }

    /// Notifies queue `index` by an MMIO write (the path taken when no ioeventfd is set).
    pub(crate) fn notify(&mut self, index: u16) {
        self.common_write(common::QUEUE_SELECT, 2, u64::from(index));
        let notify_off = self.common_read(common::QUEUE_NOTIFY_OFF, 2);
        let offset = self.layout.notify + notify_off * u64::from(self.layout.notify_multiplier);
        self.write(offset, 2, u64::from(index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_chain_pops_from_virtio_queue_with_same_buffers() {
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 8);
        let mut queue = tq.create_queue(&mem);

        let head = tq.add_chain(
            &mem,
            &[Desc::readable(0x4000, 16), Desc::writable(0x5000, 32)],
        );
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        let descs: Vec<(u64, u32, bool)> = chain
            .clone()
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        queue.add_used(&mem, chain.head_index(), 32).unwrap();

        assert_eq!(head, 0);
        assert_eq!(descs, vec![(0x4000, 16, false), (0x5000, 32, true)]);
        assert_eq!(tq.used_idx(&mem), 1);
        assert_eq!(tq.used_entry(&mem, 0), (0, 32));
    }
}
