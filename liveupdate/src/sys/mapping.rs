//! A shared mapping of a file, for tests that prove two fds map the same memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;

/// `mmap(MAP_SHARED, PROT_READ | PROT_WRITE)` of the first `len` bytes of a file.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    addr: NonNull<u8>,
    len: usize,
}

impl SharedMapping {
    /// Maps `len` bytes (the file must be at least that long).
    pub(crate) fn new(fd: impl AsFd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses; no existing memory changes.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr =
            NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        Ok(Self { addr, len })
    }

    /// Writes `bytes` at `offset` through the mapping.
    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "write past the mapping");
        // SAFETY: the range is inside the live mapping (checked above) and does not overlap `bytes`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.as_ptr().wrapping_add(offset),
                bytes.len(),
            )
        };
    }

    /// Reads `len` bytes at `offset` through the mapping.
    pub(crate) fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len, "read past the mapping");
        let mut out = vec![0u8; len];
        // SAFETY: the range is inside the live mapping (checked above); `out` has `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr.as_ptr().wrapping_add(offset),
                out.as_mut_ptr(),
                len,
            )
        };
        out
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region `new` mapped; nothing borrows it past `self`.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}
