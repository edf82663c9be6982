//! PCI: bus 0 behind configuration mechanism #1 (ports 0xcf8..0xcff), a host bridge, memory
//! BARs, MSI-X.
//!
//! Only function 0 of each slot exists; there are no bridges, I/O BARs or PCIe extended
//! configuration space. The VMM places BARs on its MMIO bus through [`PciBarRegion`] and is
//! told through [`BarRelocator`] when the guest moves one. [`passthrough`] holds what kernel
//! VFIO and vfio-user functions share.

pub mod config;
pub mod dma;
pub mod hotplug;
pub mod msix;
pub mod passthrough;
pub mod root;

use std::io;

use thiserror::Error;

pub use config::{PciConfiguration, PciConfigurationState, PciIds};
pub use dma::{DmaRegionState, NotFileBacked, dma_regions};
pub use hotplug::{PciHotplugController, PciHotplugState};
pub use msix::{MsixConfig, MsixState};
pub use root::{BarAllocator, PciBarRegion, PciRoot, PciRootState};

/// One memory BAR of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    /// BAR index (0..6); a 64-bit BAR also uses `index + 1`.
    pub index: usize,
    /// Guest physical address.
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// 64-bit memory BAR (otherwise 32-bit).
    pub is_64bit: bool,
}

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// Reads configuration space at byte `offset` (0..256); `data` is 1, 2 or 4 bytes and does
    /// not cross a dword.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space at byte `offset`, same rules as reads.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The device's memory BARs at their current addresses.
    fn bars(&self) -> Vec<PciBarInfo>;
    /// Reads BAR `bar` at `offset` inside it.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Writes BAR `bar` at `offset` inside it.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Implemented by the VMM: the guest moved a BAR, so its MMIO range (and any ioeventfds in it)
/// must follow.
pub trait BarRelocator: Send + Sync {
    /// Moves the `len` bytes mapped at `old_base` to `new_base`.
    fn move_bar(&self, old_base: u64, new_base: u64, len: u64) -> io::Result<()>;
}

/// Errors from building the PCI topology or restoring its state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciError {
    /// All 31 device slots are taken.
    #[error("No free PCI slot")]
    NoFreeSlot,
    /// The slot is the host bridge's, out of range, or taken.
    #[error("PCI slot {slot} is not available")]
    SlotUnavailable {
        /// The requested slot.
        slot: u8,
    },
    /// A BAR that is not a power of two, misaligned, or clashes with another BAR.
    #[error("Invalid BAR {index} of size {size:#x}")]
    InvalidBar {
        /// BAR index.
        index: usize,
        /// Requested size.
        size: u64,
    },
    /// The BAR window has no room left.
    #[error("No room for a BAR of size {size:#x}")]
    BarSpaceExhausted {
        /// Requested size.
        size: u64,
    },
    /// A capability does not fit in configuration space.
    #[error("No room for a capability of {len} bytes")]
    CapabilitySpaceFull {
        /// Capability length.
        len: usize,
    },
    /// A saved state does not fit the device it is restored into.
    #[error("Saved PCI state does not match the device")]
    StateMismatch,
}
