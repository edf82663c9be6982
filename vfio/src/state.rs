//! The saved state of a VFIO device: what the VMM knows of it (the device's own registers stay
//! in the device, which keeps running across a restart-mode live update).

use std::path::PathBuf;

use devices::pci::PciConfigurationState;
use serde::{Deserialize, Serialize};

use devices::pci::DmaRegionState;

use crate::open::VfioBackend;

/// What the VMM knows of an attached VFIO device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioDeviceState {
    /// The device's sysfs path (`/sys/bus/pci/devices/<BDF>`).
    pub path: PathBuf,
    /// How it reaches the IOMMU.
    pub backend: VfioBackend,
    /// The memory BARs the guest sees (sizes; their addresses are in `bars`).
    pub bar_layout: Vec<VfioBarState>,
    /// BAR registers as the guest programmed them.
    pub bars: PciConfigurationState,
    /// The device fd's regions (BARs and configuration space) as the kernel described them.
    pub regions: Vec<VfioRegionState>,
    /// Offset of the MSI capability, if the device has one.
    pub msi_cap: Option<usize>,
    /// The MSI enable bit as the guest last wrote it.
    pub msi_guest_enable: bool,
    /// MSI is enabled (the eventfd is with the kernel).
    pub msi_enabled: bool,
    /// Guest RAM mapped for the device's DMA.
    pub dma: Vec<DmaRegionState>,
    /// The IOAS holding those mappings (iommufd backend); a record, never re-created.
    pub ioas_id: Option<u32>,
    /// Restart mode: the session attachments holding the device's fds.
    pub handover: Option<VfioHandoverTokens>,
}

impl liveupdate::state::Versioned for VfioDeviceState {
    const VERSION: u16 = 1;
}

/// One memory BAR of the device as placed for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioBarState {
    /// BAR index (0..=5).
    pub index: usize,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit BAR (takes two registers).
    pub is_64bit: bool,
}

/// One region of the VFIO device fd (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioRegionState {
    /// Region index (the BAR index, or 7 for configuration space).
    pub index: u32,
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
}

/// The session attachment tokens of a handed-over device (restart mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioHandoverTokens {
    /// The vfio cdev, bound to the iommufd and attached to the IOAS.
    pub device: u64,
    /// The iommufd holding the IOAS and its mappings.
    pub iommufd: u64,
    /// The eventfd the kernel signals for MSI vector 0.
    pub msi_eventfd: u64,
}
