//! Where each PCI device sits, by device id: its slot and function, and its MSI vector group.
//! Saved in the PCI root's state, so the VMM that restores a VM places every device where the
//! saved one was, whatever order it builds, hot-plugs or removes devices in.

use std::collections::BTreeMap;

use liveupdate::state::{DecodeError, Versioned, upgrade};
use serde::{Deserialize, Serialize};

use super::ids;
use crate::config::{ConsoleMode, VmConfig};
use crate::interrupts::MsiGroupState;

/// The PCI root's state (`pci/root`), version 2: the config address register and the
/// placement of every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciRootState {
    /// Last value written to the address register (0xcf8).
    pub config_address: u32,
    /// Where each device is. `None` only in a state upgraded from version 1, which saved no
    /// placement: its devices are where that build's order put them ([`Placement::build_order`]).
    pub placement: Option<Placement>,
}

/// Version 1, frozen: the register alone (the devices crate's `PciRootState`).
pub type PciRootStateV1 = devices::pci::PciRootState;

impl Versioned for PciRootState {
    const VERSION: u16 = 2;

    fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, DecodeError>> {
        match version {
            1 => Some(upgrade::<PciRootStateV1, Self>(bytes)),
            _ => None,
        }
    }
}

impl From<PciRootStateV1> for PciRootState {
    /// The register as it was; the placement is derived from the configuration when the
    /// devices are built (it needs the configuration, which the state of `pci/root` has not).
    fn from(old: PciRootStateV1) -> Self {
        Self {
            config_address: old.config_address,
            placement: None,
        }
    }
}

/// Every device's place on bus 0, and the slot a hot-add takes next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The slot the next hot-added device takes.
    pub next_slot: u8,
    /// The devices present, and the detached ones that keep their place.
    pub devices: Vec<DevicePlacement>,
}

/// One PCI function's place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlacement {
    /// Device id (`virtio/<id>`, `vfio-user/<index>`, `vfio/<index>`).
    pub id: String,
    /// Slot on bus 0.
    pub slot: u8,
    /// Function in the slot.
    pub function: u8,
    /// Its MSI vectors: the GSI of vector 0 and how many there are.
    pub msi: Option<MsiPlacement>,
}

impl DevicePlacement {
    /// Its slot and GSIs, for messages.
    fn place(&self) -> String {
        match self.msi {
            Some(msi) => format!(
                "slot {} (MSI GSIs {}-{})",
                self.slot,
                msi.first_gsi,
                msi.first_gsi
                    .saturating_add(u32::from(msi.vectors.max(1)) - 1)
            ),
            None => format!("slot {}", self.slot),
        }
    }
}

/// An MSI vector group: consecutive GSIs from `first_gsi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiPlacement {
    /// GSI of vector 0.
    pub first_gsi: u32,
    /// Number of vectors.
    pub vectors: u16,
}

impl Placement {
    /// The placement the builds before placement was saved used: every device of `config` in
    /// build order (disks, console, rng, network cards, vsock, vfio-user, then VFIO devices,
    /// removed and detached ones included) took the next slot from 1 and the next MSI group of
    /// `groups` (the saved interrupt state's groups, in the order they were handed out). The
    /// removed devices' places are left out: nothing is there any more.
    pub fn build_order(config: &VmConfig, groups: &[MsiGroupState]) -> Result<Self, String> {
        // Each device's id, or `None` for a removed one.
        let mut order: Vec<Option<String>> = (config.disks.iter().enumerate())
            .map(|(index, disk)| {
                Some(ids::virtio(
                    &disk.id.clone().unwrap_or_else(|| format!("_disk{index}")),
                ))
            })
            .collect();
        if config.console.mode != ConsoleMode::Off {
            order.push(Some(ids::virtio("_console")));
        }
        order.push(Some(ids::virtio("_rng")));
        order.extend(
            (config.net.iter().enumerate())
                .map(|(index, net)| (!net.removed).then(|| ids::virtio(&config.net_id(index)))),
        );
        if let (Some(vsock), Some(id)) = (&config.vsock, config.vsock_id()) {
            order.push((!vsock.removed).then(|| ids::virtio(&id)));
        }
        order.extend((0..config.user_devices.len()).map(|index| Some(ids::user_device(index))));
        order.extend((0..config.devices.len()).map(|index| Some(ids::vfio_device(index))));
        if order.len() != groups.len() {
            return Err(format!(
                "the configuration has {} PCI devices, the interrupt state {} MSI groups",
                order.len(),
                groups.len()
            ));
        }
        let next_slot = u8::try_from(order.len() + 1).map_err(|_| "too many devices")?;
        let devices = (1u8..)
            .zip(order.into_iter().zip(groups))
            .filter_map(|(slot, (id, group))| Some((slot, id?, group)))
            .map(|(slot, id, group)| DevicePlacement {
                id,
                slot,
                function: 0,
                msi: Some(MsiPlacement {
                    first_gsi: group.first_gsi,
                    vectors: u16::try_from(group.routes.len()).unwrap_or(u16::MAX),
                }),
            })
            .collect::<Vec<_>>();
        Ok(Self { next_slot, devices })
    }

    /// Checks that every device sits where [`Self::build_order`] puts it, so a build that
    /// saves no placement (and places devices in that order) restores this VM as it is; the
    /// reason otherwise, naming the first device out of place.
    pub fn check_build_order(
        &self,
        config: &VmConfig,
        groups: &[MsiGroupState],
    ) -> Result<(), String> {
        let order = Self::build_order(config, groups)?;
        let next_slot = order.next_slot;
        let mut expected = order.by_id();
        for device in &self.devices {
            match expected.remove(&device.id) {
                Some(there) if there == *device => {}
                Some(there) => {
                    return Err(format!(
                        "{} is in {}; that order puts it in {}",
                        device.id,
                        device.place(),
                        there.place()
                    ));
                }
                None => return Err(format!("{} has no place in that order", device.id)),
            }
        }
        if let Some(id) = expected.into_keys().next() {
            return Err(format!(
                "that order has a place for {id}, which is not here"
            ));
        }
        if next_slot != self.next_slot {
            return Err(format!(
                "the next hot-added device goes to slot {}; that order says slot {}",
                self.next_slot, next_slot
            ));
        }
        Ok(())
    }

    /// The placements by device id.
    pub fn by_id(self) -> BTreeMap<String, DevicePlacement> {
        self.devices
            .into_iter()
            .map(|device| (device.id.clone(), device))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NetConfig, VsockConfig};

    fn group(first_gsi: u32, vectors: usize) -> MsiGroupState {
        MsiGroupState {
            first_gsi,
            routes: vec![None; vectors],
        }
    }

    fn placed(id: &str, slot: u8, first_gsi: u32, vectors: u16) -> DevicePlacement {
        DevicePlacement {
            id: id.into(),
            slot,
            function: 0,
            msi: Some(MsiPlacement { first_gsi, vectors }),
        }
    }

    #[test]
    fn version_1_state_is_read_with_its_register_and_no_placement() {
        let old = PciRootStateV1 {
            config_address: 0x8000_0810,
        };
        let bytes = postcard::to_stdvec(&old).unwrap();

        let upgraded = PciRootState::read_older(1, &bytes).unwrap().unwrap();

        assert_eq!(
            upgraded,
            PciRootState {
                config_address: 0x8000_0810,
                placement: None
            }
        );
        assert!(PciRootState::read_older(3, &bytes).is_none());
    }

    #[test]
    fn version_1_placement_is_the_old_build_order_with_removed_devices_left_out() {
        // Arrange: a disk, the console, rng, a card removed at run time and the vsock device,
        // as the old build placed them (each in the next slot and MSI group).
        let mut config = VmConfig {
            disks: vec![serde_json::from_str(r#"{"path":"/d","id":"disk0"}"#).unwrap()],
            net: vec![NetConfig {
                id: Some("net0".into()),
                removed: true,
                ..NetConfig::default()
            }],
            vsock: Some(
                serde_json::from_str::<VsockConfig>(r#"{"cid":3,"socket":"/s","id":"vsock0"}"#)
                    .unwrap(),
            ),
            ..VmConfig::default()
        };
        config.console.mode = ConsoleMode::Null;
        let groups = [
            group(24, 2),
            group(26, 3),
            group(29, 2),
            group(31, 3),
            group(34, 4),
        ];

        let placement = Placement::build_order(&config, &groups).unwrap();

        assert_eq!(
            placement,
            Placement {
                next_slot: 6,
                devices: vec![
                    placed("virtio/disk0", 1, 24, 2),
                    placed("virtio/_console", 2, 26, 3),
                    placed("virtio/_rng", 3, 29, 2),
                    placed("virtio/vsock0", 5, 34, 4),
                ],
            }
        );
    }

    /// A disk, the console and rng, each in the next slot and MSI group.
    fn three_devices() -> (VmConfig, [MsiGroupState; 3]) {
        let mut config = VmConfig {
            disks: vec![serde_json::from_str(r#"{"path":"/d","id":"disk0"}"#).unwrap()],
            ..VmConfig::default()
        };
        config.console.mode = ConsoleMode::Null;
        (config, [group(24, 2), group(26, 3), group(29, 2)])
    }

    #[test]
    fn devices_in_build_order_can_be_saved_without_placement() {
        let (config, groups) = three_devices();
        let placement = Placement::build_order(&config, &groups).unwrap();

        assert_eq!(placement.check_build_order(&config, &groups), Ok(()));
    }

    #[test]
    fn a_device_out_of_build_order_is_named() {
        // Arrange: the console and rng in each other's slot (as hot-plug order would leave them).
        let (config, groups) = three_devices();
        let mut placement = Placement::build_order(&config, &groups).unwrap();
        placement.devices[1].slot = 3;
        placement.devices[2].slot = 2;

        let result = placement.check_build_order(&config, &groups);

        assert_eq!(
            result,
            Err(
                "virtio/_console is in slot 3 (MSI GSIs 26-28); that order puts it in slot 2 \
                 (MSI GSIs 26-28)"
                    .into()
            )
        );
    }

    #[test]
    fn a_missing_or_extra_device_or_another_next_slot_is_refused() {
        let (config, groups) = three_devices();
        let order = Placement::build_order(&config, &groups).unwrap();
        let mut missing = order.clone();
        missing.devices.pop();
        let mut extra = order.clone();
        extra.devices.push(placed("vfio-user/0", 4, 31, 1));
        let mut next = order;
        next.next_slot = 9;

        assert_eq!(
            missing.check_build_order(&config, &groups),
            Err("that order has a place for virtio/_rng, which is not here".into())
        );
        assert_eq!(
            extra.check_build_order(&config, &groups),
            Err("vfio-user/0 has no place in that order".into())
        );
        assert_eq!(
            next.check_build_order(&config, &groups),
            Err("the next hot-added device goes to slot 9; that order says slot 4".into())
        );
    }

    #[test]
    fn version_1_placement_refuses_a_state_whose_groups_do_not_match_the_devices() {
        let config = VmConfig {
            console: crate::config::ConsoleConfig {
                mode: ConsoleMode::Off,
                ..crate::config::ConsoleConfig::default_console()
            },
            ..VmConfig::default()
        };

        let result = Placement::build_order(&config, &[group(24, 2), group(26, 1)]);

        assert!(result.is_err(), "{result:?}");
    }
}
