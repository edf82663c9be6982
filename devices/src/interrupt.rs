//! How devices raise interrupts, without knowing about KVM.
//!
//! The VMM implements these with eventfds registered as KVM irqfds (legacy lines through the
//! in-kernel IOAPIC, MSI-X vectors through GSI routing); tests implement them with fakes.

use std::io;

/// An edge-triggered legacy interrupt line (an IOAPIC pin).
pub trait IrqLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// One MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Message address (low and high halves combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// The MSI-X vectors of one PCI function.
pub trait MsiVectors: Send + Sync {
    /// Points `vector` at `message`, or disconnects it (`None`: masked or MSI-X disabled).
    fn configure(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()>;
    /// Delivers `vector` (which the caller has checked is configured and unmasked).
    fn trigger(&self, vector: u16) -> io::Result<()>;
}
