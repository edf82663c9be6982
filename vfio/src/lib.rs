//! Kernel VFIO PCI passthrough: a host PCI function bound to vfio-pci, assigned to the guest.
//!
//! `--device path=/sys/bus/pci/devices/<BDF>` (cloud-hypervisor's flag) attaches the function
//! as a [`VfioPciDevice`] on our PCI bus:
//!
//! - **IOMMU**: the vfio cdev (`/dev/vfio/devices/vfioN`, found in the sysfs path's
//!   `vfio-dev/`) bound to an iommufd (`/dev/iommu`), guest RAM mapped into its IOAS with
//!   `IOMMU_IOAS_MAP_FILE` on the RAM memfds, IOVA = guest physical address. Without a cdev or
//!   `/dev/iommu` the group and container API (`/dev/vfio/<group>`, `/dev/vfio/vfio`) maps the
//!   same RAM by host address.
//! - **Configuration space**: through the VFIO config region, except the BAR registers (ours)
//!   and the expansion ROM register (reads as "no ROM"), both served by the shadow shared with
//!   vfio-user (`devices::pci::passthrough`).
//! - **BARs**: every memory BAR placed in the PCI window and trapped: MMIO exits go to the
//!   region's pread/pwrite.
//! - **Interrupts**: MSI, one vector: an eventfd registered as a KVM irqfd and handed to the
//!   kernel with `VFIO_DEVICE_SET_IRQS` when the guest enables MSI.
//! - **Hot-plug**: added to a running VM with `vm.add-device` and removed with
//!   `vm.remove-device`, both through the PCI hot-plug controller (ACPI); the VMM wiring is in
//!   `vmm::device_manager` (`vfio.rs`, `hotplug.rs`, `unplug.rs`).
//!
//! # Limits
//!
//! No MSI-X, no INTx, no I/O BARs, no expansion ROM, no BAR mmap (every access exits to the
//! VMM), one MSI vector, guest RAM mapped once at attach (no hot-added RAM), no PCIe extended
//! configuration space.
//!
//! # Live update
//!
//! **Restart mode** (a new VMM binary on the same kernel, through the session agent
//! `ch-luod --emulate`): the device never notices. In prepare (guest running) the VMM's
//! participant (`vmm::device_manager::vfio`) attaches to the session the vfio cdev (bound to
//! the iommufd, attached to the IOAS), the iommufd (the IOAS and its `IOMMU_IOAS_MAP_FILE`
//! mappings of the RAM memfds live in it) and the MSI eventfd ([`VfioPciDevice::handover_fds`],
//! [`VfioPciDevice::msi_eventfd`]). In pause it stops touching the device
//! ([`VfioPciDevice::set_handed_over`]: configuration and BAR reads return all ones, writes are
//! dropped) and unregisters its irqfd, so the kernel's signals wait in the eventfd. The device
//! keeps running: a DMA under way lands in guest RAM (the memfd pages both VMMs map), its MSI
//! waits in the eventfd. Save writes [`VfioDeviceState`]: the BAR layout and registers as the
//! guest programmed them, the device fd's regions, the MSI capability state, the DMA mappings
//! and IOAS id (as a record only) and the attachment tokens. The old VMM exits without running
//! vfio-ioctls' drop (which would detach the device from the IOAS): the agent's copies keep
//! every kernel object alive. The successor adopts the fds ([`VfioPciDevice::adopt`]): no open,
//! no bind, no IOAS allocation, no map, no `VFIO_DEVICE_RESET`, no write to the device; region
//! accesses are `pread`/`pwrite` on the handed-over fd at the recorded offsets, and a later MSI
//! enable or disable by the guest is a `VFIO_DEVICE_SET_IRQS` on it. The same eventfd becomes its
//! irqfd once the LAPICs are restored, and KVM injects what waited. The adopted device can be
//! handed on again. A cancelled update gives the device back to the old VMM and re-registers its
//! irqfd.
//!
//! Only the iommufd backend is handed over: vfio-ioctls does not expose the group and container
//! fds of the fallback, so its update is refused in prepare, guest running.
//!
//! **Kernel mode (kexec)** is refused in prepare, before the pause, and the guest runs on: the
//! session refuses fd attachments, and mainline 7.2's LUO cannot preserve the vfio cdev nor the
//! iommufd with its mappings ("cannot be preserved across a kexec").

mod access;
mod device;
mod handover;
mod open;
mod state;
mod sys;

use std::path::PathBuf;

use devices::pci::PciError;
use thiserror::Error;

pub use access::HandoverFds;
pub use device::VfioPciDevice;
pub use devices::pci::DmaRegionState;
pub use handover::AdoptedFds;
pub use open::VfioBackend;
pub use state::{VfioBarState, VfioDeviceState, VfioHandoverTokens, VfioRegionState};

/// Errors from attaching a VFIO device.
#[derive(Debug, Error)]
pub enum VfioDeviceError {
    /// The device is not bound to a VFIO driver (or does not exist).
    #[error("The device is not bound to vfio-pci (its driver: {})", driver.as_deref().unwrap_or("none"))]
    NotBound {
        /// The sysfs path.
        path: PathBuf,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },
    /// A VFIO operation failed.
    #[error("VFIO {what} failed")]
    Vfio {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// An iommufd operation failed.
    #[error("iommufd {what} failed")]
    Iommufd {
        /// The operation.
        what: &'static str,
        /// Why.
        #[source]
        source: iommufd_ioctls::IommufdError,
    },
    /// A guest RAM region has no file behind it, so it cannot be mapped by file.
    #[error("Guest RAM at {address:#x} is not file-backed")]
    RamNotShareable {
        /// Region start.
        address: u64,
    },
    /// The device has no memory BAR.
    #[error("The device has no memory BAR")]
    NoBar,
    /// The device has no MSI capability, the only interrupt we pass through.
    #[error(
        "The device has no MSI capability; its interrupts could not reach the guest (MSI-X and \
         INTx are not supported yet)"
    )]
    NoMsi,
    /// A BAR of a size the guest cannot be given, that could not be placed, or whose saved
    /// registers do not fit.
    #[error("Cannot place a BAR")]
    Bar(#[source] PciError),
    /// A saved device whose IOMMU side cannot be handed over.
    #[error("A VFIO device on the {backend:?} backend cannot be handed over")]
    NotCarried {
        /// The backend it used.
        backend: VfioBackend,
    },
    /// Guest RAM is not laid out as when the device's DMA mappings were made.
    #[error("Guest RAM does not match the device's DMA mappings")]
    RamLayoutChanged,
}

impl From<devices::pci::NotFileBacked> for VfioDeviceError {
    fn from(error: devices::pci::NotFileBacked) -> Self {
        Self::RamNotShareable {
            address: error.address,
        }
    }
}
