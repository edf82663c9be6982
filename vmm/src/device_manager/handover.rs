//! One live-update participant for every PCI device that keeps running while the VMM is
//! replaced (vfio-user, kernel VFIO): the device's fds and its MSI eventfd go to the successor
//! as session attachments, so the device never sees the VMM change.
//!
//! - **prepare** (guest running): the MSI eventfd is attached first. Only a restart-mode
//!   session takes fd attachments: a refusal means a kexec is coming (the device says why it
//!   cannot cross one), unless the host's processes outlive the session (a snapshot,
//!   `FileSink::processes_outlive`): then nothing is handed over, the device stays with this
//!   VMM, whose guest runs on, and a restore re-attaches to it, if the device allows that
//!   (else it says why not). After an attached eventfd come the device's own fds (a
//!   connection, or a vfio cdev and its iommufd), or the device's reason why it cannot be
//!   carried. Attachments made before a refusal go with the cancel.
//! - **pause**: the VMM stops touching the device and unregisters its irqfd, so interrupts
//!   that fall due wait in the eventfd; the device goes on with its DMA.
//! - **save**: the device's state with the attachment tokens (none for a re-attach).
//! - **resume** (the update was cancelled, or the snapshot written): the device is used again
//!   and the irqfd comes back, delivering what waited.
//!
//! The successor finds the fds by the tokens (`HandedOverFds`) and arms the same eventfd once
//! its LAPICs are restored; a state without tokens is re-attached.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use devices::bus::lock;
use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::{SessionError, Token};
use liveupdate::state::{Envelope, Versioned};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::DeviceError;
use super::participants::{HandedOverFds, envelope};
use crate::interrupts::{InterruptError, InterruptManager, MsiGroup, borrow_eventfd, eventfd_from};

/// Why a device cannot be carried by this update (the guest runs on).
pub(super) enum Refusal {
    /// It never can be, this way (e.g. a backend whose fds cannot be handed over).
    Unsupported(String),
    /// Not now (e.g. its server does not answer).
    Failed(String),
}

/// A device the participant can carry.
pub(super) trait CarriedDevice: Send {
    /// Its saved state, tokens included.
    type State: Versioned;
    /// The attachment tokens its state records.
    type Tokens: Copy + Send;

    /// Copies of the fds the successor takes over besides the MSI eventfd, each with what it
    /// is; or why the device cannot be carried.
    fn fds_to_carry(&mut self) -> Result<Vec<(&'static str, OwnedFd)>, Refusal>;
    /// The tokens from the MSI eventfd's and those of [`Self::fds_to_carry`], in its order.
    fn tokens(msi_eventfd: Token, fds: &[Token]) -> Option<Self::Tokens>;
    /// Why the device cannot cross a kexec (`error`: the session refused the attachment).
    fn kexec_refusal(&self, error: &SessionError) -> String;
    /// Whether a successor can take the device over again by itself, with nothing handed over,
    /// from the host process that keeps it (a snapshot's restore); or why not.
    fn check_reattach(&self) -> Result<(), String>;
    /// From the pause on (true) the VMM must not touch the device; false gives it back.
    fn set_handed_over(&mut self, handed_over: bool);
    /// The state to save, with `tokens` (`None`: the successor re-attaches).
    fn carried_state(&self, tokens: Option<Self::Tokens>) -> Self::State;
}

/// The fd the previous VMM attached under `token` (`what` names it in the error). Without it
/// the restore fails: attaching the device afresh would reset it under the guest.
pub(super) fn handed_over(
    fds: Option<&HandedOverFds>,
    id: &str,
    token: Token,
    what: &str,
) -> Result<OwnedFd, DeviceError> {
    fds.and_then(|fds| fds.take(token))
        .ok_or_else(|| DeviceError::Restore {
            id: id.to_string(),
            source: format!(
                "the session holds no {what} (attachment token {token:#x}); the device is not \
             attached afresh, which would reset it under the guest"
            )
            .into(),
        })
}

/// A carried device's MSI vector and the eventfd its device signals: the eventfd handed over
/// by the previous VMM (armed only once the LAPICs are restored, so a signal that waited finds
/// them), or a fresh one, armed at once. On a restore the vector is the saved group at
/// `saved_gsi`.
pub(super) fn msi_vector(
    interrupts: &InterruptManager,
    saved_gsi: Option<u32>,
    handed_over: Option<OwnedFd>,
) -> Result<(Arc<MsiGroup>, EventFd), DeviceError> {
    let eventfd_error = |e| DeviceError::Interrupt(InterruptError::EventFd(e));
    let (irq, armed) = match handed_over {
        Some(fd) => (eventfd_from(fd), false),
        None => (EventFd::new(EFD_NONBLOCK).map_err(eventfd_error)?, true),
    };
    let vector = irq.try_clone().map_err(eventfd_error)?;
    let msi = match saved_gsi {
        Some(first_gsi) => interrupts.saved_msi_vectors_with_fds(first_gsi, vec![vector], armed),
        None => interrupts.msi_vectors_with_fds(vec![vector]),
    }
    .map_err(DeviceError::Interrupt)?;
    Ok((msi, irq))
}

/// How prepare arranged for the successor to take the device over.
#[derive(Clone, Copy)]
enum Takeover<T> {
    /// Its fds are attached to the session under these tokens.
    Adopt(T),
    /// Nothing is handed over: the successor connects to the device again (a snapshot).
    Reattach,
}

/// A carried device, as the device manager keeps it.
pub(super) struct CarriedEntry<D: CarriedDevice> {
    /// Participant id, e.g. `vfio/0`.
    pub(super) id: String,
    /// Its PCI slot on bus 0.
    pub(super) slot: u8,
    pub(super) device: Arc<Mutex<D>>,
    /// Its MSI vector, disarmed while the guest is paused for a handover.
    pub(super) msi: Arc<MsiGroup>,
    /// How prepare arranged the takeover (with the tokens of its attachments), until save
    /// records it.
    takeover: Mutex<Option<Takeover<D::Tokens>>>,
}

impl<D: CarriedDevice> CarriedEntry<D> {
    pub(super) fn new(id: String, slot: u8, device: Arc<Mutex<D>>, msi: Arc<MsiGroup>) -> Self {
        Self {
            id,
            slot,
            device,
            msi,
            takeover: Mutex::new(None),
        }
    }

    fn set_takeover(&self, takeover: Option<Takeover<D::Tokens>>) {
        *self.takeover.lock().unwrap_or_else(PoisonError::into_inner) = takeover;
    }

    fn takeover(&self) -> Option<Takeover<D::Tokens>> {
        *self.takeover.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The participant of one carried device.
pub(super) struct CarriedDeviceParticipant<'a, D: CarriedDevice> {
    pub(super) entry: &'a CarriedEntry<D>,
}

impl<D: CarriedDevice> CarriedDeviceParticipant<'_, D> {
    fn failed(&self, reason: String) -> ParticipantError {
        ParticipantError::Failed {
            id: self.entry.id.clone(),
            reason,
        }
    }

    fn unsupported(&self, reason: String) -> ParticipantError {
        ParticipantError::Unsupported {
            id: self.entry.id.clone(),
            reason,
        }
    }
}

impl<D: CarriedDevice> AnyParticipant for CarriedDeviceParticipant<'_, D> {
    fn id(&self) -> String {
        self.entry.id.clone()
    }

    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        let eventfd = self
            .entry
            .msi
            .eventfds()
            .first()
            .ok_or_else(|| self.failed("no MSI eventfd".into()))?;
        let msi_eventfd = match files.attach(borrow_eventfd(eventfd)) {
            Err(ParticipantError::Session(error @ SessionError::AttachmentsUnsupported)) => {
                // A snapshot (the host's processes outlive it) leaves the device with this VMM,
                // whose guest runs on, and its server, for a restore to find again; across a
                // kexec the server is gone.
                let refusal = {
                    let device = lock(&self.entry.device);
                    if files.processes_outlive() {
                        device.check_reattach().err()
                    } else {
                        Some(device.kexec_refusal(&error))
                    }
                };
                if let Some(reason) = refusal {
                    return Err(self.unsupported(reason));
                }
                self.entry.set_takeover(Some(Takeover::Reattach));
                return Ok(());
            }
            other => other?,
        };
        // Copies, so that vCPUs need not wait for the agent to reach the device.
        let fds = lock(&self.entry.device)
            .fds_to_carry()
            .map_err(|refusal| match refusal {
                Refusal::Unsupported(reason) => self.unsupported(reason),
                Refusal::Failed(reason) => self.failed(reason),
            })?;
        let mut tokens = Vec::with_capacity(fds.len());
        for (_, fd) in &fds {
            tokens.push(files.attach(fd.as_fd())?);
        }
        let tokens = D::tokens(msi_eventfd, &tokens)
            .ok_or_else(|| self.failed("the device's fds do not match its tokens".into()))?;
        self.entry.set_takeover(Some(Takeover::Adopt(tokens)));
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ParticipantError> {
        // From here on the successor owns the device and its interrupts: signals wait in the
        // eventfd instead of reaching this VM's LAPIC, whose state is about to be saved.
        lock(&self.entry.device).set_handed_over(true);
        self.entry.msi.disarm().map_err(|e| {
            // A participant whose pause fails is not resumed: give the device back here.
            lock(&self.entry.device).set_handed_over(false);
            self.failed(format!("cannot detach the MSI irqfd: {e}"))
        })
    }

    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let tokens = match self.entry.takeover() {
            Some(Takeover::Adopt(tokens)) => Some(tokens),
            Some(Takeover::Reattach) => None,
            None => return Err(self.failed("saved without a prepare".into())),
        };
        let state = lock(&self.entry.device).carried_state(tokens);
        envelope(&self.entry.id, &state)
    }

    fn resume(&mut self) -> Result<(), ParticipantError> {
        // Cancelled, or snapshotted: use the device again, and let what waited in the
        // eventfd through.
        self.entry.set_takeover(None);
        lock(&self.entry.device).set_handed_over(false);
        self.entry
            .msi
            .arm()
            .map_err(|e| self.failed(format!("cannot attach the MSI irqfd again: {e}")))
    }
}
