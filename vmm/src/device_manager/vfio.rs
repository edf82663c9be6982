//! Kernel VFIO devices (`--device path=/sys/bus/pci/devices/<BDF>`): a host PCI function in a
//! slot, its memory BARs on the MMIO bus (trapped), its MSI vector an irqfd whose eventfd the
//! kernel signals.
//!
//! Live update: refused in prepare, before the pause, and the guest runs on. Kernel mode is
//! told apart by the session refusing an fd attachment (only restart-mode sessions take them):
//! across a kexec the kernel would have to preserve the vfio cdev and the iommufd with its
//! mappings, which mainline 7.2's LUO does not. Restart mode (the cdev, iommufd and eventfd
//! attached for the successor, which adopts the device without a reset) is not implemented
//! yet.

use std::sync::{Arc, Mutex};

use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::SessionError;
use liveupdate::state::Envelope;
use vfio::VfioPciDevice;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::DeviceError;
use super::pci::PciBuilder;
use crate::config::DeviceConfig;
use crate::interrupts::InterruptError;

/// A kernel VFIO device, as the manager keeps it.
pub(super) struct VfioDeviceEntry {
    id: String,
    device: Arc<Mutex<VfioPciDevice>>,
}

/// The participant id of VFIO device `index` of the configuration.
pub(super) fn participant_id(index: usize) -> String {
    format!("vfio/{index}")
}

impl PciBuilder<'_, '_, '_> {
    /// Opens the host device (resetting it), maps guest RAM for its DMA, plugs it into a slot
    /// and its BARs into the MMIO bus.
    pub(super) fn add_vfio_device(
        &mut self,
        index: usize,
        config: &DeviceConfig,
    ) -> Result<VfioDeviceEntry, DeviceError> {
        let id = participant_id(index);
        let vfio_error = |source| DeviceError::Vfio {
            path: config.path.clone(),
            source,
        };
        if self.restore.is_some() {
            // Prepare refuses updates of VMs with VFIO devices, so no saved state holds one;
            // attaching afresh would reset a device the guest is using.
            return Err(DeviceError::Restore {
                id,
                source: "a VFIO device cannot be taken over from a live-update session".into(),
            });
        }
        let eventfd_error = |e| DeviceError::Interrupt(InterruptError::EventFd(e));
        let irq = EventFd::new(EFD_NONBLOCK).map_err(eventfd_error)?;
        let irq_for_kvm = irq.try_clone().map_err(eventfd_error)?;
        let msi = self
            .ctx
            .interrupts
            .msi_vectors_with_fds(vec![irq_for_kvm])
            .map_err(DeviceError::Interrupt)?;
        let bars = &mut self.bars;
        let device = VfioPciDevice::attach(&config.path, self.ctx.memory, msi, irq, &mut |size| {
            bars.allocate(size)
        })
        .map_err(vfio_error)?;
        let device = Arc::new(Mutex::new(device));
        self.place(device.clone())?;
        Ok(VfioDeviceEntry { id, device })
    }
}

/// A kernel VFIO device in a live update: refused in prepare, so the guest never pauses.
pub(super) struct VfioDeviceParticipant<'a> {
    pub(super) entry: &'a VfioDeviceEntry,
}

impl AnyParticipant for VfioDeviceParticipant<'_> {
    fn id(&self) -> String {
        self.entry.id.clone()
    }
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        let device = devices::bus::lock(&self.entry.device);
        let path = device.path().display().to_string();
        // Only a restart-mode session takes fd attachments: a refusal means the device would
        // have to cross a kexec. (In restart mode the attachment goes when the update is
        // cancelled, which the refusal below causes.)
        let reason = match files.attach(device.msi_eventfd()) {
            Err(ParticipantError::Session(SessionError::AttachmentsUnsupported)) => format!(
                "VFIO device {path} cannot be preserved across a kexec: the kernel has no \
                 VFIO/iommufd preservation"
            ),
            Err(e) => return Err(e),
            Ok(_) => format!(
                "VFIO device {path}: handing VFIO devices to a restarted VMM is not implemented yet"
            ),
        };
        Err(ParticipantError::Unsupported {
            id: self.entry.id.clone(),
            reason,
        })
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        Err(ParticipantError::Unsupported {
            id: self.entry.id.clone(),
            reason: "VFIO devices are not carried by live updates".into(),
        })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}
