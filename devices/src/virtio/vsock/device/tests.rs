//! The device against real UNIX sockets and test virtqueues.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::virtio::test_driver::{Desc, TestQueue, guest_memory};

const GUEST_CID: u64 = 3;
const BUF: u32 = 4096;

/// A device with a driver's view of its rx, tx and event queues.
struct Harness {
    dir: TempDir,
    vsock: Vsock,
    mem: GuestMemoryMmap,
    rxq: TestQueue,
    rx: Queue,
    txq: TestQueue,
    tx: Queue,
    evq: TestQueue,
    ev: Queue,
    /// Guest address of each rx chain's buffer, by head.
    rx_bufs: BTreeMap<u16, u64>,
    rx_seen: u16,
    next_buf: u64,
}

impl Harness {
    fn new() -> Self {
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("vsock.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let sockets = HostSockets {
            listener,
            conns: Vec::new(),
            pending: Vec::new(),
        };
        let vsock = Vsock::new(
            VsockParams {
                cid: GUEST_CID,
                socket,
            },
            sockets,
            64,
        )
        .unwrap();
        Self::with(dir, vsock)
    }

    fn with(dir: TempDir, vsock: Vsock) -> Self {
        let mem = guest_memory(0x100000);
        let rxq = TestQueue::new(GuestAddress(0x1000), 64);
        let txq = TestQueue::new(GuestAddress(0x3000), 64);
        let evq = TestQueue::new(GuestAddress(0x5000), 4);
        let (rx, tx, ev) = (
            rxq.create_queue(&mem),
            txq.create_queue(&mem),
            evq.create_queue(&mem),
        );
        Self {
            dir,
            vsock,
            mem,
            rxq,
            rx,
            txq,
            tx,
            evq,
            ev,
            rx_bufs: BTreeMap::new(),
            rx_seen: 0,
            next_buf: 0x10000,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.as_path().join("vsock.sock")
    }

    fn post_rx_buffers(&mut self, count: usize) {
        for _ in 0..count {
            let addr = self.next_buf;
            self.next_buf += u64::from(BUF);
            let head = self.rxq.add_chain(&self.mem, &[Desc::writable(addr, BUF)]);
            self.rx_bufs.insert(head, addr);
        }
    }

    /// Runs the receive queue and returns the packets the guest got.
    fn receive(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.vsock
            .process_queue(RX, &mut self.rx, &self.mem)
            .unwrap();
        let mut packets = Vec::new();
        while self.rx_seen != self.rxq.used_idx(&self.mem) {
            let (head, len) = self.rxq.used_entry(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self.rx_bufs[&(head as u16)];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let header = Header::parse(&bytes).unwrap();
            packets.push((header, bytes[HEADER_LEN..].to_vec()));
        }
        packets
    }

    /// Receives until a packet comes (host sockets are asynchronous), for at most 2 s.
    fn receive_some(&mut self) -> Vec<(Header, Vec<u8>)> {
        for _ in 0..200 {
            let packets = self.receive();
            if !packets.is_empty() {
                return packets;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no packet for the guest");
    }

    /// The guest sends `op` from its port `src` to host port `dst`.
    fn send(&mut self, op: Op, src: u32, dst: u32, payload: &[u8]) {
        let header = Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            len: payload.len() as u32,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let addr = self.next_buf;
        self.next_buf += 0x1000;
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        self.txq
            .add_chain(&self.mem, &[Desc::readable(addr, bytes.len() as u32)]);
        self.vsock
            .process_queue(TX, &mut self.tx, &self.mem)
            .unwrap();
    }
}

/// A host process connected through `CONNECT port` and accepted by the guest (port 5000).
fn host_connected(h: &mut Harness) -> (UnixStream, Header) {
    let mut host = UnixStream::connect(h.socket()).unwrap();
    host.write_all(b"CONNECT 5000\n").unwrap();
    h.post_rx_buffers(8);
    let packets = h.receive_some();
    let request = packets[0].0;
    assert_eq!(request.op, Op::Request);
    assert_eq!(request.dst_port, 5000);
    h.send(Op::Response, 5000, request.src_port, b"");
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (host, request)
}

#[test]
fn host_connect_reaches_the_guest_listener_and_gets_ok_with_its_port() {
    let mut h = Harness::new();

    let (mut host, request) = host_connected(&mut h);
    let mut line = vec![0u8; format!("OK {}\n", request.src_port).len()];
    host.read_exact(&mut line).unwrap();

    assert_eq!(request.dst_cid, GUEST_CID);
    assert_eq!(line, format!("OK {}\n", request.src_port).into_bytes());
}

#[test]
fn bytes_flow_both_ways_on_an_established_connection() {
    let mut h = Harness::new();
    let (mut host, request) = host_connected(&mut h);
    let mut ok = vec![0u8; format!("OK {}\n", request.src_port).len()];
    host.read_exact(&mut ok).unwrap();

    host.write_all(b"to the guest").unwrap();
    let packets = h.receive_some();
    h.send(Op::Rw, 5000, request.src_port, b"to the host");
    let mut got = [0u8; 11];
    host.read_exact(&mut got).unwrap();

    assert_eq!(packets[0].0.op, Op::Rw);
    assert_eq!(packets[0].1, b"to the guest");
    assert_eq!(&got, b"to the host");
    assert_eq!(h.vsock.counters()["tx_bytes"], 12);
    assert_eq!(h.vsock.counters()["rx_bytes"], 11);
}

#[test]
fn guest_connection_to_a_host_port_nobody_serves_is_reset() {
    let mut h = Harness::new();
    h.post_rx_buffers(4);

    h.send(Op::Request, 7000, 9999, b"");
    let packets = h.receive();

    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].0.op, Op::Rst);
    assert_eq!(packets[0].0.dst_port, 7000);
}

#[test]
fn guest_connection_reaches_the_socket_named_for_its_port() {
    let mut h = Harness::new();
    let served = UnixListener::bind(format!("{}_9000", h.socket().display())).unwrap();
    h.post_rx_buffers(4);

    h.send(Op::Request, 7000, 9000, b"");
    let packets = h.receive();
    let (mut accepted, _) = served.accept().unwrap();
    h.send(Op::Rw, 7000, 9000, b"ping");
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();

    assert_eq!(packets[0].0.op, Op::Response);
    assert_eq!(&got, b"ping");
}

#[test]
fn malformed_connect_lines_close_the_host_connection() {
    let mut h = Harness::new();
    h.post_rx_buffers(4);
    let lines: [&[u8]; 4] = [
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"HELLO 5000\n",
        &[b'x'; 4096],
    ];

    for line in lines {
        let mut host = UnixStream::connect(h.socket()).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = host.write_all(line);
        let _ = h.receive();
        std::thread::sleep(Duration::from_millis(20));
        let _ = h.receive();
        let mut byte = [0u8; 1];

        let read = host.read(&mut byte);

        assert!(matches!(read, Ok(0) | Err(_)), "{line:?} was accepted");
    }
    assert!(h.receive().is_empty(), "the guest was asked to connect");
}

#[test]
fn a_restored_connection_carries_on_on_the_same_socket() {
    let mut h = Harness::new();
    let (mut host, request) = host_connected(&mut h);
    let mut ok = vec![0u8; format!("OK {}\n", request.src_port).len()];
    host.read_exact(&mut ok).unwrap();
    let state = h.vsock.state();
    let sockets = h.vsock.host_sockets().unwrap();
    let socket = h.socket();
    let dir = std::mem::replace(&mut h.dir, TempDir::new().unwrap());
    drop(h);

    let mut successor = Vsock::new(
        VsockParams {
            cid: GUEST_CID,
            socket,
        },
        sockets,
        64,
    )
    .unwrap();
    successor.set_state(state).unwrap();
    let mut h = Harness::with(dir, successor);
    h.post_rx_buffers(4);
    host.write_all(b"after").unwrap();
    let packets = h.receive_some();

    assert_eq!(packets[0].0.op, Op::Rw);
    assert_eq!(packets[0].1, b"after");
    assert_eq!(h.vsock.connection_count(), 1);
}

#[test]
fn connections_whose_sockets_did_not_come_across_end_in_a_transport_reset() {
    let mut h = Harness::new();
    let (_host, _) = host_connected(&mut h);
    let state = h.vsock.state();
    let socket = h.dir.as_path().join("again.sock");
    let sockets = HostSockets {
        listener: UnixListener::bind(&socket).unwrap(),
        conns: Vec::new(),
        pending: Vec::new(),
    };
    let mut successor = Vsock::new(
        VsockParams {
            cid: GUEST_CID,
            socket,
        },
        sockets,
        64,
    )
    .unwrap();

    successor.set_state(state).unwrap();
    let mut h = Harness::with(TempDir::new().unwrap(), successor);
    h.evq.add_chain(&h.mem, &[Desc::writable(0x9000, 8)]);
    let delivered = h.vsock.process_queue(EVENT, &mut h.ev, &h.mem).unwrap();

    assert!(delivered);
    assert_eq!(h.evq.used_entry(&h.mem, 0).1, 4);
    assert_eq!(h.mem.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0);
    assert_eq!(h.vsock.connection_count(), 0);
}
