//! Loading a guest kernel and setting up the boot vCPU.
//!
//! Two entry paths are supported:
//! - an ELF image with a PVH note (Xen's `XEN_ELFNOTE_PHYS32_ENTRY`): the probe guest or a Linux
//!   `vmlinux`, entered in 32-bit protected mode with `hvm_start_info` in EBX;
//! - a Linux bzImage, entered at its 64-bit entry point (boot protocol 2.12+) with the zero page
//!   in RSI.
//!
//! Both paths write an Intel MP table so the guest finds its CPUs and the IOAPIC without ACPI,
//! and the ACPI tables (see `crate::acpi`), whose RSDP address they pass to the kernel.
//! The 64-bit ELF entry point (without PVH note) is not supported.
//!
//! Boot data addresses (all inside `layout::BOOT_DATA_START..layout::EBDA_START`, except the MP
//! table, which sits in the reserved EBDA, and the ACPI tables in the reserved BIOS area):
//!
//! ```text
//! 0x500     GDT
//! 0x1000    PML4, 0x2000 PDPT, 0x3000..0x7000 four page directories (identity map of 4 GiB)
//! 0x7000    zero page (bzImage) or hvm_start_info, module list and memory map (PVH)
//! 0x20000   command line (up to 64 KiB)
//! 0x9fc00   MP floating pointer, then the MP configuration table
//! 0xe0000   ACPI tables, RSDP first
//! ```

mod e820;
mod initramfs;
mod linux;
mod mptable;
mod pvh;
mod regs;
mod sys;
#[cfg(test)]
mod test_images;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout;

pub use regs::configure_boot_vcpu;

/// GDT location.
const GDT_ADDR: u64 = 0x500;
/// Page-map level 4 table for the 64-bit entry.
const PML4_ADDR: u64 = 0x1000;
/// Page directory pointer table.
const PDPT_ADDR: u64 = 0x2000;
/// First of four page directories (2 MiB pages, 1 GiB each).
const PD_ADDR: u64 = 0x3000;
/// Zero page (bzImage) or `hvm_start_info` (PVH).
const BOOT_INFO_ADDR: u64 = 0x7000;
/// Kernel command line.
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line we place, including its NUL.
const CMDLINE_MAX_SIZE: usize = 0x1_0000;

const _: () = assert!(GDT_ADDR >= layout::BOOT_DATA_START);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= layout::EBDA_START);

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    /// Kernel image: an ELF with a PVH note or a bzImage.
    pub kernel: &'a Path,
    /// Optional initramfs, loaded near the end of low RAM.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs, for the MP table and the MADT.
    pub vcpus: u8,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, EBX = `start_info`.
    Pvh {
        /// The kernel's 32-bit PVH entry point.
        entry: GuestAddress,
        /// The `hvm_start_info` structure.
        start_info: GuestAddress,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, RSI = `boot_params`.
    Linux64 {
        /// The kernel's 64-bit entry point (load address + 0x200).
        entry: GuestAddress,
        /// The zero page (`struct boot_params`).
        boot_params: GuestAddress,
    },
}

/// Errors from loading a kernel or setting up the boot vCPU.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("Cannot read kernel image {}", path.display())]
    ReadKernel {
        /// The kernel path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel file is empty.
    #[error("Kernel image {} is empty", path.display())]
    EmptyKernel {
        /// The kernel path.
        path: PathBuf,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("Kernel image {} is neither an ELF nor a bzImage", path.display())]
    UnknownKernelFormat {
        /// The kernel path.
        path: PathBuf,
    },
    /// linux-loader rejected the ELF image.
    #[error("Cannot load ELF kernel {}: {reason}", path.display())]
    LoadElf {
        /// The kernel path.
        path: PathBuf,
        /// The innermost loader error (its chain repeats itself, so only the root is kept).
        reason: String,
    },
    /// The ELF image has no PVH entry note, and we do not support the 64-bit ELF entry.
    #[error("ELF kernel has no PVH entry note: {}", path.display())]
    NoPvhNote {
        /// The kernel path.
        path: PathBuf,
    },
    /// linux-loader rejected the bzImage.
    #[error("Cannot load bzImage kernel {}: {reason}", path.display())]
    LoadBzImage {
        /// The kernel path.
        path: PathBuf,
        /// The innermost loader error (its chain repeats itself, so only the root is kept).
        reason: String,
    },
    /// The bzImage speaks a boot protocol older than 2.12.
    #[error("bzImage boot protocol {version:#x} is too old, need 0x20c")]
    OldBootProtocol {
        /// The header's protocol version.
        version: u16,
    },
    /// The bzImage has no 64-bit entry point (XLF_KERNEL_64 clear).
    #[error("bzImage has no 64-bit entry point")]
    No64BitEntry,
    /// The kernel does not fit in low RAM.
    #[error("Kernel at {start:#x}..{end:#x} does not fit in low RAM ending at {low_end:#x}")]
    KernelOutsideLowRam {
        /// First byte of the kernel.
        start: u64,
        /// End (exclusive) of the kernel, including its runtime footprint.
        end: u64,
        /// End of low RAM.
        low_end: u64,
    },
    /// Guest RAM does not start at 0 or does not reach past 1 MiB.
    #[error(
        "Guest RAM must start at 0 and extend past {:#x}",
        layout::HIGH_MEMORY_START
    )]
    LowRamTooSmall,
    /// The command line is invalid or too long.
    #[error("Invalid kernel command line (at most {max} bytes)")]
    Cmdline {
        /// Largest accepted length, without the NUL.
        max: usize,
        /// The parse error.
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// The initramfs file could not be opened or read.
    #[error("Cannot read initramfs {}", path.display())]
    ReadInitramfs {
        /// The initramfs path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The initramfs does not fit between the kernel and the end of low RAM.
    #[error("Initramfs of {size:#x} bytes does not fit between {floor:#x} and {limit:#x}")]
    InitramfsTooLarge {
        /// Size of the initramfs.
        size: u64,
        /// Lowest allowed address (end of the kernel).
        floor: u64,
        /// Highest allowed end address.
        limit: u64,
    },
    /// Writing boot data into guest memory failed.
    #[error("Cannot write {what} to guest memory")]
    WriteGuest {
        /// What was being written.
        what: &'static str,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// linux-loader could not write the boot parameters.
    #[error("Cannot write boot parameters")]
    Configure(#[source] linux_loader::configurator::Error),
    /// The ACPI tables could not be written.
    #[error("Cannot write the ACPI tables")]
    Acpi(#[source] crate::acpi::AcpiError),
    /// A vCPU register ioctl failed.
    #[error("Cannot set vCPU {what}")]
    SetRegisters {
        /// Which register set.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Kernel formats we recognise from the first bytes of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

/// ELF magic at offset 0.
const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
/// Offset of the "HdrS" magic in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// The root cause of a linux-loader error: its messages embed their causes, so printing the
/// chain would say everything twice.
pub(crate) fn loader_reason(error: &linux_loader::loader::Error) -> String {
    let mut root: &dyn std::error::Error = error;
    while let Some(source) = root.source() {
        root = source;
    }
    root.to_string()
}

/// Loads the kernel (and initramfs) into `mem`, writes the boot structures, the MP table and
/// the ACPI tables, and returns where the boot vCPU starts.
pub fn load_kernel(mem: &GuestMemoryMmap, config: &BootConfig) -> Result<BootEntry, BootError> {
    let path = config.kernel;
    let read_error = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut kernel = File::open(path).map_err(read_error)?;
    let format = detect_format(&mut kernel, path)?;
    let low_end = e820::low_ram_end(mem)?;
    let rsdp = crate::acpi::write_tables(mem, config.vcpus).map_err(BootError::Acpi)?;
    let entry = match format {
        KernelFormat::Elf => pvh::load(mem, &mut kernel, config, low_end, rsdp)?,
        KernelFormat::BzImage => linux::load(mem, &mut kernel, config, low_end, rsdp)?,
    };
    regs::write_gdt(mem, &entry)?;
    if matches!(entry, BootEntry::Linux64 { .. }) {
        regs::write_page_tables(mem)?;
    }
    mptable::write(mem, config.vcpus)?;
    Ok(entry)
}

/// Reads the start of the kernel file and tells ELF from bzImage.
fn detect_format(kernel: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let mut head = Vec::with_capacity(BZIMAGE_MAGIC_OFFSET + 4);
    kernel
        .by_ref()
        .take((BZIMAGE_MAGIC_OFFSET + 4) as u64)
        .read_to_end(&mut head)
        .map_err(|source| BootError::ReadKernel {
            path: path.to_path_buf(),
            source,
        })?;
    if head.is_empty() {
        return Err(BootError::EmptyKernel {
            path: path.to_path_buf(),
        });
    }
    if head.starts_with(&ELF_MAGIC) {
        return Ok(KernelFormat::Elf);
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..) == Some(b"HdrS".as_slice()) {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat {
        path: path.to_path_buf(),
    })
}

/// Places the NUL-terminated command line at `CMDLINE_ADDR`; `capacity` includes the NUL.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, capacity: usize) -> Result<(), BootError> {
    let cmdline_error = |source| BootError::Cmdline {
        max: capacity.saturating_sub(1),
        source,
    };
    let parsed =
        linux_loader::cmdline::Cmdline::try_from(cmdline, capacity).map_err(cmdline_error)?;
    let bytes = parsed.as_cstring().map_err(cmdline_error)?;
    write_bytes(mem, bytes.as_bytes_with_nul(), CMDLINE_ADDR, "command line")
}

/// Writes `bytes` at `addr`, naming `what` in the error.
fn write_bytes(
    mem: &GuestMemoryMmap,
    bytes: &[u8],
    addr: u64,
    what: &'static str,
) -> Result<(), BootError> {
    vm_memory::Bytes::write_slice(mem, bytes, GuestAddress(addr))
        .map_err(|source| BootError::WriteGuest { what, source })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::test_images::{
        BzImageSpec, elf_without_pvh_note, guest_memory, pvh_elf, synthetic_bzimage, temp_file,
    };
    use super::*;

    fn config(kernel: &Path) -> BootConfig<'_> {
        BootConfig {
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0",
            vcpus: 2,
        }
    }

    #[test]
    fn pvh_elf_is_booted_through_pvh() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&pvh_elf(&[0xf4]));

        let entry = load_kernel(&mem, &config(kernel.as_path())).unwrap();

        assert!(matches!(entry, BootEntry::Pvh { .. }));
    }

    #[test]
    fn bzimage_is_booted_through_linux64() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&synthetic_bzimage(&BzImageSpec::default()));

        let entry = load_kernel(&mem, &config(kernel.as_path())).unwrap();

        assert!(matches!(entry, BootEntry::Linux64 { .. }));
    }

    #[test]
    fn empty_file_is_rejected_as_empty() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&[]);

        let err = load_kernel(&mem, &config(kernel.as_path())).unwrap_err();

        assert!(matches!(err, BootError::EmptyKernel { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&kernel.as_path().display().to_string())
        );
    }

    #[test]
    fn random_bytes_are_rejected_as_unknown_format() {
        let mem = guest_memory(64 << 20);
        let noise: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let kernel = temp_file(&noise);

        let err = load_kernel(&mem, &config(kernel.as_path())).unwrap_err();

        assert!(
            matches!(err, BootError::UnknownKernelFormat { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("neither an ELF nor a bzImage"));
    }

    #[test]
    fn truncated_elf_is_rejected() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&pvh_elf(&[0xf4])[..40]);

        let err = load_kernel(&mem, &config(kernel.as_path())).unwrap_err();

        assert!(matches!(err, BootError::LoadElf { .. }), "{err}");
    }

    #[test]
    fn truncated_bzimage_is_rejected() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&synthetic_bzimage(&BzImageSpec::default())[..0x300]);

        let err = load_kernel(&mem, &config(kernel.as_path())).unwrap_err();

        assert!(matches!(err, BootError::LoadBzImage { .. }), "{err}");
    }

    #[test]
    fn elf_without_pvh_note_is_rejected() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&elf_without_pvh_note());

        let err = load_kernel(&mem, &config(kernel.as_path())).unwrap_err();

        assert!(matches!(err, BootError::NoPvhNote { .. }), "{err}");
        assert!(err.to_string().contains("ELF kernel has no PVH entry note"));
    }

    #[test]
    fn gcc_built_executable_without_pvh_note_is_rejected() {
        let source = temp_file(b"void _start(void) { for (;;) {} }\n");
        let executable = temp_file(&[]);
        let status = std::process::Command::new("gcc")
            .args(["-x", "c", "-static", "-nostdlib", "-no-pie", "-o"])
            .arg(executable.as_path())
            .arg(source.as_path())
            .status()
            .expect("this test needs gcc: apt-get install gcc");
        assert!(
            status.success(),
            "gcc failed to build a trivial static executable"
        );
        let mem = guest_memory(64 << 20);

        let err = load_kernel(&mem, &config(executable.as_path())).unwrap_err();

        assert!(matches!(err, BootError::NoPvhNote { .. }), "{err}");
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let mem = guest_memory(64 << 20);
        let path = Path::new("/nonexistent/kernel-image");

        let err = load_kernel(&mem, &config(path)).unwrap_err();

        assert!(matches!(err, BootError::ReadKernel { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/kernel-image"));
    }

    #[test]
    fn load_writes_mp_table_in_ebda() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&pvh_elf(&[0xf4]));

        load_kernel(&mem, &config(kernel.as_path())).unwrap();

        let signature: [u8; 4] = mem.read_obj(GuestAddress(layout::EBDA_START)).unwrap();
        assert_eq!(&signature, b"_MP_");
    }

    #[test]
    fn load_writes_acpi_rsdp_where_the_zero_page_points() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file(&synthetic_bzimage(&BzImageSpec::default()));

        load_kernel(&mem, &config(kernel.as_path())).unwrap();

        let params: linux_loader::loader::bootparam::boot_params =
            mem.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, layout::ACPI_TABLES_START);
        let signature: [u8; 8] = mem
            .read_obj(GuestAddress(layout::ACPI_TABLES_START))
            .unwrap();
        assert_eq!(&signature, b"RSD PTR ");
    }

    #[test]
    fn command_line_with_nul_is_rejected() {
        let mem = guest_memory(64 << 20);

        let err = write_cmdline(&mem, "a\0b", 64).unwrap_err();

        assert!(matches!(err, BootError::Cmdline { .. }), "{err}");
    }

    #[test]
    fn too_long_command_line_is_rejected() {
        let mem = guest_memory(64 << 20);

        let err = write_cmdline(&mem, &"x".repeat(64), 64).unwrap_err();

        assert!(matches!(err, BootError::Cmdline { max: 63, .. }), "{err}");
    }
}
