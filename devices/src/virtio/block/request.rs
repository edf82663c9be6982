//! One virtio-blk request: checking the descriptor chain, doing the work, writing the status.
//!
//! Layout (virtio 1.2, 5.2.6): a 16-byte header (type u32, reserved u32, sector u64) in
//! device-readable buffers, then the data, then one status byte at the very end of the last
//! device-writable buffer. The header may span descriptors; readable buffers must all come
//! before writable ones.

use log::{debug, warn};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

use super::disk::{BlockError, Disk};
use super::state::BlockCounters;

/// Length of the request header.
const HEADER_LEN: usize = 16;

/// A guest buffer (a descriptor, or what is left of one after the header or status is cut off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Segment {
    /// Guest address of the first byte.
    pub(super) addr: GuestAddress,
    /// Length in bytes.
    pub(super) len: u32,
}

impl Segment {
    /// Splits the segment into pieces of at most `max` bytes: (address, length).
    pub(super) fn chunks(self, max: usize) -> impl Iterator<Item = (GuestAddress, usize)> {
        let len = self.len as usize;
        (0..len)
            .step_by(max.max(1))
            .map(move |start| (self.addr.unchecked_add(start as u64), max.min(len - start)))
    }
}

/// A well-formed request.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Request {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub(super) kind: u32,
    /// First sector.
    pub(super) sector: u64,
    /// Device-readable data after the header (the payload of a write).
    pub(super) readable: Vec<Segment>,
    /// Device-writable data before the status byte (the buffers of a read or GET_ID).
    pub(super) writable: Vec<Segment>,
    /// Where the status byte goes.
    pub(super) status: GuestAddress,
}

/// What a descriptor chain turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    /// A request to execute.
    Request(Request),
    /// An unusable chain: it goes back to the driver, with IOERR when it has a status byte.
    Malformed {
        /// The status byte, if the chain ends in a writable buffer.
        status: Option<GuestAddress>,
        /// What was wrong, for the log.
        reason: &'static str,
    },
}

/// Handles one chain completely; returns the used length to report (bytes written to the
/// driver, status included).
pub(super) fn handle_chain(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    counters: &mut BlockCounters,
) -> u32 {
    match parse(descriptors, mem) {
        Parsed::Malformed { status, reason } => {
            debug!(
                "virtio-blk {}: malformed request: {reason}",
                disk.path().display()
            );
            match status {
                Some(addr) => {
                    write_status(mem, addr, VIRTIO_BLK_S_IOERR);
                    1
                }
                None => 0,
            }
        }
        Parsed::Request(request) => {
            let (status, written) = execute(&request, mem, disk, counters);
            write_status(mem, request.status, status);
            written.saturating_add(1)
        }
    }
}

/// Checks a chain's shape and reads its header.
pub(super) fn parse(
    descriptors: impl Iterator<Item = Descriptor>,
    mem: &GuestMemoryMmap,
) -> Parsed {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut out_of_order = false;
    let mut last: Option<(Segment, bool)> = None;
    for desc in descriptors {
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        let is_writable = desc.is_write_only();
        if is_writable {
            writable.push(segment);
        } else if writable.is_empty() {
            readable.push(segment);
        } else {
            out_of_order = true;
        }
        last = Some((segment, is_writable));
    }

    let status = match last {
        Some((segment, true)) if segment.len > 0 => {
            segment.addr.checked_add(u64::from(segment.len) - 1)
        }
        _ => None,
    };
    let Some(status) = status.filter(|addr| mem.address_in_range(*addr)) else {
        return Parsed::Malformed {
            status: None,
            reason: "no status byte",
        };
    };
    let malformed = |reason| Parsed::Malformed {
        status: Some(status),
        reason,
    };
    if out_of_order {
        return malformed("readable buffer after a writable one");
    }
    if !readable
        .iter()
        .chain(&writable)
        .all(|s| mem.check_range(s.addr, s.len as usize))
    {
        return malformed("buffer outside guest memory");
    }
    let mut header = [0u8; HEADER_LEN];
    if gather(mem, &readable, &mut header).is_err() {
        return malformed("header too short");
    }
    if let Some(status_buffer) = writable.last_mut() {
        status_buffer.len -= 1;
    }
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
    Parsed::Request(Request {
        kind: u32::from_le_bytes([t0, t1, t2, t3]),
        sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        readable: skip(&readable, HEADER_LEN),
        writable: writable.into_iter().filter(|s| s.len > 0).collect(),
        status,
    })
}

/// Does the work; returns the status and the data bytes written to the driver.
fn execute(
    request: &Request,
    mem: &GuestMemoryMmap,
    disk: &mut Disk,
    counters: &mut BlockCounters,
) -> (u32, u32) {
    let result = match request.kind {
        VIRTIO_BLK_T_IN => disk
            .read(mem, request.sector, &request.writable)
            .inspect(|bytes| {
                counters.read_ops += 1;
                counters.read_bytes += bytes;
            }),
        VIRTIO_BLK_T_OUT => disk
            .write(mem, request.sector, &request.readable)
            .map(|bytes| {
                counters.write_ops += 1;
                counters.write_bytes += bytes;
                0
            }),
        VIRTIO_BLK_T_FLUSH => disk.flush().map(|()| {
            counters.flush_ops += 1;
            0
        }),
        VIRTIO_BLK_T_GET_ID => {
            scatter(mem, disk.serial(), &request.writable).map_err(BlockError::GuestMemory)
        }
        kind => {
            debug!(
                "virtio-blk {}: unsupported request type {kind}",
                disk.path().display()
            );
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
    };
    match result {
        // Data lengths are bounded by the chain length, which virtio-queue keeps under 4 GiB.
        Ok(bytes) => (VIRTIO_BLK_S_OK, u32::try_from(bytes).unwrap_or(u32::MAX)),
        Err(err) => {
            log_failure(disk, &err);
            (VIRTIO_BLK_S_IOERR, 0)
        }
    }
}

/// Guest mistakes go to debug (a guest must not flood the log); host failures to warn.
fn log_failure(disk: &Disk, err: &BlockError) {
    let path = disk.path().display();
    match err {
        BlockError::Read { .. } | BlockError::Write { .. } | BlockError::Flush(_) => {
            warn!("virtio-blk {path}: {err}: {}", source_text(err));
        }
        _ => debug!("virtio-blk {path}: {err}"),
    }
}

/// The source of an error, for a one-line log.
fn source_text(err: &BlockError) -> String {
    std::error::Error::source(err)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Writes the status byte (its address was checked while parsing).
fn write_status(mem: &GuestMemoryMmap, addr: GuestAddress, status: u32) {
    let byte = u8::try_from(status).unwrap_or(u8::MAX);
    if let Err(err) = mem.write_obj(byte, addr) {
        warn!(
            "virtio-blk: cannot write status at {:#x}: {err}",
            addr.raw_value()
        );
    }
}

/// Fills `buf` from the start of `segments`; fails if they hold fewer bytes.
fn gather(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> Result<(), &'static str> {
    let mut filled = 0;
    for segment in segments {
        if filled == buf.len() {
            break;
        }
        let len = (segment.len as usize).min(buf.len() - filled);
        mem.read_slice(&mut buf[filled..filled + len], segment.addr)
            .map_err(|_| "unreadable")?;
        filled += len;
    }
    if filled == buf.len() {
        Ok(())
    } else {
        Err("too short")
    }
}

/// Copies as much of `data` as fits into `segments`; returns the bytes copied.
fn scatter(
    mem: &GuestMemoryMmap,
    data: &[u8],
    segments: &[Segment],
) -> Result<u64, GuestMemoryError> {
    let mut copied = 0;
    for segment in segments {
        let len = (segment.len as usize).min(data.len() - copied);
        mem.write_slice(&data[copied..copied + len], segment.addr)?;
        copied += len;
    }
    Ok(copied as u64)
}

/// The segments left after dropping the first `bytes` bytes.
fn skip(segments: &[Segment], mut bytes: usize) -> Vec<Segment> {
    let mut rest = Vec::new();
    for segment in segments {
        let len = segment.len as usize;
        if bytes >= len {
            bytes -= len;
            continue;
        }
        // bytes < len <= u32::MAX, and the segment was checked to lie in guest memory.
        let cut = bytes as u32;
        rest.push(Segment {
            addr: segment.addr.unchecked_add(u64::from(cut)),
            len: segment.len - cut,
        });
        bytes = 0;
    }
    rest
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    use super::*;
    use crate::virtio::test_driver::guest_memory;

    fn readable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn writable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn write_header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(addr)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    #[test]
    fn header_split_across_descriptors_is_parsed() {
        let mem = guest_memory(0x10000);
        write_header(&mem, 0x1000, VIRTIO_BLK_T_IN, 0);
        mem.write_obj(7u64, GuestAddress(0x2000)).unwrap();
        let chain = [
            readable(0x1000, 8),
            readable(0x2000, 8),
            writable(0x3000, 513),
        ];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Request(Request {
                kind: VIRTIO_BLK_T_IN,
                sector: 7,
                readable: vec![],
                writable: vec![Segment {
                    addr: GuestAddress(0x3000),
                    len: 512
                }],
                status: GuestAddress(0x3200),
            })
        );
    }

    #[test]
    fn data_sharing_header_descriptor_keeps_its_tail() {
        let mem = guest_memory(0x10000);
        write_header(&mem, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let chain = [readable(0x1000, 16 + 512), writable(0x3000, 1)];

        let parsed = parse(chain.into_iter(), &mem);

        let Parsed::Request(request) = parsed else {
            panic!("not a request: {parsed:?}")
        };
        assert_eq!(
            request.readable,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
        assert_eq!(request.writable, vec![]);
    }

    #[test]
    fn chain_without_writable_tail_has_no_status() {
        let mem = guest_memory(0x10000);
        let chain = [readable(0x1000, 16), readable(0x2000, 1)];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Malformed {
                status: None,
                reason: "no status byte"
            }
        );
    }

    #[test]
    fn short_header_is_malformed_with_status() {
        let mem = guest_memory(0x10000);
        let chain = [readable(0x1000, 8), writable(0x3000, 1)];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Malformed {
                status: Some(GuestAddress(0x3000)),
                reason: "header too short"
            }
        );
    }

    #[test]
    fn readable_after_writable_is_malformed() {
        let mem = guest_memory(0x10000);
        let chain = [
            readable(0x1000, 16),
            writable(0x2000, 512),
            readable(0x3000, 1),
            writable(0x4000, 1),
        ];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Malformed {
                status: Some(GuestAddress(0x4000)),
                reason: "readable buffer after a writable one"
            }
        );
    }

    #[test]
    fn buffer_outside_guest_memory_is_malformed() {
        let mem = guest_memory(0x10000);
        let chain = [
            readable(0x1000, 16),
            writable(0xf000, 0x2000),
            writable(0x4000, 1),
        ];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Malformed {
                status: Some(GuestAddress(0x4000)),
                reason: "buffer outside guest memory"
            }
        );
    }

    #[test]
    fn status_outside_guest_memory_means_no_status() {
        let mem = guest_memory(0x10000);
        let chain = [readable(0x1000, 16), writable(0x2_0000, 1)];

        let parsed = parse(chain.into_iter(), &mem);

        assert_eq!(
            parsed,
            Parsed::Malformed {
                status: None,
                reason: "no status byte"
            }
        );
    }

    #[test]
    fn segment_chunks_cover_it_exactly() {
        let segment = Segment {
            addr: GuestAddress(0x1000),
            len: 10,
        };

        let chunks: Vec<_> = segment.chunks(4).collect();

        assert_eq!(
            chunks,
            vec![
                (GuestAddress(0x1000), 4),
                (GuestAddress(0x1004), 4),
                (GuestAddress(0x1008), 2)
            ]
        );
    }
}
