//! The handles devices get: a legacy line and a group of MSI vectors.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use devices::interrupt::{IrqLine, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

use super::error::InterruptError;
use super::manager::register_irqfds;
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
    pub(super) first_gsi: u32,
    pub(super) eventfds: Vec<EventFd>,
    /// Whether the eventfds are registered as KVM irqfds (see [`Self::disarm`]).
    pub(super) armed: Mutex<bool>,
}

impl MsiGroup {
    /// Unregisters the group's irqfds: from now on a signal waits in its eventfd's counter
    /// instead of reaching the guest (a live update pauses the guest and hands the eventfds to
    /// the next VMM). Interrupts injected before this returns are in the LAPICs already.
    pub fn disarm(&self) -> Result<(), InterruptError> {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        if !*armed {
            return Ok(());
        }
        let mut released = Vec::with_capacity(self.eventfds.len());
        for (gsi, eventfd) in (self.first_gsi..).zip(&self.eventfds) {
            if let Err(source) = self.shared.vm.unregister_irqfd(eventfd, gsi) {
                // All or none: put back what was released.
                if let Err(e) = register_irqfds(&self.shared.vm, self.first_gsi, &released) {
                    log::warn!("Cannot restore the irqfds of GSI {}: {e}", self.first_gsi);
                }
                return Err(InterruptError::IrqfdRelease { gsi, source });
            }
            released.push(eventfd.try_clone().map_err(InterruptError::EventFd)?);
        }
        *armed = false;
        Ok(())
    }

    /// Registers the group's irqfds (again); KVM at once injects a signal that waited in an
    /// eventfd meanwhile. Does nothing if they are registered.
    pub fn arm(&self) -> Result<(), InterruptError> {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        if *armed {
            return Ok(());
        }
        register_irqfds(&self.shared.vm, self.first_gsi, &self.eventfds)?;
        *armed = true;
        Ok(())
    }

    /// Whether the irqfds are registered.
    pub fn is_armed(&self) -> bool {
        *self.armed.lock().unwrap_or_else(PoisonError::into_inner)
    }

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
            .set_route(self.first_gsi, vector, message)
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
