//! Hot-add: placing a PCI device on the bus of a running VM.
//!
//! The manager keeps what boot's builder had (its PCI functions, the next free slot, the
//! ioeventfd registry) and builds the device through the same [`PciBuilder`]. BAR space is
//! taken above every BAR where it is now: the guest may have moved BARs, and a VM restored
//! from a live update has its BARs where the old guest put them, not where an allocator
//! would. The device reaches the PCI root only once it is fully wired; a failed add gives
//! back its slot, its bus ranges and its MSI groups. The guest is told through the PCI hot-plug
//! controller (an ACPI device check on the slot); a guest without ACPI finds the device when it
//! rescans its PCI bus.
//!
//! Hot-added devices take the next free slot and MSI group and come last in the configuration;
//! a live update places each device by id where the saved state says, whatever the order of
//! the hot-adds and removals before it.

use devices::bus::lock;
use devices::pci::BarAllocator;
use log::warn;

use super::pci::{PciBuilder, PendingSlots};
use super::{DeviceContext, DeviceError, DeviceManager, write_bus};
use crate::layout;

impl DeviceManager {
    /// Hot-adds vfio-user device `index` of `ctx.config` (the configuration with the device
    /// appended): attaches it, places it on the PCI bus, and makes it a live-update participant.
    /// Returns its slot. On error the VM is as before.
    pub(crate) fn hot_add_user_device(
        &mut self,
        ctx: &DeviceContext<'_>,
        index: usize,
    ) -> Result<u8, DeviceError> {
        // Participant ids and MSI groups follow the configuration order.
        let config = ctx
            .config
            .user_devices
            .get(index)
            .filter(|_| index == self.user_devices.len())
            .ok_or(DeviceError::NoSuchUserDevice { index })?;
        let (entry, slot) = self.hot_add(ctx, |pci| pci.add_user_device(index, config))?;
        self.user_devices.push(entry);
        Ok(slot)
    }

    /// Hot-adds kernel VFIO device `index` of `ctx.config` (the configuration with the device
    /// appended): opens it (resetting it), maps guest RAM for its DMA, places it on the PCI
    /// bus, and makes it a live-update participant. Returns its slot. On error the VM is as
    /// before (the device is closed again).
    pub(crate) fn hot_add_vfio_device(
        &mut self,
        ctx: &DeviceContext<'_>,
        index: usize,
    ) -> Result<u8, DeviceError> {
        let config = ctx
            .config
            .devices
            .get(index)
            .filter(|_| index == self.vfio_devices.len())
            .ok_or(DeviceError::NoSuchVfioDevice { index })?;
        let (entry, slot) = self.hot_add(ctx, |pci| pci.add_vfio_device(index, config))?;
        self.vfio_devices.push(entry);
        Ok(slot)
    }

    /// Hot-adds network card `index` of `ctx.config` (the configuration with the card
    /// appended): opens its taps, places the virtio-net device on the PCI bus, starts its
    /// queue worker and makes its taps a live-update participant. Returns its slot. On error
    /// the VM is as before.
    pub(crate) fn hot_add_net(
        &mut self,
        ctx: &DeviceContext<'_>,
        index: usize,
    ) -> Result<u8, DeviceError> {
        if index != self.nets.len() || index >= ctx.config.net.len() {
            return Err(DeviceError::NoSuchNet { index });
        }
        let (slot, placed) = self.hot_add(ctx, |pci| pci.add_net(index))?;
        self.nets.push(slot);
        self.start_workers()?;
        Ok(placed)
    }

    /// Hot-adds the vsock device of `ctx.config`: binds its socket, places it on the PCI bus,
    /// starts its queue worker and makes its sockets a live-update participant. Returns its
    /// slot. On error the VM is as before.
    pub(crate) fn hot_add_vsock(&mut self, ctx: &DeviceContext<'_>) -> Result<u8, DeviceError> {
        if self.vsock.is_some() {
            return Err(DeviceError::Vsock {
                id: ctx.config.vsock_id().unwrap_or_default(),
                source: "the VM has a vsock device already".into(),
            });
        }
        let (slot, placed) = self.hot_add(ctx, |pci| {
            pci.add_vsock()?.ok_or_else(|| DeviceError::Vsock {
                id: String::new(),
                source: "the configuration has no vsock device".into(),
            })
        })?;
        self.vsock = Some(slot);
        self.start_workers()?;
        Ok(placed)
    }

    /// BAR space for a new device: the PCI window above every BAR that reaches into it.
    fn bar_allocator(&self) -> BarAllocator {
        let floor = self
            .pci_devices
            .iter()
            .flat_map(|device| lock(device).bars())
            .filter(|bar| bar.address < layout::PCI_MMIO_END)
            .map(|bar| bar.address.saturating_add(bar.size))
            .fold(layout::PCI_MMIO_START, u64::max);
        BarAllocator::new(floor, layout::PCI_MMIO_END)
    }

    /// Builds one PCI device with `build` on the running VM, puts it into the PCI root and
    /// tells the guest.
    /// Any kind of device goes through here (`build` wires it, e.g. with
    /// [`PciBuilder::place`]). On error, the BAR space, slot, MSI groups and bus ranges it took
    /// are given back and the device is dropped before the guest could see it. A virtio device
    /// (a network card) gets its queue worker from the caller; should KVM refuse one of its
    /// queue notifications midway, those registered before stay (not undone).
    pub(super) fn hot_add<T>(
        &mut self,
        ctx: &DeviceContext<'_>,
        build: impl FnOnce(&mut PciBuilder<'_, '_, '_>) -> Result<T, DeviceError>,
    ) -> Result<(T, u8), DeviceError> {
        self.hot_add_at(ctx, self.next_slot, build)
    }

    /// As [`Self::hot_add`], in slot `first_slot` (a free slot: the next one, or a detached
    /// device's).
    pub(super) fn hot_add_at<T>(
        &mut self,
        ctx: &DeviceContext<'_>,
        first_slot: u8,
        build: impl FnOnce(&mut PciBuilder<'_, '_, '_>) -> Result<T, DeviceError>,
    ) -> Result<(T, u8), DeviceError> {
        let msi_groups = ctx.interrupts.msi_group_count();
        let mut pci = PciBuilder {
            root: PendingSlots::new(first_slot),
            bars: self.bar_allocator(),
            ctx,
            ioevents: self.ioevents.clone(),
            mmio: self.buses.mmio.clone(),
            restore: None,
            saved: None,
            registry: self.registry.clone(),
            virtio: Vec::new(),
        };
        let built = build(&mut pci);
        let PciBuilder {
            root: slots,
            virtio,
            registry,
            ..
        } = pci;
        let result = built.and_then(|value| {
            // A failed build leaves nothing on the bus (`place` and the attach functions undo
            // their own inserts); from here on, undoing is ours.
            let placed = slots.added().to_vec();
            let unplace = || {
                let mut mmio = write_bus(&self.buses.mmio);
                for (_, device) in &placed {
                    for bar in lock(device).bars() {
                        let _ = mmio.remove(bar.address);
                    }
                }
            };
            let [(slot, _)] = placed.as_slice() else {
                unplace();
                return Err(DeviceError::HotAddCount {
                    count: placed.len(),
                });
            };
            let device = placed[0].1.clone();
            match slots.commit(&mut lock(&self.pci_root)) {
                Ok(next) => Ok((value, *slot, next, device)),
                Err(e) => {
                    unplace();
                    Err(DeviceError::Pci(e))
                }
            }
        });
        match result {
            Ok((value, slot, next, device)) => {
                self.pci_devices.push(device);
                self.next_slot = self.next_slot.max(next);
                self.registry = registry;
                self.virtio.extend(virtio);
                if let Err(e) = lock(&self.hotplug).notify_inserted(slot) {
                    warn!("Cannot tell the guest about the device in slot {slot}: {e}");
                }
                Ok((value, slot))
            }
            Err(error) => {
                // The device is dropped by now (with the MSI group it held): give the group
                // back, so the next device and a saved state see no orphan.
                drop(virtio);
                if let Err(e) = ctx.interrupts.release_msi_groups_from(msi_groups) {
                    warn!("Cannot release the MSI vectors of a failed hot-add: {e}");
                }
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, RwLock};

    use super::*;
    use crate::config::DeviceConfig;
    use crate::device_manager::test_fixture::{FakeDevice, Fixture, hotplug_register};
    use crate::layout;
    use devices::bus::Bus;

    /// A test device's id, by its BAR address.
    fn fake_id(bar: u64) -> String {
        format!("fake/{bar:#x}")
    }

    /// Places a fake device with a 4 KiB BAR and its participant; returns the BAR's address.
    fn place_fake(pci: &mut PciBuilder<'_, '_, '_>) -> Result<u64, DeviceError> {
        let bar = pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
        pci.place(
            &fake_id(bar),
            Arc::new(Mutex::new(FakeDevice { bar })),
            None,
            vec![fake_id(bar)],
        )?;
        Ok(bar)
    }

    fn read_byte(bus: &RwLock<Bus>, address: u64) -> Option<u8> {
        let mut data = [0u8; 1];
        bus.read()
            .unwrap()
            .read(address, &mut data)
            .then_some(data[0])
    }

    #[test]
    fn hotplug_controller_shows_the_boot_devices_present_and_nothing_inserted() {
        let fixture = Fixture::new();

        let present = hotplug_register(&fixture, devices::pci::hotplug::PRESENT);
        let inserted = hotplug_register(&fixture, devices::pci::hotplug::INSERTED);

        assert_eq!(present, 1 << 1, "virtio-rng in slot 1");
        assert_eq!(inserted, 0);
    }

    #[test]
    fn hot_added_device_is_announced_to_the_guest_once() {
        let mut fixture = Fixture::new();

        let ((), slot) = fixture.hot_add(|pci| place_fake(pci).map(drop)).unwrap();

        assert_eq!(
            hotplug_register(&fixture, devices::pci::hotplug::INSERTED),
            1 << slot
        );
        assert_eq!(
            hotplug_register(&fixture, devices::pci::hotplug::INSERTED),
            0
        );
        assert_eq!(
            hotplug_register(&fixture, devices::pci::hotplug::PRESENT),
            (1 << 1) | (1 << slot)
        );
    }

    #[test]
    fn hot_added_device_takes_the_next_slot_with_its_bar_on_the_bus() {
        let mut fixture = Fixture::new();

        let (bar, slot) = fixture.hot_add(place_fake).unwrap();

        assert_eq!(slot, 2);
        assert_eq!(fixture.manager.next_slot, 3);
        assert_eq!(fixture.vendor_id(2), 0x1234);
        assert_eq!(read_byte(&fixture.mmio(), bar), Some(0xab));
    }

    #[test]
    fn failed_hot_add_gives_back_msi_groups_bar_space_and_slot() {
        let mut fixture = Fixture::new();
        let interrupts_before = fixture.interrupts.save();
        let bars_before = fixture.manager.bar_allocator();

        let result = fixture.hot_add(|pci| {
            let _msi = pci
                .ctx
                .interrupts
                .msi_vectors(1)
                .map_err(DeviceError::Interrupt)?;
            pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
            Err::<(), _>(DeviceError::NoSuchUserDevice { index: 7 })
        });

        assert!(matches!(
            result,
            Err(DeviceError::NoSuchUserDevice { index: 7 })
        ));
        assert_eq!(fixture.interrupts.save(), interrupts_before);
        assert_eq!(fixture.manager.bar_allocator(), bars_before);
        assert_eq!(fixture.manager.next_slot, 2);
        assert_eq!(fixture.vendor_id(2), 0xffff);
    }

    #[test]
    fn bar_clashing_with_a_placed_bar_is_refused_and_leaves_the_bus_as_it_was() {
        let mut fixture = Fixture::new();
        let taken = fixture.hot_add(place_fake).unwrap().0;

        // As if the guest had moved the first device's BAR where the allocator goes next.
        let result = fixture.hot_add(|pci| {
            pci.place(
                &fake_id(taken),
                Arc::new(Mutex::new(FakeDevice { bar: taken })),
                None,
                vec![fake_id(taken)],
            )
        });

        assert!(matches!(result, Err(DeviceError::Bus(_))), "{result:?}");
        assert_eq!(read_byte(&fixture.mmio(), taken), Some(0xab));
        assert_eq!(fixture.manager.next_slot, 3);
        assert_eq!(fixture.vendor_id(3), 0xffff);
    }

    #[test]
    fn hot_add_placing_two_devices_is_refused_and_takes_both_off_the_bus() {
        let mut fixture = Fixture::new();
        let mut bars = fixture.manager.bar_allocator();
        let expected = [
            bars.allocate(0x1000).unwrap(),
            bars.allocate(0x1000).unwrap(),
        ];

        let result = fixture.hot_add(|pci| {
            let first = pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
            let second = pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
            pci.place(
                &fake_id(first),
                Arc::new(Mutex::new(FakeDevice { bar: first })),
                None,
                vec![fake_id(first)],
            )?;
            pci.place(
                &fake_id(second),
                Arc::new(Mutex::new(FakeDevice { bar: second })),
                None,
                vec![fake_id(second)],
            )?;
            Ok([first, second])
        });

        assert!(
            matches!(result, Err(DeviceError::HotAddCount { count: 2 })),
            "{result:?}"
        );
        // Both BARs are off the bus (`expected` is where the same allocator put them).
        assert_eq!(read_byte(&fixture.mmio(), expected[0]), None);
        assert_eq!(read_byte(&fixture.mmio(), expected[1]), None);
        assert_eq!(fixture.manager.next_slot, 2);
        assert_eq!(fixture.vendor_id(2), 0xffff);
    }

    #[test]
    fn hot_add_of_a_device_without_a_participant_is_refused_and_leaves_nothing_behind() {
        let mut fixture = Fixture::new();
        let expected = fixture.manager.bar_allocator().allocate(0x1000).unwrap();

        let result = fixture.hot_add(|pci| {
            let bar = pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
            let device = Arc::new(Mutex::new(FakeDevice { bar }));
            pci.place(&fake_id(bar), device, None, Vec::new())
        });

        assert!(
            matches!(&result, Err(DeviceError::NoParticipant { id }) if *id == fake_id(expected)),
            "{result:?}"
        );
        assert_eq!(read_byte(&fixture.mmio(), expected), None);
        assert_eq!(fixture.manager.next_slot, 2);
        assert_eq!(fixture.vendor_id(2), 0xffff);
        assert!(fixture.manager.registry.get(&fake_id(expected)).is_none());
    }

    #[test]
    fn a_registered_device_the_manager_cannot_save_fails_the_update_in_prepare() {
        use liveupdate::emulated::EmulatedProvider;
        use liveupdate::participant::{FileSink, ParticipantError};
        use liveupdate::session::SessionProvider;
        let mut fixture = Fixture::new();
        fixture
            .manager
            .registry
            .register("ghost", vec!["ghost/0".into()], None)
            .unwrap();
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let mut files = FileSink::new(session.as_mut());

        let mut participants = fixture
            .manager
            .participants(crate::state_format::StateFormat::current());
        let ids: Vec<String> = participants.iter().map(|p| p.id()).collect();
        let ghost = participants
            .iter_mut()
            .find(|p| p.id() == "ghost/0")
            .unwrap();
        let prepared = ghost.prepare(&mut files);

        assert!(
            matches!(&prepared, Err(ParticipantError::Failed { id, .. }) if id == "ghost/0"),
            "{prepared:?}"
        );
        assert_eq!(
            ids.first().map(String::as_str),
            Some("serial/com1"),
            "{ids:?}"
        );
    }

    #[test]
    fn bar_space_is_taken_above_a_bar_the_guest_moved_up() {
        let mut fixture = Fixture::new();
        let (first, _) = fixture
            .hot_add(|pci| {
                let bar = pci.bars.allocate(0x1000).map_err(DeviceError::Pci)?;
                let device = Arc::new(Mutex::new(FakeDevice { bar }));
                pci.place(&fake_id(bar), device.clone(), None, vec![fake_id(bar)])?;
                Ok(device)
            })
            .unwrap();
        let moved = layout::PCI_MMIO_START + 0x100_0000;
        first.lock().unwrap().bar = moved;

        let (second, _) = fixture.hot_add(place_fake).unwrap();

        assert_eq!(second, moved + 0x1000);
    }

    #[test]
    fn hot_add_of_a_vfio_device_not_bound_to_vfio_pci_is_refused_naming_its_driver() {
        let mut fixture = Fixture::new();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        std::os::unix::fs::symlink(
            "../../../bus/pci/drivers/e1000e",
            dir.as_path().join("driver"),
        )
        .unwrap();
        fixture.config.devices.push(DeviceConfig {
            path: dir.as_path().to_path_buf(),
            id: Some("nic".into()),
            kexec: crate::config::KexecPolicy::Refuse,
            removed: false,
        });
        let interrupts_before = fixture.interrupts.save();
        let result = fixture.with_context(|manager, ctx| manager.hot_add_vfio_device(ctx, 0));

        let Err(error @ DeviceError::Vfio { .. }) = result else {
            panic!("expected a VFIO error, got {result:?}");
        };
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert!(source.contains("e1000e"), "{source}");
        assert!(fixture.manager.vfio_devices.is_empty());
        assert_eq!(fixture.interrupts.save(), interrupts_before);
        assert_eq!(fixture.manager.next_slot, 2);
        assert_eq!(fixture.vendor_id(2), 0xffff);
    }

    #[test]
    fn hot_add_of_a_vfio_device_missing_from_the_config_is_refused() {
        let mut fixture = Fixture::new();
        let result = fixture.with_context(|manager, ctx| manager.hot_add_vfio_device(ctx, 0));

        assert!(matches!(
            result,
            Err(DeviceError::NoSuchVfioDevice { index: 0 })
        ));
    }

    #[test]
    fn hot_add_of_a_user_device_missing_from_the_config_is_refused() {
        let mut fixture = Fixture::new();
        let result = fixture.with_context(|manager, ctx| manager.hot_add_user_device(ctx, 0));

        assert!(matches!(
            result,
            Err(DeviceError::NoSuchUserDevice { index: 0 })
        ));
    }
}
