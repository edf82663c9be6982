//! The PVH boot path: an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note.

use std::fs::File;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX_SIZE};
use super::{BootConfig, BootEntry, BootError, e820, initramfs, write_cmdline};
use crate::layout;

/// `hvm_start_info.magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Version 1 adds the memory map fields.
const HVM_START_VERSION: u32 = 1;
/// `hvm_start_info` (56 bytes).
const START_INFO_ADDR: u64 = BOOT_INFO_ADDR;
/// The module list (one entry for the initramfs).
const MODLIST_ADDR: u64 = BOOT_INFO_ADDR + 0x40;
/// The memory map, after the module list.
const MEMMAP_ADDR: u64 = BOOT_INFO_ADDR + 0x80;
/// Alignment of the first address after the kernel where the initramfs may go.
const PAGE_SIZE: u64 = 0x1000;

/// Loads an ELF kernel that must carry a PVH note and writes `hvm_start_info` (with the ACPI
/// RSDP at `rsdp`).
pub(super) fn load(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    config: &BootConfig,
    low_end: u64,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let path = config.kernel;
    let loaded = Elf::load(
        mem,
        None,
        kernel,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(|source| BootError::LoadElf {
        path: path.to_path_buf(),
        reason: super::loader_reason(&source),
    })?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(BootError::NoPvhNote {
            path: path.to_path_buf(),
        });
    };
    if loaded.kernel_end > low_end {
        return Err(BootError::KernelOutsideLowRam {
            start: entry.0,
            end: loaded.kernel_end,
            low_end,
        });
    }

    write_cmdline(mem, config.cmdline, CMDLINE_MAX_SIZE)?;

    let mut start_info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: HVM_START_VERSION,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        rsdp_paddr: rsdp.0,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820::memory_map(mem)?
        .into_iter()
        .map(|entry| hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
            reserved: 0,
        })
        .collect();
    start_info.memmap_entries = u32::try_from(memmap.len()).unwrap_or(u32::MAX);

    let module = match config.initramfs {
        Some(initramfs_path) => {
            let floor = loaded.kernel_end.next_multiple_of(PAGE_SIZE);
            let initrd = initramfs::load(mem, initramfs_path, floor, low_end)?;
            start_info.nr_modules = 1;
            start_info.modlist_paddr = MODLIST_ADDR;
            Some(hvm_modlist_entry {
                paddr: initrd.addr,
                size: initrd.size,
                ..Default::default()
            })
        }
        None => None,
    };

    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Configure)?;

    Ok(BootEntry::Pvh {
        entry,
        start_info: GuestAddress(START_INFO_ADDR),
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use vm_memory::Bytes;

    use super::super::test_images::{PVH_ENTRY, guest_memory, pvh_elf, temp_file};
    use super::*;

    /// An RSDP address `hvm_start_info` must carry.
    const TEST_RSDP: GuestAddress = GuestAddress(0xe_0000);

    fn boot(mem: &GuestMemoryMmap, initramfs: Option<&std::path::Path>) -> BootEntry {
        let kernel = temp_file(&pvh_elf(&[0xf4]));
        let config = BootConfig {
            kernel: kernel.as_path(),
            initramfs,
            cmdline: "console=ttyS0 reboot=k",
            vcpus: 1,
        };
        let mut file = File::open(kernel.as_path()).unwrap();
        let low_end = e820::low_ram_end(mem).unwrap();
        load(mem, &mut file, &config, low_end, TEST_RSDP).unwrap()
    }

    fn memmap(mem: &GuestMemoryMmap, info: &hvm_start_info) -> Vec<(u64, u64, u32)> {
        (0..u64::from(info.memmap_entries))
            .map(|i| {
                let entry: hvm_memmap_table_entry = mem
                    .read_obj(GuestAddress(info.memmap_paddr + i * 24))
                    .unwrap();
                (entry.addr, entry.size, entry.type_)
            })
            .collect()
    }

    #[test]
    fn start_info_describes_a_64_mib_guest() {
        let mem = guest_memory(64 << 20);

        let entry = boot(&mem, None);

        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: GuestAddress(PVH_ENTRY),
                start_info: GuestAddress(START_INFO_ADDR)
            }
        );
        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 0);
        assert_eq!(info.rsdp_paddr, TEST_RSDP.0);
        assert_eq!(
            memmap(&mem, &info),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x100000, (64 << 20) - 0x100000, 1)
            ]
        );
    }

    #[test]
    fn start_info_splits_a_16_gib_guest_around_the_hole() {
        let mem = guest_memory(16 << 30);

        boot(&mem, None);

        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(
            memmap(&mem, &info),
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x100000, 0xc000_0000 - 0x100000, 1),
                (0x1_0000_0000, (16 << 30) - 0xc000_0000, 1),
            ]
        );
    }

    #[test]
    fn command_line_is_nul_terminated_at_its_address() {
        let mem = guest_memory(64 << 20);

        boot(&mem, None);

        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(info.cmdline_paddr))
            .unwrap();
        let cmdline = CStr::from_bytes_until_nul(&buf).unwrap();
        assert_eq!(cmdline.to_str().unwrap(), "console=ttyS0 reboot=k");
    }

    #[test]
    fn initramfs_is_module_zero() {
        let mem = guest_memory(64 << 20);
        let initrd = temp_file(b"070701-initramfs");

        boot(&mem, Some(initrd.as_path()));

        let info: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 16);
        assert_eq!(module.paddr, (64 << 20) - 0x1000);
        let mut data = [0u8; 16];
        mem.read_slice(&mut data, GuestAddress(module.paddr))
            .unwrap();
        assert_eq!(&data, b"070701-initramfs");
    }
}
