//! The Intel MultiProcessor Specification 1.4 table, so the guest finds its CPUs and the
//! IOAPIC without ACPI.
//!
//! The floating pointer sits at the start of the EBDA (`layout::EBDA_START`, inside the last KiB
//! of base memory that Linux scans) and the configuration table follows it. Both lie in the
//! range the memory map reports as reserved.

use std::mem::offset_of;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout;

/// Where the floating pointer goes.
const MPTABLE_START: u64 = layout::EBDA_START;
/// Spec revision 1.4.
const SPEC_REV: u8 = 4;
/// Local APIC version reported for every CPU (an integrated APIC).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version.
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// CPU feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Processor entry flags.
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// IOAPIC entry flag: usable.
const IOAPIC_ENABLED: u8 = 1 << 0;
/// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Destination "all local APICs" in a local interrupt entry.
const ALL_LOCAL_APICS: u8 = 0xff;
/// ISA IRQs routed through the IOAPIC.
const ISA_IRQS: u8 = 16;

/// MP floating pointer structure (16 bytes).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpFloatingPointer {
    pub(super) signature: [u8; 4],
    pub(super) config_table: u32,
    pub(super) length: u8,
    pub(super) spec_rev: u8,
    pub(super) checksum: u8,
    pub(super) features: [u8; 5],
}

/// MP configuration table header (44 bytes).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpConfigHeader {
    pub(super) signature: [u8; 4],
    pub(super) base_length: u16,
    pub(super) spec_rev: u8,
    pub(super) checksum: u8,
    pub(super) oem_id: [u8; 8],
    pub(super) product_id: [u8; 12],
    pub(super) oem_table: u32,
    pub(super) oem_table_size: u16,
    pub(super) entry_count: u16,
    pub(super) lapic_addr: u32,
    pub(super) ext_length: u16,
    pub(super) ext_checksum: u8,
    pub(super) reserved: u8,
}

/// Processor entry (20 bytes).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpProcessor {
    pub(super) kind: u8,
    pub(super) lapic_id: u8,
    pub(super) lapic_version: u8,
    pub(super) flags: u8,
    pub(super) signature: u32,
    pub(super) features: u32,
    pub(super) reserved: [u32; 2],
}

/// Bus entry (8 bytes).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpBus {
    pub(super) kind: u8,
    pub(super) bus_id: u8,
    pub(super) bus_type: [u8; 6],
}

/// IOAPIC entry (8 bytes).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpIoApic {
    pub(super) kind: u8,
    pub(super) id: u8,
    pub(super) version: u8,
    pub(super) flags: u8,
    pub(super) addr: u32,
}

/// I/O or local interrupt assignment entry (8 bytes; the last field is the IOAPIC pin or the
/// LINT number).
#[repr(C, packed)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct MpInterrupt {
    pub(super) kind: u8,
    pub(super) int_type: u8,
    pub(super) flags: u16,
    pub(super) source_bus: u8,
    pub(super) source_irq: u8,
    pub(super) dest_apic: u8,
    pub(super) dest_pin: u8,
}

/// Appends `value`'s bytes to `table`.
fn push<T: ByteValued>(table: &mut Vec<u8>, value: &T) {
    table.extend_from_slice(value.as_slice());
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, byte| sum.wrapping_add(*byte))
        .wrapping_neg()
}

/// The configuration table entries (after the header) and their count.
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let mut body = Vec::new();
    let mut count = 0u16;
    for cpu in 0..vcpus {
        let flags = if cpu == 0 {
            CPU_ENABLED | CPU_BOOTSTRAP
        } else {
            CPU_ENABLED
        };
        push(
            &mut body,
            &MpProcessor {
                kind: ENTRY_PROCESSOR,
                lapic_id: cpu,
                lapic_version: LAPIC_VERSION,
                flags,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                reserved: [0; 2],
            },
        );
        count += 1;
    }
    push(
        &mut body,
        &MpBus {
            kind: ENTRY_BUS,
            bus_id: 0,
            bus_type: *b"ISA   ",
        },
    );
    let ioapic_id = vcpus;
    push(
        &mut body,
        &MpIoApic {
            kind: ENTRY_IOAPIC,
            id: ioapic_id,
            version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            addr: layout::IOAPIC_START as u32,
        },
    );
    count += 2;
    for irq in 0..ISA_IRQS {
        // The PIT's IRQ0 is wired to pin 2 (the usual override); ISA IRQ2 is the PIC cascade
        // and never fires, so it gets no entry and pin 2 is not claimed twice.
        let pin = match irq {
            0 => 2,
            2 => continue,
            _ => irq,
        };
        push(
            &mut body,
            &MpInterrupt {
                kind: ENTRY_IO_INTERRUPT,
                int_type: INT_TYPE_INT,
                flags: 0,
                source_bus: 0,
                source_irq: irq,
                dest_apic: ioapic_id,
                dest_pin: pin,
            },
        );
        count += 1;
    }
    for (lint, int_type) in [(0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        push(
            &mut body,
            &MpInterrupt {
                kind: ENTRY_LOCAL_INTERRUPT,
                int_type,
                flags: 0,
                source_bus: 0,
                source_irq: 0,
                dest_apic: ALL_LOCAL_APICS,
                dest_pin: lint,
            },
        );
        count += 1;
    }
    (body, count)
}

/// The floating pointer followed by the configuration table, for placement at `start`.
fn build(vcpus: u8, start: u64) -> Vec<u8> {
    let (body, entry_count) = entries(vcpus);
    let config_addr = start + size_of::<MpFloatingPointer>() as u64;
    let mut fp = MpFloatingPointer {
        signature: *b"_MP_",
        config_table: config_addr as u32,
        length: 1,
        spec_rev: SPEC_REV,
        ..Default::default()
    };
    fp.checksum = checksum(fp.as_slice());

    let header = MpConfigHeader {
        signature: *b"PCMP",
        base_length: (size_of::<MpConfigHeader>() + body.len()) as u16,
        spec_rev: SPEC_REV,
        oem_id: *b"RUSTVMM ",
        product_id: *b"VMM MPTABLE ",
        entry_count,
        lapic_addr: layout::LAPIC_START as u32,
        ..Default::default()
    };
    let mut config = Vec::new();
    push(&mut config, &header);
    config.extend_from_slice(&body);
    // The checksum covers the header and all entries.
    config[offset_of!(MpConfigHeader, checksum)] = checksum(&config);

    let mut table = Vec::new();
    push(&mut table, &fp);
    table.extend_from_slice(&config);
    table
}

/// Writes the MP table for `vcpus` CPUs (APIC ids 0..vcpus, the IOAPIC gets id `vcpus`).
pub(super) fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let table = build(vcpus, MPTABLE_START);
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|source| BootError::WriteGuest {
            what: "MP table",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::super::test_images::guest_memory;
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn read_table(mem: &GuestMemoryMmap) -> (MpFloatingPointer, MpConfigHeader, Vec<u8>) {
        let fp: MpFloatingPointer = mem.read_obj(GuestAddress(MPTABLE_START)).unwrap();
        let header: MpConfigHeader = mem
            .read_obj(GuestAddress(u64::from(fp.config_table)))
            .unwrap();
        let mut whole = vec![0u8; usize::from(header.base_length)];
        mem.read_slice(&mut whole, GuestAddress(u64::from(fp.config_table)))
            .unwrap();
        (fp, header, whole)
    }

    fn entries_of_kind(whole: &[u8], kind: u8) -> Vec<Vec<u8>> {
        let mut found = Vec::new();
        let mut offset = size_of::<MpConfigHeader>();
        while offset < whole.len() {
            let len = if whole[offset] == ENTRY_PROCESSOR {
                20
            } else {
                8
            };
            if whole[offset] == kind {
                found.push(whole[offset..offset + len].to_vec());
            }
            offset += len;
        }
        found
    }

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(
            [
                size_of::<MpFloatingPointer>(),
                size_of::<MpConfigHeader>(),
                size_of::<MpProcessor>(),
                size_of::<MpBus>(),
                size_of::<MpIoApic>(),
                size_of::<MpInterrupt>(),
            ],
            [16, 44, 20, 8, 8, 8]
        );
    }

    #[test]
    fn checksums_are_valid() {
        let mem = guest_memory(64 << 20);

        write(&mem, 4).unwrap();

        let (fp, _, whole) = read_table(&mem);
        assert_eq!(&{ fp.signature }, b"_MP_");
        assert_eq!(sum(fp.as_slice()), 0);
        assert_eq!(&whole[..4], b"PCMP");
        assert_eq!(sum(&whole), 0);
    }

    #[test]
    fn one_processor_entry_per_vcpu_with_bsp_first() {
        let mem = guest_memory(64 << 20);

        write(&mem, 3).unwrap();

        let (_, header, whole) = read_table(&mem);
        let cpus = entries_of_kind(&whole, ENTRY_PROCESSOR);
        let ids_and_flags: Vec<(u8, u8)> = cpus.iter().map(|e| (e[1], e[3])).collect();
        assert_eq!(ids_and_flags, vec![(0, 3), (1, 1), (2, 1)]);
        // 3 CPUs, bus, IOAPIC, 15 I/O interrupts, 2 local interrupts.
        assert_eq!({ header.entry_count }, 3 + 1 + 1 + 15 + 2);
        assert_eq!({ header.lapic_addr }, 0xfee0_0000);
    }

    #[test]
    fn ioapic_entry_follows_the_cpu_ids() {
        let mem = guest_memory(64 << 20);

        write(&mem, 2).unwrap();

        let (_, _, whole) = read_table(&mem);
        let ioapics = entries_of_kind(&whole, ENTRY_IOAPIC);
        assert_eq!(
            ioapics,
            vec![vec![
                ENTRY_IOAPIC,
                2,
                IOAPIC_VERSION,
                1,
                0x00,
                0x00,
                0xc0,
                0xfe
            ]]
        );
    }

    #[test]
    fn irq0_goes_to_pin2_and_others_are_identity() {
        let mem = guest_memory(64 << 20);

        write(&mem, 1).unwrap();

        let (_, _, whole) = read_table(&mem);
        let routes: Vec<(u8, u8)> = entries_of_kind(&whole, ENTRY_IO_INTERRUPT)
            .iter()
            .map(|e| (e[5], e[7]))
            .collect();
        let mut expected = vec![(0, 2)];
        expected.extend((1..16).filter(|irq| *irq != 2).map(|irq| (irq, irq)));
        assert_eq!(routes, expected);
    }

    #[test]
    fn local_interrupts_are_extint_and_nmi() {
        let mem = guest_memory(64 << 20);

        write(&mem, 1).unwrap();

        let (_, _, whole) = read_table(&mem);
        let lints: Vec<(u8, u8)> = entries_of_kind(&whole, ENTRY_LOCAL_INTERRUPT)
            .iter()
            .map(|e| (e[1], e[7]))
            .collect();
        assert_eq!(lints, vec![(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)]);
    }

    #[test]
    fn largest_table_fits_in_the_reserved_legacy_area() {
        let table = build(u8::MAX, MPTABLE_START);

        assert!(MPTABLE_START + table.len() as u64 <= layout::HIGH_MEMORY_START);
    }
}
