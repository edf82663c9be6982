//! Guest RAM as the DMA regions of a device served outside the VMM (kernel VFIO, vfio-user):
//! every region is a window of a RAM memfd, so the other side maps the very same file.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// One guest RAM region mapped for a device's DMA (IOVA = guest physical address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaRegionState {
    /// Guest physical address, also the IOVA.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in its RAM memfd.
    pub file_offset: u64,
}

/// A guest RAM region with no file behind it (at `address`): it cannot be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFileBacked {
    /// The region's guest physical address.
    pub address: u64,
}

/// Every region of `memory` as a DMA region; each must be file-backed (the RAM memfds).
pub fn dma_regions(memory: &GuestMemoryMmap) -> Result<Vec<DmaRegionState>, NotFileBacked> {
    memory
        .iter()
        .map(|region| {
            let address = region.start_addr().0;
            let file = region.file_offset().ok_or(NotFileBacked { address })?;
            Ok(DmaRegionState {
                address,
                size: region.len(),
                file_offset: file.start(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn file_backed_regions_become_dma_regions_at_their_file_offsets() {
        let file = TempFile::new().unwrap().into_file();
        file.set_len(0x3000).unwrap();
        let region = |offset: u64, address: u64| {
            let mapping =
                MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), offset), 0x1000)
                    .unwrap();
            GuestRegionMmap::new(mapping, GuestAddress(address)).unwrap()
        };
        let memory =
            GuestMemoryMmap::from_regions(vec![region(0, 0), region(0x2000, 0x10_0000)]).unwrap();

        let regions = dma_regions(&memory).unwrap();

        assert_eq!(
            regions,
            [
                DmaRegionState {
                    address: 0,
                    size: 0x1000,
                    file_offset: 0
                },
                DmaRegionState {
                    address: 0x10_0000,
                    size: 0x1000,
                    file_offset: 0x2000
                },
            ]
        );
    }

    #[test]
    fn anonymous_ram_is_refused_naming_its_address() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x4000), 0x1000)]).unwrap();

        assert_eq!(dma_regions(&memory), Err(NotFileBacked { address: 0x4000 }));
    }
}
