//! The error type of the `interrupts` module.

use std::io;

use thiserror::Error;

/// Errors from setting up interrupt lines and routes.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// The IOAPIC has no such pin.
    #[error("IOAPIC pin {pin} does not exist")]
    InvalidPin {
        /// The pin asked for.
        pin: u32,
    },
    /// The pin already has a line and an eventfd was supplied for it.
    #[error("IOAPIC pin {pin} already has a line")]
    PinInUse {
        /// The pin asked for.
        pin: u32,
    },
    /// Not enough GSIs left below KVM's limit.
    #[error("No GSIs left for {count} MSI vectors")]
    OutOfGsis {
        /// The number of vectors asked for.
        count: usize,
    },
    /// The group has no such vector.
    #[error("MSI vector {vector} does not exist (the group has {count})")]
    InvalidVector {
        /// The vector asked for.
        vector: u16,
        /// The group's size.
        count: usize,
    },
    /// A restored group is claimed with another size than it was saved with.
    #[error("Saved MSI group at GSI {first_gsi} has {saved} vectors, {requested} were requested")]
    GroupMismatch {
        /// The group's first GSI.
        first_gsi: u32,
        /// Its saved size.
        saved: usize,
        /// The size asked for now.
        requested: usize,
    },
    /// A device claims a saved group the state does not hold, or one already claimed.
    #[error("No saved MSI group at GSI {first_gsi} is left to claim")]
    NoSavedGroup {
        /// The GSI the device's placement names.
        first_gsi: u32,
    },
    /// Creating an eventfd failed.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// KVM refused to register an irqfd.
    #[error("KVM refused the irqfd for GSI {gsi}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused to unregister an irqfd.
    #[error("KVM refused to release the irqfd of GSI {gsi}")]
    IrqfdRelease {
        /// The GSI.
        gsi: u32,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused the routing table.
    #[error("KVM refused the GSI routing table")]
    Routing(#[source] kvm_ioctls::Error),
    /// A saved state is malformed (e.g. from a corrupt or hostile blob).
    #[error("Invalid interrupt state: {reason}")]
    InvalidState {
        /// What is wrong.
        reason: &'static str,
    },
}
