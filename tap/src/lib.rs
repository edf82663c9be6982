//! Linux tap devices for the VMM's virtio-net device.
//!
//! What it does:
//! - opens the queues of a tap interface through `/dev/net/tun` ([`Tap::open`]), creating the
//!   interface or attaching to an existing one, single- or multi-queue, or adopts a queue fd
//!   opened by someone else ([`Tap::from_fd`]);
//! - sets every queue up the way a VERSION_1 virtio-net device needs it: Ethernet frames, no
//!   packet-info prefix, a [`VNET_HDR_LEN`]-byte virtio-net header, non-blocking fds;
//! - reads and writes frames on a queue, and sets the offloads the guest accepts;
//! - configures the host side of an interface by name: MAC, MTU, IPv4 address, link up
//!   ([`set_mac`], [`set_mtu`], [`set_ipv4`], [`set_up`] and their getters).
//!
//! What it does not do: the virtio-net device itself (queues, feature negotiation, header
//! parsing), polling or an event loop, bridges, routes, IPv6 addresses, netlink, vhost-net, or
//! making a tap persistent. Interfaces are found in the calling thread's network namespace.
//!
//! Most operations need `CAP_NET_ADMIN`; without it they fail with
//! [`TapError::PermissionDenied`].

mod error;
mod host;
mod ifreq;
mod mac;
mod sys;
mod tap;
#[cfg(test)]
mod testutil;

pub use error::TapError;
pub use host::{
    ipv4, is_up, mac, mtu, set_ipv4, set_mac, set_mtu, set_tx_queue_len, set_up, tx_queue_len,
};
pub use mac::MacAddr;
pub use tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO, Tap, VNET_HDR_LEN};
