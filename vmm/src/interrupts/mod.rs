//! Device interrupts into KVM: one eventfd per line or vector, registered as a KVM irqfd, and
//! the GSI routing table that tells KVM where each GSI goes.
//!
//! GSIs 0..24 are the IOAPIC pins (0..16 also reach the PICs), as KVM routes them by default;
//! MSI vectors get GSIs from 24 up, handed out in groups (one per PCI function) after every
//! group there is; a restored device claims its saved group again by its first GSI, which its
//! placement names. Devices see only the traits of `devices::interrupt`.
//!
//! An irqfd whose GSI has no route delivers nothing (KVM consumes the eventfd count and finds
//! no target; checked on the test machines), so disconnecting a vector only removes its route.
//! Irqfds stay registered until the VM is closed, except for groups a live update carries to
//! another VMM ([`MsiGroup::disarm`], [`InterruptManager::saved_msi_vectors_with_fds`]): there the
//! eventfd itself crosses over, and between the two VMMs its signals wait in its counter.

mod error;
mod lines;
mod manager;
mod routing;
mod state;
mod sys;

pub use error::InterruptError;
pub use lines::{LegacyIrq, MsiGroup};
pub use manager::{InterruptManager, RoutesPending};
pub use routing::{IOAPIC_PINS, MSI_GSI_START};
pub use state::{InterruptState, MsiGroupState};
pub use sys::{borrow_eventfd, eventfd_from};
