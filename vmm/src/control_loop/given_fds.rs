//! The API socket and the event monitor given as fds the VMM inherited (`--api-socket fd=N`,
//! `--event-monitor fd=N`), checked before they are used: a listening socket, an fd open for
//! writing. The numbers stay open and unowned; the VMM works on close-on-exec copies.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;

use crate::api::ApiServerError;
use crate::event_monitor::EventMonitorError;
use crate::sys;

/// The listening socket inherited as `fd`.
pub(super) fn api_listener(fd: i32) -> Result<UnixListener, ApiServerError> {
    let bad = |reason: String| ApiServerError::BadFd { fd, reason };
    let copy = sys::dup_inherited_fd(fd).map_err(|e| bad(format!("not open ({e})")))?;
    match sys::is_listening_socket(copy.as_fd()) {
        Ok(true) => Ok(UnixListener::from(copy)),
        Ok(false) => Err(bad("a socket, but not listening".into())),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => Err(bad("not a socket".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// The file inherited as `fd`, open for writing.
pub(super) fn event_file(fd: i32) -> Result<File, EventMonitorError> {
    let bad = |reason: String| EventMonitorError::BadFd { fd, reason };
    let copy = sys::dup_inherited_fd(fd).map_err(|e| bad(format!("not open ({e})")))?;
    match sys::is_writable(copy.as_fd()) {
        Ok(true) => Ok(File::from(copy)),
        Ok(false) => Err(bad("not open for writing".into())),
        Err(e) => Err(bad(e.to_string())),
    }
}
