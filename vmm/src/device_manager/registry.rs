//! The device registry: every device the manager holds, by id, with the live-update
//! participants that carry it and, for a PCI device, its place on the bus.
//!
//! A device is registered once, when it is added (at boot, on a restore or by a hot-add), and
//! both sides of a live update walk the registry: the save drives exactly the registered
//! participants (in registration order) and saves the registered placement; the restore places
//! each device by the saved placement and checks that every device it built was saved and every
//! saved place found its device. A device without a participant is refused at registration,
//! while the VM still runs, rather than missed by the VMM that restores it.

use super::DeviceError;
use super::placement::DevicePlacement;

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Registered {
    /// Device id (also the key of its placement).
    pub(super) id: String,
    /// The participants that save and restore it (at least one).
    pub(super) participants: Vec<String>,
    /// Its place on bus 0, for a PCI device.
    pub(super) placement: Option<DevicePlacement>,
}

/// The registered devices, in registration order.
#[derive(Debug, Clone, Default)]
pub(super) struct DeviceRegistry {
    devices: Vec<Registered>,
}

impl DeviceRegistry {
    /// Registers device `id`, carried by `participants`, at `placement`. Refused without a
    /// participant, or for an id registered already.
    pub(super) fn register(
        &mut self,
        id: &str,
        participants: Vec<String>,
        placement: Option<DevicePlacement>,
    ) -> Result<(), DeviceError> {
        if participants.is_empty() {
            return Err(DeviceError::NoParticipant { id: id.to_string() });
        }
        if self.get(id).is_some() {
            return Err(DeviceError::AlreadyRegistered { id: id.to_string() });
        }
        self.devices.push(Registered {
            id: id.to_string(),
            participants,
            placement,
        });
        Ok(())
    }

    /// Forgets device `id` (it left the VM, or is registered again differently); returns what
    /// it was registered with.
    pub(super) fn unregister(&mut self, id: &str) -> Option<Registered> {
        let index = self.devices.iter().position(|device| device.id == id)?;
        Some(self.devices.remove(index))
    }

    /// Puts back a device [`Self::unregister`] returned.
    pub(super) fn restore(&mut self, device: Registered) -> Result<(), DeviceError> {
        self.register(&device.id, device.participants, device.placement)
    }

    /// Device `id`, if registered.
    pub(super) fn get(&self, id: &str) -> Option<&Registered> {
        self.devices.iter().find(|device| device.id == id)
    }

    /// Every registered participant id, device by device in registration order.
    pub(super) fn participant_ids(&self) -> impl Iterator<Item = &str> {
        self.devices
            .iter()
            .flat_map(|device| device.participants.iter().map(String::as_str))
    }

    /// The places of the registered PCI devices.
    pub(super) fn placement(&self) -> Vec<DevicePlacement> {
        self.devices
            .iter()
            .filter_map(|device| device.placement.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_a_participant_is_refused_at_registration() {
        let mut registry = DeviceRegistry::default();

        let result = registry.register("virtio/disk0", Vec::new(), None);

        assert!(
            matches!(&result, Err(DeviceError::NoParticipant { id }) if id == "virtio/disk0"),
            "{result:?}"
        );
        assert!(registry.get("virtio/disk0").is_none());
    }

    #[test]
    fn an_id_is_registered_once_and_participants_come_in_registration_order() {
        let mut registry = DeviceRegistry::default();
        registry
            .register(
                "virtio/net0",
                vec!["virtio/net0".into(), "net/net0".into()],
                None,
            )
            .unwrap();
        registry
            .register("cmos", vec!["cmos".into()], None)
            .unwrap();

        let again = registry.register("cmos", vec!["cmos".into()], None);
        let ids: Vec<&str> = registry.participant_ids().collect();

        assert!(
            matches!(again, Err(DeviceError::AlreadyRegistered { .. })),
            "{again:?}"
        );
        assert_eq!(ids, ["virtio/net0", "net/net0", "cmos"]);
    }
}
