//! The virtio-vsock packet header (virtio 1.x, 5.10.6): 44 bytes, little-endian, in front of
//! every packet on the rx and tx queues.

use serde::{Deserialize, Serialize};

/// Length of the header.
pub const HEADER_LEN: usize = 44;
/// The only socket type we carry: a stream.
pub const TYPE_STREAM: u16 = 1;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// What a packet does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Connect.
    Request,
    /// Connection accepted.
    Response,
    /// Connection refused or reset.
    Rst,
    /// One or both directions closed (`flags`).
    Shutdown,
    /// Data.
    Rw,
    /// The sender's credit changed.
    CreditUpdate,
    /// The sender asks for the receiver's credit.
    CreditRequest,
}

impl Op {
    fn code(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Rst => 3,
            Self::Shutdown => 4,
            Self::Rw => 5,
            Self::CreditUpdate => 6,
            Self::CreditRequest => 7,
        }
    }

    fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `flags` of a SHUTDOWN: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a SHUTDOWN: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Sender's CID.
    pub src_cid: u64,
    /// Receiver's CID.
    pub dst_cid: u64,
    /// Sender's port.
    pub src_port: u32,
    /// Receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// What the packet does.
    pub op: Op,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// The sender's receive buffer for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed on this connection (wrapping).
    pub fwd_cnt: u32,
}

/// Why a header was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadHeader {
    /// Fewer than 44 bytes.
    Short,
    /// Not a stream packet.
    Type(u16),
    /// Unknown operation.
    Op(u16),
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32_at(bytes, at)) | (u64::from(u32_at(bytes, at + 4)) << 32)
}

impl Header {
    /// Parses the first 44 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, BadHeader> {
        if bytes.len() < HEADER_LEN {
            return Err(BadHeader::Short);
        }
        let kind = u16_at(bytes, 28);
        if kind != TYPE_STREAM {
            return Err(BadHeader::Type(kind));
        }
        let code = u16_at(bytes, 30);
        Ok(Self {
            src_cid: u64_at(bytes, 0),
            dst_cid: u64_at(bytes, 8),
            src_port: u32_at(bytes, 16),
            dst_port: u32_at(bytes, 20),
            len: u32_at(bytes, 24),
            op: Op::from_code(code).ok_or(BadHeader::Op(code))?,
            flags: u32_at(bytes, 32),
            buf_alloc: u32_at(bytes, 36),
            fwd_cnt: u32_at(bytes, 40),
        })
    }

    /// The 44 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.code().to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 5000,
            len: 17,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 12,
        }
    }

    #[test]
    fn header_round_trips_through_its_wire_form() {
        let header = sample();

        assert_eq!(Header::parse(&header.to_bytes()), Ok(header));
    }

    #[test]
    fn short_datagram_or_unknown_op_is_refused() {
        let mut bytes = sample().to_bytes();

        assert_eq!(Header::parse(&bytes[..40]), Err(BadHeader::Short));
        bytes[30] = 9;
        assert_eq!(Header::parse(&bytes), Err(BadHeader::Op(9)));
        bytes[28] = 2;
        assert_eq!(Header::parse(&bytes), Err(BadHeader::Type(2)));
    }
}
