//! The host ends (pty, socket) of the serial port and the console as the devices are built,
//! and the participant that carries them across a live update.
//!
//! - **Restart mode**: the pty master, or the listening socket, is attached to the session in
//!   prepare, the socket's client (if one is connected) at save, once input has stopped; the
//!   successor adopts them: same pty path, same socket, the client stays connected.
//! - **Kexec mode**: no pty or host process survives. The restoring VMM opens a new pty (its
//!   path is in `vm.info` and in a `vm/pty-recreated` event) or binds the socket again at its
//!   path.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::{SessionError, Token};
use liveupdate::state::{Envelope, StateSet};
use serde::{Deserialize, Serialize};

use super::handover::handed_over;
use super::participants::{HandedOverFds, envelope};
use super::{DeviceError, restore_error};
use crate::config::{ConsoleConfig, ConsoleMode};
use crate::host_console::{self, HostEnd, Port};

/// How an end reaches the VMM that restores the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostEndHandover {
    /// Restart mode: the pty master or the listening socket, and the socket's client.
    Attached {
        /// The pty master or the listening socket.
        fd: Token,
        /// The socket's client, if one was connected.
        client: Option<Token>,
    },
    /// Kexec mode: a new pty, or the socket bound again at its path.
    Reopen,
}

/// What an end's participant saves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEndState {
    /// The pty's path or the socket's path when saved.
    pub path: PathBuf,
    /// How the end comes back.
    pub handover: HostEndHandover,
}

impl liveupdate::state::Versioned for HostEndState {
    const VERSION: u16 = 1;
}

/// Participant id of the host end of `port`.
pub(super) fn id(port: Port) -> String {
    format!("host-end/{}", port.name())
}

/// The end of `port` as `config` asks (from its saved handover on a restore); `None` when the
/// mode needs no end of ours.
pub(super) fn host_end(
    port: Port,
    config: &ConsoleConfig,
    restore: Option<&mut StateSet>,
    fds: Option<&HandedOverFds>,
) -> Result<Option<Arc<HostEnd>>, DeviceError> {
    if !host_console::has_host_end(config) {
        return Ok(None);
    }
    let end = match restore {
        None => host_console::open(port, config).map_err(DeviceError::HostEnd)?,
        Some(states) => host_console::register(restored(port, config, states, fds)?),
    };
    Ok(Some(end))
}

fn restored(
    port: Port,
    config: &ConsoleConfig,
    states: &mut StateSet,
    fds: Option<&HandedOverFds>,
) -> Result<HostEnd, DeviceError> {
    let key = id(port);
    let state: HostEndState = states.take(&key).map_err(restore_error(&key))?;
    let end = match (state.handover, config.mode) {
        (HostEndHandover::Attached { fd, .. }, ConsoleMode::Pty) => {
            HostEnd::adopt_pty(port, handed_over(fds, &key, fd, "pty master")?)
        }
        (HostEndHandover::Attached { fd, client }, _) => {
            let listener = handed_over(fds, &key, fd, "listening socket")?;
            let client = client
                .map(|token| handed_over(fds, &key, token, "socket client"))
                .transpose()?;
            HostEnd::adopt_socket(port, &state.path, listener, client)
        }
        (HostEndHandover::Reopen, ConsoleMode::Pty) => HostEnd::recreate_pty(port),
        (HostEndHandover::Reopen, _) => HostEnd::bind(port, &state.path, true),
    };
    end.map_err(DeviceError::HostEnd)
}

/// The participant carrying one end (`host-end/serial`, `host-end/console`).
pub(super) struct HostEndParticipant<'a> {
    pub(super) end: &'a HostEnd,
    pub(super) handover: Option<HostEndHandover>,
}

impl HostEndParticipant<'_> {
    fn failed(&self, reason: String) -> ParticipantError {
        ParticipantError::Failed {
            id: id(self.end.port()),
            reason,
        }
    }
}

impl AnyParticipant for HostEndParticipant<'_> {
    fn id(&self) -> String {
        id(self.end.port())
    }

    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        if super::as_across_kexec() {
            self.handover = Some(HostEndHandover::Reopen);
            return Ok(());
        }
        let (fd, _) = self
            .end
            .fds_to_hand_over()
            .map_err(|e| self.failed(format!("cannot copy its fd: {e}")))?;
        self.handover = Some(match files.attach(fd.as_fd()) {
            Ok(fd) => HostEndHandover::Attached { fd, client: None },
            // Only a restart-mode session takes attachments: a kexec is coming.
            Err(ParticipantError::Session(SessionError::AttachmentsUnsupported)) => {
                HostEndHandover::Reopen
            }
            Err(e) => return Err(e),
        });
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ParticipantError> {
        // From here on input waits on the host side, for whoever runs the VM next.
        self.end.stop_input();
        Ok(())
    }

    fn save(&mut self, files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let handover = match self.handover.clone() {
            None => return Err(self.failed("saved without a prepare".into())),
            Some(HostEndHandover::Attached { fd, .. }) => {
                // Input is stopped: this is the client the successor continues with.
                let (_, client) = self
                    .end
                    .fds_to_hand_over()
                    .map_err(|e| self.failed(format!("cannot copy its client: {e}")))?;
                let client = client.map(|c| files.attach(c.as_fd())).transpose()?;
                HostEndHandover::Attached { fd, client }
            }
            Some(HostEndHandover::Reopen) => HostEndHandover::Reopen,
        };
        // Either the successor owns the socket now or binds it again, replacing the file.
        self.end.keep_path(true);
        let state = HostEndState {
            path: self.end.path().to_path_buf(),
            handover,
        };
        envelope(&id(self.end.port()), &state)
    }

    fn resume(&mut self) -> Result<(), ParticipantError> {
        self.handover = None;
        self.end.keep_path(false);
        host_console::restart_input(self.end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_end_state_round_trips_through_its_envelope() {
        let state = HostEndState {
            path: PathBuf::from("/run/serial.sock"),
            handover: HostEndHandover::Attached {
                fd: 16,
                client: Some(17),
            },
        };

        let envelope = Envelope::wrap("host-end/serial", &state).unwrap();
        let mut states =
            liveupdate::state::decode(&liveupdate::state::encode(vec![envelope]).unwrap()).unwrap();
        let back: HostEndState = states.take("host-end/serial").unwrap();

        assert_eq!(back, state);
    }

    #[test]
    fn what_is_typed_into_the_consoles_pty_reaches_the_console_device() {
        use std::io::{Read as _, Write as _};
        use std::os::unix::fs::OpenOptionsExt;

        use devices::bus::lock;

        use crate::config::VmConfig;
        use crate::device_manager::test_fixture::Fixture;

        let mut fixture = Fixture::with_config(VmConfig {
            console: ConsoleConfig {
                mode: ConsoleMode::Pty,
                file: None,
                socket: None,
            },
            ..VmConfig::default()
        });
        let end = host_console::get(Port::Console).unwrap();
        let (sender, received) = std::sync::mpsc::channel();
        end.start_input(Arc::new(move |port, bytes| {
            let _ = sender.send((port, bytes));
        }));
        let mut terminal = std::fs::File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(end.path())
            .unwrap();

        terminal.write_all(b"hey\n").unwrap();
        let mut typed = Vec::new();
        while typed.len() < 4 {
            let (port, bytes) = received
                .recv_timeout(std::time::Duration::from_secs(5))
                .unwrap();
            assert_eq!(port, Port::Console);
            typed.extend(bytes);
        }
        let taken = fixture.manager.push_input(Port::Console, &typed);
        end.writer().write_all(b"out\r\n").unwrap();
        let mut shown = [0u8; 5];
        terminal.read_exact(&mut shown).unwrap();

        // Raw mode both ways: no byte translated, the guest's output not echoed back into it.
        assert_eq!((typed.as_slice(), taken), (&b"hey\n"[..], 4));
        let console = fixture.manager.console.as_ref().unwrap();
        assert_eq!(lock(console).device().pending_input_len(), 4);
        assert_eq!(&shown, b"out\r\n");
        let echoed = received.recv_timeout(std::time::Duration::from_millis(200));
        assert!(echoed.is_err(), "echoed into the guest: {echoed:?}");
        host_console::close_all();
    }

    #[test]
    fn modes_without_a_host_end_build_none() {
        let config = ConsoleConfig::default_serial();

        let end = host_end(Port::Serial, &config, None, None).unwrap();

        assert!(end.is_none());
    }
}
