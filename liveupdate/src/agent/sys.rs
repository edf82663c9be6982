//! The system calls the agent needs that neither std nor vmm-sys-util wraps safely.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::signal::create_sigset;

/// The credentials of the process at the other end of a connected UNIX socket
/// (`SO_PEERCRED`), as they were when it connected.
fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
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
    Ok(cred)
}

/// The uid of the process at the other end of a connected UNIX socket.
pub(crate) fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    peer_credentials(stream).map(|cred| cred.uid)
}

/// The pid of the process at the other end of a connected UNIX socket, as it was when it
/// connected.
pub(crate) fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
    peer_credentials(stream).map(|cred| cred.pid)
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

/// A pidfd for process `pid` (`pidfd_open`, Linux 5.3+): it becomes readable when the process
/// exits, and never refers to another process, unlike a pid.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, touches no memory of ours; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = libc::c_int::try_from(fd).map_err(io::Error::other)?;
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind `pidfd` has exited (its pidfd polls readable), waiting up to
/// `timeout_ms` for it.
pub(crate) fn has_exited(pidfd: &OwnedFd, timeout_ms: libc::c_int) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `poll` is one valid pollfd, for the call's duration; the result is checked.
    let ready = unsafe { libc::poll(&raw mut poll, 1, timeout_ms) };
    ready > 0 && poll.revents & libc::POLLIN != 0
}

/// Waits until one of `fds` is readable (or hung up), or `timeout` passed (`None`: for ever);
/// returns which are (none after a timeout). Unlike a blocking read, this wait ignores the
/// wake-ups a socket's waiters get when the peer reads what this side sent (keyed for
/// writing): a thread waiting for an answer is not woken, and put back to sleep, as its request
/// is read.
pub(crate) fn wait_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    let timeout_ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
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
        let ret = unsafe { libc::poll(polled.as_mut_ptr(), count, timeout_ms) };
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
