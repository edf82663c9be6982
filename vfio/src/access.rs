//! The few device operations the PCI emulation needs, behind a trait so it can be tested
//! without a host device: the kernel's device as vfio-ioctls opened it, the same device
//! adopted from a previous VMM's fds, or (after a handover) nothing.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSI_IRQ_INDEX};
use vfio_ioctls::{VfioDevice, VfioError};
use vmm_sys_util::eventfd::EventFd;

use crate::open::Iommu;
use crate::state::VfioRegionState;
use crate::sys::{borrow_eventfd, borrow_raw, set_msi_eventfd};

/// The fds that keep a device and its DMA mappings alive, for the next VMM.
#[derive(Debug, Clone, Copy)]
pub struct HandoverFds<'a> {
    /// The vfio cdev (bound, attached to the IOAS).
    pub device: BorrowedFd<'a>,
    /// The iommufd holding the IOAS.
    pub iommufd: BorrowedFd<'a>,
}

/// Region reads and writes, region sizes and the MSI eventfd of one VFIO device.
pub(crate) trait DeviceAccess: Send {
    /// Reads `data.len()` bytes of region `region` at `offset`; leaves `data` as it was when
    /// the kernel refuses (the caller pre-fills all ones).
    fn read(&self, region: u32, offset: u64, data: &mut [u8]);
    /// Writes `data` into region `region` at `offset`; a refused write is logged and dropped.
    fn write(&self, region: u32, offset: u64, data: &[u8]);
    /// Size of region `region` (0 when absent).
    fn region_size(&self, region: u32) -> u64;
    /// Hands the kernel `irq` for MSI vector 0 (`Some`), or disables MSI (`None`).
    fn set_msi(&self, irq: Option<&EventFd>) -> Result<(), VfioError>;
    /// The BAR and configuration regions, for the saved state.
    fn regions(&self) -> Vec<VfioRegionState> {
        Vec::new()
    }
    /// The id of the IOAS the device is attached to (iommufd only).
    fn ioas_id(&self) -> Option<u32> {
        None
    }
    /// The fds a successor needs (iommufd only: group and container are not handed over).
    fn handover_fds(&self) -> Option<HandoverFds<'_>> {
        None
    }
}

/// The kernel's device.
pub(crate) struct Kernel {
    pub(crate) device: VfioDevice,
    pub(crate) iommu: Iommu,
}

impl DeviceAccess for Kernel {
    fn read(&self, region: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(region, data, offset);
    }

    fn write(&self, region: u32, offset: u64, data: &[u8]) {
        self.device.region_write(region, data, offset);
    }

    fn region_size(&self, region: u32) -> u64 {
        // Asking for a region the device lacks is logged by vfio-ioctls: check first.
        if self.device.get_region_flags(region) == 0 {
            return 0;
        }
        self.device.get_region_size(region)
    }

    fn set_msi(&self, irq: Option<&EventFd>) -> Result<(), VfioError> {
        match irq {
            Some(irq) => {
                if self.device.get_irq_info(VFIO_PCI_MSI_IRQ_INDEX).is_none() {
                    return Err(VfioError::VfioDeviceEnableIrq);
                }
                self.device.enable_msi(vec![irq])
            }
            None => self.device.disable_msi(),
        }
    }

    fn regions(&self) -> Vec<VfioRegionState> {
        (0..=VFIO_PCI_CONFIG_REGION_INDEX)
            .filter_map(|index| {
                let flags = self.device.get_region_flags(index);
                (flags != 0).then(|| VfioRegionState {
                    index,
                    offset: self.device.get_region_offset(index),
                    size: self.device.get_region_size(index),
                    flags,
                })
            })
            .collect()
    }

    fn ioas_id(&self) -> Option<u32> {
        match &self.iommu {
            Iommu::Iommufd { ioas } => Some(ioas.ioas().id()),
            Iommu::Container { .. } => None,
        }
    }

    fn handover_fds(&self) -> Option<HandoverFds<'_>> {
        match &self.iommu {
            Iommu::Iommufd { ioas } => Some(HandoverFds {
                device: borrow_raw(&self.device),
                iommufd: borrow_raw(ioas.iommufd().as_ref()),
            }),
            Iommu::Container { .. } => None,
        }
    }
}

/// A device a previous VMM handed over: its cdev, already bound to the iommufd and attached to
/// the IOAS that maps guest RAM. Region accesses are plain `pread`/`pwrite` at the offsets the
/// previous VMM recorded; nothing is asked of the device when adopting it.
pub(crate) struct Adopted {
    pub(crate) device: File,
    pub(crate) iommufd: OwnedFd,
    pub(crate) regions: Vec<VfioRegionState>,
    pub(crate) ioas_id: Option<u32>,
}

impl Adopted {
    /// Where `len` bytes at `offset` of `region` are in the device fd, if inside the region.
    fn at(&self, region: u32, offset: u64, len: usize) -> Option<u64> {
        let info = self.regions.iter().find(|r| r.index == region)?;
        let end = offset.checked_add(len as u64)?;
        (end <= info.size).then(|| info.offset + offset)
    }
}

impl DeviceAccess for Adopted {
    fn read(&self, region: u32, offset: u64, data: &mut [u8]) {
        let Some(at) = self.at(region, offset, data.len()) else {
            log::debug!("VFIO: read outside region {region} at {offset:#x}");
            return;
        };
        if let Err(e) = self.device.read_exact_at(data, at) {
            log::warn!("VFIO: read of region {region} at {offset:#x} failed: {e}");
        }
    }

    fn write(&self, region: u32, offset: u64, data: &[u8]) {
        let Some(at) = self.at(region, offset, data.len()) else {
            log::debug!("VFIO: write outside region {region} at {offset:#x}");
            return;
        };
        if let Err(e) = self.device.write_all_at(data, at) {
            log::warn!("VFIO: write of region {region} at {offset:#x} failed: {e}");
        }
    }

    fn region_size(&self, region: u32) -> u64 {
        self.regions
            .iter()
            .find(|r| r.index == region)
            .map_or(0, |r| r.size)
    }

    fn set_msi(&self, irq: Option<&EventFd>) -> Result<(), VfioError> {
        set_msi_eventfd(&self.device, irq.map(borrow_eventfd)).map_err(|e| {
            log::warn!("VFIO: VFIO_DEVICE_SET_IRQS failed: {e}");
            if irq.is_some() {
                VfioError::VfioDeviceEnableIrq
            } else {
                VfioError::VfioDeviceDisableIrq
            }
        })
    }

    fn regions(&self) -> Vec<VfioRegionState> {
        self.regions.clone()
    }

    fn ioas_id(&self) -> Option<u32> {
        self.ioas_id
    }

    fn handover_fds(&self) -> Option<HandoverFds<'_>> {
        Some(HandoverFds {
            device: self.device.as_fd(),
            iommufd: self.iommufd.as_fd(),
        })
    }
}

/// What stays of a device handed to a successor: the old VMM must neither touch it nor run
/// vfio-ioctls' drop, which would detach it from the IOAS the successor relies on.
pub(crate) struct Released;

impl DeviceAccess for Released {
    fn read(&self, _region: u32, _offset: u64, _data: &mut [u8]) {}
    fn write(&self, _region: u32, _offset: u64, _data: &[u8]) {}
    fn region_size(&self, _region: u32) -> u64 {
        0
    }
    fn set_msi(&self, _irq: Option<&EventFd>) -> Result<(), VfioError> {
        Err(VfioError::VfioDeviceSetIrq)
    }
}
