//! The unsafe operations of this crate: the tun ioctls (`<linux/if_tun.h>`, documented in
//! `Documentation/networking/tuntap.rst`), the interface ioctls on a socket (`netdevice(7)`),
//! `fcntl` flags, `getrandom` for MAC addresses and, for tests only, `unshare(CLONE_NEWNET)`.
//!
//! Each wrapper checks the return value and turns it into an `io::Error`; the typed errors are
//! made one layer up.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_uint, c_ulong};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use crate::ifreq::IfReq;

// <linux/if_tun.h>: the ioctl numbers are declared with `int` as their size even though
// TUNSETIFF and TUNGETIFF pass a `struct ifreq`; the number must match the kernel's.
const TUNTAP: c_uint = b'T' as c_uint;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

/// `IFF_TUN`: a layer-3 device (IP packets, no Ethernet header).
pub(crate) const IFF_TUN: u16 = 0x0001;
/// `IFF_TAP`: a layer-2 device (Ethernet frames).
pub(crate) const IFF_TAP: u16 = 0x0002;
/// `IFF_MULTI_QUEUE`: each open of the device adds one queue.
pub(crate) const IFF_MULTI_QUEUE: u16 = 0x0100;
/// `IFF_NO_PI`: no 4-byte packet-information prefix before each frame.
pub(crate) const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`: a `virtio_net_hdr` before each frame.
pub(crate) const IFF_VNET_HDR: u16 = 0x4000;

// <linux/if.h>: `ifr_flags` bits for SIOC[GS]IFFLAGS.
/// `IFF_UP`: the administrative state.
pub(crate) const IFF_UP: u16 = 0x0001;
/// `IFF_RUNNING`: the operational state (the kernel keeps its own value).
pub(crate) const IFF_RUNNING: u16 = 0x0040;

/// `SIOCETHTOOL` command asking for `struct ethtool_drvinfo` (`<linux/ethtool.h>`).
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo`: the driver's name and its bus information.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Returns `Err(last_os_error)` when an ioctl or syscall returned a negative value.
fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// `TUNSETIFF`: creates the interface `req` names (or attaches this file to it) with the
/// flags in `req`; on success the kernel writes the real name back into `req`.
pub(crate) fn tun_set_iff(tun: &File, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `tun` is an open file and `req` is a whole `struct ifreq`, which the kernel reads
    // and writes back within its size; every byte pattern is a valid `IfReq`.
    check(unsafe { ioctl_with_mut_ref(tun, TUNSETIFF(), req) }).map(drop)
}

/// `TUNGETIFF`: the name and flags of the tun/tap device `fd` is attached to.
pub(crate) fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<IfReq> {
    let mut req = IfReq::new("");
    // SAFETY: `fd` is open for the borrow; the kernel writes at most a `struct ifreq` into
    // `req`, every byte pattern of which is valid. Other file types reject the number.
    check(unsafe { ioctl_with_mut_ref(&fd, TUNGETIFF(), &mut req) })?;
    Ok(req)
}

/// `TUNSETVNETHDRSZ`: the size of the header before each frame, at least 10.
pub(crate) fn tun_set_vnet_hdr_sz(fd: BorrowedFd<'_>, size: c_int) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow and the kernel only reads one `int` from `size`.
    check(unsafe { ioctl_with_ref(&fd, TUNSETVNETHDRSZ(), &size) }).map(drop)
}

/// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the reader of the tap can take.
pub(crate) fn tun_set_offload(fd: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    // SAFETY: `fd` is open for the borrow; TUNSETOFFLOAD takes its argument by value and
    // touches no memory of ours.
    check(unsafe { ioctl_with_val(&fd, TUNSETOFFLOAD(), c_ulong::from(flags)) }).map(drop)
}

/// Sets `O_NONBLOCK` (file status) and `FD_CLOEXEC` (descriptor flag) on `fd`.
pub(crate) fn set_nonblock_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor open for the borrow reads no memory of ours.
    let status = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: F_SETFL with an int argument on a descriptor open for the borrow.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) })?;
    // SAFETY: F_GETFD on a descriptor open for the borrow reads no memory of ours.
    let fd_flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) })?;
    // SAFETY: F_SETFD with an int argument on a descriptor open for the borrow.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Fills `buf` from the kernel's random pool (`getrandom(2)`), retrying short reads.
pub(crate) fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes for the whole call; the
        // return value is checked.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(ret) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// An `AF_INET`/`SOCK_DGRAM` socket, close-on-exec, for the interface ioctls (as `ip` uses).
/// It is never bound and carries no traffic.
pub(crate) fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2), so it is open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One of the `SIOC[GS]IF*` ioctls in `netdevice(7)` on the interface `req` names.
pub(crate) fn socket_ioctl(
    sock: BorrowedFd<'_>,
    request: c_ulong,
    req: &mut IfReq,
) -> io::Result<()> {
    // SAFETY: `sock` is open for the borrow; the requests used here read and write at most a
    // `struct ifreq`, any byte pattern of which is valid, and never follow a pointer in it.
    check(unsafe { ioctl_with_mut_ref(&sock, request, req) }).map(drop)
}

/// `ETHTOOL_GDRVINFO` on interface `name`: the driver name and bus information, each up to
/// its NUL. A tap answers `("tun", "tap")`, a tun device `("tun", "tun")`.
pub(crate) fn driver_info(sock: BorrowedFd<'_>, name: &str) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = IfReq::new(name);
    req.set_data_ptr(std::ptr::from_mut(&mut info).addr());
    // SAFETY: `sock` is open for the borrow; `req` points at `info`, a whole
    // `struct ethtool_drvinfo` that lives until this function returns, and the kernel writes
    // only within it (every byte pattern is valid for its integer fields).
    check(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCETHTOOL, &mut req) })?;
    Ok((until_nul(&info.driver), until_nul(&info.bus_info)))
}

/// The bytes of `field` up to its first NUL.
fn until_nul(field: &[u8]) -> Vec<u8> {
    field.iter().copied().take_while(|&b| b != 0).collect()
}

/// Moves the calling thread into a new, empty network namespace. The namespace goes away once
/// the thread has exited and every fd into it (taps, sockets) is closed.
#[cfg(test)]
pub(crate) fn unshare_netns() -> io::Result<()> {
    // SAFETY: unshare(2) takes no pointers; CLONE_NEWNET affects only the calling thread.
    check(unsafe { libc::unshare(libc::CLONE_NEWNET) }).map(drop)
}
