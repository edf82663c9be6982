//! Tap queues: opening `/dev/net/tun`, adopting a handed-over fd, and frame I/O.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::TapError;
use crate::ifreq::{IfReq, validate_name};
use crate::sys::{self, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR};

/// Bytes of `struct virtio_net_hdr_v1` (with `num_buffers`) before every frame read from or
/// written to a [`Tap`]: the header a VERSION_1 virtio-net device exchanges with the guest.
pub const VNET_HDR_LEN: usize = 12;

/// `VNET_HDR_LEN` as the `int` TUNSETVNETHDRSZ takes.
const VNET_HDR_SZ: i32 = 12;
const _: () = assert!(VNET_HDR_SZ as usize == VNET_HDR_LEN);

/// Offload for [`Tap::set_offload`]: the reader takes frames with a partial checksum.
pub const TUN_F_CSUM: u32 = libc::TUN_F_CSUM;
/// Offload for [`Tap::set_offload`]: TCPv4 segmentation (needs `TUN_F_CSUM`).
pub const TUN_F_TSO4: u32 = libc::TUN_F_TSO4;
/// Offload for [`Tap::set_offload`]: TCPv6 segmentation (needs `TUN_F_CSUM`).
pub const TUN_F_TSO6: u32 = libc::TUN_F_TSO6;
/// Offload for [`Tap::set_offload`]: TSO with the ECN bit (needs a `TUN_F_TSO*`).
pub const TUN_F_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
/// Offload for [`Tap::set_offload`]: UDP fragmentation offload (needs `TUN_F_CSUM`).
pub const TUN_F_UFO: u32 = libc::TUN_F_UFO;

/// The clone device every tap queue is opened from.
const TUN_PATH: &str = "/dev/net/tun";

/// The name pattern given to the kernel when the caller leaves the name empty; the kernel
/// replaces `%d` with the first free number.
const NAME_PATTERN: &str = "vmtap%d";

/// The flags every queue we open asks for: Ethernet frames, no packet-info prefix, and a
/// virtio-net header before each frame.
const TAP_FLAGS: u16 = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

/// One queue of a Linux tap interface: a non-blocking, close-on-exec fd that reads and writes
/// whole frames, each preceded by a [`VNET_HDR_LEN`]-byte virtio-net header.
///
/// Closing the last queue of a tap this process created removes the interface (unless someone
/// made it persistent).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens `queues` queues of tap `name`, creating the interface if it does not exist and
    /// attaching to it if it does. More than one queue makes it a multi-queue tap.
    ///
    /// An empty `name` lets the kernel choose one (`vmtap0`, `vmtap1`...); read it back with
    /// [`Tap::name`]. Every queue has its virtio-net header size set to [`VNET_HDR_LEN`].
    pub fn open(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if !name.is_empty() {
            validate_name(name).map_err(|reason| TapError::InvalidName {
                name: name.to_owned(),
                reason,
            })?;
        }
        let asked = if name.is_empty() { NAME_PATTERN } else { name };
        if queues == 0 {
            return Err(TapError::NoQueues {
                name: asked.to_owned(),
            });
        }
        let flags = if queues > 1 {
            TAP_FLAGS | IFF_MULTI_QUEUE
        } else {
            TAP_FLAGS
        };
        let first = Self::open_queue(asked, flags)?;
        let real_name = first.name.clone();
        let mut taps = Vec::with_capacity(queues);
        taps.push(first);
        // The rest attach to the interface the first one created or found, by its real name.
        for _ in 1..queues {
            taps.push(Self::open_queue(&real_name, flags)?);
        }
        log::debug!("Opened {queues} queue(s) of tap {real_name}");
        Ok(taps)
    }

    /// Opens `/dev/net/tun` and attaches it to `name` (a name or the kernel pattern).
    fn open_queue(name: &str, flags: u16) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied {
                    name: name.to_owned(),
                    op: "open /dev/net/tun",
                },
                _ => TapError::Io {
                    name: name.to_owned(),
                    op: "open /dev/net/tun",
                    source,
                },
            })?;
        let mut req = IfReq::new(name);
        req.set_flags(flags);
        sys::tun_set_iff(&file, &mut req).map_err(|source| set_iff_error(name, source))?;
        let name = name_of(&req)?;
        // The kernel's default is the 10-byte legacy header; a VERSION_1 device uses 12.
        sys::tun_set_vnet_hdr_sz(file.as_fd(), VNET_HDR_SZ)
            .map_err(|source| TapError::from_io(&name, "TUNSETVNETHDRSZ", source))?;
        Ok(Tap { file, name })
    }

    /// Adopts a tap queue fd opened by someone else (given on the command line or received
    /// over `SCM_RIGHTS`). It must be attached to a tap (not a tun device) opened with
    /// `IFF_VNET_HDR` and `IFF_NO_PI`. Sets `O_NONBLOCK`, close-on-exec and the virtio-net
    /// header size.
    ///
    /// A missing `IFF_NO_PI` is only caught when the queue has a socket filter attached: the
    /// kernel reports the same bit as `IFF_NOFILTER` otherwise.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let req = sys::tun_get_iff(fd.as_fd()).map_err(|source| match source.raw_os_error() {
            // ENOTTY/EINVAL: not a tun file at all; EBADFD: /dev/net/tun not yet attached.
            Some(libc::ENOTTY | libc::EINVAL | libc::EBADFD) => TapError::FdNotATap { fd: raw },
            _ => TapError::Io {
                name: format!("fd {raw}"),
                op: "TUNGETIFF",
                source,
            },
        })?;
        let name = name_of(&req)?;
        let flags = req.flags();
        let unsuitable = |reason| TapError::FdUnsuitable {
            fd: raw,
            name: name.clone(),
            reason,
        };
        if flags & IFF_TUN != 0 || flags & IFF_TAP == 0 {
            return Err(unsuitable("it is a tun device (IP packets), not a tap"));
        }
        if flags & IFF_VNET_HDR == 0 {
            return Err(unsuitable("it was opened without IFF_VNET_HDR"));
        }
        // TUNGETIFF reports bit 0x1000 as IFF_NO_PI *or* IFF_NOFILTER (no socket filter on this
        // queue), so a clear bit proves the packet-info prefix, a set bit does not rule it out.
        if flags & IFF_NO_PI == 0 {
            return Err(unsuitable("it was opened without IFF_NO_PI"));
        }
        sys::set_nonblock_cloexec(fd.as_fd())
            .map_err(|source| TapError::from_io(&name, "fcntl", source))?;
        sys::tun_set_vnet_hdr_sz(fd.as_fd(), VNET_HDR_SZ)
            .map_err(|source| TapError::from_io(&name, "TUNSETVNETHDRSZ", source))?;
        log::debug!("Adopted fd {raw} of tap {name}");
        Ok(Tap {
            file: File::from(fd),
            name,
        })
    }

    /// The interface name, as the kernel reported it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives up the queue fd, for example to hand it to another process.
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    /// Tells the kernel which offloads (`TUN_F_*`, or 0 for none) the guest accepts in frames
    /// read from the tap; the TSO/UFO flags need `TUN_F_CSUM`. Applies to the whole interface.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        sys::tun_set_offload(self.file.as_fd(), flags)
            .map_err(|source| TapError::from_io(&self.name, "TUNSETOFFLOAD", source))
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is queued. A
    /// frame longer than `buf` is truncated.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame, header included.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }

    /// Writes one frame gathered from several buffers (header included), as one `writev`.
    pub fn writev(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// The name the kernel wrote back into `req`.
fn name_of(req: &IfReq) -> Result<String, TapError> {
    String::from_utf8(req.name_bytes().to_vec()).map_err(|_| TapError::InvalidName {
        name: String::from_utf8_lossy(req.name_bytes()).into_owned(),
        reason: "not UTF-8",
    })
}

/// Types a TUNSETIFF failure on `name`.
fn set_iff_error(name: &str, source: io::Error) -> TapError {
    match source.raw_os_error() {
        // tun_attach: a single-queue tap already has its queue.
        Some(libc::EBUSY) => TapError::Busy {
            name: name.to_owned(),
        },
        // The interface exists but is not a tap, or its multi-queue flag differs from ours.
        Some(libc::EINVAL) => classify_existing(name, source),
        _ => TapError::from_io(name, "TUNSETIFF", source),
    }
}

/// Tells apart the two reasons TUNSETIFF returns EINVAL on an existing interface by asking
/// its driver (`ETHTOOL_GDRVINFO`): a tap reports driver `tun` and bus `tap`.
fn classify_existing(name: &str, source: io::Error) -> TapError {
    let info = sys::inet_socket().and_then(|sock| sys::driver_info(sock.as_fd(), name));
    match info {
        Ok((driver, bus)) if driver == b"tun" && bus == b"tap" => TapError::QueueModeMismatch {
            name: name.to_owned(),
        },
        Ok(_) => TapError::NotATap {
            name: name.to_owned(),
        },
        Err(_) => TapError::Io {
            name: name.to_owned(),
            op: "TUNSETIFF",
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::OwnedFd;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::testutil::{in_netns, raw_queue, tun_flags};

    const SUBNET_MASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
    const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const BROADCAST: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 255);
    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];

    /// Opens tap `name` with address 10.0.0.1/24 and brings it up.
    fn up_tap(name: &str) -> Tap {
        let tap = Tap::open(name, 1).unwrap().remove(0);
        crate::set_ipv4(name, HOST_ADDR, SUBNET_MASK).unwrap();
        crate::set_up(name).unwrap();
        tap
    }

    /// Reads frames from `tap` until one is an IPv4 UDP datagram to `port`, skipping the IPv6
    /// chatter a new interface sends; panics after two seconds.
    fn read_udp_frame(tap: &Tap, port: u16) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0; 2048];
        while Instant::now() < deadline {
            match tap.read(&mut buf) {
                Ok(len) => {
                    let frame = &buf[..len];
                    // vnet header, Ethernet header (14), IPv4 header (20, no options), UDP.
                    let udp = VNET_HDR_LEN + 14 + 20;
                    if len >= udp + 8
                        && frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ETHERTYPE_IPV4
                        && frame[VNET_HDR_LEN + 14 + 9] == 17
                        && frame[udp + 2..udp + 4] == port.to_be_bytes()
                    {
                        return frame.to_vec();
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(err) => panic!("tap read failed: {err}"),
            }
        }
        panic!("no UDP frame to port {port} on the tap within 2 s");
    }

    /// Ones' complement sum of 16-bit words (RFC 1071), for the IPv4 header checksum.
    fn ip_checksum(header: &[u8]) -> [u8; 2] {
        let sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let folded = (folded & 0xffff) + (folded >> 16);
        (!u16::try_from(folded).unwrap()).to_be_bytes()
    }

    /// An Ethernet broadcast frame carrying a UDP datagram from the guest's 10.0.0.2:1234 to
    /// 10.0.0.255:`port` (no UDP checksum).
    fn guest_broadcast_frame(port: u16, payload: &[u8]) -> Vec<u8> {
        let udp_len = u16::try_from(8 + payload.len()).unwrap();
        let ip_len = 20 + udp_len;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip.extend_from_slice(&GUEST_ADDR.octets());
        ip.extend_from_slice(&BROADCAST.octets());
        let checksum = ip_checksum(&ip);
        ip[10..12].copy_from_slice(&checksum);
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ETHERTYPE_IPV4);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&1234u16.to_be_bytes());
        frame.extend_from_slice(&port.to_be_bytes());
        frame.extend_from_slice(&udp_len.to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn open_by_name_creates_the_interface_with_that_name() {
        let (name, mtu) = in_netns(|| {
            let taps = Tap::open("vm0", 1).unwrap();
            (taps[0].name().to_owned(), crate::mtu("vm0").unwrap())
        });

        assert_eq!((name.as_str(), mtu), ("vm0", 1500));
    }

    #[test]
    fn open_with_an_empty_name_gets_a_vmtap_name() {
        let name = in_netns(|| Tap::open("", 1).unwrap()[0].name().to_owned());

        assert_eq!(name, "vmtap0");
    }

    #[test]
    fn open_with_an_empty_name_and_two_queues_shares_the_chosen_name() {
        let names = in_netns(|| {
            let taps = Tap::open("", 2).unwrap();
            (taps[0].name().to_owned(), taps[1].name().to_owned())
        });

        assert_eq!(names, ("vmtap0".to_owned(), "vmtap0".to_owned()));
    }

    #[test]
    fn open_with_two_queues_makes_a_multi_queue_tap() {
        let flags = in_netns(|| {
            let taps = Tap::open("mq0", 2).unwrap();
            taps.iter().map(tun_flags).collect::<Vec<_>>()
        });

        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
        assert_eq!(flags, vec![want, want]);
    }

    #[test]
    fn open_of_an_existing_multi_queue_tap_adds_queues() {
        let count = in_netns(|| {
            let _first = Tap::open("mq0", 2).unwrap();
            Tap::open("mq0", 2).unwrap().len()
        });

        assert_eq!(count, 2);
    }

    #[test]
    fn second_single_queue_open_is_busy() {
        let err = in_netns(|| {
            let _held = Tap::open("vm0", 1).unwrap();
            Tap::open("vm0", 1).unwrap_err()
        });

        assert_eq!(err.to_string(), "Tap vm0 is in use by another process");
    }

    #[test]
    fn single_queue_open_of_a_multi_queue_tap_is_a_queue_mode_mismatch() {
        let err = in_netns(|| {
            let _held = Tap::open("mq0", 2).unwrap();
            Tap::open("mq0", 1).unwrap_err()
        });

        assert!(matches!(err, TapError::QueueModeMismatch { name } if name == "mq0"));
    }

    #[test]
    fn open_of_a_tun_interface_is_not_a_tap() {
        let err = in_netns(|| {
            let _tun = raw_queue("tun0", IFF_TUN | IFF_NO_PI);
            Tap::open("tun0", 1).unwrap_err()
        });

        assert_eq!(err.to_string(), "Interface tun0 exists and is not a tap");
    }

    #[test]
    fn open_with_a_long_name_is_refused_before_any_syscall() {
        let err = in_netns(|| Tap::open("0123456789abcdef", 1).unwrap_err());

        assert!(matches!(
            err,
            TapError::InvalidName {
                reason: "longer than 15 bytes",
                ..
            }
        ));
    }

    #[test]
    fn open_with_a_slash_or_space_in_the_name_is_refused() {
        let errs = in_netns(|| {
            (
                Tap::open("a/b", 1).unwrap_err(),
                Tap::open("a b", 1).unwrap_err(),
            )
        });

        assert!(matches!(
            errs,
            (TapError::InvalidName { .. }, TapError::InvalidName { .. })
        ));
    }

    #[test]
    fn open_with_zero_queues_is_refused() {
        let err = in_netns(|| Tap::open("vm0", 0).unwrap_err());

        assert_eq!(err.to_string(), "Tap vm0 needs at least one queue");
    }

    #[test]
    fn read_of_an_idle_tap_would_block() {
        let kind = in_netns(|| {
            let tap = Tap::open("vm0", 1).unwrap().remove(0);
            tap.read(&mut [0; 64]).unwrap_err().kind()
        });

        assert_eq!(kind, io::ErrorKind::WouldBlock);
    }

    #[test]
    fn set_offload_accepts_checksum_and_tso() {
        let result = in_netns(|| {
            let tap = Tap::open("vm0", 1).unwrap().remove(0);
            tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
                .map_err(|e| e.to_string())
        });

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn from_fd_on_a_regular_file_is_not_a_tap() {
        let file = File::open(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
        let raw = file.as_raw_fd();

        let err = Tap::from_fd(OwnedFd::from(file)).unwrap_err();

        assert_eq!(err.to_string(), format!("fd {raw} is not a tap"));
    }

    #[test]
    fn from_fd_on_a_pipe_is_not_a_tap() {
        let (reader, _writer) = io::pipe().unwrap();

        let err = Tap::from_fd(OwnedFd::from(reader)).unwrap_err();

        assert!(matches!(err, TapError::FdNotATap { .. }));
    }

    #[test]
    fn from_fd_on_an_unattached_tun_clone_is_not_a_tap() {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
            .expect("open /dev/net/tun (needs root)");

        let err = Tap::from_fd(OwnedFd::from(file)).unwrap_err();

        assert!(matches!(err, TapError::FdNotATap { .. }));
    }

    #[test]
    fn from_fd_on_a_tap_without_vnet_hdr_says_so() {
        let err =
            in_netns(|| Tap::from_fd(raw_queue("vm0", IFF_TAP | IFF_NO_PI).into()).unwrap_err());

        assert!(
            err.to_string()
                .ends_with("cannot serve virtio-net: it was opened without IFF_VNET_HDR")
        );
    }

    #[test]
    fn from_fd_on_a_tun_device_says_it_is_not_a_tap() {
        let err = in_netns(|| {
            Tap::from_fd(raw_queue("tun0", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).into()).unwrap_err()
        });

        assert!(matches!(err, TapError::FdUnsuitable { ref name, .. } if name == "tun0"));
    }

    #[test]
    fn from_fd_adopts_a_tap_and_makes_it_non_blocking() {
        let (name, kind) = in_netns(|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(TUN_PATH)
                .unwrap();
            let mut req = IfReq::new("vm0");
            req.set_flags(TAP_FLAGS);
            sys::tun_set_iff(&file, &mut req).unwrap();

            let tap = Tap::from_fd(file.into()).unwrap();

            let kind = tap.read(&mut [0; 64]).unwrap_err().kind();
            (tap.name().to_owned(), kind)
        });

        assert_eq!((name.as_str(), kind), ("vm0", io::ErrorKind::WouldBlock));
    }

    #[test]
    fn into_fd_keeps_the_queue_open() {
        let name = in_netns(|| {
            let fd = Tap::open("vm0", 1).unwrap().remove(0).into_fd();
            Tap::from_fd(fd).unwrap().name().to_owned()
        });

        assert_eq!(name, "vm0");
    }

    #[test]
    fn frame_from_the_host_stack_is_read_after_a_vnet_header() {
        let (frame, host_mac) = in_netns(|| {
            let tap = up_tap("vm0");
            let sock = UdpSocket::bind((HOST_ADDR, 0)).unwrap();
            sock.set_broadcast(true).unwrap();
            sock.send_to(b"hello", (BROADCAST, 9999)).unwrap();
            (read_udp_frame(&tap, 9999), crate::mac("vm0").unwrap())
        });

        let eth = &frame[VNET_HDR_LEN..];
        assert_eq!(frame[1], 0, "gso_type is VIRTIO_NET_HDR_GSO_NONE");
        assert_eq!(&eth[..6], &[0xff; 6]);
        assert_eq!(&eth[6..12], &host_mac.bytes());
        assert_eq!(&eth[eth.len() - 5..], b"hello");
    }

    #[test]
    fn frame_written_with_writev_reaches_a_host_socket() {
        let (written, received) = in_netns(|| {
            let tap = up_tap("vm0");
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9999)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let frame = guest_broadcast_frame(9999, b"ping");
            let header = [0; VNET_HDR_LEN];

            let written = tap
                .writev(&[IoSlice::new(&header), IoSlice::new(&frame)])
                .unwrap();

            let mut buf = [0; 64];
            let (len, from) = sock.recv_from(&mut buf).unwrap();
            (
                written - frame.len(),
                (buf[..len].to_vec(), from.to_string()),
            )
        });

        assert_eq!(written, VNET_HDR_LEN);
        assert_eq!(received, (b"ping".to_vec(), "10.0.0.2:1234".to_owned()));
    }

    #[test]
    fn frame_written_with_write_reaches_a_host_socket() {
        let received = in_netns(|| {
            let tap = up_tap("vm0");
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9999)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut frame = vec![0; VNET_HDR_LEN];
            frame.extend_from_slice(&guest_broadcast_frame(9999, b"pong"));

            tap.write(&frame).unwrap();

            let mut buf = [0; 64];
            let len = sock.recv(&mut buf).unwrap();
            buf[..len].to_vec()
        });

        assert_eq!(received, b"pong");
    }
}
