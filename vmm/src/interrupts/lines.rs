//! The handles devices get: a legacy line and a group of MSI vectors.

use std::io;
use std::sync::Arc;

use devices::interrupt::{IrqLine, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

use super::error::InterruptError;
use super::routing::Shared;

/// One IOAPIC pin's line.
#[derive(Debug)]
pub struct LegacyIrq {
    pub(super) pin: u32,
    pub(super) eventfd: EventFd,
}

impl LegacyIrq {
    /// The IOAPIC pin (and GSI).
    pub fn pin(&self) -> u32 {
        self.pin
    }

    /// The eventfd registered as irqfd, e.g. to hand to another process (`try_clone`).
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

impl IrqLine for LegacyIrq {
    fn trigger(&self) -> io::Result<()> {
        // A non-resampling irqfd raises and lowers the GSI once per write: an edge.
        self.eventfd.write(1)
    }
}

/// The MSI vectors of one PCI function.
#[derive(Debug)]
pub struct MsiGroup {
    pub(super) shared: Arc<Shared>,
    pub(super) index: usize,
    pub(super) first_gsi: u32,
    pub(super) eventfds: Vec<EventFd>,
}

impl MsiGroup {
    /// GSI of vector 0; vector `v` has GSI `first_gsi() + v`.
    pub fn first_gsi(&self) -> u32 {
        self.first_gsi
    }

    /// The eventfd of each vector, registered as irqfd, e.g. to hand to another process.
    pub fn eventfds(&self) -> &[EventFd] {
        &self.eventfds
    }
}

impl MsiVectors for MsiGroup {
    fn configure(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
        self.shared
            .set_route(self.index, vector, message)
            .map_err(io::Error::other)
    }

    fn trigger(&self, vector: u16) -> io::Result<()> {
        let eventfd = self.eventfds.get(usize::from(vector)).ok_or_else(|| {
            io::Error::other(InterruptError::InvalidVector {
                vector,
                count: self.eventfds.len(),
            })
        })?;
        eventfd.write(1)
    }
}
