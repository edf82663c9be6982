//! Restart-mode live update of a VFIO device: the old VMM hands its fds to the successor
//! through the session, the successor adopts them. The device is never reset, re-opened,
//! re-bound or re-mapped: its DMA into guest RAM and its interrupts go on through the pause.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use devices::interrupt::MsiVectors;
use devices::pci::{PciBarInfo, PciConfiguration, PciIds};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::VfioDeviceError;
use crate::access::{Adopted, HandoverFds};
use crate::device::VfioPciDevice;
use crate::open::{VfioBackend, dma_regions};
use crate::state::VfioDeviceState;

/// The fds a previous VMM attached for a device, taken from the session.
#[derive(Debug)]
pub struct AdoptedFds {
    /// The vfio cdev, bound to `iommufd` and attached to the IOAS.
    pub device: OwnedFd,
    /// The iommufd holding the IOAS and its mappings.
    pub iommufd: OwnedFd,
}

impl VfioPciDevice {
    /// The fds the successor needs to keep the device and its DMA mappings: `None` on the
    /// group and container fallback, whose fds vfio-ioctls does not expose.
    pub fn handover_fds(&self) -> Option<HandoverFds<'_>> {
        self.access.handover_fds()
    }

    /// Stops (or, on a cancelled update, resumes) every access of this VMM to the device:
    /// while handed over, configuration and BAR reads return all ones and writes are dropped,
    /// and dropping the device leaves the kernel objects alone.
    pub fn set_handed_over(&mut self, handed_over: bool) {
        self.handed_over = handed_over;
    }

    /// Rebuilds the device a previous VMM handed over, from its `state` and the fds it
    /// attached, without a single call to the device or the IOMMU: the cdev stays bound and
    /// attached, the IOAS keeps its mappings of the RAM memfds (which `memory` must map at the
    /// same addresses), the guest's BAR and MSI programming stays in the device. `irq` is the
    /// handed-over eventfd behind vector 0 of `msi`, which the kernel still signals.
    pub fn adopt(
        state: &VfioDeviceState,
        fds: AdoptedFds,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
    ) -> Result<Self, VfioDeviceError> {
        if state.backend != VfioBackend::Iommufd {
            return Err(VfioDeviceError::NotCarried {
                backend: state.backend,
            });
        }
        if dma_regions(memory)? != state.dma {
            return Err(VfioDeviceError::RamLayoutChanged);
        }
        let mut bars = PciConfiguration::new(&PciIds::default());
        for bar in &state.bar_layout {
            let address = state.bars.bar_addresses.get(bar.index).copied().flatten();
            bars.add_bar(&PciBarInfo {
                index: bar.index,
                address: address.unwrap_or(0),
                size: bar.size,
                is_64bit: bar.is_64bit,
            })
            .map_err(VfioDeviceError::Bar)?;
        }
        bars.set_state(&state.bars).map_err(VfioDeviceError::Bar)?;
        if bars.bars().is_empty() {
            return Err(VfioDeviceError::NoBar);
        }
        let access = Box::new(Adopted {
            device: File::from(fds.device),
            iommufd: fds.iommufd,
            regions: state.regions.clone(),
            ioas_id: state.ioas_id,
        });
        log::info!(
            "VFIO device {} adopted (IOAS {:?}, MSI {}), BARs {:x?}",
            state.path.display(),
            state.ioas_id,
            if state.msi_enabled { "on" } else { "off" },
            bars.bars()
        );
        Ok(Self {
            access,
            path: state.path.clone(),
            backend: state.backend,
            dma: state.dma.clone(),
            bar_layout: state.bar_layout.clone(),
            bars,
            regions: state.regions.clone(),
            ioas_id: state.ioas_id,
            msi_cap: state.msi_cap,
            msi_guest_enable: state.msi_guest_enable,
            msi_enabled: state.msi_enabled,
            msi,
            irq,
            handed_over: false,
            _memory: memory.clone(),
        })
    }
}
