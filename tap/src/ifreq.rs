//! `struct ifreq` (`<linux/if.h>`) as plain bytes, so that no union is ever read.
//!
//! The kernel copies the whole structure in and out with `copy_{from,to}_user`; every bit
//! pattern is a valid `IfReq`, so the ioctl wrappers in `sys` can hand it out mutably.

use std::net::Ipv4Addr;

/// `IFNAMSIZ`: interface names are at most 15 bytes plus the terminating NUL.
pub(crate) const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// Size of the `ifr_ifru` union: 24 bytes on 64-bit targets (it holds an `ifmap`).
const DATA_LEN: usize = size_of::<libc::ifreq>() - IFNAMSIZ;

/// Bytes of a `struct sockaddr`, the largest member we read or write in the union.
const SOCKADDR_LEN: usize = size_of::<libc::sockaddr>();

/// `struct ifreq`: a NUL-terminated name, then the `ifr_ifru` union as raw bytes.
#[repr(C, align(8))]
#[derive(Debug, Clone)]
pub(crate) struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; DATA_LEN],
}

const _: () = assert!(size_of::<IfReq>() == size_of::<libc::ifreq>());
const _: () = assert!(SOCKADDR_LEN <= DATA_LEN);

impl IfReq {
    /// An all-zero request for `name`, which the caller has checked with `validate_name` (or is
    /// a kernel name pattern such as `vmtap%d`); longer names are cut to 15 bytes.
    pub(crate) fn new(name: &str) -> Self {
        let mut req = Self {
            name: [0; IFNAMSIZ],
            data: [0; DATA_LEN],
        };
        let len = name.len().min(IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    /// The name bytes, up to the first NUL.
    pub(crate) fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        &self.name[..end]
    }

    /// `ifr_flags` (a `short`; read as `u16` because the tun flags use bit 15).
    pub(crate) fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Sets `ifr_flags`.
    pub(crate) fn set_flags(&mut self, flags: u16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    /// `ifr_mtu` (an `int`).
    pub(crate) fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }

    /// Sets `ifr_mtu`.
    pub(crate) fn set_int(&mut self, value: i32) {
        self.data[..4].copy_from_slice(&value.to_ne_bytes());
    }

    /// Sets `ifr_data`, a pointer the kernel follows (`SIOCETHTOOL`).
    pub(crate) fn set_data_ptr(&mut self, addr: usize) {
        let bytes = addr.to_ne_bytes();
        self.data[..bytes.len()].copy_from_slice(&bytes);
    }

    /// `ifr_hwaddr`: the address family (`ARPHRD_*`) and the first six bytes of `sa_data`.
    pub(crate) fn hwaddr(&self) -> (u16, [u8; 6]) {
        let family = u16::from_ne_bytes([self.data[0], self.data[1]]);
        let mut mac = [0; 6];
        mac.copy_from_slice(&self.data[2..8]);
        (family, mac)
    }

    /// Sets `ifr_hwaddr` to an Ethernet address.
    pub(crate) fn set_hwaddr(&mut self, family: u16, mac: [u8; 6]) {
        self.data[..SOCKADDR_LEN].fill(0);
        self.data[..2].copy_from_slice(&family.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }

    /// `ifr_addr`/`ifr_netmask` read as a `sockaddr_in`, or `None` for another family.
    pub(crate) fn ipv4(&self) -> Option<Ipv4Addr> {
        let family = u16::from_ne_bytes([self.data[0], self.data[1]]);
        if i32::from(family) != libc::AF_INET {
            return None;
        }
        Some(Ipv4Addr::new(
            self.data[4],
            self.data[5],
            self.data[6],
            self.data[7],
        ))
    }

    /// Sets `ifr_addr`/`ifr_netmask` to a `sockaddr_in` with port 0.
    pub(crate) fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data[..SOCKADDR_LEN].fill(0);
        // AF_INET is 2: it fits a sa_family_t (u16).
        self.data[..2].copy_from_slice(&AF_INET_FAMILY.to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

/// `AF_INET` as a `sa_family_t`.
const AF_INET_FAMILY: u16 = 2;
const _: () = assert!(AF_INET_FAMILY as i32 == libc::AF_INET);

/// Why a name with a character the kernel (or we) refuse is refused.
const BAD_CHAR: &str = "contains '/', ':', '%', NUL or whitespace";

/// Checks `name` the way the kernel's `dev_valid_name` does, plus `%`, so that a caller's name
/// is never taken as a pattern: 1 to 15 bytes, not `.` or `..`, no `/`, `:`, `%`, NUL or
/// whitespace. Returns why the name is refused.
pub(crate) fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() >= IFNAMSIZ {
        return Err("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return Err("reserved");
    }
    if name
        .chars()
        .any(|c| matches!(c, '/' | ':' | '%' | '\0') || c.is_whitespace())
    {
        return Err(BAD_CHAR);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_round_trips_up_to_the_nul() {
        let req = IfReq::new("tap0");

        assert_eq!(req.name_bytes(), b"tap0");
    }

    #[test]
    fn ipv4_round_trips_as_sockaddr_in() {
        let mut req = IfReq::new("tap0");

        req.set_ipv4(Ipv4Addr::new(10, 1, 2, 3));

        assert_eq!(req.ipv4(), Some(Ipv4Addr::new(10, 1, 2, 3)));
    }

    #[test]
    fn ipv4_of_another_family_is_none() {
        let mut req = IfReq::new("tap0");

        req.set_hwaddr(1, [2, 0, 0, 0, 0, 1]);

        assert_eq!(req.ipv4(), None);
    }

    #[test]
    fn names_the_kernel_refuses_are_refused() {
        assert_eq!(validate_name(""), Err("empty"));
        assert_eq!(
            validate_name("0123456789abcdef"),
            Err("longer than 15 bytes")
        );
        assert_eq!(validate_name(".."), Err("reserved"));
        assert_eq!(validate_name("a/b"), Err(BAD_CHAR));
        assert_eq!(validate_name("a b"), Err(BAD_CHAR));
        assert_eq!(validate_name("vm%d"), Err(BAD_CHAR));
        assert_eq!(validate_name("0123456789abcde"), Ok(()));
    }
}
