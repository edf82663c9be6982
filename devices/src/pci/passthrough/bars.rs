//! The BAR registers of a passed-through function. The VMM places the BARs in its PCI window,
//! so the guest reads and writes the VMM's copy of the registers (sizing included), never the
//! device's. Memory BARs only: an I/O BAR is left out (its register reads 0). The expansion
//! ROM is not passed through: its register reads 0, which tells the guest there is none (a
//! ROM would need a place on the bus and in the saved state).

use std::ops::Range;

use super::super::config::NUM_BARS;
use super::super::{PciBarInfo, PciConfiguration, PciConfigurationState, PciError, PciIds};

/// Offset of BAR 0's register in configuration space; BAR `n`'s is `4 * n` further.
pub const BAR0_REGISTER: usize = 0x10;
/// The BAR registers.
const BAR_REGISTERS: Range<usize> = BAR0_REGISTER..BAR0_REGISTER + 4 * NUM_BARS;
/// The expansion ROM BAR register.
const ROM_REGISTER: Range<usize> = 0x30..0x34;
/// BAR register bit 0: I/O space.
const BAR_IO: u32 = 1;
/// BAR register type bits 2:1; 10b is a 64-bit memory BAR.
const BAR_TYPE_MASK: u32 = 0b110;
const BAR_TYPE_64: u32 = 0b100;
/// Largest 32-bit memory BAR we place.
const MAX_32BIT_BAR: u64 = 1 << 31;

/// One BAR as the device reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceBar {
    /// The device's BAR register (its type bits: I/O, 64-bit).
    pub register: u32,
    /// Size of the region behind it; 0 when there is none.
    pub size: u64,
}

/// The VMM's copy of a passed-through function's BAR and expansion ROM registers.
#[derive(Clone, Debug)]
pub struct BarShadow {
    registers: PciConfiguration,
}

/// A size the guest can be given: a power of two of at least 16 bytes, at most 2 GiB for a
/// 32-bit BAR.
fn check_size(index: usize, size: u64, is_64bit: bool) -> Result<(), PciError> {
    if !size.is_power_of_two() || size < 16 || (!is_64bit && size > MAX_32BIT_BAR) {
        return Err(PciError::InvalidBar { index, size });
    }
    Ok(())
}

impl BarShadow {
    /// Places the memory BARs `probe(index)` reports (a 64-bit one takes the next index too)
    /// where `place_bar(size)` says, in index order.
    pub fn place(
        probe: &mut dyn FnMut(usize) -> DeviceBar,
        place_bar: &mut dyn FnMut(u64) -> Result<u64, PciError>,
    ) -> Result<Self, PciError> {
        let mut registers = PciConfiguration::new(&PciIds::default());
        let mut index = 0;
        while index < NUM_BARS {
            let bar = probe(index);
            let is_io = bar.register & BAR_IO != 0;
            let is_64bit = !is_io && bar.register & BAR_TYPE_MASK == BAR_TYPE_64;
            if bar.size != 0 && is_io {
                log::warn!("I/O BAR {index} is not passed through; the guest sees none");
            } else if bar.size != 0 {
                check_size(index, bar.size, is_64bit)?;
                registers.add_bar(&PciBarInfo {
                    index,
                    address: place_bar(bar.size)?,
                    size: bar.size,
                    is_64bit,
                })?;
            }
            index += if is_64bit { 2 } else { 1 };
        }
        Ok(Self { registers })
    }

    /// Rebuilds the registers of BARs placed earlier (`bars`: index, size, type; their
    /// addresses are ignored) as the guest left them (`state`, from [`Self::state`]).
    pub fn restore(bars: &[PciBarInfo], state: &PciConfigurationState) -> Result<Self, PciError> {
        let mut registers = PciConfiguration::new(&PciIds::default());
        for bar in bars {
            check_size(bar.index, bar.size, bar.is_64bit)?;
            registers.add_bar(&PciBarInfo { address: 0, ..*bar })?;
        }
        registers.set_state(state)?;
        Ok(Self { registers })
    }

    /// The BARs at their current guest addresses.
    pub fn bars(&self) -> Vec<PciBarInfo> {
        self.registers.bars()
    }

    /// The registers as the guest programmed them.
    pub fn state(&self) -> PciConfigurationState {
        self.registers.state()
    }

    /// Serves a configuration read at `offset` if it is of a BAR or the ROM register; `false`
    /// when the device answers it.
    pub fn read(&self, offset: usize, data: &mut [u8]) -> bool {
        if BAR_REGISTERS.contains(&offset) {
            self.registers.read(offset, data);
        } else if ROM_REGISTER.contains(&offset) {
            data.fill(0);
        } else {
            return false;
        }
        true
    }

    /// Takes a configuration write at `offset` if it is of a BAR or the ROM register (which
    /// drops it); `false` when it goes to the device.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> bool {
        if BAR_REGISTERS.contains(&offset) {
            self.registers.write(offset, data);
        } else if !ROM_REGISTER.contains(&offset) {
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM32: u32 = 0;
    const MEM64: u32 = BAR_TYPE_64;

    /// BAR 0: 32-bit 1 MiB; BAR 1: I/O, 256 bytes; BARs 2-3: 64-bit 16 KiB; BAR 4: none;
    /// BAR 5: 32-bit 4 KiB. Placed from 0xc000_0000 up, each at a multiple of 1 MiB.
    fn placed() -> BarShadow {
        let bars = [
            DeviceBar {
                register: MEM32,
                size: 1 << 20,
            },
            DeviceBar {
                register: BAR_IO,
                size: 0x100,
            },
            DeviceBar {
                register: MEM64,
                size: 0x4000,
            },
            DeviceBar::default(),
            DeviceBar::default(),
            DeviceBar {
                register: MEM32,
                size: 0x1000,
            },
        ];
        let mut next = 0xc000_0000;
        BarShadow::place(&mut |index| bars[index], &mut |_| {
            next += 1 << 20;
            Ok(next - (1 << 20))
        })
        .unwrap()
    }

    fn write_dword(shadow: &mut BarShadow, offset: usize, value: u32) -> bool {
        shadow.write(offset, &value.to_le_bytes())
    }

    fn read_dword(shadow: &BarShadow, offset: usize) -> u32 {
        let mut raw = [0u8; 4];
        assert!(shadow.read(offset, &mut raw), "{offset:#x} not served");
        u32::from_le_bytes(raw)
    }

    #[test]
    fn memory_bars_are_placed_in_index_order_and_io_bars_left_out() {
        let shadow = placed();

        let placed: Vec<_> = shadow
            .bars()
            .iter()
            .map(|b| (b.index, b.address, b.size, b.is_64bit))
            .collect();

        assert_eq!(
            placed,
            [
                (0, 0xc000_0000, 1 << 20, false),
                (2, 0xc010_0000, 0x4000, true),
                (5, 0xc020_0000, 0x1000, false),
            ]
        );
        assert_eq!(read_dword(&shadow, 0x14), 0, "the I/O BAR reads as absent");
    }

    #[test]
    fn an_all_ones_write_makes_the_register_read_the_size_mask() {
        let mut shadow = placed();

        write_dword(&mut shadow, 0x10, u32::MAX);

        assert_eq!(read_dword(&shadow, 0x10), !((1u32 << 20) - 1));
        assert_eq!(shadow.bars()[0].address, 0xc000_0000);
    }

    #[test]
    fn a_64_bit_pair_sizes_and_moves_through_both_registers() {
        let mut shadow = placed();

        write_dword(&mut shadow, 0x18, u32::MAX);
        write_dword(&mut shadow, 0x1c, u32::MAX);
        let sized = (read_dword(&shadow, 0x18), read_dword(&shadow, 0x1c));
        write_dword(&mut shadow, 0x18, 0xd000_0000);
        write_dword(&mut shadow, 0x1c, 0x1);

        assert_eq!(sized, (0xffff_c000 | MEM64, u32::MAX));
        assert_eq!(shadow.bars()[1].address, 0x1_d000_0000);
        assert_eq!(read_dword(&shadow, 0x18), 0xd000_0000 | MEM64);
    }

    #[test]
    fn a_write_that_is_not_all_ones_moves_the_bar_and_drops_the_bits_below_its_size() {
        let mut shadow = placed();

        write_dword(&mut shadow, 0x24, 0xe000_0abc);

        assert_eq!(shadow.bars()[2].address, 0xe000_0000);
        assert_eq!(read_dword(&shadow, 0x24), 0xe000_0000);
    }

    #[test]
    fn the_rom_register_reads_no_rom_even_after_a_size_probe_or_an_enable() {
        let mut shadow = placed();

        let probe_taken = write_dword(&mut shadow, 0x30, 0xffff_f800);
        let sized = read_dword(&shadow, 0x30);
        let enable_taken = write_dword(&mut shadow, 0x30, 0xc100_0001);

        assert!(
            probe_taken && enable_taken,
            "ROM writes must not reach the device"
        );
        assert_eq!((sized, read_dword(&shadow, 0x30)), (0, 0));
    }

    #[test]
    fn registers_outside_the_bars_and_the_rom_are_left_to_the_device() {
        let mut shadow = placed();
        let mut data = [0u8; 4];

        assert!(!shadow.read(0x0c, &mut data));
        assert!(!shadow.read(0x2c, &mut data));
        assert!(!shadow.write(0x34, &[0x40]));
        assert!(!shadow.write(0x04, &[0x06, 0]));
    }

    #[test]
    fn sizes_the_guest_cannot_be_given_are_refused() {
        let odd = DeviceBar {
            register: MEM32,
            size: 0x3000,
        };
        let huge = DeviceBar {
            register: MEM32,
            size: 1 << 32,
        };

        let odd = BarShadow::place(&mut |_| odd, &mut |_| Ok(0));
        let huge = BarShadow::place(&mut |_| huge, &mut |_| Ok(0));

        assert_eq!(
            odd.err(),
            Some(PciError::InvalidBar {
                index: 0,
                size: 0x3000
            })
        );
        assert_eq!(
            huge.err(),
            Some(PciError::InvalidBar {
                index: 0,
                size: 1 << 32
            })
        );
    }

    #[test]
    fn restore_puts_back_where_the_guest_moved_the_bars() {
        let mut shadow = placed();
        write_dword(&mut shadow, 0x10, 0xd000_0000);
        write_dword(&mut shadow, 0x1c, 0x2);

        let restored = BarShadow::restore(&shadow.bars(), &shadow.state()).unwrap();

        assert_eq!(restored.bars(), shadow.bars());
        assert_eq!(read_dword(&restored, 0x10), 0xd000_0000);
        assert_eq!(read_dword(&restored, 0x1c), 0x2);
    }

    #[test]
    fn restore_refuses_a_state_of_another_layout() {
        let shadow = placed();
        let one_bar = [PciBarInfo {
            index: 0,
            address: 0,
            size: 1 << 20,
            is_64bit: false,
        }];

        let result = BarShadow::restore(&one_bar, &shadow.state());

        assert!(matches!(result, Err(PciError::StateMismatch)));
    }
}
