//! The crate's error type.

use std::io;

/// Why opening, adopting or configuring a tap failed. Every variant names the interface (or
/// the fd) it is about; `Io` also names the operation.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface has a queue attached and is not multi-queue.
    #[error("Tap {name} is in use by another process")]
    Busy {
        /// Interface name.
        name: String,
    },
    /// The adopted fd is not attached to a tap device at all.
    #[error("fd {fd} is not a tap")]
    FdNotATap {
        /// The raw fd number, for the message.
        fd: i32,
    },
    /// The adopted fd is a tun/tap queue, but not one a virtio-net device can use.
    #[error("Tap {name} (fd {fd}) cannot serve virtio-net: {reason}")]
    FdUnsuitable {
        /// The raw fd number, for the message.
        fd: i32,
        /// Interface name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The name cannot be an interface name.
    #[error("Invalid interface name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not a MAC address in `12:34:56:78:9a:bc` form.
    #[error("Invalid MAC address {input:?}")]
    InvalidMac {
        /// The refused text.
        input: String,
    },
    /// An operation on an interface failed.
    #[error("{op} on {name} failed")]
    Io {
        /// Interface name (or the name pattern asked for).
        name: String,
        /// The syscall or ioctl.
        op: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Zero queues were asked for.
    #[error("Tap {name} needs at least one queue")]
    NoQueues {
        /// Interface name.
        name: String,
    },
    /// No interface has that name in this network namespace.
    #[error("No interface named {name}")]
    NoSuchInterface {
        /// Interface name.
        name: String,
    },
    /// An interface of that name exists and is not a tap (a tun device, a bridge, a NIC...).
    #[error("Interface {name} exists and is not a tap")]
    NotATap {
        /// Interface name.
        name: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` (or access to `/dev/net/tun`, or the tap's owner).
    #[error("Permission denied for {op} on {name}: it needs CAP_NET_ADMIN")]
    PermissionDenied {
        /// Interface name.
        name: String,
        /// The syscall or ioctl.
        op: &'static str,
    },
    /// The tap exists with the other multi-queue setting than the one asked for.
    #[error("Tap {name} exists with a different multi-queue setting")]
    QueueModeMismatch {
        /// Interface name.
        name: String,
    },
    /// Reading random bytes for a MAC address failed.
    #[error("Cannot get random bytes for a MAC address")]
    Random {
        /// The read error.
        #[source]
        source: io::Error,
    },
}

impl TapError {
    /// Maps the errno of `op` on interface `name` to the variants every operation shares:
    /// permission, missing interface, or plain I/O.
    pub(crate) fn from_io(name: &str, op: &'static str, source: io::Error) -> Self {
        let name = name.to_owned();
        match source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => Self::PermissionDenied { name, op },
            Some(libc::ENODEV) => Self::NoSuchInterface { name },
            _ => Self::Io { name, op, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eperm_says_cap_net_admin_is_needed() {
        let err = TapError::from_io(
            "vm0",
            "TUNSETIFF",
            io::Error::from_raw_os_error(libc::EPERM),
        );

        assert_eq!(
            err.to_string(),
            "Permission denied for TUNSETIFF on vm0: it needs CAP_NET_ADMIN"
        );
    }

    #[test]
    fn io_message_names_interface_and_operation_but_not_the_source() {
        let err = TapError::from_io(
            "vm0",
            "SIOCSIFMTU",
            io::Error::from_raw_os_error(libc::EINVAL),
        );

        assert_eq!(err.to_string(), "SIOCSIFMTU on vm0 failed");
    }
}
