//! The host side of an interface, by name: MAC, MTU, IPv4 address and link state, set through
//! the `netdevice(7)` ioctls on an `AF_INET` datagram socket, as `ip link`/`ifconfig` do.
//!
//! Each call acts on the interface of that name in the calling thread's network namespace.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::raw::c_ulong;

use crate::ifreq::{IfReq, validate_name};
use crate::sys::{self, IFF_RUNNING, IFF_UP};
use crate::{MacAddr, TapError};

/// Runs `request` (named `op` in errors) on interface `name`.
fn if_ioctl(
    name: &str,
    op: &'static str,
    request: c_ulong,
    req: &mut IfReq,
) -> Result<(), TapError> {
    let sock = sys::inet_socket().map_err(|source| TapError::from_io(name, "socket", source))?;
    sys::socket_ioctl(sock.as_fd(), request, req)
        .map_err(|source| TapError::from_io(name, op, source))
}

/// A request for `name` after checking that it can be an interface name.
fn request(name: &str) -> Result<IfReq, TapError> {
    validate_name(name).map_err(|reason| TapError::InvalidName {
        name: name.to_owned(),
        reason,
    })?;
    Ok(IfReq::new(name))
}

/// An `Io` error for a reply the kernel should not give.
fn unexpected(name: &str, op: &'static str, what: &'static str) -> TapError {
    TapError::Io {
        name: name.to_owned(),
        op,
        source: io::Error::new(io::ErrorKind::InvalidData, what),
    }
}

/// Sets the Ethernet address of interface `name` (`SIOCSIFHWADDR`). A tap accepts this while
/// up; the guest side keeps its own address.
pub fn set_mac(name: &str, mac: MacAddr) -> Result<(), TapError> {
    let mut req = request(name)?;
    req.set_hwaddr(libc::ARPHRD_ETHER, mac.bytes());
    if_ioctl(name, "SIOCSIFHWADDR", libc::SIOCSIFHWADDR, &mut req)
}

/// The Ethernet address of interface `name` (`SIOCGIFHWADDR`).
pub fn mac(name: &str) -> Result<MacAddr, TapError> {
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFHWADDR", libc::SIOCGIFHWADDR, &mut req)?;
    let (family, bytes) = req.hwaddr();
    if family != libc::ARPHRD_ETHER {
        return Err(unexpected(
            name,
            "SIOCGIFHWADDR",
            "not an Ethernet interface",
        ));
    }
    Ok(MacAddr::new(bytes))
}

/// Sets the MTU of interface `name` (`SIOCSIFMTU`).
pub fn set_mtu(name: &str, mtu: u16) -> Result<(), TapError> {
    let mut req = request(name)?;
    req.set_int(i32::from(mtu));
    if_ioctl(name, "SIOCSIFMTU", libc::SIOCSIFMTU, &mut req)
}

/// The MTU of interface `name` (`SIOCGIFMTU`). A `u32` because some interfaces (loopback)
/// exceed 65535.
pub fn mtu(name: &str) -> Result<u32, TapError> {
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFMTU", libc::SIOCGIFMTU, &mut req)?;
    u32::try_from(req.int()).map_err(|_| unexpected(name, "SIOCGIFMTU", "negative MTU"))
}

/// Sets how many frames interface `name` queues (`SIOCSIFTXQLEN`). For a tap this is the
/// queue of frames waiting for its reader (the VMM), 500 by default.
pub fn set_tx_queue_len(name: &str, len: u32) -> Result<(), TapError> {
    let mut req = request(name)?;
    req.set_int(i32::try_from(len).unwrap_or(i32::MAX));
    if_ioctl(name, "SIOCSIFTXQLEN", libc::SIOCSIFTXQLEN, &mut req)
}

/// How many frames interface `name` queues (`SIOCGIFTXQLEN`).
pub fn tx_queue_len(name: &str) -> Result<u32, TapError> {
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFTXQLEN", libc::SIOCGIFTXQLEN, &mut req)?;
    u32::try_from(req.int()).map_err(|_| unexpected(name, "SIOCGIFTXQLEN", "negative length"))
}

/// Gives interface `name` the IPv4 address `addr` with netmask `mask` (`SIOCSIFADDR`, then
/// `SIOCSIFNETMASK`, which also moves the broadcast address), replacing its primary address.
pub fn set_ipv4(name: &str, addr: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
    let mut req = request(name)?;
    req.set_ipv4(addr);
    if_ioctl(name, "SIOCSIFADDR", libc::SIOCSIFADDR, &mut req)?;
    // The mask only after the address: SIOCSIFADDR resets it to the address's class default.
    req.set_ipv4(mask);
    if_ioctl(name, "SIOCSIFNETMASK", libc::SIOCSIFNETMASK, &mut req)
}

/// The primary IPv4 address and netmask of interface `name`, or `None` if it has none.
pub fn ipv4(name: &str) -> Result<Option<(Ipv4Addr, Ipv4Addr)>, TapError> {
    let mut req = request(name)?;
    match if_ioctl(name, "SIOCGIFADDR", libc::SIOCGIFADDR, &mut req) {
        Err(TapError::Io { source, .. }) if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            return Ok(None);
        }
        result => result?,
    }
    let addr = req
        .ipv4()
        .ok_or_else(|| unexpected(name, "SIOCGIFADDR", "not an IPv4 address"))?;
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFNETMASK", libc::SIOCGIFNETMASK, &mut req)?;
    let mask = req
        .ipv4()
        .ok_or_else(|| unexpected(name, "SIOCGIFNETMASK", "not an IPv4 netmask"))?;
    Ok(Some((addr, mask)))
}

/// Brings interface `name` up (`SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP` and
/// `IFF_RUNNING` added to the flags it has).
pub fn set_up(name: &str) -> Result<(), TapError> {
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut req)?;
    req.set_flags(req.flags() | IFF_UP | IFF_RUNNING);
    if_ioctl(name, "SIOCSIFFLAGS", libc::SIOCSIFFLAGS, &mut req)
}

/// Whether interface `name` is administratively up (`IFF_UP`).
pub fn is_up(name: &str) -> Result<bool, TapError> {
    let mut req = request(name)?;
    if_ioctl(name, "SIOCGIFFLAGS", libc::SIOCGIFFLAGS, &mut req)?;
    Ok(req.flags() & IFF_UP != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tap;
    use crate::testutil::in_netns;

    #[test]
    fn set_mac_then_mac_round_trips() {
        let wanted = MacAddr::new([0x02, 0x12, 0x34, 0x56, 0x78, 0x9a]);

        let got = in_netns(move || {
            let _tap = Tap::open("vm0", 1).unwrap();
            set_mac("vm0", wanted).unwrap();
            mac("vm0").unwrap()
        });

        assert_eq!(got, wanted);
    }

    #[test]
    fn set_mac_to_a_multicast_address_is_refused_by_the_kernel() {
        let err = in_netns(|| {
            let _tap = Tap::open("vm0", 1).unwrap();
            set_mac("vm0", MacAddr::new([0x01, 0, 0x5e, 0, 0, 1])).unwrap_err()
        });

        assert_eq!(err.to_string(), "SIOCSIFHWADDR on vm0 failed");
    }

    #[test]
    fn set_mtu_then_mtu_round_trips() {
        let got = in_netns(|| {
            let _tap = Tap::open("vm0", 1).unwrap();
            set_mtu("vm0", 9000).unwrap();
            mtu("vm0").unwrap()
        });

        assert_eq!(got, 9000);
    }

    #[test]
    fn set_ipv4_then_ipv4_round_trips() {
        let addr = Ipv4Addr::new(192, 168, 7, 1);
        let mask = Ipv4Addr::new(255, 255, 255, 0);

        let got = in_netns(move || {
            let _tap = Tap::open("vm0", 1).unwrap();
            set_ipv4("vm0", addr, mask).unwrap();
            ipv4("vm0").unwrap()
        });

        assert_eq!(got, Some((addr, mask)));
    }

    #[test]
    fn ipv4_of_an_unaddressed_interface_is_none() {
        let got = in_netns(|| {
            let _tap = Tap::open("vm0", 1).unwrap();
            ipv4("vm0").unwrap()
        });

        assert_eq!(got, None);
    }

    #[test]
    fn new_tap_is_down_and_set_up_brings_it_up() {
        let states = in_netns(|| {
            let _tap = Tap::open("vm0", 1).unwrap();
            let before = is_up("vm0").unwrap();
            set_up("vm0").unwrap();
            (before, is_up("vm0").unwrap())
        });

        assert_eq!(states, (false, true));
    }

    #[test]
    fn mac_of_a_missing_interface_is_no_such_interface() {
        let err = in_netns(|| mac("nosuch0").unwrap_err());

        assert_eq!(err.to_string(), "No interface named nosuch0");
    }

    #[test]
    fn host_calls_refuse_an_invalid_name() {
        let err = mtu("much-too-long-name").unwrap_err();

        assert!(matches!(err, TapError::InvalidName { .. }));
    }

    #[test]
    fn set_tx_queue_len_then_tx_queue_len_round_trips() {
        let got = in_netns(|| {
            let _tap = Tap::open("vm0", 1).unwrap();
            set_tx_queue_len("vm0", 4096).unwrap();
            tx_queue_len("vm0").unwrap()
        });

        assert_eq!(got, 4096);
    }
}
