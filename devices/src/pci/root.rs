//! The PCI root: configuration mechanism #1, the host bridge, device slots, BAR allocation and
//! the bus adapter for BARs.

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::config::{merge_bytes, read_bytes};
use super::{BarRelocator, PciBarInfo, PciConfiguration, PciDevice, PciError, PciIds};
use crate::bus::{BusDevice, lock};

/// First port of configuration mechanism #1 (address at +0, data at +4..+8).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports covered by [`PciRoot`].
pub const PCI_CONFIG_IO_PORT_LEN: u64 = 8;
const SLOTS: usize = 32;
const ENABLE_BIT: u32 = 1 << 31;
/// BAR registers live at configuration offsets 0x10..0x28.
const BAR_OFFSETS: std::ops::Range<usize> = 0x10..0x28;

/// A PCI function shared between the root, the MMIO bus and the VMM.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Root state saved across a live update (devices save their own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// Last value written to the address register (0xcf8).
    pub config_address: u32,
}

impl liveupdate::state::Versioned for PciRootState {
    const VERSION: u16 = 1;
}

/// Bus 0 with a host bridge at slot 0 and devices at slots 1..32.
pub struct PciRoot {
    config_address: u32,
    host_bridge: PciConfiguration,
    slots: Vec<Option<SharedPciDevice>>,
    relocator: Option<Arc<dyn BarRelocator>>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used: Vec<usize> = (0..SLOTS).filter(|s| self.slots[*s].is_some()).collect();
        f.debug_struct("PciRoot")
            .field("config_address", &self.config_address)
            .field("used_slots", &used)
            .finish()
    }
}

impl PciRoot {
    /// A root with only the host bridge; `relocator` hears about BAR moves.
    pub fn new(relocator: Option<Arc<dyn BarRelocator>>) -> Self {
        // Intel's host bridge id, class 06/00 (host bridge).
        let ids = PciIds {
            vendor_id: 0x8086,
            device_id: 0x0d57,
            class: 0x06,
            ..PciIds::default()
        };
        Self {
            config_address: 0,
            host_bridge: PciConfiguration::new(&ids),
            slots: vec![None; SLOTS],
            relocator,
        }
    }

    /// Puts `device` in the first free slot (1..32) and returns the slot.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        let slot = (1..SLOTS)
            .find(|s| self.slots[*s].is_none())
            .ok_or(PciError::NoFreeSlot)?;
        self.slots[slot] = Some(device);
        Ok(slot as u8)
    }

    /// Puts `device` in `slot` (1..32), e.g. to keep the slots a saved VM had.
    pub fn add_device_at(&mut self, slot: u8, device: SharedPciDevice) -> Result<(), PciError> {
        let index = usize::from(slot);
        if index == 0 || index >= SLOTS || self.slots[index].is_some() {
            return Err(PciError::SlotUnavailable { slot });
        }
        self.slots[index] = Some(device);
        Ok(())
    }

    /// Takes the device out of `slot` (a hot-unplug); `None` if the slot was empty.
    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        let index = usize::from(slot);
        if index == 0 {
            return None;
        }
        self.slots.get_mut(index)?.take()
    }

    /// The state to save.
    pub fn state(&self) -> PciRootState {
        PciRootState {
            config_address: self.config_address,
        }
    }

    /// Puts back a saved state.
    pub fn set_state(&mut self, state: &PciRootState) {
        self.config_address = state.config_address;
    }

    /// (slot, register byte offset) addressed by the address register, if it names an
    /// existing function on bus 0.
    fn target(&self) -> Option<(usize, usize)> {
        let address = self.config_address;
        let bus = (address >> 16) & 0xff;
        let function = (address >> 8) & 0x7;
        // Bits 27:24 are AMD's extended register number: beyond our 256 bytes.
        let extended = (address >> 24) & 0xf;
        if address & ENABLE_BIT == 0 || bus != 0 || function != 0 || extended != 0 {
            return None;
        }
        let slot = ((address >> 11) & 0x1f) as usize;
        Some((slot, (address & 0xfc) as usize))
    }

    fn config_read(&self, offset: usize, data: &mut [u8]) {
        match self.target() {
            Some((0, reg)) => self.host_bridge.read(reg + offset, data),
            Some((slot, reg)) => match &self.slots[slot] {
                Some(device) => lock(device).config_read(reg + offset, data),
                None => data.fill(0xff),
            },
            None => data.fill(0xff),
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        match self.target() {
            Some((0, reg)) => self.host_bridge.write(reg + offset, data),
            Some((slot, reg)) => {
                let Some(device) = self.slots[slot].clone() else {
                    return;
                };
                let at = reg + offset;
                let is_bar = BAR_OFFSETS.contains(&at);
                let before = if is_bar {
                    lock(&device).bars()
                } else {
                    Vec::new()
                };
                lock(&device).config_write(at, data);
                if is_bar {
                    let after = lock(&device).bars();
                    // The device lock is released: the relocator may take it.
                    self.report_moves(&before, &after);
                }
            }
            None => {}
        }
    }

    fn report_moves(&self, before: &[PciBarInfo], after: &[PciBarInfo]) {
        for (old, new) in before.iter().zip(after) {
            if old.address == new.address {
                continue;
            }
            log::info!(
                "PCI BAR moved from {:#x} to {:#x}",
                old.address,
                new.address
            );
            if let Some(relocator) = &self.relocator
                && let Err(e) = relocator.move_bar(old.address, new.address, old.size)
            {
                log::warn!(
                    "Moving BAR {:#x} to {:#x} failed: {e}",
                    old.address,
                    new.address
                );
            }
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..4 => read_bytes(self.config_address, offset as usize, data),
            4..8 if offset as usize + data.len() <= 8 => {
                self.config_read(offset as usize - 4, data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0..4 => {
                self.config_address = merge_bytes(self.config_address, offset as usize, data);
            }
            4..8 if offset as usize + data.len() <= 8 => {
                self.config_write(offset as usize - 4, data)
            }
            _ => log::debug!("PCI config port write at {offset:#x} ignored"),
        }
    }
}

/// Hands out naturally aligned BAR addresses from a window `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// An allocator over `[start, end)` (the VMM uses 0xc000_0000..0xfec0_0000).
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// An address for a BAR of `size` bytes (a power of two), aligned to `size`.
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        if !size.is_power_of_two() {
            return Err(PciError::InvalidBar { index: 0, size });
        }
        let base = self
            .next
            .checked_next_multiple_of(size)
            .filter(|b| b.checked_add(size).is_some_and(|end| end <= self.end))
            .ok_or(PciError::BarSpaceExhausted { size })?;
        self.next = base + size;
        Ok(base)
    }
}

/// A [`BusDevice`] serving one BAR of one PCI device, for the VMM's MMIO bus.
pub struct PciBarRegion {
    device: SharedPciDevice,
    bar: usize,
}

impl fmt::Debug for PciBarRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBarRegion")
            .field("bar", &self.bar)
            .finish()
    }
}

impl PciBarRegion {
    /// Forwards accesses to BAR `bar` of `device`.
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for PciBarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    struct FakeDevice {
        config: PciConfiguration,
        bar_writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl FakeDevice {
        fn new() -> Self {
            let mut config = PciConfiguration::new(&PciIds {
                vendor_id: 0x1af4,
                device_id: 0x1044,
                ..PciIds::default()
            });
            let bar = PciBarInfo {
                index: 0,
                address: 0xc000_0000,
                size: 0x1000,
                is_64bit: false,
            };
            config.add_bar(&bar).unwrap();
            Self {
                config,
                bar_writes: Vec::new(),
            }
        }
    }

    impl PciDevice for FakeDevice {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.bar_writes.push((bar, offset, data.to_vec()));
        }
    }

    #[derive(Default)]
    struct RecordingRelocator {
        moves: Mutex<Vec<(u64, u64, u64)>>,
    }

    impl BarRelocator for RecordingRelocator {
        fn move_bar(&self, old_base: u64, new_base: u64, len: u64) -> io::Result<()> {
            self.moves.lock().unwrap().push((old_base, new_base, len));
            Ok(())
        }
    }

    fn address(slot: u32, reg: u32) -> [u8; 4] {
        (ENABLE_BIT | (slot << 11) | reg).to_le_bytes()
    }

    fn read32(root: &mut PciRoot, slot: u32, reg: u32) -> u32 {
        root.write(0, &address(slot, reg));
        let mut data = [0u8; 4];
        root.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(root: &mut PciRoot, slot: u32, reg: u32, value: u32) {
        root.write(0, &address(slot, reg));
        root.write(4, &value.to_le_bytes());
    }

    #[test]
    fn host_bridge_ids_read_through_config_mechanism_one() {
        let mut root = PciRoot::new(None);

        let ids = read32(&mut root, 0, 0);
        let class = read32(&mut root, 0, 8) >> 16;
        root.write(0, &address(0, 0));
        let mut device_id = [0u8; 2];
        root.read(6, &mut device_id);

        assert_eq!(ids, 0x0d57_8086);
        assert_eq!(class, 0x0600);
        assert_eq!(u16::from_le_bytes(device_id), 0x0d57);
    }

    #[test]
    fn absent_slot_and_disabled_address_read_all_ones() {
        let mut root = PciRoot::new(None);

        let absent = read32(&mut root, 5, 0);
        root.write(0, &0u32.to_le_bytes());
        let mut disabled = [0u8; 4];
        root.read(4, &mut disabled);

        assert_eq!(absent, u32::MAX);
        assert_eq!(u32::from_le_bytes(disabled), u32::MAX);
    }

    #[test]
    fn added_device_gets_slot_one_and_its_ids_are_visible() {
        let mut root = PciRoot::new(None);

        let slot = root
            .add_device(Arc::new(Mutex::new(FakeDevice::new())))
            .unwrap();

        assert_eq!(slot, 1);
        assert_eq!(read32(&mut root, 1, 0), 0x1044_1af4);
    }

    #[test]
    fn add_device_at_taken_or_host_bridge_slot_is_refused() {
        let mut root = PciRoot::new(None);
        root.add_device_at(4, Arc::new(Mutex::new(FakeDevice::new())))
            .unwrap();

        let taken = root.add_device_at(4, Arc::new(Mutex::new(FakeDevice::new())));
        let bridge = root.add_device_at(0, Arc::new(Mutex::new(FakeDevice::new())));

        assert_eq!(taken, Err(PciError::SlotUnavailable { slot: 4 }));
        assert_eq!(bridge, Err(PciError::SlotUnavailable { slot: 0 }));
        assert_eq!(read32(&mut root, 4, 0), 0x1044_1af4);
    }

    #[test]
    fn address_register_reads_back() {
        let mut root = PciRoot::new(None);
        root.write(0, &address(3, 0x10));
        let mut data = [0u8; 4];

        root.read(0, &mut data);

        assert_eq!(data, address(3, 0x10));
    }

    #[test]
    fn bar_sizing_returns_mask_and_does_not_relocate() {
        let relocator = Arc::new(RecordingRelocator::default());
        let mut root = PciRoot::new(Some(relocator.clone()));
        root.add_device(Arc::new(Mutex::new(FakeDevice::new())))
            .unwrap();

        write32(&mut root, 1, 0x10, u32::MAX);
        let mask = read32(&mut root, 1, 0x10);
        write32(&mut root, 1, 0x10, 0xc000_0000);

        assert_eq!(mask, 0xffff_f000);
        assert_eq!(relocator.moves.lock().unwrap().clone(), vec![]);
    }

    #[test]
    fn bar_write_of_new_address_calls_relocator() {
        let relocator = Arc::new(RecordingRelocator::default());
        let mut root = PciRoot::new(Some(relocator.clone()));
        root.add_device(Arc::new(Mutex::new(FakeDevice::new())))
            .unwrap();

        write32(&mut root, 1, 0x10, 0xd000_0000);

        assert_eq!(
            relocator.moves.lock().unwrap().clone(),
            vec![(0xc000_0000, 0xd000_0000, 0x1000)]
        );
        assert_eq!(read32(&mut root, 1, 0x10), 0xd000_0000);
    }

    #[test]
    fn allocator_aligns_naturally_and_runs_out() {
        let mut allocator = BarAllocator::new(0xc000_1000, 0xc001_0000);

        let small = allocator.allocate(0x1000).unwrap();
        let large = allocator.allocate(0x8000).unwrap();
        let too_big = allocator.allocate(0x8000);

        assert_eq!((small, large), (0xc000_1000, 0xc000_8000));
        assert_eq!(too_big, Err(PciError::BarSpaceExhausted { size: 0x8000 }));
    }

    #[test]
    fn bar_region_forwards_to_its_bar() {
        let device = Arc::new(Mutex::new(FakeDevice::new()));
        let mut region = PciBarRegion::new(device.clone(), 2);
        let mut data = [0u8; 1];

        region.read(3, &mut data);
        region.write(8, &[1, 2]);

        assert_eq!(data, [5]);
        assert_eq!(device.lock().unwrap().bar_writes, vec![(2, 8, vec![1, 2])]);
    }
}
