//! The Linux 64-bit boot protocol for bzImage kernels.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::{BOOT_INFO_ADDR, CMDLINE_ADDR, CMDLINE_MAX_SIZE};
use super::{BootConfig, BootEntry, BootError, e820, initramfs, write_cmdline};
use crate::layout;

/// Offset of the setup header in the image (and in the zero page).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Boot protocol 2.12 introduced XLF_KERNEL_64 and the 64-bit entry we use.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// xloadflags bit: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry from the protected-mode load address.
const ENTRY_64_OFFSET: u64 = 0x200;
/// type_of_loader for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Where the zero page goes.
const ZERO_PAGE_ADDR: u64 = BOOT_INFO_ADDR;
/// Alignment of the initramfs floor above the kernel.
const PAGE_SIZE: u64 = 0x1000;

/// Loads a bzImage, fills the zero page (with the ACPI RSDP at `rsdp`) and returns the 64-bit
/// entry.
pub(super) fn load(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    config: &BootConfig,
    low_end: u64,
    rsdp: GuestAddress,
) -> Result<BootEntry, BootError> {
    let path = config.kernel;
    let read_error = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let header = read_setup_header(kernel).map_err(read_error)?;
    check_protocol(&header)?;

    let load_addr = load_address(&header);
    let image_len = kernel.metadata().map_err(read_error)?.len();
    // The decompressor works in place from the load address up to init_size.
    let footprint = u64::from(header.init_size).max(image_len);
    let kernel_end = load_addr.saturating_add(footprint);
    if kernel_end > low_end {
        return Err(BootError::KernelOutsideLowRam {
            start: load_addr,
            end: kernel_end,
            low_end,
        });
    }
    let loaded = BzImage::load(
        mem,
        Some(GuestAddress(load_addr)),
        kernel,
        Some(GuestAddress(layout::HIGH_MEMORY_START)),
    )
    .map_err(|source| BootError::LoadBzImage {
        path: path.to_path_buf(),
        reason: super::loader_reason(&source),
    })?;

    let mut params = boot_params {
        hdr: loaded.setup_header.unwrap_or(header),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.acpi_rsdp_addr = rsdp.0;

    let cmdline_capacity = usize::try_from(header.cmdline_size)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .min(CMDLINE_MAX_SIZE);
    write_cmdline(mem, config.cmdline, cmdline_capacity)?;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;

    if let Some(initramfs_path) = config.initramfs {
        let limit = (u64::from(header.initrd_addr_max) + 1).min(low_end);
        let floor = kernel_end.next_multiple_of(PAGE_SIZE);
        let initrd = initramfs::load(mem, initramfs_path, floor, limit)?;
        // Both fit in 32 bits: the initramfs lies below low_end, which is at most 4 GiB.
        params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
    }

    let map = e820::memory_map(mem)?;
    let mut count = 0u8;
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
        count += 1;
    }
    params.e820_entries = count;

    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(BootError::Configure)?;

    Ok(BootEntry::Linux64 {
        entry: GuestAddress(load_addr + ENTRY_64_OFFSET),
        boot_params: GuestAddress(ZERO_PAGE_ADDR),
    })
}

/// Reads the setup header from the image.
fn read_setup_header(kernel: &mut File) -> std::io::Result<setup_header> {
    let mut header = setup_header::default();
    kernel.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))?;
    kernel.read_exact(header.as_mut_slice())?;
    Ok(header)
}

/// Accepts only kernels with the 64-bit entry (protocol 2.12+ and XLF_KERNEL_64).
fn check_protocol(header: &setup_header) -> Result<(), BootError> {
    let version = header.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(BootError::OldBootProtocol { version });
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry);
    }
    Ok(())
}

/// 1 MiB, or the kernel's preferred address if it is relocatable: loading there spares the
/// kernel a relocation.
fn load_address(header: &setup_header) -> u64 {
    let preferred = header.pref_address;
    if header.relocatable_kernel != 0 && preferred >= layout::HIGH_MEMORY_START {
        preferred
    } else {
        layout::HIGH_MEMORY_START
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use vm_memory::Bytes;

    use super::super::test_images::{BzImageSpec, guest_memory, synthetic_bzimage, temp_file};
    use super::*;

    /// An RSDP address the zero page must carry.
    const TEST_RSDP: GuestAddress = GuestAddress(0xe_0000);

    fn boot(
        mem: &GuestMemoryMmap,
        spec: &BzImageSpec,
        initramfs: Option<&std::path::Path>,
    ) -> Result<BootEntry, BootError> {
        let kernel = temp_file(&synthetic_bzimage(spec));
        let config = BootConfig {
            kernel: kernel.as_path(),
            initramfs,
            cmdline: "console=ttyS0 panic=-1",
            vcpus: 1,
        };
        let mut file = File::open(kernel.as_path()).unwrap();
        let low_end = e820::low_ram_end(mem).unwrap();
        load(mem, &mut file, &config, low_end, TEST_RSDP)
    }

    fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap()
    }

    #[test]
    fn non_relocatable_kernel_enters_at_one_mib_plus_0x200() {
        let mem = guest_memory(64 << 20);

        let entry = boot(&mem, &BzImageSpec::default(), None).unwrap();

        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: GuestAddress(0x10_0200),
                boot_params: GuestAddress(ZERO_PAGE_ADDR)
            }
        );
    }

    #[test]
    fn relocatable_kernel_is_loaded_at_its_preferred_address() {
        let mem = guest_memory(64 << 20);
        let spec = BzImageSpec {
            relocatable: true,
            pref_address: 0x100_0000,
            code64: vec![0x90, 0xf4],
            ..Default::default()
        };

        let entry = boot(&mem, &spec, None).unwrap();

        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: GuestAddress(0x100_0200),
                boot_params: GuestAddress(ZERO_PAGE_ADDR)
            }
        );
        let code: [u8; 2] = mem.read_obj(GuestAddress(0x100_0200)).unwrap();
        assert_eq!(code, [0x90, 0xf4]);
    }

    #[test]
    fn zero_page_carries_header_loader_and_cmdline() {
        let mem = guest_memory(64 << 20);

        boot(&mem, &BzImageSpec::default(), None).unwrap();

        let params = zero_page(&mem);
        let hdr = params.hdr;
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.code32_start }, 0x10_0000);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.ramdisk_size }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, TEST_RSDP.0);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(
            CStr::from_bytes_until_nul(&buf).unwrap().to_str().unwrap(),
            "console=ttyS0 panic=-1"
        );
    }

    #[test]
    fn e820_describes_a_64_mib_guest() {
        let mem = guest_memory(64 << 20);

        boot(&mem, &BzImageSpec::default(), None).unwrap();

        let params = zero_page(&mem);
        let table: Vec<(u64, u64, u32)> = params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            table,
            vec![
                (0, 0x9fc00, 1),
                (0x9fc00, 0x60400, 2),
                (0x100000, (64 << 20) - 0x100000, 1)
            ]
        );
    }

    #[test]
    fn e820_describes_high_ram_of_a_16_gib_guest() {
        let mem = guest_memory(16 << 30);

        boot(&mem, &BzImageSpec::default(), None).unwrap();

        let params = zero_page(&mem);
        assert_eq!(params.e820_entries, 4);
        let high = params.e820_table[3];
        assert_eq!(
            ({ high.addr }, { high.size }, { high.r#type }),
            (1 << 32, (16 << 30) - 0xc000_0000, 1)
        );
    }

    #[test]
    fn initramfs_sits_page_aligned_below_initrd_addr_max() {
        let mem = guest_memory(64 << 20);
        let spec = BzImageSpec {
            initrd_addr_max: 0x2ff_ffff,
            ..Default::default()
        };
        let initrd = temp_file(&[0x42; 0x1800]);

        boot(&mem, &spec, Some(initrd.as_path())).unwrap();

        let hdr = zero_page(&mem).hdr;
        assert_eq!({ hdr.ramdisk_image }, 0x300_0000 - 0x2000);
        assert_eq!({ hdr.ramdisk_size }, 0x1800);
        let byte: u8 = mem.read_obj(GuestAddress(0x300_0000 - 0x2000)).unwrap();
        assert_eq!(byte, 0x42);
    }

    #[test]
    fn old_boot_protocol_is_rejected() {
        let mem = guest_memory(64 << 20);
        let spec = BzImageSpec {
            version: 0x020a,
            ..Default::default()
        };

        let err = boot(&mem, &spec, None).unwrap_err();

        assert!(
            matches!(err, BootError::OldBootProtocol { version: 0x020a }),
            "{err}"
        );
    }

    #[test]
    fn kernel_without_64_bit_entry_is_rejected() {
        let mem = guest_memory(64 << 20);
        let spec = BzImageSpec {
            xloadflags: 0,
            ..Default::default()
        };

        let err = boot(&mem, &spec, None).unwrap_err();

        assert!(matches!(err, BootError::No64BitEntry), "{err}");
    }

    #[test]
    fn kernel_larger_than_low_ram_is_rejected() {
        let mem = guest_memory(8 << 20);
        let spec = BzImageSpec {
            init_size: 16 << 20,
            ..Default::default()
        };

        let err = boot(&mem, &spec, None).unwrap_err();

        assert!(
            matches!(err, BootError::KernelOutsideLowRam { .. }),
            "{err}"
        );
    }
}
