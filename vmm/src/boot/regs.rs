//! Boot vCPU state: the GDT and identity page tables in guest memory, and the registers for
//! the PVH (32-bit protected mode) and Linux 64-bit (long mode) entries.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use super::{BootEntry, BootError, GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, write_bytes};

/// Selector of the flat code segment (the Linux boot protocol's `__BOOT_CS`).
const CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS`).
const DATA_SELECTOR: u16 = 0x18;
/// Selector of the TSS; KVM needs a usable TR even though the guest never switches tasks.
const TSS_SELECTOR: u16 = 0x20;
/// GDT: null, unused, code, data, TSS (16 bytes in long mode).
const GDT_ENTRIES: usize = 6;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
/// x87 control word after FNINIT.
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked.
const MXCSR_DEFAULT: u32 = 0x1f80;

/// Page table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
/// Page directories, each mapping 1 GiB with 2 MiB pages.
const PAGE_DIRECTORIES: u64 = 4;
const ENTRIES_PER_TABLE: u64 = 512;
const TABLE_SIZE: u64 = 0x1000;
const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Segment descriptor types.
const TYPE_CODE_EXEC_READ_ACCESSED: u8 = 0xb;
const TYPE_DATA_READ_WRITE_ACCESSED: u8 = 0x3;
const TYPE_TSS_BUSY: u8 = 0xb;

/// Whether the entry runs 64-bit code.
fn is_long_mode(entry: &BootEntry) -> bool {
    matches!(entry, BootEntry::Linux64 { .. })
}

/// Flat 4 GiB code segment: 64-bit for the Linux entry, 32-bit for PVH.
fn code_segment(long_mode: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: TYPE_CODE_EXEC_READ_ACCESSED,
        present: 1,
        s: 1,
        db: u8::from(!long_mode),
        l: u8::from(long_mode),
        g: 1,
        ..Default::default()
    }
}

/// Flat 4 GiB read/write data segment.
fn data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: DATA_SELECTOR,
        type_: TYPE_DATA_READ_WRITE_ACCESSED,
        present: 1,
        s: 1,
        db: 1,
        g: 1,
        ..Default::default()
    }
}

/// A minimal busy TSS.
fn tss_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: TYPE_TSS_BUSY,
        present: 1,
        ..Default::default()
    }
}

/// Encodes a segment as an 8-byte GDT descriptor.
fn descriptor(segment: &kvm_segment) -> u64 {
    let base = segment.base & 0xffff_ffff;
    // With 4 KiB granularity the descriptor holds the limit in pages.
    let limit = if segment.g != 0 {
        u64::from(segment.limit) >> 12
    } else {
        u64::from(segment.limit)
    };
    let access = u64::from(segment.type_ & 0xf)
        | u64::from(segment.s & 1) << 4
        | u64::from(segment.dpl & 3) << 5
        | u64::from(segment.present & 1) << 7;
    let flags = u64::from(segment.avl & 1)
        | u64::from(segment.l & 1) << 1
        | u64::from(segment.db & 1) << 2
        | u64::from(segment.g & 1) << 3;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | (base >> 24) << 56
}

/// Writes the GDT whose selectors `configure_boot_vcpu` loads.
pub(super) fn write_gdt(mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), BootError> {
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[usize::from(CODE_SELECTOR / 8)] = descriptor(&code_segment(is_long_mode(entry)));
    gdt[usize::from(DATA_SELECTOR / 8)] = descriptor(&data_segment());
    // The TSS descriptor's upper half (base bits 63..32) stays zero.
    gdt[usize::from(TSS_SELECTOR / 8)] = descriptor(&tss_segment());
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write_bytes(mem, &bytes, GDT_ADDR, "GDT")
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages.
pub(super) fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let table_bits = PTE_PRESENT | PTE_WRITABLE;
    let pml4 = [PDPT_ADDR | table_bits];
    let pdpt: Vec<u64> = (0..PAGE_DIRECTORIES)
        .map(|i| (PD_ADDR + i * TABLE_SIZE) | table_bits)
        .collect();
    let directories: Vec<u64> = (0..PAGE_DIRECTORIES * ENTRIES_PER_TABLE)
        .map(|i| (i * HUGE_PAGE_SIZE) | table_bits | PTE_HUGE)
        .collect();
    let as_bytes =
        |entries: &[u64]| -> Vec<u8> { entries.iter().flat_map(|e| e.to_le_bytes()).collect() };
    write_bytes(mem, &as_bytes(&pml4), PML4_ADDR, "PML4")?;
    write_bytes(
        mem,
        &as_bytes(&pdpt),
        PDPT_ADDR,
        "page directory pointer table",
    )?;
    write_bytes(mem, &as_bytes(&directories), PD_ADDR, "page directories")
}

/// Sets the boot vCPU's registers for `entry`. `load_kernel` must have written the GDT (and,
/// for Linux, the page tables) into guest memory.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), BootError> {
    let set_error = |what| move |source| BootError::SetRegisters { what, source };
    let fpu = kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(set_error("FPU state"))?;

    let mut sregs = vcpu.get_sregs().map_err(set_error("special registers"))?;
    set_segments(&mut sregs, is_long_mode(entry));
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match *entry {
        BootEntry::Pvh { entry, start_info } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = start_info.0;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            regs.rip = entry.0;
            regs.rsi = boot_params.0;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(set_error("special registers"))?;
    vcpu.set_regs(&regs).map_err(set_error("general registers"))
}

/// Loads the flat segments and the GDT; the IDT is left empty (interrupts are off at entry).
fn set_segments(sregs: &mut kvm_sregs, long_mode: bool) {
    let data = data_segment();
    sregs.cs = code_segment(long_mode);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss_segment();
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
}

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::{Kvm, VcpuExit};
    use vm_memory::{Bytes, GuestAddress};

    use super::super::sys::TestVm;
    use super::super::test_images::{
        BzImageSpec, guest_memory, pvh_elf, synthetic_bzimage, temp_file,
    };
    use super::super::{BootConfig, load_kernel};
    use super::*;

    /// `mov eax, ebx; out 0x80, eax; hlt` (32-bit).
    const REPORT_EBX: [u8; 5] = [0x89, 0xd8, 0xe7, 0x80, 0xf4];
    /// `mov eax, esi; out 0x80, eax; hlt` (64-bit).
    const REPORT_ESI: [u8; 5] = [0x89, 0xf0, 0xe7, 0x80, 0xf4];

    #[test]
    fn flat_code_descriptors_encode_as_usual() {
        assert_eq!(descriptor(&code_segment(false)), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(&code_segment(true)), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(&data_segment()), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = guest_memory(64 << 20);

        write_page_tables(&mem).unwrap();

        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 4 * TABLE_SIZE - 8))
            .unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        assert_eq!(pdpt3, (PD_ADDR + 3 * TABLE_SIZE) | 3);
        assert_eq!(last, ((4 << 30) - HUGE_PAGE_SIZE) | 0x83);
    }

    #[test]
    fn gdt_code_selector_matches_the_entry_mode() {
        let mem = guest_memory(64 << 20);
        let entry = BootEntry::Linux64 {
            entry: GuestAddress(0x10_0200),
            boot_params: GuestAddress(0x7000),
        };

        write_gdt(&mem, &entry).unwrap();

        let code: u64 = mem
            .read_obj(GuestAddress(GDT_ADDR + u64::from(CODE_SELECTOR)))
            .unwrap();
        assert_eq!(code, descriptor(&code_segment(true)));
    }

    /// Loads `kernel`, runs vCPU 0 on KVM and returns the first port write (port, value).
    fn run_to_first_port_write(kernel: &[u8]) -> (BootEntry, u16, u32) {
        let kvm = Kvm::new().unwrap_or_else(|err| {
            panic!("this test needs KVM: cannot open /dev/kvm ({err}); load kvm_intel or kvm_amd and grant access")
        });
        let mem = guest_memory(64 << 20);
        let file = temp_file(kernel);
        let config = BootConfig {
            kernel: file.as_path(),
            initramfs: None,
            cmdline: "",
            vcpus: 1,
        };
        let entry = load_kernel(&mem, &config).unwrap();
        let mut vm = TestVm::new(&kvm, mem).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vm.vcpu().set_cpuid2(&cpuid).unwrap();
        configure_boot_vcpu(vm.vcpu(), &entry).unwrap();

        match vm.vcpu().run().unwrap() {
            VcpuExit::IoOut(port, data) => {
                let value = u32::from_le_bytes(data.try_into().expect("4-byte port write"));
                (entry, port, value)
            }
            other => panic!("expected a port write, got {other:?}"),
        }
    }

    #[test]
    fn pvh_guest_sees_start_info_in_ebx() {
        let (entry, port, value) = run_to_first_port_write(&pvh_elf(&REPORT_EBX));

        let BootEntry::Pvh { start_info, .. } = entry else {
            panic!("expected PVH, got {entry:?}")
        };
        assert_eq!(port, 0x80);
        assert_eq!(u64::from(value), start_info.0);
    }

    #[test]
    fn linux64_guest_sees_boot_params_in_rsi() {
        let spec = BzImageSpec {
            code64: REPORT_ESI.to_vec(),
            ..Default::default()
        };

        let (entry, port, value) = run_to_first_port_write(&synthetic_bzimage(&spec));

        let BootEntry::Linux64 { boot_params, .. } = entry else {
            panic!("expected Linux64, got {entry:?}")
        };
        assert_eq!(port, 0x80);
        assert_eq!(u64::from(value), boot_params.0);
    }
}
