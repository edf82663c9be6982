//! ACPI tables for the guest, written into guest RAM at boot.
//!
//! The tables describe what the MP table describes (CPUs, the IOAPIC, ISA IRQ 0 on pin 2) plus
//! the PCI host bridge and its hot-plug slots, so that a Linux guest with ACPI uses acpiphp
//! for bus 0. The platform is hardware-reduced ACPI: no PM blocks, no SCI, no reset register
//! (the guest falls back to the i8042 reset, which the VMM handles); hot-plug events arrive
//! through the Generic Event Device in the DSDT.
//!
//! Layout, from `layout::ACPI_TABLES_START` (inside the reserved legacy BIOS area, where a
//! guest scanning for the RSDP looks), each table 16-byte aligned:
//!
//! ```text
//! RSDP (revision 2) -> XSDT -> FADT (X_DSDT -> DSDT), MADT
//! ```

mod dsdt;

use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout;

/// OEM id in every table header.
const OEM_ID: [u8; 6] = *b"RUSTVM";
/// OEM table id in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"RUSTVMM ";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Length of the common system description table header.
const SDT_HEADER_LEN: u32 = 36;
/// Alignment of each table.
const TABLE_ALIGN: u64 = 16;
/// Tables the XSDT lists: the FADT and the MADT.
const XSDT_ENTRIES: usize = 2;

/// MADT revision of ACPI 6.5.
const MADT_REVISION: u8 = 5;
/// MADT flag: the platform also has dual 8259 PICs (KVM's irqchip has them, and the MP table
/// routes the PIC through LINT0).
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// MADT structure types and lengths.
const MADT_LOCAL_APIC: [u8; 2] = [0, 8];
const MADT_IO_APIC: [u8; 2] = [1, 12];
const MADT_INTERRUPT_OVERRIDE: [u8; 2] = [2, 10];
const MADT_LOCAL_APIC_NMI: [u8; 2] = [4, 6];
/// Local APIC flag: the CPU is enabled.
const LOCAL_APIC_ENABLED: u32 = 1 << 0;
/// Processor UID meaning "all processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;
/// The LAPIC input the NMI is wired to (as in the MP table).
const NMI_LINT: u8 = 1;
/// ISA IRQ 0 (the PIT) is wired to IOAPIC pin 2 (as in the MP table).
const PIT_ISA_IRQ: u8 = 0;
const PIT_GSI: u32 = 2;
/// MPS INTI flags "conforms to the bus" (the MP table's entries use 0 too).
const INTI_CONFORMING: u16 = 0;

/// FADT IA-PC boot architecture flag: an 8042 keyboard controller is present (the VMM's
/// i8042, which also performs the reset).
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

/// Errors from writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables of {size} bytes do not fit in {capacity} bytes")]
    TooLarge {
        /// Size of the tables.
        size: u64,
        /// Size of the ACPI area.
        capacity: u64,
    },
    /// Writing the tables into guest memory failed.
    #[error("Cannot write the ACPI tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// AML or table bytes already encoded.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encodes `aml` into bytes.
fn encode(aml: &dyn Aml) -> Encoded {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    Encoded(bytes)
}

/// Writes the RSDP, XSDT, FADT, MADT and DSDT for `vcpus` CPUs at `layout::ACPI_TABLES_START`
/// and returns the RSDP's address (for `boot_params.acpi_rsdp_addr` or
/// `hvm_start_info.rsdp_paddr`).
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<GuestAddress, AcpiError> {
    let start = layout::ACPI_TABLES_START;
    let image = build(vcpus, start);
    let size = image.len() as u64;
    let capacity = layout::ACPI_TABLES_END - start;
    if size > capacity {
        return Err(AcpiError::TooLarge { size, capacity });
    }
    mem.write_slice(&image, GuestAddress(start))
        .map_err(AcpiError::Write)?;
    Ok(GuestAddress(start))
}

/// The tables as one image to be placed at `start` (16-byte aligned), RSDP first.
fn build(vcpus: u8, start: u64) -> Vec<u8> {
    let madt = madt(vcpus);
    let dsdt = dsdt::dsdt();
    let xsdt_len = SDT_HEADER_LEN as usize + XSDT_ENTRIES * size_of::<u64>();

    let mut end = start + Rsdp::len() as u64;
    let mut place = |len: usize| {
        let addr = end.next_multiple_of(TABLE_ALIGN);
        end = addr + len as u64;
        addr
    };
    let xsdt_addr = place(xsdt_len);
    let fadt_addr = place(FADT::len());
    let madt_addr = place(madt.len());
    let dsdt_addr = place(dsdt.len());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let mut image = vec![0u8; usize::try_from(end - start).unwrap_or(usize::MAX)];
    for (addr, bytes) in [
        (start, encode(&rsdp).0),
        (xsdt_addr, encode(&xsdt).0),
        (fadt_addr, fadt(dsdt_addr)),
        (madt_addr, madt.as_slice().to_vec()),
        (dsdt_addr, dsdt.as_slice().to_vec()),
    ] {
        let offset = usize::try_from(addr - start).unwrap_or(usize::MAX);
        if let Some(slot) = image.get_mut(offset..offset + bytes.len()) {
            slot.copy_from_slice(&bytes);
        }
    }
    image
}

/// The FADT: hardware-reduced ACPI, the DSDT at `dsdt_addr`, an i8042 present.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    encode(&fadt.finalize()).0
}

/// The MADT, mirroring the MP table: one enabled local APIC per vCPU (ACPI id = APIC id =
/// index), the IOAPIC with id `vcpus`, ISA IRQ 0 on GSI 2 and the NMI on every LAPIC's LINT1.
fn madt(vcpus: u8) -> Sdt {
    let mut madt = Sdt::new(
        *b"APIC",
        SDT_HEADER_LEN + 8,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, layout::LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..vcpus {
        let mut entry = MADT_LOCAL_APIC.to_vec();
        entry.extend([cpu, cpu]);
        entry.extend(LOCAL_APIC_ENABLED.to_le_bytes());
        madt.append_slice(&entry);
    }
    let ioapic_id = vcpus;
    let mut entry = MADT_IO_APIC.to_vec();
    entry.extend([ioapic_id, 0]);
    entry.extend((layout::IOAPIC_START as u32).to_le_bytes());
    entry.extend(0u32.to_le_bytes());
    madt.append_slice(&entry);

    let mut entry = MADT_INTERRUPT_OVERRIDE.to_vec();
    entry.extend([0, PIT_ISA_IRQ]);
    entry.extend(PIT_GSI.to_le_bytes());
    entry.extend(INTI_CONFORMING.to_le_bytes());
    madt.append_slice(&entry);

    let mut entry = MADT_LOCAL_APIC_NMI.to_vec();
    entry.push(ALL_PROCESSORS);
    entry.extend(INTI_CONFORMING.to_le_bytes());
    entry.push(NMI_LINT);
    madt.append_slice(&entry);
    madt
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Guest RAM covering the legacy BIOS area.
    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |sum, byte| sum.wrapping_add(*byte))
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// The tables a guest finds from the RSDP, read from guest memory.
    struct Found {
        rsdp: Vec<u8>,
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let mut header = [0u8; SDT_HEADER_LEN as usize];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let mut table = vec![0u8; u32_at(&header, 4) as usize];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        table
    }

    /// Scans 0xE0000..0xFFFFF on 16-byte boundaries for a valid RSDP, as a guest does.
    fn scan_for_rsdp(mem: &GuestMemoryMmap) -> Option<u64> {
        (0xe_0000..0x10_0000).step_by(16).find(|addr| {
            let mut rsdp = [0u8; 36];
            mem.read_slice(&mut rsdp, GuestAddress(*addr)).unwrap();
            &rsdp[..8] == b"RSD PTR " && sum(&rsdp[..20]) == 0
        })
    }

    fn find_tables(vcpus: u8) -> Found {
        let mem = guest_memory();
        let rsdp_addr = write_tables(&mem, vcpus).unwrap();
        assert_eq!(scan_for_rsdp(&mem), Some(rsdp_addr.0));
        let mut rsdp = vec![0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        let xsdt = read_table(&mem, u64_at(&rsdp, 24));
        let entries: Vec<u64> = (SDT_HEADER_LEN as usize..xsdt.len())
            .step_by(8)
            .map(|offset| u64_at(&xsdt, offset))
            .collect();
        assert_eq!(entries.len(), 2, "the XSDT lists the FADT and the MADT");
        let fadt = read_table(&mem, entries[0]);
        let madt = read_table(&mem, entries[1]);
        let dsdt = read_table(&mem, u64_at(&fadt, 140));
        Found {
            rsdp,
            xsdt,
            fadt,
            madt,
            dsdt,
        }
    }

    /// MADT structures as (type, bytes).
    fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut structures = Vec::new();
        let mut offset = 44;
        while offset < madt.len() {
            let len = usize::from(madt[offset + 1]);
            structures.push((madt[offset], madt[offset..offset + len].to_vec()));
            offset += len;
        }
        structures
    }

    /// A directory of its own under the system temp dir, removed on drop.
    pub(super) struct TempDir(pub(super) PathBuf);

    impl TempDir {
        pub(super) fn new(name: &str) -> Self {
            // Tests run in parallel threads of one process: a counter keeps their dirs apart.
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let index = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("vmm-acpi-{}-{index}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `iasl -d` on `table` and returns the disassembly.
    pub(super) fn disassemble(name: &str, table: &[u8]) -> String {
        let dir = TempDir::new(name);
        let input = dir.0.join(format!("{name}.dat"));
        std::fs::write(&input, table).unwrap();
        let output = Command::new("iasl")
            .arg("-d")
            .arg(&input)
            .current_dir(&dir.0)
            .output()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot run iasl ({error}): install acpica-tools (apt-get install acpica-tools)"
                )
            });
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "iasl -d {name} failed:\n{log}");
        std::fs::read_to_string(dir.0.join(format!("{name}.dsl"))).unwrap()
    }

    #[test]
    fn every_table_checksums_to_zero() {
        let found = find_tables(4);

        assert_eq!(sum(&found.rsdp[..20]), 0, "RSDP (ACPI 1.0 part)");
        assert_eq!(sum(&found.rsdp), 0, "RSDP (extended)");
        for (name, table) in [
            ("XSDT", &found.xsdt),
            ("FACP", &found.fadt),
            ("APIC", &found.madt),
            ("DSDT", &found.dsdt),
        ] {
            assert_eq!(&table[..4], name.as_bytes());
            assert_eq!(sum(table), 0, "{name} checksum");
        }
    }

    #[test]
    fn rsdp_is_revision_2_at_the_start_of_the_area_and_points_at_the_xsdt() {
        let mem = guest_memory();

        let rsdp_addr = write_tables(&mem, 1).unwrap();

        assert_eq!(rsdp_addr, GuestAddress(layout::ACPI_TABLES_START));
        let found = find_tables(1);
        assert_eq!(found.rsdp[15], 2, "revision");
        assert_eq!(u32_at(&found.rsdp, 20), 36, "length");
        assert_eq!(&found.xsdt[..4], b"XSDT");
        assert_eq!(&found.fadt[..4], b"FACP");
        assert_eq!(&found.madt[..4], b"APIC");
    }

    #[test]
    fn fadt_is_hardware_reduced_without_reset_register_and_with_i8042() {
        let found = find_tables(1);

        let flags = u32_at(&found.fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(&found.fadt[116..128], &[0; 12], "RESET_REG");
        assert_eq!(
            u16::from_le_bytes([found.fadt[109], found.fadt[110]]),
            1 << 1
        );
        assert_eq!(u32_at(&found.fadt, 40), 0, "no 32-bit DSDT pointer");
    }

    #[test]
    fn madt_has_one_enabled_local_apic_per_vcpu() {
        let found = find_tables(3);

        assert_eq!(u32_at(&found.madt, 36), 0xfee0_0000);
        let lapics: Vec<Vec<u8>> = madt_structures(&found.madt)
            .into_iter()
            .filter(|(kind, _)| *kind == 0)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(
            lapics,
            vec![
                vec![0, 8, 0, 0, 1, 0, 0, 0],
                vec![0, 8, 1, 1, 1, 0, 0, 0],
                vec![0, 8, 2, 2, 1, 0, 0, 0],
            ]
        );
    }

    #[test]
    fn madt_mirrors_the_mp_table_ioapic_irq0_override_and_nmi() {
        let found = find_tables(2);

        let others: Vec<(u8, Vec<u8>)> = madt_structures(&found.madt)
            .into_iter()
            .filter(|(kind, _)| *kind != 0)
            .collect();
        assert_eq!(
            others,
            vec![
                (1, vec![1, 12, 2, 0, 0x00, 0x00, 0xc0, 0xfe, 0, 0, 0, 0]),
                (2, vec![2, 10, 0, 0, 2, 0, 0, 0, 0, 0]),
                (4, vec![4, 6, 0xff, 0, 0, 1]),
            ]
        );
    }

    #[test]
    fn tables_for_255_vcpus_fit_in_the_area() {
        let mem = guest_memory();

        let written = write_tables(&mem, u8::MAX);

        assert!(matches!(
            written,
            Ok(GuestAddress(layout::ACPI_TABLES_START))
        ));
    }

    #[test]
    fn memory_without_the_legacy_area_is_a_write_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();

        let err = write_tables(&mem, 1).unwrap_err();

        assert!(matches!(err, AcpiError::Write(_)), "{err}");
    }

    #[test]
    fn xsdt_fadt_and_madt_disassemble_with_iasl() {
        // (iasl cannot disassemble a lone RSDP; the tests above check it field by field.)
        let found = find_tables(2);

        let xsdt = disassemble("xsdt", &found.xsdt);
        let fadt = disassemble("facp", &found.fadt);
        let madt = disassemble("apic", &found.madt);

        assert!(xsdt.contains("XSDT"), "{xsdt}");
        assert!(fadt.contains("Hardware Reduced (V5) : 1"), "{fadt}");
        assert_eq!(madt.matches("Processor Local APIC").count(), 2, "{madt}");
        assert!(madt.contains("Interrupt Source Override"), "{madt}");
    }
}
