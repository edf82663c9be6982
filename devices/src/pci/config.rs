//! A type-0 PCI configuration space: ids, command, capability list, memory BARs with sizing,
//! interrupt line. Shared by the host bridge and every endpoint we emulate.

use serde::{Deserialize, Serialize};

use super::{PciBarInfo, PciError};

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const CACHE_LINE_REG: usize = 3;
const CAPABILITY_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Status register bit 4: the capability list is valid.
const STATUS_CAPABILITY_LIST: u32 = 1 << 20;
/// Command bits a guest may set: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Capabilities start after the standard header.
const FIRST_CAPABILITY: usize = 0x40;
/// Memory BAR flag: 64-bit (type 10b in bits 2:1).
const BAR_MEM_64: u32 = 0b100;

/// Identity of a PCI function, fixed at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision: u8,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

/// The guest-programmed part of a configuration space, saved across a live update.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigurationState {
    /// Command register.
    pub command: u16,
    /// Cache line size register (Linux writes it; we keep it).
    pub cache_line_size: u8,
    /// Interrupt line register.
    pub interrupt_line: u8,
    /// Guest address of each BAR, by BAR index (absent BARs are `None`).
    pub bar_addresses: Vec<Option<u64>>,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    is_64bit: bool,
    address: u64,
    /// Per dword (low, high): the last write was all ones, so reads return the size mask.
    sizing: [bool; 2],
}

/// A type-0 configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_REGS],
    bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last capability added, to chain the next one.
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    /// A configuration space with these ids, no BARs and no capabilities.
    pub fn new(ids: &PciIds) -> Self {
        let mut regs = [0u32; NUM_REGS];
        regs[0] = u32::from(ids.vendor_id) | (u32::from(ids.device_id) << 16);
        regs[2] = u32::from(ids.revision)
            | (u32::from(ids.prog_if) << 8)
            | (u32::from(ids.subclass) << 16)
            | (u32::from(ids.class) << 24);
        regs[11] = u32::from(ids.subsystem_vendor_id) | (u32::from(ids.subsystem_id) << 16);
        Self {
            regs,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        }
    }

    /// Declares a memory BAR. `size` must be a power of two of at least 16 bytes, `address`
    /// aligned to it; a 64-bit BAR takes index `bar.index` and the next one.
    pub fn add_bar(&mut self, bar: &PciBarInfo) -> Result<(), PciError> {
        let index = bar.index;
        let last = if bar.is_64bit { index + 1 } else { index };
        let aligned =
            bar.size.is_power_of_two() && bar.size >= 16 && bar.address.is_multiple_of(bar.size);
        let fits = bar.is_64bit || bar.address.saturating_add(bar.size) <= 1 << 32;
        if last >= NUM_BARS || !aligned || !fits {
            return Err(PciError::InvalidBar {
                index,
                size: bar.size,
            });
        }
        let taken = self.bars[index].is_some() || (bar.is_64bit && self.bars[last].is_some());
        if taken || (index > 0 && self.bars[index - 1].is_some_and(|b| b.is_64bit)) {
            return Err(PciError::InvalidBar {
                index,
                size: bar.size,
            });
        }
        self.bars[index] = Some(Bar {
            size: bar.size,
            is_64bit: bar.is_64bit,
            address: bar.address,
            sizing: [false; 2],
        });
        Ok(())
    }

    /// The declared BARs with their current guest addresses.
    pub fn bars(&self) -> Vec<PciBarInfo> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, bar)| {
                bar.map(|b| PciBarInfo {
                    index,
                    address: b.address,
                    size: b.size,
                    is_64bit: b.is_64bit,
                })
            })
            .collect()
    }

    /// Appends a capability; `body` starts with the capability id, its second byte (next
    /// pointer) is filled in here. Returns the capability's offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_capability;
        let end = offset + body.len();
        if body.len() < 2 || end > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull { len: body.len() });
        }
        for (i, byte) in body.iter().enumerate() {
            let byte = if i == 1 { 0 } else { *byte };
            self.set_byte(offset + i, byte);
        }
        match self.last_capability {
            Some(previous) => self.set_byte(previous + 1, offset as u8),
            None => {
                self.regs[CAPABILITY_POINTER_REG] = offset as u32;
                self.regs[COMMAND_REG] |= STATUS_CAPABILITY_LIST;
            }
        }
        self.last_capability = Some(offset);
        // Capabilities are dword aligned.
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    /// Sets the interrupt pin register (1 = INTA#).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        let reg = &mut self.regs[INTERRUPT_REG];
        *reg = (*reg & !0xff00) | (u32::from(pin) << 8);
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Which BAR (and which dword of it) a register holds.
    fn bar_at(&self, reg: usize) -> Option<(usize, usize)> {
        let slot = reg.checked_sub(BAR0_REG).filter(|s| *s < NUM_BARS)?;
        if self.bars[slot].is_some() {
            return Some((slot, 0));
        }
        let previous = slot.checked_sub(1)?;
        self.bars[previous]
            .filter(|b| b.is_64bit)
            .map(|_| (previous, 1))
    }

    /// Reads the dword register `reg` (0..64).
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= NUM_REGS {
            return u32::MAX;
        }
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            return self
                .bar_at(reg)
                .map_or(0, |(i, half)| self.bar_reg(i, half));
        }
        self.regs[reg]
    }

    fn bar_reg(&self, index: usize, half: usize) -> u32 {
        let Some(bar) = self.bars[index] else {
            return 0;
        };
        let value = if bar.sizing[half] {
            !(bar.size - 1)
        } else {
            bar.address
        };
        if half == 1 {
            return (value >> 32) as u32;
        }
        let flags = if bar.is_64bit { BAR_MEM_64 } else { 0 };
        ((value as u32) & !0xf) | flags
    }

    /// Writes the dword register `reg`; read-only bits are kept. Returns nothing: callers that
    /// care about BAR moves compare [`PciConfiguration::bars`] before and after.
    pub fn write_reg(&mut self, reg: usize, value: u32) {
        match reg {
            COMMAND_REG => {
                let status = self.regs[reg] & 0xffff_0000;
                self.regs[reg] = status | (value & COMMAND_WRITABLE);
            }
            CACHE_LINE_REG => {
                self.regs[reg] = (self.regs[reg] & !0xff) | (value & 0xff);
            }
            INTERRUPT_REG => {
                self.regs[reg] = (self.regs[reg] & !0xff) | (value & 0xff);
            }
            r if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&r) => {
                if let Some((index, half)) = self.bar_at(r) {
                    self.write_bar(index, half, value);
                }
            }
            _ => log::debug!("PCI config write to read-only register {reg:#x} ignored"),
        }
    }

    fn write_bar(&mut self, index: usize, half: usize, value: u32) {
        let Some(bar) = self.bars[index].as_mut() else {
            return;
        };
        // All ones (ignoring the read-only flag bits of the low dword) is a sizing probe: the
        // address stays and reads return the size mask until the next write.
        let probe = if half == 0 { value | 0xf } else { value };
        if probe == u32::MAX {
            bar.sizing[half] = true;
            return;
        }
        bar.sizing[half] = false;
        let new = if half == 0 {
            (bar.address & !0xffff_ffff) | u64::from(value & !0xf)
        } else {
            (bar.address & 0xffff_ffff) | (u64::from(value) << 32)
        };
        // The address bits below the size are read-only zero.
        bar.address = new & !(bar.size - 1);
    }

    /// Reads `data.len()` bytes (1, 2 or 4, not crossing a dword) at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let value = self.read_reg(offset / 4);
        read_bytes(value, offset % 4, data);
    }

    /// Writes `data` (1, 2 or 4 bytes, not crossing a dword) at `offset`.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let reg = offset / 4;
        if reg >= NUM_REGS || offset % 4 + data.len() > 4 {
            log::debug!("PCI config write at {offset:#x} len {} ignored", data.len());
            return;
        }
        // Merge into the stored value, not the sizing mask, so partial writes to a BAR keep
        // the other bytes of its address.
        let current = match self.bar_at(reg) {
            Some((index, half)) => {
                self.bars[index].map_or(0, |b| (b.address >> (32 * half)) as u32)
            }
            None => self.regs[reg],
        };
        self.write_reg(reg, merge_bytes(current, offset % 4, data));
    }

    /// The guest-programmed registers.
    pub fn state(&self) -> PciConfigurationState {
        PciConfigurationState {
            command: self.regs[COMMAND_REG] as u16,
            cache_line_size: self.regs[CACHE_LINE_REG] as u8,
            interrupt_line: self.regs[INTERRUPT_REG] as u8,
            bar_addresses: self.bars.iter().map(|b| b.map(|b| b.address)).collect(),
        }
    }

    /// Puts back registers saved by [`PciConfiguration::state`]; the BAR layout must match.
    pub fn set_state(&mut self, state: &PciConfigurationState) -> Result<(), PciError> {
        let layout_matches = state.bar_addresses.len() == NUM_BARS
            && self
                .bars
                .iter()
                .zip(&state.bar_addresses)
                .all(|(bar, saved)| match (bar, saved) {
                    (Some(bar), Some(address)) => address.is_multiple_of(bar.size),
                    (None, None) => true,
                    _ => false,
                });
        if !layout_matches {
            return Err(PciError::StateMismatch);
        }
        self.write_reg(COMMAND_REG, u32::from(state.command));
        self.write_reg(CACHE_LINE_REG, u32::from(state.cache_line_size));
        self.write_reg(INTERRUPT_REG, u32::from(state.interrupt_line));
        for (bar, saved) in self.bars.iter_mut().zip(&state.bar_addresses) {
            if let (Some(bar), Some(address)) = (bar, saved) {
                bar.address = *address;
            }
        }
        Ok(())
    }
}

/// Copies the bytes of `value` starting at byte `shift` into `data` (zero past the dword).
pub fn read_bytes(value: u32, shift: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, out) in data.iter_mut().enumerate() {
        *out = bytes.get(shift + i).copied().unwrap_or(0);
    }
}

/// `current` with the bytes of `data` written at byte `shift` (bytes past the dword dropped).
pub fn merge_bytes(current: u32, shift: usize, data: &[u8]) -> u32 {
    let mut bytes = current.to_le_bytes();
    for (i, byte) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(shift + i) {
            *slot = *byte;
        }
    }
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_bars() -> PciConfiguration {
        let mut config = PciConfiguration::new(&PciIds {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            class: 0xff,
            ..PciIds::default()
        });
        let bar0 = PciBarInfo {
            index: 0,
            address: 0xc000_0000,
            size: 0x8000,
            is_64bit: true,
        };
        let bar2 = PciBarInfo {
            index: 2,
            address: 0xd000_0000,
            size: 0x1000,
            is_64bit: false,
        };
        config.add_bar(&bar0).unwrap();
        config.add_bar(&bar2).unwrap();
        config
    }

    #[test]
    fn bar_sizing_reads_size_mask_and_keeps_address() {
        let mut config = config_with_bars();

        config.write_reg(4, u32::MAX);
        config.write_reg(5, u32::MAX);
        let sized = (config.read_reg(4), config.read_reg(5));
        config.write_reg(4, 0xc000_0000);
        config.write_reg(5, 0);

        assert_eq!(sized, (0xffff_8004, 0xffff_ffff));
        assert_eq!(config.read_reg(4), 0xc000_0004);
        assert_eq!(config.bars()[0].address, 0xc000_0000);
    }

    #[test]
    fn bar_write_moves_address_and_drops_bits_below_size() {
        let mut config = config_with_bars();

        config.write_reg(6, 0xe000_0123);

        assert_eq!(config.bars()[1].address, 0xe000_0000);
        assert_eq!(config.read_reg(6), 0xe000_0000);
    }

    #[test]
    fn high_half_of_64bit_bar_and_absent_bar_read_as_expected() {
        let config = config_with_bars();

        assert_eq!(config.read_reg(5), 0);
        assert_eq!(config.read_reg(7), 0);
    }

    #[test]
    fn capabilities_are_chained_from_capability_pointer() {
        let mut config = config_with_bars();

        let first = config.add_capability(&[0x09, 0xaa, 4, 1]).unwrap();
        let second = config.add_capability(&[0x11, 0, 0, 0, 0]).unwrap();

        assert_eq!((first, second), (0x40, 0x44));
        assert_eq!(config.read_reg(13) & 0xff, 0x40);
        assert_eq!(config.read_reg(0x40 / 4), 0x0104_4409);
        assert_ne!(config.read_reg(1) & STATUS_CAPABILITY_LIST, 0);
    }

    #[test]
    fn ids_are_read_only() {
        let mut config = config_with_bars();

        config.write(0, &[0xff, 0xff]);
        config.write(0x2c, &0u32.to_le_bytes());
        let mut vendor = [0u8; 2];
        config.read(0, &mut vendor);

        assert_eq!(u16::from_le_bytes(vendor), 0x1af4);
        assert_eq!(config.read_reg(0) >> 16, 0x1044);
    }

    #[test]
    fn state_round_trip_restores_bar_addresses_and_command() {
        let mut config = config_with_bars();
        config.write(4, &[0x06, 0x00]);
        config.write_reg(6, 0xe000_0000);
        let state = config.state();

        let mut restored = config_with_bars();
        restored.set_state(&state).unwrap();

        assert_eq!(restored.state(), state);
        assert_eq!(restored.read_reg(6), 0xe000_0000);
    }
}
