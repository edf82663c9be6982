//! The kernel session provider: LUO on `/dev/liveupdate` (Linux 6.19+, booted with
//! `liveupdate=on`; see `../shared/reference/luo.md` §1-2).
//!
//! The device is exclusive (a second open gives [`SessionError::Busy`]), so on a host with
//! several VMMs one agent owns it and passes session fds on ([`KernelSession::as_fd`],
//! [`KernelSession::from_fd`]). Sessions do not depend on the device fd: a [`KernelProvider`]
//! may be dropped right after creating or retrieving sessions, and they stay valid. What keeps
//! an outgoing session (and its files) alive up to the kexec is its own fd.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::session::{AdoptAs, Session, SessionError, SessionProvider, Token, check_name};
use crate::sys;

mod self_test;

pub use self_test::{
    KEXEC_TEST_SESSION, KEXEC_TEST_TOKEN, KernelSelfTestError, kexec_stage1, kexec_stage2,
    self_test_kernel,
};

/// Where LUO's device lives.
pub const DEVICE_PATH: &str = "/dev/liveupdate";

/// Maps the errno of `open(/dev/liveupdate)` (luo.md §1.5).
fn open_error(source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::ENOENT) => SessionError::NotAvailable,
        Some(libc::EBUSY) => SessionError::Busy,
        Some(libc::EIO) => SessionError::IncomingCorrupt,
        _ => SessionError::Os {
            operation: "open /dev/liveupdate",
            source,
        },
    }
}

/// Maps the errno of `LIVEUPDATE_IOCTL_CREATE_SESSION`.
fn create_session_error(name: &str, source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::EEXIST) => SessionError::SessionExists {
            name: name.to_string(),
        },
        // Newer kernels check the name; ours is checked first, so this is a kernel rule we lack.
        Some(libc::EINVAL) => SessionError::InvalidName {
            name: name.to_string(),
        },
        _ => SessionError::Os {
            operation: "LIVEUPDATE_IOCTL_CREATE_SESSION",
            source,
        },
    }
}

/// Maps the errno of `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`: ENOENT (none) and EINVAL (retrieved
/// already) both mean there is no session to hand out.
fn retrieve_session_error(name: &str, source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::EINVAL) => SessionError::NoSuchSession {
            name: name.to_string(),
        },
        _ => SessionError::Os {
            operation: "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
            source,
        },
    }
}

/// Maps the errno of `LIVEUPDATE_SESSION_PRESERVE_FD`. EINVAL: our struct is right, so it is
/// the session-type check (preserve on an incoming session).
fn preserve_fd_error(token: Token, source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::ENOENT) => SessionError::Unpreservable,
        Some(libc::EEXIST) => SessionError::TokenExists { token },
        Some(libc::EBUSY) => SessionError::AlreadyPreserved,
        Some(libc::EINVAL) => SessionError::WrongDirection {
            operation: "preserve_fd",
            direction: "incoming",
        },
        _ => SessionError::Os {
            operation: "LIVEUPDATE_SESSION_PRESERVE_FD",
            source,
        },
    }
}

/// Maps the errno of `LIVEUPDATE_SESSION_RETRIEVE_FD`. EINVAL: retrieve on an outgoing session.
fn retrieve_fd_error(token: Token, source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::ENOENT) => SessionError::NoSuchToken { token },
        Some(libc::EINVAL) => SessionError::WrongDirection {
            operation: "retrieve_fd",
            direction: "outgoing",
        },
        _ => SessionError::Os {
            operation: "LIVEUPDATE_SESSION_RETRIEVE_FD",
            source,
        },
    }
}

/// Maps the errno of `LIVEUPDATE_SESSION_FINISH`. EINVAL: finish on an outgoing session.
fn finish_error(source: io::Error) -> SessionError {
    match source.raw_os_error() {
        Some(libc::EBUSY) => SessionError::NotFinishable,
        Some(libc::EINVAL) => SessionError::WrongDirection {
            operation: "finish",
            direction: "outgoing",
        },
        _ => SessionError::Os {
            operation: "LIVEUPDATE_SESSION_FINISH",
            source,
        },
    }
}

/// Sessions from the kernel: an open `/dev/liveupdate`.
#[derive(Debug)]
pub struct KernelProvider {
    device: OwnedFd,
}

impl KernelProvider {
    /// Opens `/dev/liveupdate` (read-write, close-on-exec).
    pub fn open() -> Result<Self, SessionError> {
        Self::open_at(Path::new(DEVICE_PATH))
    }

    /// Opens the LUO device at `path` (tests, or a device node elsewhere).
    pub fn open_at(path: &Path) -> Result<Self, SessionError> {
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_error)?;
        Ok(Self {
            device: OwnedFd::from(file),
        })
    }

    /// Wraps an open `/dev/liveupdate` received from an earlier agent (its fd store, or an
    /// upgrade): the device admits one opener, so a successor takes the same open file.
    pub fn from_device_fd(device: OwnedFd) -> Self {
        Self { device }
    }

    /// Creates an outgoing session, as the concrete type (to pass its fd on).
    pub fn create(&mut self, name: &str) -> Result<KernelSession, SessionError> {
        check_name(name)?;
        let fd = sys::create_session(self.device.as_fd(), name)
            .map_err(|e| create_session_error(name, e))?;
        Ok(KernelSession::from_fd(fd))
    }

    /// Retrieves an incoming session (once per name per boot), as the concrete type.
    pub fn retrieve(&mut self, name: &str) -> Result<KernelSession, SessionError> {
        check_name(name)?;
        let fd = sys::retrieve_session(self.device.as_fd(), name)
            .map_err(|e| retrieve_session_error(name, e))?;
        Ok(KernelSession::from_fd(fd))
    }
}

impl SessionProvider for KernelProvider {
    fn create_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        Ok(Box::new(self.create(name)?))
    }

    fn retrieve_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        Ok(Box::new(self.retrieve(name)?))
    }

    /// The device itself, as `device`.
    fn export_fds(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        let copy = self.device.try_clone().map_err(|source| SessionError::Os {
            operation: "export_fds",
            source,
        })?;
        Ok(vec![(DEVICE_FD_NAME.to_string(), copy)])
    }

    /// An outgoing or retrieved session from its session fd, named `session`. A session handed
    /// over lives in the kernel until the kexec: there is nothing to adopt.
    fn adopt(
        &mut self,
        name: &str,
        side: AdoptAs,
        fds: Vec<(String, OwnedFd)>,
    ) -> Result<Option<Box<dyn Session>>, SessionError> {
        let fd = fds
            .into_iter()
            .find(|(fd_name, _)| fd_name == SESSION_FD_NAME)
            .map(|(_, fd)| fd);
        match (side, fd) {
            (AdoptAs::Outgoing | AdoptAs::Retrieved, Some(fd)) => {
                Ok(Some(Box::new(KernelSession::from_fd(fd))))
            }
            _ => Err(SessionError::Os {
                operation: "adopt",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no session fd for kernel session {name:?} ({side:?})"),
                ),
            }),
        }
    }
}

/// The name [`KernelProvider`] exports `/dev/liveupdate` under.
pub const DEVICE_FD_NAME: &str = "device";
/// The name a [`KernelSession`] exports its session fd under.
pub const SESSION_FD_NAME: &str = "session";

/// A LUO session fd. Closing it (drop) before the kexec discards an outgoing session and its
/// files; closing a retrieved session runs an implicit FINISH.
#[derive(Debug)]
pub struct KernelSession {
    fd: OwnedFd,
}

impl KernelSession {
    /// Wraps a session fd received from elsewhere (`LISTEN_FDS`, SCM_RIGHTS). Nothing checks
    /// that it is a session: ioctls on another kind of fd fail with [`SessionError::Os`]
    /// ([`crate::inherited`] checks an fd inherited by `LISTEN_FDS` first).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// The session fd, to pass on (the receiver's dup keeps the session alive too).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for KernelSession {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Session for KernelSession {
    /// The name through `LIVEUPDATE_SESSION_GET_NAME` (Linux 7.2+; older kernels give
    /// [`SessionError::Os`]).
    fn name(&self) -> Result<String, SessionError> {
        sys::get_name(self.fd.as_fd()).map_err(|source| SessionError::Os {
            operation: "LIVEUPDATE_SESSION_GET_NAME",
            source,
        })
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        sys::preserve_fd(self.fd.as_fd(), fd, token).map_err(|e| preserve_fd_error(token, e))
    }

    /// The kernel returns another fd for the same file if the token was retrieved already
    /// (luo.md §1.5); a failed retrieve is permanent for that token.
    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        sys::retrieve_fd(self.fd.as_fd(), token).map_err(|e| retrieve_fd_error(token, e))
    }

    fn finish(&mut self) -> Result<(), SessionError> {
        sys::finish(self.fd.as_fd()).map_err(finish_error)
    }

    fn export_fds(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        let copy = self.fd.try_clone().map_err(|source| SessionError::Os {
            operation: "export_fds",
            source,
        })?;
        Ok(vec![(SESSION_FD_NAME.to_string(), copy)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn open_of_a_missing_device_gives_not_available() {
        let err = KernelProvider::open_at(Path::new("/nonexistent")).unwrap_err();

        assert!(matches!(err, SessionError::NotAvailable));
    }

    #[test]
    fn open_errnos_map_to_busy_corrupt_and_os() {
        assert!(matches!(
            open_error(errno(libc::ENOENT)),
            SessionError::NotAvailable
        ));
        assert!(matches!(open_error(errno(libc::EBUSY)), SessionError::Busy));
        assert!(matches!(
            open_error(errno(libc::EIO)),
            SessionError::IncomingCorrupt
        ));
        assert!(matches!(
            open_error(errno(libc::EACCES)),
            SessionError::Os { .. }
        ));
    }

    #[test]
    fn create_session_errnos_map_to_exists_invalid_name_and_os() {
        let exists = create_session_error("vm", errno(libc::EEXIST));
        let invalid = create_session_error("vm", errno(libc::EINVAL));
        let other = create_session_error("vm", errno(libc::ENOMEM));

        assert!(matches!(exists, SessionError::SessionExists { name } if name == "vm"));
        assert!(matches!(invalid, SessionError::InvalidName { .. }));
        assert!(matches!(other, SessionError::Os { .. }));
    }

    #[test]
    fn retrieve_session_enoent_and_einval_map_to_no_such_session() {
        let none = retrieve_session_error("vm", errno(libc::ENOENT));
        let taken = retrieve_session_error("vm", errno(libc::EINVAL));
        let other = retrieve_session_error("vm", errno(libc::ENOMEM));

        assert!(matches!(none, SessionError::NoSuchSession { .. }));
        assert!(matches!(taken, SessionError::NoSuchSession { .. }));
        assert!(matches!(other, SessionError::Os { .. }));
    }

    #[test]
    fn preserve_fd_errnos_map_per_the_luo_table() {
        let unpreservable = preserve_fd_error(1, errno(libc::ENOENT));
        let exists = preserve_fd_error(1, errno(libc::EEXIST));
        let busy = preserve_fd_error(1, errno(libc::EBUSY));
        let incoming = preserve_fd_error(1, errno(libc::EINVAL));
        let other = preserve_fd_error(1, errno(libc::ENOSPC));

        assert!(matches!(unpreservable, SessionError::Unpreservable));
        assert!(matches!(exists, SessionError::TokenExists { token: 1 }));
        assert!(matches!(busy, SessionError::AlreadyPreserved));
        assert!(matches!(
            incoming,
            SessionError::WrongDirection {
                direction: "incoming",
                ..
            }
        ));
        assert!(matches!(other, SessionError::Os { .. }));
    }

    #[test]
    fn retrieve_fd_errnos_map_to_no_such_token_wrong_direction_and_os() {
        let none = retrieve_fd_error(2, errno(libc::ENOENT));
        let outgoing = retrieve_fd_error(2, errno(libc::EINVAL));
        let other = retrieve_fd_error(2, errno(libc::ENOMEM));

        assert!(matches!(none, SessionError::NoSuchToken { token: 2 }));
        assert!(matches!(
            outgoing,
            SessionError::WrongDirection {
                direction: "outgoing",
                ..
            }
        ));
        assert!(matches!(other, SessionError::Os { .. }));
    }

    #[test]
    fn finish_errnos_map_to_not_finishable_wrong_direction_and_os() {
        assert!(matches!(
            finish_error(errno(libc::EBUSY)),
            SessionError::NotFinishable
        ));
        assert!(matches!(
            finish_error(errno(libc::EINVAL)),
            SessionError::WrongDirection {
                operation: "finish",
                direction: "outgoing"
            }
        ));
        assert!(matches!(
            finish_error(errno(libc::EIO)),
            SessionError::Os { .. }
        ));
    }

    #[test]
    fn session_from_a_non_session_fd_reports_os_errors() {
        let memfd = sys::memfd_create("not-a-session", 0).unwrap();
        let mut session = KernelSession::from_fd(memfd);

        let err = session.finish().unwrap_err();

        assert!(matches!(
            err,
            SessionError::Os {
                operation: "LIVEUPDATE_SESSION_FINISH",
                ..
            }
        ));
    }
}
