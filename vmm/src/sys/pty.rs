//! Pseudo-terminals (`pty(7)`): a new master with its slave unlocked, the slave's path, and
//! raw mode, so what the guest writes reaches the host side byte for byte and nothing is
//! echoed back into the guest.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Opens a new pty master (`posix_openpt(3)`, close-on-exec, never our controlling terminal),
/// unlocks its slave and returns the master with the slave's path.
pub fn open_pty() -> io::Result<(OwnedFd, PathBuf)> {
    // SAFETY: posix_openpt takes only flags; the return value is checked before use.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by posix_openpt, so this process owns it alone.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt only acts on the open master fd; the result is checked.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: unlockpt only acts on the open master fd; the result is checked.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let path = slave_path(master.as_fd())?;
    Ok((master, path))
}

/// The path of the slave of pty master `master` (`ptsname_r(3)`).
pub fn slave_path(master: BorrowedFd<'_>) -> io::Result<PathBuf> {
    let mut buf = [0u8; 128];
    // SAFETY: `buf` is writable for its whole length, which is passed; ptsname_r writes a
    // NUL-terminated name within it or returns an error number, which is checked.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let name = CStr::from_bytes_until_nul(&buf).map_err(io::Error::other)?;
    Ok(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}

/// Puts the terminal `tty` in raw mode (`cfmakeraw(3)`): no echo, no line editing, no
/// translation of output or input bytes.
pub fn set_raw(tty: &File) -> io::Result<()> {
    // SAFETY: termios is plain data; all zeroes is a valid value that tcgetattr overwrites.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `termios` is a valid, writable termios for tcgetattr to fill; checked.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &raw mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `termios` is a valid termios that cfmakeraw edits in place.
    unsafe { libc::cfmakeraw(&raw mut termios) };
    // SAFETY: tcsetattr only reads `termios`; the result is checked.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &raw const termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
