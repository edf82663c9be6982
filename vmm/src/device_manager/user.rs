//! vfio-user devices: a remote PCI function in a slot, its BAR on the MMIO bus, its MSI vector
//! an irqfd whose eventfd the server signals.
//!
//! Live update (restart mode): the connection and the MSI eventfd are handed to the successor
//! as session attachments, so the server never sees a disconnect and the device keeps running
//! (see the `vfio_user` crate docs). A state without them is taken over by a re-attach
//! (`persist=on` servers only): a snapshot's (the device stays with the snapshotted VM, which
//! runs on; a restore connects to the server again), or one from an older VMM.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use liveupdate::session::{SessionError, Token};
use vfio_user::{HandoverTokens, VfioUserDeviceState, VfioUserPciDevice};

use super::handover::{CarriedDevice, CarriedEntry, Refusal, handed_over, msi_vector};
use super::pci::PciBuilder;
use super::{DeviceError, ids, restore_error};
use crate::config::UserDeviceConfig;

/// An attached vfio-user device, as the manager keeps it.
pub(super) type UserDeviceEntry = CarriedEntry<VfioUserPciDevice>;

/// How the device is brought up.
enum Attach {
    /// A fresh connection (boot, hot-add, guest reboot): the device is reset.
    Connect,
    /// Restore of a state whose connection was handed over: adopt it, nothing sent.
    Adopt(VfioUserDeviceState, HandoverTokens),
    /// Restore of an older state: connect again without a reset.
    Reattach(VfioUserDeviceState),
}

impl PciBuilder<'_, '_, '_> {
    /// Connects to the device's server (fresh, adopting the handed-over connection, or
    /// re-attaching from an older saved state), plugs it into a slot and its BAR into the
    /// MMIO bus.
    pub(super) fn add_user_device(
        &mut self,
        index: usize,
        config: &UserDeviceConfig,
    ) -> Result<UserDeviceEntry, DeviceError> {
        let id = ids::user_device(index);
        let user_error = |source| DeviceError::UserDevice {
            socket: config.socket.clone(),
            source,
        };
        let attach = match self.restore.as_deref_mut() {
            Some(states) => {
                let state: VfioUserDeviceState = states.take(&id).map_err(restore_error(&id))?;
                match state.handover {
                    Some(tokens) => Attach::Adopt(state, tokens),
                    None => Attach::Reattach(state),
                }
            }
            None => Attach::Connect,
        };
        let saved_gsi = self.saved_gsi(&id)?;
        let (device, msi) = match attach {
            Attach::Adopt(state, tokens) => {
                let stream = UnixStream::from(handed_over(
                    self.ctx.handed_over,
                    &id,
                    tokens.socket,
                    "connection",
                )?);
                let irq =
                    handed_over(self.ctx.handed_over, &id, tokens.msi_eventfd, "MSI eventfd")?;
                let (msi, irq) = msi_vector(self.ctx.interrupts, saved_gsi, Some(irq))?;
                let device =
                    VfioUserPciDevice::adopt(stream, self.ctx.memory, msi.clone(), irq, &state);
                (device, msi)
            }
            Attach::Reattach(state) => {
                let (msi, irq) = msi_vector(self.ctx.interrupts, saved_gsi, None)?;
                let device = VfioUserPciDevice::reattach(self.ctx.memory, msi.clone(), irq, &state);
                (device, msi)
            }
            Attach::Connect => {
                let (msi, irq) = msi_vector(self.ctx.interrupts, saved_gsi, None)?;
                let bars = &mut self.bars;
                let device = VfioUserPciDevice::connect(
                    &config.socket,
                    self.ctx.memory,
                    msi.clone(),
                    irq,
                    &mut |size| bars.allocate(size),
                );
                (device, msi)
            }
        };
        let mut device = device.map_err(user_error)?;
        device.set_server_persists(config.persist);
        let device = Arc::new(Mutex::new(device));
        let slot = self.place(&id, device.clone(), Some(&msi), vec![id.clone()])?;
        Ok(UserDeviceEntry::new(id, slot, device, msi))
    }
}

/// A vfio-user device carried by a live update: its connection and MSI eventfd go to the
/// successor (restart mode only), so the server never sees a disconnect. Nothing is sent to
/// the server from the pause on.
impl CarriedDevice for VfioUserPciDevice {
    type State = VfioUserDeviceState;
    type Tokens = HandoverTokens;

    fn fds_to_carry(&mut self) -> Result<Vec<(&'static str, OwnedFd)>, Refusal> {
        // The successor must find the server: refuse now, while the guest can run on here.
        if !self.is_alive() {
            return Err(Refusal::Failed(
                "the vfio-user server does not answer".into(),
            ));
        }
        let connection = self
            .connection_fd()
            .try_clone_to_owned()
            .map_err(|e| Refusal::Failed(format!("cannot duplicate the connection: {e}")))?;
        Ok(vec![("connection", connection)])
    }

    fn tokens(msi_eventfd: Token, fds: &[Token]) -> Option<HandoverTokens> {
        match fds {
            [socket] => Some(HandoverTokens {
                socket: *socket,
                msi_eventfd,
            }),
            _ => None,
        }
    }

    fn kexec_refusal(&self, error: &SessionError) -> String {
        format!("its connection cannot be handed over: {error}")
    }

    fn check_reattach(&self) -> Result<(), String> {
        if self.server_persists() {
            return Ok(());
        }
        Err(format!(
            "the vfio-user device at {} cannot be snapshotted without persist=on: a restore \
             connects to its server again, which must keep the device as it is for its next \
             client (e.g. vfio-user-testdev --persist); add the device with persist=on",
            self.socket().display()
        ))
    }

    fn set_handed_over(&mut self, handed_over: bool) {
        VfioUserPciDevice::set_handed_over(self, handed_over);
    }

    fn carried_state(&self, tokens: Option<HandoverTokens>) -> VfioUserDeviceState {
        let mut state = self.state();
        state.handover = tokens;
        state
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use devices::pci::PciDevice;
    use liveupdate::emulated::EmulatedProvider;
    use liveupdate::session::SessionProvider;
    use vfio_user::testdev::regs::{DEVICE_MAGIC, reg};
    use vfio_user::testdev::{TestDevOptions, serve};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    use devices::bus::lock;
    use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};

    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::cpu::test_util;
    use crate::device_manager::handover::CarriedDeviceParticipant;
    use crate::interrupts::InterruptManager;
    use crate::snapshot::dir_session::DirSession;

    /// A device served by the test server on a thread, attached to a VM with 1 MiB of RAM.
    fn attached(name: &str) -> (UserDeviceEntry, InterruptManager) {
        let dir = std::env::temp_dir().join(format!("user-dev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dev.sock");
        let served = socket.clone();
        std::thread::spawn(move || serve(&served, &TestDevOptions::default()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the test server did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ram = crate::sys::memfd_create(c"user-dev-test").unwrap();
        ram.set_len(1 << 20).unwrap();
        let mapping = MmapRegion::from_file(FileOffset::new(ram, 0), 1 << 20).unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let kvm = test_util::kvm();
        let interrupts = InterruptManager::new(Arc::new(test_util::vm(&kvm))).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let msi = interrupts
            .msi_vectors_with_fds(vec![irq.try_clone().unwrap()])
            .unwrap();
        let device = VfioUserPciDevice::connect(&socket, &memory, msi.clone(), irq, &mut |_| {
            Ok(0xc000_0000)
        })
        .unwrap();
        let entry =
            UserDeviceEntry::new("vfio-user/0".into(), 1, Arc::new(Mutex::new(device)), msi);
        (entry, interrupts)
    }

    fn id_register(entry: &UserDeviceEntry) -> u32 {
        let mut data = [0u8; 4];
        lock(&entry.device).bar_read(0, reg::ID, &mut data);
        u32::from_le_bytes(data)
    }

    /// Across a kexec the server is gone, persist or not.
    #[test]
    fn prepare_refuses_an_update_whose_session_cannot_carry_the_connection() {
        let (entry, _interrupts) = attached("no-attach");
        lock(&entry.device).set_server_persists(true);
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let mut files = FileSink::new(session.as_mut());

        let result = CarriedDeviceParticipant { entry: &entry }.prepare(&mut files);

        match result {
            Err(ParticipantError::Unsupported { id, reason }) => {
                assert_eq!(id, "vfio-user/0");
                assert!(reason.contains("only in restart mode"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_snapshot_saves_a_persisting_device_for_a_re_attach_and_gives_it_back() {
        let (entry, _interrupts) = attached("snapshot");
        lock(&entry.device).set_server_persists(true);
        let (mut session, _files) = DirSession::outgoing(Path::new("/nonexistent"));
        let mut files = FileSink::new(&mut session);
        let mut participant = CarriedDeviceParticipant { entry: &entry };

        participant.prepare(&mut files).unwrap();
        participant.pause().unwrap();
        let envelope = participant.save(&mut files).unwrap();
        participant.resume().unwrap();

        let blob = liveupdate::state::encode(vec![envelope]).unwrap();
        let mut states = liveupdate::state::decode(&blob).unwrap();
        let state: VfioUserDeviceState = states.take("vfio-user/0").unwrap();
        assert_eq!(
            state.handover, None,
            "nothing handed over: a restore re-attaches"
        );
        assert_eq!(state.socket, lock(&entry.device).socket());
        assert_eq!(
            id_register(&entry),
            DEVICE_MAGIC,
            "the device is used again"
        );
        assert!(entry.msi.is_armed());
    }

    #[test]
    fn a_snapshot_refuses_a_device_whose_server_does_not_persist() {
        let (entry, _interrupts) = attached("snapshot-no-persist");
        let (mut session, _files) = DirSession::outgoing(Path::new("/nonexistent"));
        let mut files = FileSink::new(&mut session);

        let result = CarriedDeviceParticipant { entry: &entry }.prepare(&mut files);

        match result {
            Err(ParticipantError::Unsupported { id, reason }) => {
                assert_eq!(id, "vfio-user/0");
                assert!(reason.contains("without persist=on"), "{reason}");
                assert!(reason.contains("dev.sock"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            id_register(&entry),
            DEVICE_MAGIC,
            "the device is still in use"
        );
    }

    #[test]
    fn pause_silences_the_device_and_resume_gives_it_back() {
        let (entry, _interrupts) = attached("pause");
        let mut participant = CarriedDeviceParticipant { entry: &entry };

        participant.pause().unwrap();
        let paused = (id_register(&entry), entry.msi.is_armed());
        participant.resume().unwrap();

        assert_eq!(
            paused,
            (u32::MAX, false),
            "no message and no irqfd while paused"
        );
        assert_eq!(id_register(&entry), DEVICE_MAGIC);
        assert!(entry.msi.is_armed());
    }
}
