//! One stream between a guest port and a host UNIX socket: its credit on both sides, the bytes
//! of the guest waiting for the host socket, and how far each side has shut down.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use serde::{Deserialize, Serialize};

use super::packet::{HOST_CID, Header, Op};

/// Receive buffer we advertise to the guest for each connection (bytes it may send before we
/// pass them to the host socket).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// After consuming this much since the last report, we tell the guest our credit.
const CREDIT_UPDATE_AFTER: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// A host process connected and sent `CONNECT <port>`; the guest has not answered yet.
    Connecting,
    /// Data flows.
    Established,
}

/// What a connection carries across a live update (its socket travels apart, as an fd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    /// Our (host) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// Where it is.
    pub phase: Phase,
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed.
    pub peer_fwd_cnt: u32,
    /// Bytes we have sent the guest.
    pub tx_cnt: u32,
    /// Bytes of the guest we have passed to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` when we last told the guest.
    pub fwd_cnt_reported: u32,
    /// Bytes of the guest (after our `OK` line) not yet written to the host socket.
    pub to_host: Vec<u8>,
    /// How many leading bytes of `to_host` are our own (the `OK` line), not the guest's.
    pub own_bytes: usize,
    /// The guest will send no more: shut the host socket's write side once `to_host` is out.
    pub guest_done_sending: bool,
    /// The host socket reached its end: we told the guest we send no more.
    pub host_done_sending: bool,
}

/// A connection with its host socket.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Ports, credit and buffers.
    pub state: ConnState,
}

/// What a guest packet asks of the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing more to do.
    Done,
    /// Send this to the guest.
    Reply(Op),
    /// Reset and forget the connection (we tell the guest unless it told us).
    Reset,
    /// Forget the connection (the guest reset it).
    Closed,
}

impl Connection {
    /// A connection on `stream` (made non-blocking).
    pub fn new(stream: UnixStream, state: ConnState) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self { stream, state })
    }

    /// A fresh state between `local_port` and `peer_port`.
    pub fn fresh_state(local_port: u32, peer_port: u32, phase: Phase) -> ConnState {
        ConnState {
            local_port,
            peer_port,
            phase,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_reported: 0,
            to_host: Vec::new(),
            own_bytes: 0,
            guest_done_sending: false,
            host_done_sending: false,
        }
    }

    /// A header from us to the guest's CID `guest_cid`, with our credit.
    pub fn header(&mut self, guest_cid: u64, op: Op, len: u32, flags: u32) -> Header {
        self.state.fwd_cnt_reported = self.state.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.state.local_port,
            dst_port: self.state.peer_port,
            len,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.state.fwd_cnt,
        }
    }

    /// Bytes the guest can take now: its buffer less what is in flight.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.state.tx_cnt.wrapping_sub(self.state.peer_fwd_cnt);
        self.state.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether we should tell the guest our credit now.
    pub fn owes_credit_update(&self) -> bool {
        self.state.fwd_cnt.wrapping_sub(self.state.fwd_cnt_reported) >= CREDIT_UPDATE_AFTER
    }

    /// Handles a packet of the guest on this connection (payload for RW).
    pub fn handle_guest_packet(&mut self, header: &Header, payload: &[u8]) -> Outcome {
        self.state.peer_buf_alloc = header.buf_alloc;
        self.state.peer_fwd_cnt = header.fwd_cnt;
        match (header.op, self.state.phase) {
            (Op::Rst, _) => Outcome::Closed,
            (Op::Response, Phase::Connecting) => {
                self.state.phase = Phase::Established;
                // The host process learns our port, as cloud-hypervisor's hybrid vsock says.
                let ok = format!("OK {}\n", self.state.local_port);
                self.state.to_host.splice(0..0, ok.bytes());
                self.state.own_bytes += ok.len();
                Outcome::Done
            }
            (Op::Rw, Phase::Established) => {
                let guest_bytes = self.state.to_host.len() - self.state.own_bytes;
                let pending = u32::try_from(guest_bytes).unwrap_or(u32::MAX);
                if self.state.guest_done_sending || pending.saturating_add(header.len) > BUF_ALLOC {
                    // The guest overran the credit we gave it, or sends after its shutdown.
                    return Outcome::Reset;
                }
                self.state.to_host.extend_from_slice(payload);
                Outcome::Done
            }
            (Op::CreditUpdate, _) => Outcome::Done,
            (Op::CreditRequest, Phase::Established) => Outcome::Reply(Op::CreditUpdate),
            (Op::Shutdown, Phase::Established) => {
                if header.flags & super::packet::SHUTDOWN_SEND != 0 {
                    self.state.guest_done_sending = true;
                }
                if header.flags & super::packet::SHUTDOWN_RCV != 0 && self.state.to_host.is_empty()
                {
                    // The guest takes no more; with both sides done the stream is over.
                    if self.state.guest_done_sending {
                        return Outcome::Reset;
                    }
                }
                Outcome::Done
            }
            _ => Outcome::Reset,
        }
    }

    /// Writes what waits for the host socket. Returns false if the socket is gone (reset).
    pub fn flush_to_host(&mut self) -> bool {
        while !self.state.to_host.is_empty() {
            match self.stream.write(&self.state.to_host) {
                Ok(0) => return false,
                Ok(written) => {
                    self.state.to_host.drain(..written);
                    let own = written.min(self.state.own_bytes);
                    self.state.own_bytes -= own;
                    let consumed = u32::try_from(written - own).unwrap_or(u32::MAX);
                    self.state.fwd_cnt = self.state.fwd_cnt.wrapping_add(consumed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if self.state.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        true
    }

    /// Reads host bytes for the guest into `buf`: at most the guest's credit. `Ok(0)` is the
    /// host's end of stream.
    pub fn read_from_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = buf.len().min(self.peer_credit() as usize);
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let read = self.stream.read(&mut buf[..room])?;
        let counted = u32::try_from(read).unwrap_or(u32::MAX);
        self.state.tx_cnt = self.state.tx_cnt.wrapping_add(counted);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let state = Connection::fresh_state(1024, 5000, Phase::Established);
        (Connection::new(ours, state).unwrap(), theirs)
    }

    fn rw(len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5000,
            dst_port: 1024,
            len,
            op: Op::Rw,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    #[test]
    fn guest_bytes_reach_the_host_socket_and_count_as_consumed() {
        let (mut conn, mut host) = connection();

        let outcome = conn.handle_guest_packet(&rw(5, 4096, 0), b"hello");
        let flushed = conn.flush_to_host();
        let mut got = [0u8; 5];
        host.read_exact(&mut got).unwrap();

        assert_eq!(outcome, Outcome::Done);
        assert!(flushed);
        assert_eq!(&got, b"hello");
        assert_eq!(conn.state.fwd_cnt, 5);
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_reset() {
        let (mut conn, _host) = connection();
        conn.state.to_host = vec![0; BUF_ALLOC as usize - 2];

        let outcome = conn.handle_guest_packet(&rw(3, 4096, 0), b"abc");

        assert_eq!(outcome, Outcome::Reset);
    }

    #[test]
    fn reads_from_the_host_stop_at_the_guests_credit() {
        let (mut conn, mut host) = connection();
        conn.handle_guest_packet(&rw(0, 4, 0), b"");
        host.write_all(b"abcdef").unwrap();
        let mut buf = [0u8; 16];

        let first = conn.read_from_host(&mut buf).unwrap();
        let second = conn.read_from_host(&mut buf);

        assert_eq!(first, 4);
        assert_eq!(second.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn the_guests_credit_update_frees_room_again() {
        let (mut conn, mut host) = connection();
        conn.handle_guest_packet(&rw(0, 4, 0), b"");
        host.write_all(b"abcdef").unwrap();
        let mut buf = [0u8; 16];
        conn.read_from_host(&mut buf).unwrap();

        let mut update = rw(0, 4, 4);
        update.op = Op::CreditUpdate;
        conn.handle_guest_packet(&update, b"");

        assert_eq!(conn.peer_credit(), 4);
        assert_eq!(conn.read_from_host(&mut buf).unwrap(), 2);
    }

    #[test]
    fn the_guests_response_sends_the_host_its_ok_line() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let state = Connection::fresh_state(1025, 1234, Phase::Connecting);
        let mut conn = Connection::new(ours, state).unwrap();
        let mut response = rw(0, 4096, 0);
        response.op = Op::Response;

        conn.handle_guest_packet(&response, b"");
        conn.flush_to_host();
        let mut line = [0u8; 8];
        host.read_exact(&mut line).unwrap();

        assert_eq!(&line, b"OK 1025\n");
        assert_eq!(conn.state.phase, Phase::Established);
        assert_eq!(conn.state.fwd_cnt, 0, "the OK line is not guest data");
    }

    #[test]
    fn a_credit_request_is_answered_with_an_update() {
        let (mut conn, _host) = connection();
        let mut request = rw(0, 4096, 0);
        request.op = Op::CreditRequest;

        assert_eq!(
            conn.handle_guest_packet(&request, b""),
            Outcome::Reply(Op::CreditUpdate)
        );
    }
}
