//! Thin wrappers over the few syscalls and ioctls that the safe crates do not cover.
//!
//! Every `unsafe` block of the `vmm` crate lives here, each with its invariant.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Creates an anonymous shmem file (`memfd_create(2)`) with close-on-exec set.
///
/// Never `MFD_HUGETLB`: the kernel's live-update code only preserves shmem memfds.
pub fn memfd_create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid; the return value
    // is checked before it is used.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, so it is an open descriptor we own alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(File::from(owned))
}

/// Registers every region of `mem` as a KVM memory slot, slot `i` for region `i`.
pub fn register_memory_slots(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let memory_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem` for `memory_size` bytes, and
        // the caller keeps `mem` alive for as long as the VM (the `Vm` holds both).
        unsafe { vm.set_user_memory_region(memory_region) }?;
    }
    Ok(())
}

/// A close-on-exec copy of `fd`, an fd this process inherited by number (e.g. `--net fd=[3]`).
/// The number itself stays open and unowned: nothing here claims it, so nothing closes it twice.
pub fn dup_inherited_fd(fd: std::os::fd::RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; an fd that is not open gives
    // EBADF, which is checked.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` was just created by fcntl, so this process owns it alone.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}
