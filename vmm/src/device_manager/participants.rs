//! Each device as a live-update participant, and the fds the previous VMM attached for them.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};

use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::Token;
use liveupdate::state::{Envelope, Versioned};

use super::ids;
use super::pci::VirtioEntry;

pub(super) fn envelope<S: Versioned>(id: &str, state: &S) -> Result<Envelope, ParticipantError> {
    Envelope::wrap(id, state).map_err(|e| ParticipantError::BadState {
        id: id.to_string(),
        source: Box::new(e),
    })
}

/// Restart mode: the fds the previous VMM attached to the session (an outside device's
/// connection, its interrupt eventfd, a tap), by token, while the devices are rebuilt from
/// their states. The restore owns it and lends it to the build through
/// [`super::DeviceContext::handed_over`]; when it drops, the fds no device claimed close.
#[derive(Debug, Default)]
pub struct HandedOverFds {
    fds: Mutex<BTreeMap<Token, OwnedFd>>,
}

impl HandedOverFds {
    /// The fds attached to the session, by token.
    pub fn new(fds: BTreeMap<Token, OwnedFd>) -> Self {
        Self {
            fds: Mutex::new(fds),
        }
    }

    /// Takes the fd attached under `token`, if the previous VMM attached one.
    pub(super) fn take(&self, token: Token) -> Option<OwnedFd> {
        self.fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&token)
    }
}

impl Drop for HandedOverFds {
    fn drop(&mut self) {
        let fds = std::mem::take(self.fds.get_mut().unwrap_or_else(PoisonError::into_inner));
        let left: Vec<_> = fds.into_keys().collect();
        if !left.is_empty() {
            log::warn!("Attached fds no device claimed (closed): tokens {left:?}");
        }
    }
}

/// A device that only needs its state saved: it changes only when a vCPU touches it, and the
/// vCPUs are paused before any device saves.
pub(super) struct StateOnly<'a> {
    pub(super) id: String,
    pub(super) save: Box<dyn Fn() -> Result<Envelope, ParticipantError> + 'a>,
}

impl AnyParticipant for StateOnly<'_> {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        (self.save)()
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// A participant the device registry and the manager disagree on: it fails the update in
/// prepare (the VM runs on), as the VMM restoring the VM would miss or not place its device.
pub(super) struct Unregistered {
    pub(super) id: String,
    pub(super) reason: &'static str,
}

impl AnyParticipant for Unregistered {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Err(ParticipantError::Failed {
            id: self.id.clone(),
            reason: self.reason.to_string(),
        })
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        Err(ParticipantError::Failed {
            id: self.id.clone(),
            reason: self.reason.to_string(),
        })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// A virtio-pci device: its queue worker stops on pause, after completing what it holds.
pub(super) struct VirtioParticipant<'a> {
    pub(super) entry: &'a mut VirtioEntry,
    /// Whether its worker ran before the pause (a paused VM has none to restart on resume).
    pub(super) was_running: bool,
}

impl AnyParticipant for VirtioParticipant<'_> {
    fn id(&self) -> String {
        ids::virtio(&self.entry.id)
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        self.was_running = self.entry.worker.is_some();
        if let Some(worker) = self.entry.worker.take() {
            worker.stop();
        }
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let id = ids::virtio(&self.entry.id);
        self.entry
            .device
            .save(&id)
            .map_err(|e| ParticipantError::BadState {
                id: id.clone(),
                source: Box::new(e),
            })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        if !self.was_running {
            return Ok(());
        }
        let worker = self
            .entry
            .device
            .start_worker()
            .map_err(|e| ParticipantError::Failed {
                id: ids::virtio(&self.entry.id),
                reason: format!("cannot restart the queue worker: {e}"),
            })?;
        self.entry.worker = Some(worker);
        Ok(())
    }
}
