//! vfio-user devices: a remote PCI function in a slot, its BAR on the MMIO bus, its MSI vector
//! an irqfd whose eventfd the server signals.
//!
//! Live update: a device whose server persists (`persist=on`) is re-attached by the new VMM
//! without a reset (see the `vfio_user` crate docs); any other refuses the update in prepare.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pci::PciBarRegion;
use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::state::Envelope;
use vfio_user::{VfioUserDeviceState, VfioUserPciDevice};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::participants::envelope;
use super::pci::PciBuilder;
use super::{DeviceError, ids, restore_error, write_bus};
use crate::config::UserDeviceConfig;
use crate::interrupts::InterruptError;

/// Version of `VfioUserDeviceState` in the state blob.
const USER_DEVICE_STATE_VERSION: u16 = 1;

/// An attached vfio-user device, as the manager keeps it.
pub(super) struct UserDeviceEntry {
    id: String,
    device: Arc<Mutex<VfioUserPciDevice>>,
    persist: bool,
}

impl PciBuilder<'_, '_, '_> {
    /// Connects to the device's server (fresh, or re-attaching from its saved state), plugs it
    /// into a slot and its BAR 0 into the MMIO bus.
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
        let eventfd_error = |e| DeviceError::Interrupt(InterruptError::EventFd(e));
        let irq = EventFd::new(EFD_NONBLOCK).map_err(eventfd_error)?;
        let irq_for_kvm = irq.try_clone().map_err(eventfd_error)?;
        let msi = self
            .ctx
            .interrupts
            .msi_vectors_with_fds(vec![irq_for_kvm])
            .map_err(DeviceError::Interrupt)?;
        let device = match self.restore.as_deref_mut() {
            Some(states) => {
                let state: VfioUserDeviceState = states
                    .take(&id, USER_DEVICE_STATE_VERSION)
                    .map_err(restore_error(&id))?;
                VfioUserPciDevice::reattach(self.ctx.memory, msi, irq, &state)
            }
            None => {
                let bars = &mut self.bars;
                VfioUserPciDevice::connect(&config.socket, self.ctx.memory, msi, irq, &mut |size| {
                    bars.allocate(size)
                })
            }
        }
        .map_err(user_error)?;
        let bar = devices::pci::PciDevice::bars(&device)
            .first()
            .copied()
            .ok_or_else(|| user_error(vfio_user::UserDeviceError::NoBar))?;
        let device = Arc::new(Mutex::new(device));
        self.root
            .add_device(device.clone())
            .map_err(DeviceError::Pci)?;
        write_bus(&self.mmio)
            .insert(
                Arc::new(Mutex::new(PciBarRegion::new(device.clone(), 0))),
                bar.address,
                bar.size,
            )
            .map_err(DeviceError::Bus)?;
        Ok(UserDeviceEntry {
            id,
            device,
            persist: config.persist,
        })
    }
}

/// A vfio-user device in a live update. With a persisting server it saves what the VMM knows
/// (BAR registers, DMA regions) and the successor re-attaches; the device itself keeps running
/// and DMA-ing through the pause. Otherwise the update is refused in prepare (before the pause):
/// a server that resets on reconnect would hand the guest a device at power-on.
pub(super) struct UserDeviceParticipant<'a> {
    pub(super) entry: &'a UserDeviceEntry,
}

impl AnyParticipant for UserDeviceParticipant<'_> {
    fn id(&self) -> String {
        self.entry.id.clone()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        if !self.entry.persist {
            return Err(ParticipantError::Unsupported {
                id: self.entry.id.clone(),
                reason: "its server does not keep the device across a reconnect (persist=off)"
                    .into(),
            });
        }
        // The successor must find the server: refuse now, while the guest can run on here.
        if !lock(&self.entry.device).is_alive() {
            return Err(ParticipantError::Failed {
                id: self.entry.id.clone(),
                reason: "the vfio-user server does not answer".into(),
            });
        }
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let state = lock(&self.entry.device).state();
        envelope(&self.entry.id, USER_DEVICE_STATE_VERSION, &state)
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}
