//! Kernel VFIO devices (`--device path=/sys/bus/pci/devices/<BDF>`): a host PCI function in a
//! slot, its memory BARs on the MMIO bus (trapped), its MSI vector an irqfd whose eventfd the
//! kernel signals.
//!
//! Live update, restart mode: the vfio cdev (bound to the iommufd, attached to the IOAS that
//! maps the RAM memfds), the iommufd and the MSI eventfd are attached to the session in
//! prepare, so they stay open across the VMM replacement. From the pause this VMM no longer
//! touches the device and its irqfd is unregistered, so the device's interrupts wait in the
//! eventfd; the device itself keeps running and DMA-ing. The successor adopts the fds: no open,
//! no bind, no IOAS, no map, no reset, no re-programming; the same eventfd becomes its irqfd
//! once the LAPICs are restored. A successor without the attachments refuses the restore (it
//! never re-opens, which would reset the device). The group and container fallback is refused
//! in prepare, guest running.
//!
//! Kernel mode (kexec) is refused in prepare: the session refuses fd attachments, and mainline
//! 7.2's LUO cannot preserve the vfio cdev nor the iommufd with its mappings.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use liveupdate::session::{SessionError, Token};
use serde::{Deserialize, Serialize};
use vfio::{AdoptedFds, VfioDeviceState, VfioHandoverTokens, VfioPciDevice};
use vmm_sys_util::eventfd::EventFd;

use super::handover::{CarriedDevice, CarriedEntry, Refusal, handed_over, msi_vector};
use super::pci::PciBuilder;
use super::{DeviceError, ids, restore_error};
use crate::config::DeviceConfig;
use crate::interrupts::MsiGroup;

/// A kernel VFIO device, as the manager keeps it.
pub(super) type VfioDeviceEntry = CarriedEntry<VfioPciDevice>;

/// A VFIO device of the configuration: attached, or detached (hot-unplugged: the guest
/// released it and the host device is closed) with its slot and MSI vector kept, so that a
/// rebuild by a live update places every device where it was, and the device can come back
/// in place.
pub(super) enum VfioSlot {
    /// On the bus.
    Attached(VfioDeviceEntry),
    /// Not on the bus.
    Detached(DetachedVfio),
}

/// What a detached VFIO device keeps.
pub(super) struct DetachedVfio {
    /// Participant id of its saved [`DetachedVfioState`].
    pub(super) id: String,
    pub(super) slot: u8,
    pub(super) msi: Arc<MsiGroup>,
    /// Detached for a kexec-mode live update (`kexec=detach`): the VMM that restores the VM
    /// attaches it again.
    pub(super) reattach_after_update: bool,
}

/// A detached VFIO device in a live update's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DetachedVfioState {
    /// Its PCI slot, kept free for it.
    pub slot: u8,
    /// See [`DetachedVfio::reattach_after_update`].
    pub reattach_after_update: bool,
}

impl liveupdate::state::Versioned for DetachedVfioState {
    const VERSION: u16 = 1;
}

/// The error for the VFIO device `config` names.
fn vfio_error(config: &DeviceConfig) -> impl FnOnce(::vfio::VfioDeviceError) -> DeviceError + '_ {
    move |source| DeviceError::Vfio {
        path: config.path.clone(),
        source,
    }
}

/// The participant id of VFIO device `index` of the configuration.
pub(super) fn participant_id(index: usize) -> String {
    ids::vfio_device(index)
}

/// The participant id of VFIO device `index` while it is detached.
pub(super) fn detached_participant_id(index: usize) -> String {
    format!("vfio/{index}/detached")
}

impl PciBuilder<'_, '_, '_> {
    /// Opens the host device (resetting it), maps guest RAM for its DMA, plugs it into a slot
    /// and its BARs into the MMIO bus; on a restore, adopts the device the previous VMM handed
    /// over instead, or keeps its slot and vector free if it was detached.
    pub(super) fn add_vfio_device(
        &mut self,
        index: usize,
        config: &DeviceConfig,
    ) -> Result<VfioSlot, DeviceError> {
        let id = participant_id(index);
        let saved_gsi = self.saved_gsi(&id)?;
        let saved_slot = self.saved_place(&id)?.map(|place| place.slot);
        if let Some(states) = self.restore.as_deref_mut() {
            let detached_id = detached_participant_id(index);
            if states.envelope(&detached_id).is_some() {
                let state: DetachedVfioState = states
                    .take(&detached_id)
                    .map_err(restore_error(&detached_id))?;
                let slot = saved_slot.unwrap_or(state.slot);
                if slot != state.slot {
                    return Err(DeviceError::Restore {
                        id: detached_id,
                        source: format!(
                            "the detached device had slot {}, its placement says slot {slot}",
                            state.slot
                        )
                        .into(),
                    });
                }
                let (msi, _irq) = msi_vector(self.ctx.interrupts, saved_gsi, None)?;
                self.keep_place(&id, slot, &msi, vec![detached_id.clone()])?;
                return Ok(VfioSlot::Detached(DetachedVfio {
                    id: detached_id,
                    slot,
                    msi,
                    reattach_after_update: state.reattach_after_update,
                }));
            }
            let state: VfioDeviceState = states.take(&id).map_err(restore_error(&id))?;
            if state.path != config.path {
                return Err(DeviceError::Restore {
                    id,
                    source: format!(
                        "the saved VFIO device is {}, the configuration names {}",
                        state.path.display(),
                        config.path.display()
                    )
                    .into(),
                });
            }
            let Some(tokens) = state.handover else {
                return Err(DeviceError::Restore {
                    id,
                    source: "the saved VFIO device was not handed over".into(),
                });
            };
            let fds = AdoptedFds {
                device: handed_over(self.ctx.handed_over, &id, tokens.device, "VFIO device fd")?,
                iommufd: handed_over(self.ctx.handed_over, &id, tokens.iommufd, "iommufd")?,
            };
            let irq = handed_over(self.ctx.handed_over, &id, tokens.msi_eventfd, "MSI eventfd")?;
            let (msi, irq) = msi_vector(self.ctx.interrupts, saved_gsi, Some(irq))?;
            let device = VfioPciDevice::adopt(&state, fds, self.ctx.memory, msi.clone(), irq)
                .map_err(vfio_error(config))?;
            return self.place_vfio(index, device, msi).map(VfioSlot::Attached);
        }
        let (msi, irq) = msi_vector(self.ctx.interrupts, None, None)?;
        self.attach_vfio_device(index, config, msi, irq)
            .map(VfioSlot::Attached)
    }

    /// Opens the host device afresh (resetting it) with the MSI vector `msi` (whose eventfd
    /// `irq` is) and places it: at boot, on a hot-add, or when a detached device comes back.
    pub(super) fn attach_vfio_device(
        &mut self,
        index: usize,
        config: &DeviceConfig,
        msi: Arc<MsiGroup>,
        irq: EventFd,
    ) -> Result<VfioDeviceEntry, DeviceError> {
        let bars = &mut self.bars;
        let device = VfioPciDevice::attach(
            &config.path,
            self.ctx.memory,
            msi.clone(),
            irq,
            &mut |size| bars.allocate(size),
        )
        .map_err(vfio_error(config))?;
        self.place_vfio(index, device, msi)
    }

    /// Puts VFIO device `index` on the bus and in a slot.
    fn place_vfio(
        &mut self,
        index: usize,
        device: VfioPciDevice,
        msi: Arc<MsiGroup>,
    ) -> Result<VfioDeviceEntry, DeviceError> {
        let device = Arc::new(Mutex::new(device));
        let id = participant_id(index);
        let slot = self.place(&id, device.clone(), Some(&msi), vec![id.clone()])?;
        Ok(VfioDeviceEntry::new(id, slot, device, msi))
    }
}

/// A kernel VFIO device carried by a live update: its vfio cdev, iommufd and MSI eventfd go
/// to the successor (restart mode only), which adopts them without a reset. Refused in
/// prepare (guest running) in kernel mode and on the container fallback.
impl CarriedDevice for VfioPciDevice {
    type State = VfioDeviceState;
    type Tokens = VfioHandoverTokens;

    fn fds_to_carry(&mut self) -> Result<Vec<(&'static str, OwnedFd)>, Refusal> {
        let Some(fds) = self.handover_fds() else {
            return Err(Refusal::Unsupported(format!(
                "VFIO device {} uses the group and container fallback, which cannot be \
                 handed over (it needs the vfio cdev and /dev/iommu)",
                self.path().display()
            )));
        };
        let copy = |fd: BorrowedFd<'_>, what: &'static str| {
            fd.try_clone_to_owned()
                .map(|fd| (what, fd))
                .map_err(|e| Refusal::Failed(format!("cannot duplicate the {what}: {e}")))
        };
        Ok(vec![
            copy(fds.device, "device fd")?,
            copy(fds.iommufd, "iommufd")?,
        ])
    }

    fn tokens(msi_eventfd: Token, fds: &[Token]) -> Option<VfioHandoverTokens> {
        match fds {
            [device, iommufd] => Some(VfioHandoverTokens {
                device: *device,
                iommufd: *iommufd,
                msi_eventfd,
            }),
            _ => None,
        }
    }

    fn kexec_refusal(&self, _error: &SessionError) -> String {
        format!(
            "VFIO device {} cannot be preserved across a kexec: the kernel has no \
             VFIO/iommufd preservation",
            self.path().display()
        )
    }

    fn check_reattach(&self) -> Result<(), String> {
        Err(format!(
            "VFIO device {} cannot be snapshotted: a restore would open it afresh, which \
             resets it under the guest",
            self.path().display()
        ))
    }

    fn set_handed_over(&mut self, handed_over: bool) {
        VfioPciDevice::set_handed_over(self, handed_over);
    }

    fn carried_state(&self, tokens: Option<VfioHandoverTokens>) -> VfioDeviceState {
        let mut state = self.state();
        state.handover = tokens;
        state
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    use devices::pci::PciDevice;
    use liveupdate::emulated::EmulatedProvider;
    use liveupdate::session::{Session, SessionProvider, Token};
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    use devices::bus::lock;
    use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};

    use super::*;
    use crate::cpu::test_util;
    use crate::device_manager::handover::CarriedDeviceParticipant;
    use crate::device_manager::test_fixture::adopted_vfio;
    use crate::interrupts::InterruptManager;

    /// A restart-mode session that keeps what is attached.
    #[derive(Debug, Default)]
    struct Attaching(BTreeMap<Token, OwnedFd>);

    impl Session for Attaching {
        fn name(&self) -> Result<String, SessionError> {
            Ok("test".into())
        }
        fn preserve_fd(&mut self, _fd: BorrowedFd<'_>, _token: Token) -> Result<(), SessionError> {
            Ok(())
        }
        fn retrieve_fd(&mut self, _token: Token) -> Result<OwnedFd, SessionError> {
            Err(SessionError::AttachmentsUnsupported)
        }
        fn finish(&mut self) -> Result<(), SessionError> {
            Ok(())
        }
        fn attach_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
            self.0.insert(token, fd.try_clone_to_owned().unwrap());
            Ok(())
        }
    }

    struct Fixture {
        entry: VfioDeviceEntry,
        device_file: File,
        _interrupts: InterruptManager,
    }

    /// A device adopted over plain files (no host device needed) in a VM with 1 MiB of RAM.
    fn adopted() -> Fixture {
        let ram = crate::sys::memfd_create(c"vfio-dev-test").unwrap();
        ram.set_len(1 << 20).unwrap();
        let mapping = MmapRegion::from_file(FileOffset::new(ram, 0), 1 << 20).unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        let memory = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let kvm = test_util::kvm();
        let interrupts = InterruptManager::new(Arc::new(test_util::vm(&kvm))).unwrap();
        let adopted = adopted_vfio(&memory, &interrupts, 0xc000_0000);
        let entry = VfioDeviceEntry::new(
            "vfio/0".into(),
            1,
            Arc::new(Mutex::new(adopted.device)),
            adopted.msi,
        );
        Fixture {
            entry,
            device_file: adopted.device_file,
            _interrupts: interrupts,
        }
    }

    fn same_file(a: &File, b: &OwnedFd) -> bool {
        let b = File::from(b.try_clone().unwrap());
        let (a, b) = (a.metadata().unwrap(), b.metadata().unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    #[test]
    fn kernel_mode_prepare_refuses_because_the_device_cannot_cross_a_kexec() {
        let fixture = adopted();
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let mut files = FileSink::new(session.as_mut());

        let result = CarriedDeviceParticipant {
            entry: &fixture.entry,
        }
        .prepare(&mut files);

        match result {
            Err(ParticipantError::Unsupported { id, reason }) => {
                assert_eq!(id, "vfio/0");
                assert!(
                    reason.contains("cannot be preserved across a kexec"),
                    "{reason}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn restart_mode_hands_over_the_device_fd_iommufd_and_eventfd() {
        let fixture = adopted();
        let mut session = Attaching::default();
        let mut participant = CarriedDeviceParticipant {
            entry: &fixture.entry,
        };

        participant
            .prepare(&mut FileSink::new(&mut session))
            .unwrap();
        participant.pause().unwrap();
        let envelope = participant.save(&mut FileSink::new(&mut session)).unwrap();

        let state: VfioDeviceState = postcard::from_bytes(&envelope.state).unwrap();
        let tokens = state.handover.unwrap();
        assert_eq!(session.0.len(), 3);
        assert!(same_file(&fixture.device_file, &session.0[&tokens.device]));
        assert!(session.0.contains_key(&tokens.iommufd));
        assert!(session.0.contains_key(&tokens.msi_eventfd));
        assert_eq!(state.ioas_id, Some(1));
    }

    #[test]
    fn pause_silences_the_device_and_its_irqfd_and_resume_gives_them_back() {
        let fixture = adopted();
        let mut participant = CarriedDeviceParticipant {
            entry: &fixture.entry,
        };
        let read = || {
            let mut data = [0u8; 4];
            lock(&fixture.entry.device).bar_read(0, 0, &mut data);
            data
        };

        participant.pause().unwrap();
        let paused = (read(), fixture.entry.msi.is_armed());
        participant.resume().unwrap();

        assert_eq!(paused, ([0xff; 4], false));
        assert_eq!(read(), [0; 4]);
        assert!(fixture.entry.msi.is_armed());
    }

    #[test]
    fn a_restore_without_the_attachments_fails_instead_of_opening_the_device() {
        let fds = super::super::HandedOverFds::default();
        let result = handed_over(Some(&fds), "vfio/0", 0x77, "VFIO device fd");

        match result {
            Err(DeviceError::Restore { id, source }) => {
                assert_eq!(id, "vfio/0");
                let message = source.to_string();
                assert!(message.contains("holds no VFIO device fd"), "{message}");
                assert!(message.contains("reset"), "{message}");
            }
            other => panic!("expected a restore error, got {other:?}"),
        }
    }
}
