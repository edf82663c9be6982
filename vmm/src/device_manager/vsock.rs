//! The vsock device: its listening socket (bound at boot, handed over or bound again on a
//! restore), the virtio-vsock device on it, and the participant that carries its host sockets
//! across a live update.
//!
//! - **Restart mode**: the listening socket and every connection's socket are attached to the
//!   session (the connections at save, when the guest and the device are stopped, so the list
//!   matches the device's saved state) and the successor adopts them: no connection resets.
//! - **Kexec mode**: host processes do not survive a kexec, nor their connections. The restoring
//!   VMM binds the socket again at the same path and tells the guest every connection is gone
//!   (a transport reset event); the guest's listeners take new connections at once.

use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use devices::bus::lock;
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::vsock::{HostSockets, Vsock, VsockParams};
use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::{SessionError, Token};
use liveupdate::state::Envelope;
use serde::{Deserialize, Serialize};

use super::handover::handed_over;
use super::participants::envelope;
use super::pci::PciBuilder;
use super::{DeviceError, ids, restore_error};
use crate::config::VsockConfig;

/// Size of each of the device's queues.
const QUEUE_SIZE: u16 = 256;

/// How the host sockets reach the VMM that restores the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketHandover {
    /// Restart mode: the same sockets, attached to the session under these tokens, in the
    /// order of the device's saved state.
    Attached {
        /// The listening socket.
        listener: Token,
        /// Each connection's socket.
        conns: Vec<Token>,
        /// Each host connection still sending its `CONNECT` line.
        pending: Vec<Token>,
    },
    /// Kexec mode: the restoring VMM binds the socket again; connections are gone.
    Rebind,
}

/// What the socket participant saves (the device itself saves as `virtio/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSocketsState {
    /// The listening socket's path.
    pub socket: PathBuf,
    /// How the sockets come back.
    pub handover: SocketHandover,
}

impl liveupdate::state::Versioned for VsockSocketsState {
    const VERSION: u16 = 1;
}

/// The vsock device as the device manager keeps it.
pub(super) struct VsockEntry {
    /// API id.
    pub(super) id: String,
    /// Its PCI slot on bus 0.
    pub(super) slot: u8,
    device: Arc<Mutex<VirtioPciDevice<Vsock>>>,
    socket: PathBuf,
    /// Set in prepare: the listener's token (restart mode), or none (kexec mode).
    prepared: Mutex<Option<Option<Token>>>,
    /// The successor owns the socket path now: it is not removed with the device.
    handed_over: AtomicBool,
}

impl Drop for VsockEntry {
    fn drop(&mut self) {
        if !self.handed_over.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

/// The device: in use, or removed from the running VM.
pub(super) enum VsockSlot {
    /// In use.
    Attached(VsockEntry),
    /// Gone until the next boot.
    Removed,
}

fn vsock_error(id: &str, reason: String) -> DeviceError {
    DeviceError::Vsock {
        id: id.to_string(),
        source: reason.into(),
    }
}

/// Binds the listening socket at `path`; `replace_stale` first removes a socket file left at
/// the path (by the VMM that ran the VM before a kexec).
fn bind(id: &str, path: &Path, replace_stale: bool) -> Result<UnixListener, DeviceError> {
    if replace_stale
        && let Ok(meta) = path.symlink_metadata()
        && meta.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
        .map_err(|e| vsock_error(id, format!("cannot listen on {}: {e}", path.display())))
}

impl PciBuilder<'_, '_, '_> {
    /// Builds the vsock device of the configuration, if it has one: its host sockets (from
    /// the saved handover on a restore), the device and its PCI placement.
    pub(super) fn add_vsock(&mut self) -> Result<Option<VsockSlot>, DeviceError> {
        let (Some(config), Some(id)) = (&self.ctx.config.vsock, self.ctx.config.vsock_id()) else {
            return Ok(None);
        };
        if config.removed {
            return Ok(Some(VsockSlot::Removed));
        }
        let sockets = self.vsock_sockets(config, &id)?;
        let params = VsockParams {
            cid: u64::from(config.cid),
            socket: config.socket.clone(),
        };
        let device = Vsock::new(params, sockets, QUEUE_SIZE).map_err(|e| DeviceError::Vsock {
            id: id.clone(),
            source: Box::new(e),
        })?;
        let device = self.add(device, &id, vec![ids::vsock_sockets(&id)])?;
        let slot = self.root.added().last().map_or(0, |(slot, _)| *slot);
        Ok(Some(VsockSlot::Attached(VsockEntry {
            id,
            slot,
            device,
            socket: config.socket.clone(),
            prepared: Mutex::new(None),
            handed_over: AtomicBool::new(false),
        })))
    }

    fn vsock_sockets(
        &mut self,
        config: &VsockConfig,
        id: &str,
    ) -> Result<HostSockets, DeviceError> {
        let Some(states) = self.restore.as_deref_mut() else {
            config.check_socket().map_err(DeviceError::VsockConfig)?;
            return Ok(HostSockets {
                listener: bind(id, &config.socket, false)?,
                conns: Vec::new(),
                pending: Vec::new(),
            });
        };
        let key = ids::vsock_sockets(id);
        let state: VsockSocketsState = states.take(&key).map_err(restore_error(&key))?;
        match state.handover {
            SocketHandover::Rebind => Ok(HostSockets {
                listener: bind(id, &config.socket, true)?,
                conns: Vec::new(),
                pending: Vec::new(),
            }),
            SocketHandover::Attached {
                listener,
                conns,
                pending,
            } => {
                let stream = |token| {
                    handed_over(self.ctx.handed_over, &key, token, "vsock connection socket")
                        .map(UnixStream::from)
                };
                Ok(HostSockets {
                    listener: UnixListener::from(handed_over(
                        self.ctx.handed_over,
                        &key,
                        listener,
                        "vsock listening socket",
                    )?),
                    conns: conns.into_iter().map(stream).collect::<Result<_, _>>()?,
                    pending: pending.into_iter().map(stream).collect::<Result<_, _>>()?,
                })
            }
        }
    }
}

/// The participant carrying the device's host sockets (`vsock/<id>`).
pub(super) struct VsockSocketsParticipant<'a> {
    pub(super) entry: &'a VsockEntry,
}

impl VsockSocketsParticipant<'_> {
    fn failed(&self, reason: String) -> ParticipantError {
        ParticipantError::Failed {
            id: self.id_string(),
            reason,
        }
    }

    fn id_string(&self) -> String {
        ids::vsock_sockets(&self.entry.id)
    }

    fn set_prepared(&self, prepared: Option<Option<Token>>) {
        *self
            .entry
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = prepared;
    }
}

impl AnyParticipant for VsockSocketsParticipant<'_> {
    fn id(&self) -> String {
        self.id_string()
    }

    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        if super::as_across_kexec() {
            self.set_prepared(Some(None));
            return Ok(());
        }
        let listener = lock(&self.entry.device)
            .device()
            .listener_copy()
            .map_err(|e| self.failed(format!("cannot copy the listening socket: {e}")))?;
        match files.attach(listener.as_fd()) {
            Ok(token) => self.set_prepared(Some(Some(token))),
            // Only a restart-mode session takes attachments: a kexec is coming.
            Err(ParticipantError::Session(SessionError::AttachmentsUnsupported)) => {
                self.set_prepared(Some(None));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ParticipantError> {
        // The queue worker stops with `virtio/<id>`; connections wait in their sockets.
        Ok(())
    }

    fn save(&mut self, files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let prepared = *self
            .entry
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let handover = match prepared {
            None => return Err(self.failed("saved without a prepare".into())),
            Some(None) => SocketHandover::Rebind,
            Some(Some(listener)) => {
                // The device is stopped: these are exactly the connections its state lists.
                let sockets = lock(&self.entry.device)
                    .device()
                    .host_sockets()
                    .map_err(|e| self.failed(format!("cannot copy a connection socket: {e}")))?;
                let mut attach = |streams: &[UnixStream]| {
                    streams
                        .iter()
                        .map(|s| files.attach(s.as_fd()))
                        .collect::<Result<Vec<_>, _>>()
                };
                let conns = attach(&sockets.conns)?;
                let pending = attach(&sockets.pending)?;
                self.entry.handed_over.store(true, Ordering::Release);
                SocketHandover::Attached {
                    listener,
                    conns,
                    pending,
                }
            }
        };
        let state = VsockSocketsState {
            socket: self.entry.socket.clone(),
            handover,
        };
        envelope(&self.id_string(), &state)
    }

    fn resume(&mut self) -> Result<(), ParticipantError> {
        self.set_prepared(None);
        self.entry.handed_over.store(false, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_state_round_trips_through_its_envelope() {
        let state = VsockSocketsState {
            socket: PathBuf::from("/run/vm.vsock"),
            handover: SocketHandover::Attached {
                listener: 16,
                conns: vec![17, 18],
                pending: vec![19],
            },
        };

        let envelope = Envelope::wrap("vsock/v0", &state).unwrap();
        let mut states =
            liveupdate::state::decode(&liveupdate::state::encode(vec![envelope]).unwrap()).unwrap();
        let back: VsockSocketsState = states.take("vsock/v0").unwrap();

        assert_eq!(back, state);
    }

    #[test]
    fn a_stale_socket_file_is_replaced_when_binding_again() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("v.sock");
        drop(UnixListener::bind(&path).unwrap());

        let fresh = bind("v0", &path, false);
        let again = bind("v0", &path, true);

        assert!(
            fresh.is_err(),
            "a fresh boot must not take over an existing path"
        );
        again.unwrap();
    }
}
