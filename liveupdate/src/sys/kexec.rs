//! `kexec_file_load(2)` and `reboot(LINUX_REBOOT_CMD_KEXEC)`: the two calls that replace the
//! running kernel. LUO hands sessions over only on this path (the image must come from
//! `kexec_file_load`, not `kexec_load`; luo.md §2.1).

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `KEXEC_FILE_NO_INITRAMFS`: load without an initrd.
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// Loads `kernel` (and `initrd`, if any) with command line `cmdline` as the image the next
/// `reboot(LINUX_REBOOT_CMD_KEXEC)` starts. Replaces any image loaded before.
pub fn kexec_file_load(
    kernel: BorrowedFd<'_>,
    initrd: Option<BorrowedFd<'_>>,
    cmdline: &str,
) -> io::Result<()> {
    let cmdline = CString::new(cmdline)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the command line"))?;
    // The length counts the terminating NUL.
    let cmdline_len = cmdline.as_bytes_with_nul().len() as libc::c_ulong;
    let (initrd_fd, flags) = match initrd {
        Some(fd) => (fd.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    // SAFETY: both fds are open for the call; the command line is a NUL-terminated buffer of
    // `cmdline_len` bytes that outlives it; the kernel only reads from them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd_fd,
            cmdline_len,
            cmdline.as_ptr(),
            flags,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unloads the image [`kexec_file_load`] loaded (no error if none is loaded).
pub fn kexec_file_unload() -> io::Result<()> {
    // SAFETY: with KEXEC_FILE_UNLOAD the kernel ignores the fds and reads no memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_char>(),
            libc::KEXEC_FILE_UNLOAD as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Flushes file systems and starts the loaded kernel. Returns only on failure (no image
/// loaded: EINVAL; a preserved file that refuses to freeze: its errno).
pub fn reboot_kexec() -> io::Error {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot takes a command number only; on success it does not return.
    let ret = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_KEXEC) };
    if ret < 0 {
        return io::Error::last_os_error();
    }
    io::Error::other("reboot(LINUX_REBOOT_CMD_KEXEC) returned")
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn command_line_with_nul_is_refused_before_the_call() {
        let file = File::open("/dev/null").unwrap();

        let err = kexec_file_load(file.as_fd(), None, "a\0b").unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
