//! The DSDT: the PCI host bridge with its hot-plug slots, the Generic Event Device that
//! reports hot-plug events, and COM1.
//!
//! It follows the PCI hot-plug contract (`devices::pci::hotplug`): `\_SB.PCI0` maps the
//! controller's register page, its method `PSCN` turns the INSERTED and REMOVE_REQUESTED bits
//! into device-check and eject-request notifications on the slot devices `S01`..`S1F`, whose
//! `_EJ0` writes their bit to EJECT; `\_SB.GED_` calls `PSCN` on the controller's interrupt.
//! Linux's acpiphp driver registers one hot-plug slot per `Snn` device (it has `_EJ0`).
//!
//! COM1 is needed because the platform is hardware-reduced: Linux then sets up no legacy ISA
//! IRQs, so the 8250 driver's legacy port could not get IRQ 4 and ttyS0 would stay unusable
//! (the kernel's console output still appears, but nothing can open the tty). Described here,
//! the port's IRQ is registered through ACPI and the 8250 PNP driver takes the port over.

use std::ops::RangeInclusive;

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, And, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Method, MethodCall, Name,
    Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Scope, Store,
};
use acpi_tables::sdt::Sdt;

use super::{Encoded, OEM_ID, OEM_REVISION, OEM_TABLE_ID, SDT_HEADER_LEN, encode};
use crate::layout;

/// DSDT revision 2 and up: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// Bus 0 slots that can hold a hot-plugged device (slot 0 is the host bridge).
const SLOTS: RangeInclusive<u8> = 1..=31;
/// Notify value: re-check the device (it was added).
const NOTIFY_DEVICE_CHECK: u8 = 1;
/// Notify value: the platform asks to eject the device.
const NOTIFY_EJECT_REQUEST: u8 = 3;
/// The operation region over the hot-plug controller's register page.
const HOTPLUG_REGION: &str = "PCST";
/// Register fields, in register order (offsets 0x0, 0x4, 0x8, 0xC).
const FIELD_INSERTED: &str = "PCIU";
const FIELD_REMOVE_REQUESTED: &str = "PCID";
const FIELD_EJECT: &str = "PCEJ";
const FIELD_PRESENT: &str = "PCPR";
/// Absolute path of the EJECT field, for the slots' `_EJ0`.
const EJECT_PATH: &str = "\\_SB_.PCI0.PCEJ";
/// Absolute path of the scan method, for the GED's `_EVT`.
const SCAN_PATH: &str = "\\_SB_.PCI0.PSCN";
/// The PCI I/O ports of configuration mechanism #1 (address and data).
const PCI_CONFIG_PORT: u16 = 0xcf8;
const PCI_CONFIG_PORT_LEN: u8 = 8;
/// COM1's eight I/O ports.
const COM1_PORT: u16 = layout::COM1_PORT as u16;
const COM1_PORT_LEN: u8 = 8;
const _: () = assert!(layout::COM1_PORT < 1 << 16);
/// The 32-bit BAR window, as AML wants it (first and last address).
const PCI_MMIO_FIRST: u32 = layout::PCI_MMIO_START as u32;
const PCI_MMIO_LAST: u32 = (layout::PCI_MMIO_END - 1) as u32;
const _: () =
    assert!(layout::PCI_MMIO_END <= 1 << 32 && layout::PCI_MMIO_START < layout::PCI_MMIO_END);

/// A 32-bit register field named `name` (a four-character name segment).
fn register_field(name: &str) -> FieldEntry {
    let mut segment = *b"____";
    for (byte, char) in segment.iter_mut().zip(name.bytes()) {
        *byte = char;
    }
    FieldEntry::Named(segment, 32)
}

/// The ACPI name of slot `slot` (`S01_`..`S1F_`; disassemblers print it without the `_`).
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The whole DSDT, header included and checksummed.
pub(super) fn dsdt() -> Sdt {
    let host_bridge = host_bridge();
    let event_device = generic_event_device();
    let com1 = com1();
    let system_bus = Scope::new(
        Path::new("\\_SB_"),
        vec![&host_bridge, &event_device, &com1],
    );
    let mut table = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    table.append_slice(&encode(&system_bus).0);
    table
}

/// `\_SB.PCI0`: the host bridge, its resources, the hot-plug registers and the slots.
fn host_bridge() -> Encoded {
    let buses = AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_LEN);
    let ports_below = AddressSpace::new_io(0u16, PCI_CONFIG_PORT - 1, None);
    let ports_above = AddressSpace::new_io(
        PCI_CONFIG_PORT + u16::from(PCI_CONFIG_PORT_LEN),
        u16::MAX,
        None,
    );
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_FIRST,
        PCI_MMIO_LAST,
        None,
    );
    let resources = ResourceTemplate::new(vec![
        &buses,
        &config_ports,
        &ports_below,
        &ports_above,
        &mmio,
    ]);
    let region = OpRegion::new(
        Path::new(HOTPLUG_REGION),
        OpRegionSpace::SystemMemory,
        &layout::PCI_HOTPLUG_START,
        &layout::PCI_HOTPLUG_SIZE,
    );
    let fields = Field::new(
        Path::new(HOTPLUG_REGION),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            register_field(FIELD_INSERTED),
            register_field(FIELD_REMOVE_REQUESTED),
            register_field(FIELD_EJECT),
            register_field(FIELD_PRESENT),
        ],
    );
    let slots: Vec<Encoded> = SLOTS.map(slot_device).collect();
    let scan = scan_method();
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A03"));
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let segment = Name::new(Path::new("_SEG"), &aml::ZERO);
    let bus = Name::new(Path::new("_BBN"), &aml::ZERO);
    let crs = Name::new(Path::new("_CRS"), &resources);
    let mut children: Vec<&dyn Aml> =
        vec![&hid, &uid, &segment, &bus, &crs, &region, &fields, &scan];
    children.extend(slots.iter().map(|slot| slot as &dyn Aml));
    encode(&Device::new(Path::new("PCI0"), children))
}

/// `PSCN`: reads INSERTED and REMOVE_REQUESTED once each (reading clears them) and notifies
/// every slot whose bit is set. Serialized, so two callers never split one read's bits.
fn scan_method() -> Encoded {
    let inserted = Local(0);
    let remove_requested = Local(1);
    let inserted_field = Path::new(FIELD_INSERTED);
    let remove_requested_field = Path::new(FIELD_REMOVE_REQUESTED);
    let read_inserted = Store::new(&inserted, &inserted_field);
    let read_remove_requested = Store::new(&remove_requested, &remove_requested_field);
    let mut notifications = Vec::new();
    for slot in SLOTS {
        let bit = 1u32 << slot;
        let name = Path::new(&slot_name(slot));
        for (bits, value) in [
            (&inserted, NOTIFY_DEVICE_CHECK),
            (&remove_requested, NOTIFY_EJECT_REQUEST),
        ] {
            notifications.push(encode(&If::new(
                &And::new(&aml::ZERO, bits, &bit),
                vec![&Notify::new(&name, &value)],
            )));
        }
    }
    let mut body: Vec<&dyn Aml> = vec![&read_inserted, &read_remove_requested];
    body.extend(notifications.iter().map(|n| n as &dyn Aml));
    encode(&Method::new(Path::new("PSCN"), 0, true, body))
}

/// `Snn`: slot `slot`'s device (function 0), its slot number and its eject method.
fn slot_device(slot: u8) -> Encoded {
    let address = u32::from(slot) << 16;
    let slot_number = u32::from(slot);
    let bit = 1u32 << slot;
    let eject_path = Path::new(EJECT_PATH);
    let release = Store::new(&eject_path, &bit);
    encode(&Device::new(
        Path::new(&slot_name(slot)),
        vec![
            &Name::new(Path::new("_ADR"), &address),
            &Name::new(Path::new("_SUN"), &slot_number),
            &Method::new(Path::new("_EJ0"), 1, false, vec![&release]),
        ],
    ))
}

/// `\_SB.GED_`: the Generic Event Device on the hot-plug interrupt; `_EVT` scans the slots.
fn generic_event_device() -> Encoded {
    let interrupt = Interrupt::new(true, true, false, false, layout::PCI_HOTPLUG_IRQ);
    let resources = ResourceTemplate::new(vec![&interrupt]);
    let scan = MethodCall::new(Path::new(SCAN_PATH), vec![]);
    encode(&Device::new(
        Path::new("GED_"),
        vec![
            &Name::new(Path::new("_HID"), &"ACPI0013"),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &resources),
            &Method::new(Path::new("_EVT"), 1, false, vec![&scan]),
        ],
    ))
}

/// `\_SB.COM1`: the 16550 UART at `layout::COM1_PORT` on IRQ `layout::COM1_IRQ`.
fn com1() -> Encoded {
    let ports = aml::IO::new(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN);
    let interrupt = Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let resources = ResourceTemplate::new(vec![&ports, &interrupt]);
    encode(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &resources),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::tests::{TempDir, disassemble};
    use super::*;

    fn disassembled_dsdt() -> String {
        disassemble("dsdt", dsdt().as_slice())
    }

    #[test]
    fn dsdt_checksums_to_zero() {
        let table = dsdt();

        let sum = table
            .as_slice()
            .iter()
            .fold(0u8, |sum, byte| sum.wrapping_add(*byte));

        assert_eq!(sum, 0);
        assert_eq!(&table.as_slice()[..4], b"DSDT");
    }

    #[test]
    fn host_bridge_has_bus_0_and_its_windows() {
        let asl = disassembled_dsdt();

        for expected in [
            "Device (PCI0)",
            "Name (_HID, EisaId (\"PNP0A03\")",
            "Name (_SEG, Zero)",
            "Name (_BBN, Zero)",
            "0x0CF8,             // Range Minimum",
            "0x0CF7,             // Range Maximum",
            "0x0D00,             // Range Minimum",
            "0xC0000000,         // Range Minimum",
            "0xFEAFFFFF,         // Range Maximum",
            "OperationRegion (PCST, SystemMemory, 0xFEB00000, 0x1000)",
        ] {
            assert!(asl.contains(expected), "missing {expected:?} in\n{asl}");
        }
    }

    #[test]
    fn every_slot_has_address_slot_number_and_eject() {
        let asl = disassembled_dsdt();

        assert_eq!(asl.matches("Method (_EJ0, 1").count(), 31, "{asl}");
        assert!(asl.contains("Device (S01)"), "{asl}");
        assert!(asl.contains("Device (S1F)"), "{asl}");
        assert!(asl.contains("Name (_ADR, 0x001F0000)"), "{asl}");
        assert!(asl.contains("Name (_SUN, 0x1F)"), "{asl}");
        assert!(asl.contains("\\_SB.PCI0.PCEJ = 0x80000000"), "{asl}");
    }

    #[test]
    fn scan_notifies_each_slot_for_insertion_and_removal() {
        let asl = disassembled_dsdt();

        assert!(asl.contains("Method (PSCN, 0, Serialized)"), "{asl}");
        assert!(asl.contains("Notify (S05, One)"), "{asl}");
        assert!(asl.contains("Notify (S05, 0x03)"), "{asl}");
        assert_eq!(asl.matches("Notify (").count(), 62, "{asl}");
    }

    #[test]
    fn generic_event_device_scans_on_the_hotplug_interrupt() {
        let asl = disassembled_dsdt();

        assert!(asl.contains("Device (GED)"), "{asl}");
        assert!(asl.contains("\"ACPI0013\""), "{asl}");
        assert!(
            asl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )"),
            "{asl}"
        );
        assert!(asl.contains("0x00000005,"), "{asl}");
        assert!(asl.contains("\\_SB.PCI0.PSCN ()"), "{asl}");
    }

    #[test]
    fn com1_has_its_ports_and_irq_4() {
        let asl = disassembled_dsdt();

        assert!(asl.contains("Device (COM1)"), "{asl}");
        assert!(asl.contains("EisaId (\"PNP0501\")"), "{asl}");
        assert!(
            asl.contains("0x03F8,             // Range Minimum"),
            "{asl}"
        );
        assert!(asl.contains("0x00000004,"), "{asl}");
    }

    #[test]
    fn disassembly_recompiles_without_errors() {
        let asl = disassembled_dsdt();
        let dir = TempDir::new("dsdt-recompile");
        let source = dir.0.join("dsdt.dsl");
        std::fs::write(&source, &asl).unwrap();

        let output = Command::new("iasl")
            .arg(&source)
            .current_dir(&dir.0)
            .output()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run iasl ({error}): install acpica-tools (apt-get install acpica-tools)"
                )
            });

        let log = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{log}");
        assert!(log.contains(" 0 Errors"), "{log}");
    }
}
