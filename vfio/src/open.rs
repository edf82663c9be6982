//! Opening a VFIO device: the vfio cdev bound to an iommufd when the kernel has them, the
//! group and container API otherwise; guest RAM is mapped for DMA at its guest addresses.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use devices::pci::{DmaRegionState, dma_regions};
use iommufd_ioctls::IommuFd;
use serde::{Deserialize, Serialize};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VfioDeviceError;
use crate::sys::container_dma_map;

/// Where the iommufd lives; its absence selects the container API.
const IOMMUFD_PATH: &str = "/dev/iommu";

/// How the device reaches the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfioBackend {
    /// `/dev/vfio/devices/vfioN` bound to an iommufd; RAM mapped with `IOMMU_IOAS_MAP_FILE`.
    Iommufd,
    /// `/dev/vfio/<group>` in a `/dev/vfio/vfio` container; RAM mapped by host address.
    Container,
}

/// What keeps the IOMMU side open (the device holds it too; we need it to map).
pub(crate) enum Iommu {
    Iommufd { ioas: Arc<VfioIommufd> },
    Container { _container: Arc<VfioContainer> },
}

/// An opened device with guest RAM mapped.
pub(crate) struct Opened {
    pub(crate) device: VfioDevice,
    pub(crate) backend: VfioBackend,
    pub(crate) dma: Vec<DmaRegionState>,
    /// Kept so the IOMMU outlives nothing it points at (container mappings use host addresses).
    pub(crate) iommu: Iommu,
}

fn vfio_error(what: &'static str) -> impl FnOnce(vfio_ioctls::VfioError) -> VfioDeviceError {
    move |source| VfioDeviceError::Vfio { what, source }
}

/// Whether the device at `sysfs` has a vfio cdev and the kernel an iommufd.
pub(crate) fn has_cdev(sysfs: &Path) -> bool {
    sysfs.join("vfio-dev").is_dir() && Path::new(IOMMUFD_PATH).exists()
}

/// Opens the device at `sysfs` (a `/sys/bus/pci/devices/<BDF>` path) and maps every region
/// of `memory` for its DMA.
pub(crate) fn open(sysfs: &Path, memory: &GuestMemoryMmap) -> Result<Opened, VfioDeviceError> {
    let driver = std::fs::read_link(sysfs.join("driver")).ok();
    let driver = driver
        .as_deref()
        .and_then(Path::file_name)
        .map(|name| name.to_string_lossy().into_owned());
    if !driver
        .as_deref()
        .is_some_and(|name| name.starts_with("vfio"))
    {
        return Err(VfioDeviceError::NotBound {
            path: sysfs.to_path_buf(),
            driver,
        });
    }
    let dma = dma_regions(memory)?;
    if has_cdev(sysfs) {
        let iommufd = IommuFd::new().map_err(|source| VfioDeviceError::Iommufd {
            what: "open /dev/iommu",
            source,
        })?;
        let iommufd = Arc::new(
            VfioIommufd::new(Arc::new(iommufd), None, None).map_err(vfio_error("IOAS alloc"))?,
        );
        let device = VfioDevice::new(sysfs, iommufd.clone(), true)
            .map_err(vfio_error("cdev open and bind"))?;
        for (region, state) in memory.iter().zip(&dma) {
            let file = region
                .file_offset()
                .ok_or(VfioDeviceError::RamNotShareable {
                    address: state.address,
                })?;
            iommufd
                .ioas()
                .map_file(
                    file.file().as_raw_fd(),
                    state.file_offset,
                    state.size,
                    state.address,
                    true,
                )
                .map_err(|source| VfioDeviceError::Iommufd {
                    what: "IOMMU_IOAS_MAP_FILE",
                    source,
                })?;
        }
        return Ok(Opened {
            device,
            backend: VfioBackend::Iommufd,
            dma,
            iommu: Iommu::Iommufd { ioas: iommufd },
        });
    }
    let container = Arc::new(VfioContainer::new(None).map_err(vfio_error("container open"))?);
    let device =
        VfioDevice::new(sysfs, container.clone(), false).map_err(vfio_error("group open"))?;
    for (region, state) in memory.iter().zip(&dma) {
        container_dma_map(&container, state.address, region).map_err(vfio_error("DMA map"))?;
    }
    Ok(Opened {
        device,
        backend: VfioBackend::Container,
        dma,
        iommu: Iommu::Container {
            _container: container,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_a_driver_is_refused_before_any_vfio_call() {
        let dir = std::env::temp_dir().join(format!("vfio-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let memory = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap();

        let result = open(&dir, &memory);

        assert!(
            matches!(result, Err(VfioDeviceError::NotBound { ref path, driver: None }) if *path == dir),
            "{:?}",
            result.err()
        );
    }

    #[test]
    fn anonymous_ram_cannot_be_mapped_for_dma() {
        let memory = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 4096)]).unwrap();

        let result = dma_regions(&memory).map_err(VfioDeviceError::from);

        assert!(matches!(
            result,
            Err(VfioDeviceError::RamNotShareable { address: 0 })
        ));
    }
}
