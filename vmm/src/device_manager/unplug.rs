//! Hot-unplug: a VFIO device leaves the running VM once the guest has released it, and can
//! come back to the same slot.
//!
//! The host asks through the PCI hot-plug controller (the guest sees an ACPI eject request);
//! the guest stops using the device and ejects it; the controller reports the eject to the
//! control loop, which takes the device off the bus and closes it (the kernel resets it). A VFIO
//! device keeps its slot and MSI vector, detached, for its return; attaching it again opens the
//! host device afresh in that slot and tells the guest, which finds it as a new device. A
//! network card or the vsock device leaves its place for good (a live update places the other
//! devices by id and holds nothing for it).

use devices::bus::lock;
use devices::pci::PciDevice;
use log::{info, warn};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use super::net::{NetSlot, forget_tap_fds};
use super::vfio::{DetachedVfio, VfioSlot, detached_participant_id, participant_id};
use super::vsock::VsockSlot;
use super::{DeviceContext, DeviceError, DeviceManager, write_bus};
use crate::interrupts::InterruptError;

impl DeviceManager {
    /// The PCI slot of VFIO device `index` while it is attached.
    pub(crate) fn attached_vfio_slot(&self, index: usize) -> Option<u8> {
        match self.vfio_devices.get(index)? {
            VfioSlot::Attached(entry) => Some(entry.slot),
            VfioSlot::Detached(_) => None,
        }
    }

    /// The VFIO devices that are detached, by index, each with whether a live update detached
    /// it (and the VMM that restores the VM attaches it again).
    pub(crate) fn detached_vfio_devices(&self) -> Vec<(usize, bool)> {
        self.vfio_devices
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match slot {
                VfioSlot::Detached(detached) => Some((index, detached.reattach_after_update)),
                VfioSlot::Attached(_) => None,
            })
            .collect()
    }

    /// Asks the guest to release the device in `slot` (an ACPI eject request).
    pub(crate) fn request_removal(&self, slot: u8) -> Result<(), DeviceError> {
        lock(&self.hotplug)
            .request_removal(slot)
            .map_err(|e| DeviceError::Interrupt(InterruptError::EventFd(e)))
    }

    /// Withdraws a removal request the guest has not acted on.
    pub(crate) fn withdraw_removal(&self, slot: u8) {
        lock(&self.hotplug).withdraw_removal(slot);
    }

    /// Takes every device the guest ejected off the bus; `for_update` marks VFIO devices to be
    /// attached again after a live update. Returns the VFIO indices detached; network cards
    /// taken off wait in [`Self::take_unplugged_nets`].
    pub(crate) fn detach_ejected(&mut self, vm: &VmFd, for_update: &[usize]) -> Vec<usize> {
        let ejected = lock(&self.hotplug).take_ejected();
        let mut detached = Vec::new();
        for slot in ejected {
            let net = self
                .nets
                .iter()
                .position(|entry| matches!(entry, NetSlot::Attached(e) if e.slot == slot));
            if let Some(index) = net {
                self.detach_net(vm, index);
                self.unplugged_nets.push(index);
                continue;
            }
            if self.attached_vsock_slot() == Some(slot) {
                self.detach_vsock(vm);
                self.unplugged_vsock = true;
                continue;
            }
            let found = self
                .vfio_devices
                .iter()
                .position(|entry| matches!(entry, VfioSlot::Attached(e) if e.slot == slot));
            match found {
                Some(index) => {
                    self.detach_vfio(index, for_update.contains(&index));
                    detached.push(index);
                }
                None => warn!(
                    "The guest ejected the device in slot {slot}, which cannot be unplugged \
                     (only VFIO devices, network cards and the vsock device can): it stays"
                ),
            }
        }
        detached
    }

    /// The network cards taken off the bus since the last call, by index.
    pub(crate) fn take_unplugged_nets(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.unplugged_nets)
    }

    /// The PCI slot of network card `index` while it is attached.
    pub(crate) fn attached_net_slot(&self, index: usize) -> Option<u8> {
        match self.nets.get(index)? {
            NetSlot::Attached(entry) => Some(entry.slot),
            NetSlot::Removed => None,
        }
    }

    /// Whether the guest ejected the vsock device since the last call.
    pub(crate) fn take_unplugged_vsock(&mut self) -> bool {
        std::mem::take(&mut self.unplugged_vsock)
    }

    /// The PCI slot of the vsock device while it is attached.
    pub(crate) fn attached_vsock_slot(&self) -> Option<u8> {
        match self.vsock.as_ref()? {
            VsockSlot::Attached(entry) => Some(entry.slot),
            VsockSlot::Removed => None,
        }
    }

    /// Takes network card `index` off the bus; its taps close.
    fn detach_net(&mut self, vm: &VmFd, index: usize) {
        let Some(NetSlot::Attached(entry)) = self.nets.get(index) else {
            return;
        };
        let (slot, id) = (entry.slot, entry.id.clone());
        self.unplug_virtio(vm, slot, &id);
        forget_tap_fds(&id);
        // Dropping the entry closes the taps (a tap the VMM created goes with them).
        self.nets[index] = NetSlot::Removed;
        info!("Network card {id} unplugged from slot {slot}");
    }

    /// Takes the vsock device off the bus: its connections close, its socket goes.
    fn detach_vsock(&mut self, vm: &VmFd) {
        let Some(VsockSlot::Attached(entry)) = &self.vsock else {
            return;
        };
        let (slot, id) = (entry.slot, entry.id.clone());
        self.unplug_virtio(vm, slot, &id);
        self.vsock = Some(VsockSlot::Removed);
        info!("vsock device {id} unplugged from slot {slot}");
    }

    /// Takes virtio device `id` in `slot` off the bus: its queue worker stops, its BAR and
    /// queue notifications go.
    fn unplug_virtio(&mut self, vm: &VmFd, slot: u8, id: &str) {
        self.registry.unregister(&super::ids::virtio(id));
        if let Some(position) = self.virtio.iter().position(|v| v.id == id) {
            let mut virtio = self.virtio.remove(position);
            if let Some(worker) = virtio.worker.take() {
                worker.stop();
            }
        }
        if let Some(device) = lock(&self.pci_root).remove_device(slot) {
            for bar in lock(&device).bars() {
                if let Err(e) = write_bus(&self.buses.mmio).remove(bar.address) {
                    warn!("Unplugging slot {slot}: BAR at {:#x}: {e}", bar.address);
                }
                let events = lock(&self.ioevents).by_bar.remove(&bar.address);
                for (offset, evt) in events.into_iter().flatten() {
                    let address = IoEventAddress::Mmio(bar.address + offset);
                    if let Err(e) = vm.unregister_ioevent(&evt, &address, NoDatamatch) {
                        warn!("Unplugging slot {slot}: queue notification: {e}");
                    }
                }
            }
            self.pci_devices
                .retain(|other| !std::sync::Arc::ptr_eq(other, &device));
        }
        lock(&self.hotplug).set_present(slot, false);
    }

    fn detach_vfio(&mut self, index: usize, reattach_after_update: bool) {
        let Some(VfioSlot::Attached(entry)) = self.vfio_devices.get(index) else {
            return;
        };
        let slot = entry.slot;
        let msi = entry.msi.clone();
        let bars = lock(&entry.device).bars();
        {
            let mut mmio = write_bus(&self.buses.mmio);
            for bar in &bars {
                if let Err(e) = mmio.remove(bar.address) {
                    warn!("Unplugging slot {slot}: BAR at {:#x}: {e}", bar.address);
                }
            }
        }
        if let Some(device) = lock(&self.pci_root).remove_device(slot) {
            self.pci_devices
                .retain(|other| !std::sync::Arc::ptr_eq(other, &device));
        }
        lock(&self.hotplug).set_present(slot, false);
        // Dropping the entry closes the host device (the kernel resets it and its DMA
        // mappings go); the MSI vector stays claimed for the device's return.
        // It stays registered at its place, now carried by its detached participant.
        let id = participant_id(index);
        if let Some(mut registered) = self.registry.unregister(&id) {
            registered.participants = vec![detached_participant_id(index)];
            if let Err(e) = self.registry.restore(registered) {
                warn!("VFIO device {index} left the device registry: {e}");
            }
        }
        self.vfio_devices[index] = VfioSlot::Detached(DetachedVfio {
            id: detached_participant_id(index),
            slot,
            msi,
            reattach_after_update,
        });
        info!("VFIO device {index} unplugged from slot {slot}");
    }

    /// Attaches detached VFIO device `index` of `ctx.config` again, in its slot, and tells the
    /// guest. On error it stays detached.
    pub(crate) fn reattach_vfio_device(
        &mut self,
        ctx: &DeviceContext<'_>,
        index: usize,
    ) -> Result<u8, DeviceError> {
        let (Some(VfioSlot::Detached(detached)), Some(config)) =
            (self.vfio_devices.get(index), ctx.config.devices.get(index))
        else {
            return Err(DeviceError::NoSuchVfioDevice { index });
        };
        let (slot, msi) = (detached.slot, detached.msi.clone());
        let irq = msi
            .eventfds()
            .first()
            .ok_or(DeviceError::NoSuchVfioDevice { index })?
            .try_clone()
            .map_err(|e| DeviceError::Interrupt(InterruptError::EventFd(e)))?;
        // Registered again by the attach, with its attached participant.
        let kept = self.registry.unregister(&participant_id(index));
        let attached = self.hot_add_at(ctx, slot, |pci| {
            pci.attach_vfio_device(index, config, msi, irq)
        });
        let (entry, placed) = match attached {
            Ok(attached) => attached,
            Err(error) => {
                if let Some(kept) = kept
                    && let Err(e) = self.registry.restore(kept)
                {
                    warn!("Detached VFIO device {index} left the device registry: {e}");
                }
                return Err(error);
            }
        };
        self.vfio_devices[index] = VfioSlot::Attached(entry);
        info!("VFIO device {index} attached again in slot {placed}");
        Ok(placed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use devices::pci::hotplug::{EJECT, PRESENT, REMOVE_REQUESTED};

    use super::*;
    use crate::device_manager::test_fixture::{Fixture, hotplug_register};
    use crate::layout;
    use crate::vcpu_thread::VcpuEvent;

    /// The guest's eject of `slot`, as its `_EJ0` writes it.
    fn guest_ejects(fixture: &Fixture, slot: u8) {
        let mmio = fixture.mmio();
        let bus = mmio.read().unwrap();
        assert!(bus.write(
            layout::PCI_HOTPLUG_START + EJECT,
            &(1u32 << slot).to_le_bytes()
        ));
    }

    #[test]
    fn released_vfio_device_leaves_the_bus_and_keeps_its_slot_and_vector() {
        let mut fixture = Fixture::new();
        let (slot, bar) = fixture.with_vfio_device();
        let groups = fixture.interrupts.msi_group_count();
        let bar_answers = |fixture: &Fixture| {
            let mut byte = [0u8; 1];
            fixture.mmio().read().unwrap().read(bar, &mut byte)
        };
        assert!(bar_answers(&fixture), "the BAR is on the bus before");
        assert_ne!(hotplug_register(&fixture, PRESENT) & (1 << slot), 0);

        fixture.manager.request_removal(slot).unwrap();
        let requested = hotplug_register(&fixture, REMOVE_REQUESTED);
        guest_ejects(&fixture, slot);
        let detached = fixture.manager.detach_ejected(&fixture.vm.clone(), &[0]);

        assert_eq!(requested, 1 << slot);
        assert_eq!(detached, vec![0]);
        assert!(!bar_answers(&fixture), "the BAR is still on the bus");
        assert!(
            lock(&fixture.manager.pci_root)
                .remove_device(slot)
                .is_none(),
            "slot {slot} still holds a device"
        );
        assert_eq!(hotplug_register(&fixture, PRESENT) & (1 << slot), 0);
        assert_eq!(fixture.manager.attached_vfio_slot(0), None);
        assert_eq!(fixture.manager.detached_vfio_devices(), vec![(0, true)]);
        assert_eq!(fixture.interrupts.msi_group_count(), groups);
        let ids: Vec<String> = (fixture
            .manager
            .participants(crate::state_format::StateFormat::current())
            .iter())
        .map(|p| p.id())
        .collect();
        assert!(ids.contains(&"vfio/0/detached".to_string()), "{ids:?}");
        assert!(!ids.contains(&"vfio/0".to_string()), "{ids:?}");
    }

    #[test]
    fn ejected_device_that_cannot_be_unplugged_stays_on_the_bus() {
        let mut fixture = Fixture::new();
        let vendor = fixture.vendor_id(1);

        guest_ejects(&fixture, 1);
        let detached = fixture.manager.detach_ejected(&fixture.vm.clone(), &[]);

        assert!(detached.is_empty());
        assert_eq!(fixture.vendor_id(1), vendor);
        assert_eq!(hotplug_register(&fixture, PRESENT) & (1 << 1), 1 << 1);
    }

    #[test]
    fn guest_eject_without_a_request_detaches_for_good() {
        let mut fixture = Fixture::new();
        let (slot, _) = fixture.with_vfio_device();

        guest_ejects(&fixture, slot);
        let detached = fixture.manager.detach_ejected(&fixture.vm.clone(), &[]);

        assert_eq!(detached, vec![0]);
        assert_eq!(fixture.manager.detached_vfio_devices(), vec![(0, false)]);
    }

    #[test]
    fn guest_eject_reports_to_the_vmm() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let on_event = Arc::new(move |e| sink.lock().unwrap().push(e));
        let fixture = Fixture::with_events(on_event);
        let mmio = fixture.manager.buses().mmio.clone();

        let eject = layout::PCI_HOTPLUG_START + devices::pci::hotplug::EJECT;
        assert!(
            mmio.read()
                .unwrap()
                .write(eject, &(1u32 << 1).to_le_bytes())
        );

        assert_eq!(*events.lock().unwrap(), vec![VcpuEvent::DeviceEjected]);
    }
}
