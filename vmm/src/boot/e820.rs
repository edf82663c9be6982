//! The guest's physical memory map, shared by the e820 table (bzImage) and the PVH memmap.

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::BootError;
use crate::layout;

/// e820 type of usable RAM.
pub(super) const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub(super) const E820_RESERVED: u32 = 2;

/// One memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MemoryMapEntry {
    /// First guest physical address.
    pub(super) addr: u64,
    /// Length in bytes.
    pub(super) size: u64,
    /// e820 type.
    pub(super) kind: u32,
}

/// End of the guest RAM region that starts at 0, which must reach past 1 MiB.
/// Capped at 4 GiB so low-RAM placements stay 32-bit addressable.
pub(super) fn low_ram_end(mem: &GuestMemoryMmap) -> Result<u64, BootError> {
    let region = mem
        .iter()
        .find(|region| region.start_addr().raw_value() == 0)
        .ok_or(BootError::LowRamTooSmall)?;
    let end = region.len().min(layout::HIGH_RAM_START);
    if end <= layout::HIGH_MEMORY_START {
        return Err(BootError::LowRamTooSmall);
    }
    Ok(end)
}

/// The memory map for `mem`: the region at 0 is split around the EBDA and legacy BIOS area
/// (reported reserved), every other region is RAM. The MMIO hole is left as a gap so the
/// guest's PCI code can see it is free for BARs.
pub(super) fn memory_map(mem: &GuestMemoryMmap) -> Result<Vec<MemoryMapEntry>, BootError> {
    let low_end = low_ram_end(mem)?;
    let mut entries = vec![
        MemoryMapEntry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: layout::EBDA_START,
            size: layout::HIGH_MEMORY_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryMapEntry {
            addr: layout::HIGH_MEMORY_START,
            size: low_end - layout::HIGH_MEMORY_START,
            kind: E820_RAM,
        },
    ];
    entries.extend(
        mem.iter()
            .filter(|region| region.start_addr().raw_value() != 0)
            .map(|region| MemoryMapEntry {
                addr: region.start_addr().raw_value(),
                size: region.len(),
                kind: E820_RAM,
            }),
    );
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::super::test_images::guest_memory;
    use super::*;

    #[test]
    fn small_guest_map_reserves_legacy_area() {
        let mem = guest_memory(64 << 20);

        let map = memory_map(&mem).unwrap();

        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                MemoryMapEntry {
                    addr: 0x100000,
                    size: (64 << 20) - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn large_guest_map_has_high_ram_above_4g() {
        let mem = guest_memory(16 << 30);

        let map = memory_map(&mem).unwrap();

        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: 0x100000,
                size: 0xc000_0000 - 0x100000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            MemoryMapEntry {
                addr: 0x1_0000_0000,
                size: (16 << 30) - 0xc000_0000,
                kind: E820_RAM
            }
        );
    }

    #[test]
    fn guest_below_one_mib_is_rejected() {
        let mem = guest_memory(512 << 10);

        let err = low_ram_end(&mem).unwrap_err();

        assert!(matches!(err, BootError::LowRamTooSmall), "{err}");
    }
}
