//! Guest RAM: one shmem memfd, mapped `MAP_SHARED` and registered as KVM memory slots.
//!
//! RAM always lives in a memfd so that a live update can preserve it (LUO preserves shmem
//! memfds) or hand it to a successor VMM, which maps the very same pages. The memfd is split
//! into the ranges of [`crate::layout::ram_ranges`], one after the other in the file.

use std::fs::File;
use std::io;

use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::sys;

/// The smallest RAM size we accept.
pub const MIN_RAM_SIZE: u64 = 64 << 20;

/// Errors from setting up guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Size below the minimum or not page aligned.
    #[error("Invalid RAM size {size:#x}: it must be at least 64 MiB and a multiple of 4 KiB")]
    InvalidSize {
        /// The refused size.
        size: u64,
    },
    /// The memfd could not be created or sized.
    #[error("Cannot create the guest RAM memfd")]
    Memfd(#[source] io::Error),
    /// The memfd has another size than the RAM it is supposed to hold.
    #[error("Guest RAM memfd holds {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The size the configuration asks for.
        expected: u64,
        /// The size of the file.
        actual: u64,
    },
    /// Mapping the memfd failed.
    #[error("Cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("Cannot register guest RAM with KVM")]
    MemorySlot(#[source] kvm_ioctls::Error),
}

/// Guest RAM and the memfd that backs it.
#[derive(Debug)]
pub struct GuestRam {
    memfd: File,
    size: u64,
    memory: GuestMemoryMmap,
}

impl GuestRam {
    /// Creates `size` bytes of fresh, zeroed guest RAM in a new memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::new_named(size, c"guest-ram")
    }

    /// Like [`GuestRam::new`], for a VM of `vcpus` vCPUs: the memfd's name says how many (see
    /// [`vcpus_hint`]).
    pub fn new_for_vcpus(size: u64, vcpus: u8) -> Result<Self, MemoryError> {
        let name = std::ffi::CString::new(format!("guest-ram vcpus={vcpus}"))
            .map_err(|_| MemoryError::InvalidSize { size })?;
        Self::new_named(size, &name)
    }

    fn new_named(size: u64, name: &std::ffi::CStr) -> Result<Self, MemoryError> {
        check_size(size)?;
        let memfd = sys::memfd_create(name).map_err(MemoryError::Memfd)?;
        memfd.set_len(size).map_err(MemoryError::Memfd)?;
        Self::from_memfd(memfd, size)
    }

    /// Maps an existing memfd (e.g. one handed over by a live update) as guest RAM.
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self, MemoryError> {
        check_size(size)?;
        let actual = memfd.metadata().map_err(MemoryError::Memfd)?.len();
        if actual != size {
            return Err(MemoryError::SizeMismatch {
                expected: size,
                actual,
            });
        }
        let mut ranges = Vec::new();
        let mut file_offset = 0;
        for (guest_addr, len) in layout::ram_ranges(size) {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize { size })?;
            ranges.push((
                GuestAddress(guest_addr),
                len_usize,
                Some(FileOffset::new(file, file_offset)),
            ));
            file_offset += len;
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
        // Huge folios make a kernel live update cheaper: LUO pins, preserves and restores RAM
        // folio by folio (a 2 MiB folio is one step, not 512), and KVM maps it with large pages.
        // Only a hint: without transparent huge pages RAM works as before.
        if let Err(e) = sys::advise_huge_pages(&memory) {
            log::debug!("Guest RAM without huge pages (MADV_HUGEPAGE: {e})");
        }
        Ok(Self {
            memfd,
            size,
            memory,
        })
    }

    /// The guest's view of RAM, for loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The memfd holding all of guest RAM.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Registers the RAM ranges as KVM memory slots of `vm`.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        sys::register_memory_slots(vm, &self.memory).map_err(MemoryError::MemorySlot)
    }
}

/// The vCPU count in the name of a guest RAM memfd made by [`GuestRam::new_for_vcpus`], if it
/// is one: a successor that maps the RAM ahead of a live update starts that many vCPU threads
/// before the pause. Only a hint (a RAM file from elsewhere has none, or may lie): the saved
/// state decides.
pub fn vcpus_hint(memfd: &File) -> Option<u8> {
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(memfd)
    ))
    .ok()?;
    let link = link.to_string_lossy();
    let rest = link.strip_prefix("/memfd:guest-ram vcpus=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn check_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_RAM_SIZE || !size.is_multiple_of(4096) {
        return Err(MemoryError::InvalidSize { size });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn ram_is_a_memfd_shared_with_the_guest_view() {
        let ram = GuestRam::new(64 << 20).unwrap();

        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut from_file = [0u8; 4];
        ram.memfd().read_exact_at(&mut from_file, 0x1000).unwrap();

        assert_eq!(u32::from_le_bytes(from_file), 0xdead_beef);
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(ram.memfd())
        ))
        .unwrap();
        assert!(
            link.to_string_lossy().starts_with("/memfd:guest-ram"),
            "{link:?}"
        );
    }

    #[test]
    fn ram_asks_for_huge_pages() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let start = ram.memory().iter().next().unwrap().as_ptr() as usize;

        // The mapping's line in smaps ("start-end perms ...") and its VmFlags after it: `hg` is
        // MADV_HUGEPAGE (the flag is set whether or not the host then uses huge pages).
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let header = format!("{start:x}-");
        let mapping = smaps
            .split_inclusive('\n')
            .skip_while(|line| !line.starts_with(&header))
            .collect::<String>();
        let flags = mapping
            .lines()
            .find(|line| line.starts_with("VmFlags:"))
            .unwrap();
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn ram_made_for_a_vcpu_count_names_it_and_plain_ram_does_not() {
        let for_four = GuestRam::new_for_vcpus(64 << 20, 4).unwrap();
        let plain = GuestRam::new(64 << 20).unwrap();

        assert_eq!(vcpus_hint(for_four.memfd()), Some(4));
        assert_eq!(vcpus_hint(plain.memfd()), None);
    }

    #[test]
    fn high_ram_follows_low_ram_in_the_file() {
        let size = 4 << 30;
        let ram = GuestRam::new(size).unwrap();

        ram.memfd()
            .write_all_at(&[0x5a], layout::MMIO_HOLE_START)
            .unwrap();
        let byte: u8 = ram
            .memory()
            .read_obj(GuestAddress(layout::HIGH_RAM_START))
            .unwrap();

        assert_eq!(byte, 0x5a);
        assert_eq!(ram.memory().num_regions(), 2);
        assert_eq!(
            ram.memory().last_addr(),
            GuestAddress(layout::HIGH_RAM_START + (1 << 30) - 1)
        );
    }

    #[test]
    fn sizes_below_minimum_or_unaligned_are_refused() {
        assert!(matches!(
            GuestRam::new(1 << 20),
            Err(MemoryError::InvalidSize { .. })
        ));
        assert!(matches!(
            GuestRam::new((64 << 20) + 1),
            Err(MemoryError::InvalidSize { .. })
        ));
    }

    #[test]
    fn memfd_of_the_wrong_size_is_refused() {
        let memfd = sys::memfd_create(c"test").unwrap();
        memfd.set_len(128 << 20).unwrap();

        let result = GuestRam::from_memfd(memfd, 64 << 20);

        assert!(matches!(result, Err(MemoryError::SizeMismatch { .. })));
    }
}
