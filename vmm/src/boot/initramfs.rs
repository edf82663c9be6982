//! Placing the initramfs at the top of low RAM.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;

/// Page size the initramfs start is aligned to.
const PAGE_SIZE: u64 = 0x1000;

/// Where an initramfs was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LoadedInitramfs {
    /// Guest address of its first byte (page aligned).
    pub(super) addr: u64,
    /// Its size in bytes.
    pub(super) size: u64,
}

/// Loads the file at `path` as high as possible so that it ends at or below `limit`, starting
/// at or above `floor` (the end of the kernel).
pub(super) fn load(
    mem: &GuestMemoryMmap,
    path: &Path,
    floor: u64,
    limit: u64,
) -> Result<LoadedInitramfs, BootError> {
    let read_error = |source| BootError::ReadInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let too_large = BootError::InitramfsTooLarge { size, floor, limit };
    let Some(addr) = limit.checked_sub(size).map(|top| top & !(PAGE_SIZE - 1)) else {
        return Err(too_large);
    };
    if addr < floor {
        return Err(too_large);
    }
    let count =
        usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge { size, floor, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
        .map_err(|source| BootError::WriteGuest {
            what: "initramfs",
            source,
        })?;
    Ok(LoadedInitramfs { addr, size })
}

#[cfg(test)]
mod tests {
    use super::super::test_images::{guest_memory, temp_file};
    use super::*;

    #[test]
    fn initramfs_lands_page_aligned_below_limit() {
        let mem = guest_memory(64 << 20);
        let file = temp_file(&[0xab; 5000]);

        let loaded = load(&mem, file.as_path(), 0x20_0000, 64 << 20).unwrap();

        assert_eq!(
            loaded,
            LoadedInitramfs {
                addr: (64 << 20) - 0x2000,
                size: 5000
            }
        );
        let byte: u8 = mem.read_obj(GuestAddress(loaded.addr + 4999)).unwrap();
        assert_eq!(byte, 0xab);
    }

    #[test]
    fn initramfs_overlapping_kernel_is_rejected() {
        let mem = guest_memory(64 << 20);
        let file = temp_file(&[0; 0x3000]);

        let err = load(&mem, file.as_path(), 0x3ff_e000, 64 << 20).unwrap_err();

        assert!(
            matches!(err, BootError::InitramfsTooLarge { size: 0x3000, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_initramfs_error_names_the_path() {
        let mem = guest_memory(64 << 20);

        let err = load(&mem, Path::new("/nonexistent/initrd"), 0, 64 << 20).unwrap_err();

        assert!(err.to_string().contains("/nonexistent/initrd"), "{err}");
    }
}
