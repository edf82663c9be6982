//! The system calls the agent needs that neither std nor vmm-sys-util wraps safely.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::signal::create_sigset;

/// The uid of the process at the other end of a connected UNIX socket (`SO_PEERCRED`).
pub(crate) fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).map_err(io::Error::other)?;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`; the
    // kernel writes at most `len` bytes; the return value is checked.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Waits until one of `signals` is pending for this thread, consumes it and returns its number.
///
/// The signals must be blocked in every thread (block them before spawning any), otherwise the
/// default action (termination) may run first.
pub(crate) fn wait_for_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    let set = create_sigset(signals).map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set and `signal` is valid for writes; the return
    // value is checked.
    let ret = unsafe { libc::sigwait(&raw const set, &raw mut signal) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(signal)
}

/// The effective uid of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Waits until one of `fds` is readable (or hung up); returns which are.
pub(crate) fn wait_readable(fds: &[BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let count = libc::nfds_t::try_from(polled.len()).map_err(io::Error::other)?;
    loop {
        // SAFETY: `polled` is a valid array of `count` pollfd structs for the call, and the
        // kernel writes only their `revents`; the return value is checked.
        let ret = unsafe { libc::poll(polled.as_mut_ptr(), count, -1) };
        if ret >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}
