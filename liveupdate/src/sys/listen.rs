//! The libc calls behind fds passed the systemd way (`LISTEN_FDS`, fds from 3 upwards): claiming
//! an inherited fd, its close-on-exec flag, the variables, and passing an fd to a child at a
//! fixed number (the test bed's stand-in for PID 1).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

/// The variables of the protocol (`sd_listen_fds(3)`).
pub const LISTEN_VARS: [&str; 3] = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

/// Inherited fds already claimed: each may be owned once per process.
static CLAIMED: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// `fcntl(fd, F_GETFD)`: EBADF if `fd` is not open.
fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD reads the flags of a descriptor number; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Sets FD_CLOEXEC on `fd` (an fd passed to this process), so no child inherits it.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    let flags = fd_flags(fd)?;
    // SAFETY: F_SETFD only changes the descriptor's flags; no memory is involved.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of `fd`, an fd passed to this process by its parent (fd 3 or above), with
/// FD_CLOEXEC set. Each number can be claimed once per process; EBADF if it is not open.
pub fn claim_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let mut claimed = CLAIMED
        .lock()
        .map_err(|_| io::Error::other("the claimed-fd list is poisoned"))?;
    if claimed.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the fd was claimed already",
        ));
    }
    set_cloexec(fd)?;
    claimed.push(fd);
    // SAFETY: `fd` is open (checked above) and was passed by the parent for this process to
    // own (LISTEN_FDS); std never opens fds it does not own, and the list above makes sure
    // nothing here owns it twice.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the environment, so children
/// do not take this process's fds for theirs. Call it from `main`, before any thread starts.
pub fn unset_listen_env() {
    for var in LISTEN_VARS {
        // SAFETY: changing the environment races only with other threads reading it; callers
        // run this at startup, single-threaded (documented above).
        unsafe { std::env::remove_var(var) };
    }
}

/// Makes `fd` the child's fd `target` (without FD_CLOEXEC) when `command` is spawned; `fd`
/// must stay open until then. The child's other fds are unchanged.
pub fn pass_fd_at(command: &mut Command, fd: BorrowedFd<'_>, target: RawFd) {
    let source = fd.as_raw_fd();
    let dup_into_target = move || {
        if source == target {
            // dup2 onto itself would keep FD_CLOEXEC: clear it instead.
            // SAFETY: F_SETFD on an open descriptor; fcntl is async-signal-safe.
            if unsafe { libc::fcntl(target, libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        // SAFETY: dup2 of an open descriptor (the parent keeps `fd` open until spawn);
        // it is async-signal-safe and clears FD_CLOEXEC on `target`.
        if unsafe { libc::dup2(source, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and calls only dup2 and fcntl,
    // both async-signal-safe; it allocates nothing and takes no lock.
    unsafe { command.pre_exec(dup_into_target) };
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_closed_fd_cannot_be_claimed() {
        // Far above anything the test process has open.
        let err = claim_inherited_fd(1_000_000).unwrap_err();

        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn stdio_fds_are_never_claimed() {
        let err = claim_inherited_fd(0).unwrap_err();

        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn passed_fd_appears_at_the_target_number_in_the_child() {
        let memfd = super::super::memfd_create("passed", 0).unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", "readlink /proc/self/fd/7"]);
        pass_fd_at(&mut command, memfd.as_fd(), 7);

        let output = command.output().unwrap();

        let link = String::from_utf8_lossy(&output.stdout);
        assert!(link.contains("memfd:passed"), "fd 7 in the child: {link}");
    }
}
