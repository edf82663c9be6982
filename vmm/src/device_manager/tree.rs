//! The device tree `vm.info` shows once the VM is booted, in cloud-hypervisor's shape: a map
//! from device id to a `DeviceNode` (`id`, `resources`, `parent`, `children`, `pci_bdf`).
//!
//! As in cloud-hypervisor, a virtio device is two nodes: its virtio-pci transport
//! (`_virtio-pci-<id>`, with the PCI address and BAR) and the device itself (`<id>`, its child).
//! A VFIO or vfio-user device is one node with its PCI address and BARs. The ids are the ones
//! the API and `vm.counters` use. The tree is read from the devices as they are now, so it
//! follows hot-plug, unplug and a live update (which places every device where it was).

use std::collections::BTreeMap;

use devices::bus::lock;
use devices::legacy::SERIAL_PORT_LEN;
use devices::pci::{PciBarInfo, PciDevice};
use serde::Serialize;

use super::DeviceManager;
use super::vfio::VfioSlot;
use crate::config::VmConfig;
use crate::layout;

/// Device id → node.
pub type DeviceTree = BTreeMap<String, DeviceNode>;

/// One device, as cloud-hypervisor's `DeviceNode` serialises.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceNode {
    /// The device id.
    pub id: String,
    /// Where it sits: ports, interrupt lines, BARs.
    pub resources: Vec<Resource>,
    /// The node it hangs under (a virtio device's transport).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The nodes hanging under it.
    pub children: Vec<String>,
    /// Its PCI address, `segment:bus:device.function`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// A resource of a device, as cloud-hypervisor's `Resource` serialises (externally tagged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Resource {
    /// A range of I/O ports.
    PioAddressRange {
        /// First port.
        base: u64,
        /// Number of ports.
        size: u64,
    },
    /// A legacy (IOAPIC) interrupt line.
    LegacyIrq(u32),
    /// A memory BAR.
    PciBar {
        /// BAR index.
        index: usize,
        /// Guest physical address (where the guest has it now).
        base: u64,
        /// Size in bytes.
        size: u64,
        /// `Mmio32` or `Mmio64`.
        type_: PciBarType,
        /// We place no BAR as prefetchable.
        prefetchable: bool,
    },
}

/// The kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PciBarType {
    /// Below 4 GiB.
    Mmio32,
    /// 64-bit.
    Mmio64,
}

/// The PCI address of `slot` on bus 0 of segment 0 (function 0: we have no other).
pub fn pci_bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

fn bar_resources(bars: &[PciBarInfo]) -> Vec<Resource> {
    bars.iter()
        .map(|bar| Resource::PciBar {
            index: bar.index,
            base: bar.address,
            size: bar.size,
            type_: if bar.is_64bit {
                PciBarType::Mmio64
            } else {
                PciBarType::Mmio32
            },
            prefetchable: false,
        })
        .collect()
}

/// A node for a PCI function of its own (VFIO, vfio-user).
fn pci_node(id: String, slot: u8, bars: &[PciBarInfo]) -> DeviceNode {
    DeviceNode {
        id,
        resources: bar_resources(bars),
        parent: None,
        children: Vec::new(),
        pci_bdf: Some(pci_bdf(slot)),
    }
}

impl DeviceManager {
    /// The device tree; `config` is the VM's configuration, removed devices included (they
    /// keep their index until the next boot).
    pub fn device_tree(&self, config: &VmConfig) -> DeviceTree {
        let mut tree = DeviceTree::new();
        if self.serial.is_some() {
            let id = "_serial".to_string();
            let resources = vec![
                Resource::PioAddressRange {
                    base: layout::COM1_PORT,
                    size: SERIAL_PORT_LEN,
                },
                Resource::LegacyIrq(layout::COM1_IRQ),
            ];
            tree.insert(
                id.clone(),
                DeviceNode {
                    id,
                    resources,
                    parent: None,
                    children: Vec::new(),
                    pci_bdf: None,
                },
            );
        }
        for entry in &self.virtio {
            let transport = format!("_virtio-pci-{}", entry.id);
            let mut node = pci_node(transport.clone(), entry.slot, &entry.device.bars());
            node.children.push(entry.id.clone());
            tree.insert(transport.clone(), node);
            tree.insert(
                entry.id.clone(),
                DeviceNode {
                    id: entry.id.clone(),
                    resources: Vec::new(),
                    parent: Some(transport),
                    children: Vec::new(),
                    pci_bdf: None,
                },
            );
        }
        for (index, entry) in self.user_devices.iter().enumerate() {
            let id = config.user_device_id(index);
            let node = pci_node(id.clone(), entry.slot, &lock(&entry.device).bars());
            tree.insert(id, node);
        }
        for (index, slot) in self.vfio_devices.iter().enumerate() {
            if let VfioSlot::Attached(entry) = slot {
                let id = config.vfio_device_id(index);
                let node = pci_node(id.clone(), entry.slot, &lock(&entry.device).bars());
                tree.insert(id, node);
            }
        }
        tree
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use std::path::PathBuf;

    use super::*;
    use crate::config::{DeviceConfig, KexecPolicy};
    use crate::device_manager::test_fixture::Fixture;

    #[test]
    fn booted_devices_appear_with_their_ids_slots_and_resources() {
        let mut fixture = Fixture::new();
        let (slot, bar) = fixture.with_vfio_device();
        fixture.config.devices.push(DeviceConfig {
            path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0"),
            id: Some("edu".into()),
            kexec: KexecPolicy::Refuse,
            removed: false,
        });

        let tree = fixture.manager.device_tree(&fixture.config);

        let ids: Vec<&str> = tree.keys().map(String::as_str).collect();
        assert_eq!(ids, ["_rng", "_serial", "_virtio-pci-_rng", "edu"]);
        assert_eq!(
            tree["_virtio-pci-_rng"].pci_bdf.as_deref(),
            Some("0000:00:01.0")
        );
        assert_eq!(tree["_virtio-pci-_rng"].children, ["_rng"]);
        assert_eq!(tree["_rng"].parent.as_deref(), Some("_virtio-pci-_rng"));
        assert_eq!(tree["edu"].pci_bdf, Some(pci_bdf(slot)));
        assert!(
            matches!(tree["edu"].resources[..], [Resource::PciBar { base, .. }, ..] if base == bar),
            "{:?}",
            tree["edu"]
        );
        assert_eq!(tree["_serial"].resources[1], Resource::LegacyIrq(4));
    }

    #[test]
    fn nodes_serialise_as_cloud_hypervisors_device_node() {
        let bar = PciBarInfo {
            index: 0,
            address: 0xe000_0000,
            size: 0x1000,
            is_64bit: false,
        };
        let mut transport = pci_node("_virtio-pci-_rng".into(), 2, &[bar]);
        transport.children.push("_rng".into());
        let device = DeviceNode {
            id: "_rng".into(),
            resources: Vec::new(),
            parent: Some("_virtio-pci-_rng".into()),
            children: Vec::new(),
            pci_bdf: None,
        };

        let (transport, device) = (
            serde_json::to_value(&transport).unwrap(),
            serde_json::to_value(&device).unwrap(),
        );

        assert_eq!(
            transport,
            json!({
                "id": "_virtio-pci-_rng",
                "resources": [{"PciBar": {"index": 0, "base": 0xe000_0000u64, "size": 0x1000,
                                          "type_": "Mmio32", "prefetchable": false}}],
                "children": ["_rng"],
                "pci_bdf": "0000:00:02.0",
            })
        );
        assert_eq!(
            device,
            json!({"id": "_rng", "resources": [], "parent": "_virtio-pci-_rng", "children": []})
        );
    }

    #[test]
    fn port_and_interrupt_resources_serialise_externally_tagged() {
        let resources = [
            Resource::PioAddressRange {
                base: 0x3f8,
                size: 8,
            },
            Resource::LegacyIrq(4),
        ];

        let value = serde_json::to_value(resources).unwrap();

        assert_eq!(
            value,
            json!([{"PioAddressRange": {"base": 0x3f8, "size": 8}}, {"LegacyIrq": 4}])
        );
    }
}
