//! The virtio-vsock device with cloud-hypervisor's hybrid host side: the guest's streams end in
//! UNIX sockets. A host process connects to the device's socket and writes `CONNECT <port>\n`
//! to reach the guest's listener on that port (it reads `OK <host port>\n` once the guest
//! accepts); a guest connection to host port P goes to the UNIX socket `<path>_P`.
//!
//! Every host socket sits in one epoll set of the device's own, which the queue worker watches
//! as the receive queue's ready fd: host input and new connections wake the receive queue,
//! which delivers what the guest's credit allows. Packets the device must send (responses,
//! resets, credit updates) queue up and go out first.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{Connection, Outcome, Phase};
use super::packet::{HEADER_LEN, HOST_CID, Header, Op, SHUTDOWN_SEND};
use super::state::{PendingConnectState, VsockCounters, VsockState};
use crate::virtio::device::{VirtioDevice, VirtioError, read_config_bytes};

/// Virtio device type of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Largest payload of one packet we send.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest `CONNECT <port>\n` line a host process may send.
const MAX_CONNECT_LINE: usize = 32;
/// How long a host process has to finish its `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Host connections waiting for their line, at most (the oldest goes first).
const MAX_PENDING_CONNECTS: usize = 64;
/// Packets for the guest that may wait for its receive buffers.
const MAX_QUEUED_PACKETS: usize = 1024;
/// Event of the event queue: every connection is gone (virtio 1.x, 5.10.6.6).
const EVENT_TRANSPORT_RESET: u32 = 0;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const FIRST_SOCKET_TOKEN: u64 = 16;

const RX: u16 = 0;
const TX: u16 = 1;
const EVENT: u16 = 2;

/// Ports of a connection: ours (host), the guest's.
type Key = (u32, u32);

/// A host process that connected and has not finished its `CONNECT` line.
#[derive(Debug)]
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// What the device sees of its host side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockParams {
    /// The guest's CID (3 or more).
    pub cid: u64,
    /// The listening socket's path; guest connections to port P go to `<path>_P`.
    pub socket: PathBuf,
}

/// The host sockets a device hands to its successor, in the order its state lists them.
#[derive(Debug)]
pub struct HostSockets {
    /// The listening socket.
    pub listener: UnixListener,
    /// Each connection's socket, as `VsockState::conns`.
    pub conns: Vec<UnixStream>,
    /// Each pending host connection's socket, as `VsockState::pending`.
    pub pending: Vec<UnixStream>,
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    params: VsockParams,
    listener: UnixListener,
    epoll: Epoll,
    kick: EventFd,
    /// Ticks while host connections wait for their line, so a silent one is dropped in time.
    timer: TimerFd,
    conns: BTreeMap<Key, Connection>,
    pending: BTreeMap<u64, PendingConnect>,
    /// epoll token of each connection.
    tokens: BTreeMap<u64, Key>,
    next_token: u64,
    next_local_port: u32,
    /// Connections whose host socket has bytes for the guest.
    readable: BTreeSet<Key>,
    /// Packets for the guest, before any data.
    control: VecDeque<Header>,
    /// A transport reset waits for an event buffer.
    reset_event: bool,
    /// Sockets handed over for the saved connections, until `set_state` takes them.
    handed_over: Option<(Vec<UnixStream>, Vec<UnixStream>)>,
    counters: VsockCounters,
    rx_starved: bool,
    queue_max_sizes: [u16; 3],
    scratch: Vec<u8>,
}

fn epoll_error(e: io::Error) -> VirtioError {
    VirtioError::Backend(e)
}

impl Vsock {
    /// A device listening on `sockets.listener`; on a live update's restore, with the sockets
    /// of the saved connections, which [`VirtioDevice::set_state`] matches to their states.
    pub fn new(
        params: VsockParams,
        sockets: HostSockets,
        queue_size: u16,
    ) -> Result<Self, VirtioError> {
        let HostSockets {
            listener,
            conns,
            pending,
        } = sockets;
        listener.set_nonblocking(true).map_err(epoll_error)?;
        let epoll = Epoll::new().map_err(epoll_error)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(epoll_error)?;
        let timer = TimerFd::new()
            .map_err(|e| VirtioError::Backend(io::Error::from_raw_os_error(e.errno())))?;
        for (fd, token) in [
            (listener.as_raw_fd(), TOKEN_LISTENER),
            (kick.as_raw_fd(), TOKEN_KICK),
            (timer.as_raw_fd(), TOKEN_TIMER),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(epoll_error)?;
        }
        Ok(Self {
            params,
            listener,
            epoll,
            kick,
            timer,
            conns: BTreeMap::new(),
            pending: BTreeMap::new(),
            tokens: BTreeMap::new(),
            next_token: FIRST_SOCKET_TOKEN,
            next_local_port: 1024,
            readable: BTreeSet::new(),
            control: VecDeque::new(),
            reset_event: false,
            handed_over: Some((conns, pending)),
            counters: VsockCounters::default(),
            rx_starved: true,
            queue_max_sizes: [queue_size; 3],
            scratch: vec![0; HEADER_LEN + MAX_PAYLOAD],
        })
    }

    /// A copy of the listening socket.
    pub fn listener_copy(&self) -> io::Result<UnixListener> {
        self.listener.try_clone()
    }

    /// The sockets to hand to a successor (copies), in the order [`Self::state`] lists them.
    pub fn host_sockets(&self) -> io::Result<HostSockets> {
        Ok(HostSockets {
            listener: self.listener_copy()?,
            conns: self
                .conns
                .values()
                .map(|c| c.stream.try_clone())
                .collect::<io::Result<_>>()?,
            pending: self
                .pending
                .values()
                .map(|p| p.stream.try_clone())
                .collect::<io::Result<_>>()?,
        })
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, events: EventSet) -> io::Result<u64> {
        let token = self.next_token;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        self.next_token += 1;
        Ok(token)
    }

    fn add_connection(&mut self, conn: Connection) -> io::Result<()> {
        let key = (conn.state.local_port, conn.state.peer_port);
        let token = self.watch(conn.stream.as_raw_fd(), EventSet::IN)?;
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.counters.connections += 1;
        Ok(())
    }

    fn token_of(&self, key: Key) -> Option<u64> {
        self.tokens
            .iter()
            .find(|(_, k)| **k == key)
            .map(|(token, _)| *token)
    }

    /// Forgets a connection; with `tell_guest` the guest gets a reset first.
    fn drop_connection(&mut self, key: Key, tell_guest: bool) {
        if let Some(mut conn) = self.conns.remove(&key) {
            if tell_guest {
                let header = conn.header(self.params.cid, Op::Rst, 0, 0);
                self.queue_control(header);
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.counters.closed_connections += 1;
        }
        if let Some(token) = self.token_of(key) {
            self.tokens.remove(&token);
        }
        self.readable.remove(&key);
    }

    /// Queues a packet for the guest. A guest that sends and never takes its replies (no
    /// receive buffers) cannot make the queue grow without bound: past a limit, new packets
    /// are dropped and counted.
    fn queue_control(&mut self, header: Header) {
        if self.control.len() >= MAX_QUEUED_PACKETS {
            self.counters.bad_packets += 1;
            return;
        }
        self.control.push_back(header);
    }

    /// Watches a connection's socket for writability only while bytes wait for it.
    fn update_interest(&self, key: Key) {
        let (Some(conn), Some(token)) = (self.conns.get(&key), self.token_of(key)) else {
            return;
        };
        let mut events = EventSet::IN;
        if !conn.state.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(events, token),
        );
    }

    /// A reset for a packet of the guest that belongs to no connection.
    fn reset_reply(&self, to: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.params.cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn free_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(1024);
            if !self.conns.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    fn flush(&mut self, key: Key) {
        let alive = match self.conns.get_mut(&key) {
            Some(conn) => conn.flush_to_host(),
            None => return,
        };
        if !alive {
            self.drop_connection(key, true);
            return;
        }
        self.update_interest(key);
        let cid = self.params.cid;
        if let Some(conn) = self.conns.get_mut(&key)
            && conn.owes_credit_update()
        {
            let update = conn.header(cid, Op::CreditUpdate, 0, 0);
            self.queue_control(update);
        }
    }

    /// A packet of the guest.
    fn handle_guest_packet(&mut self, header: &Header, payload: &[u8]) {
        if header.src_cid != self.params.cid || header.dst_cid != HOST_CID {
            self.counters.bad_packets += 1;
            return;
        }
        self.counters.rx_bytes += payload.len() as u64;
        let key = (header.dst_port, header.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match header.op {
                Op::Request => self.connect_to_host(header),
                Op::Rst => {}
                _ => self.queue_control(self.reset_reply(header)),
            }
            return;
        };
        let cid = self.params.cid;
        match conn.handle_guest_packet(header, payload) {
            Outcome::Done => self.flush(key),
            Outcome::Reply(op) => {
                let reply = conn.header(cid, op, 0, 0);
                self.queue_control(reply);
            }
            Outcome::Reset => self.drop_connection(key, true),
            Outcome::Closed => self.drop_connection(key, false),
        }
        // New credit or an established connection may let host bytes through now.
        if self.conns.contains_key(&key) {
            self.readable.insert(key);
        }
    }

    /// The guest connects to host port `dst_port`: the UNIX socket `<path>_<port>`.
    fn connect_to_host(&mut self, request: &Header) {
        let path = format!("{}_{}", self.params.socket.display(), request.dst_port);
        let mut state =
            Connection::fresh_state(request.dst_port, request.src_port, Phase::Established);
        state.peer_buf_alloc = request.buf_alloc;
        state.peer_fwd_cnt = request.fwd_cnt;
        let conn = UnixStream::connect(&path).and_then(|stream| Connection::new(stream, state));
        match conn {
            Ok(mut conn) => {
                let response = conn.header(self.params.cid, Op::Response, 0, 0);
                match self.add_connection(conn) {
                    Ok(()) => self.queue_control(response),
                    Err(_) => self.queue_control(self.reset_reply(request)),
                }
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {path} refused: {e}");
                self.counters.refused_connects += 1;
                self.queue_control(self.reset_reply(request));
            }
        }
    }

    /// Fills the guest's receive buffers: queued packets first, then host data.
    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let mut used = false;
        self.rx_starved = false;
        loop {
            let wants_buffer = !self.control.is_empty() || self.next_readable().is_some();
            if !wants_buffer {
                return Ok(used);
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.rx_starved = true;
                return Ok(used);
            };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            for desc in chain {
                if !desc.is_write_only() {
                    return Err(VirtioError::MalformedChain {
                        queue: RX,
                        reason: "device-readable buffer in a receive chain".into(),
                    });
                }
                buffers.push((desc.addr(), desc.len() as usize));
            }
            let room: usize = buffers.iter().map(|(_, len)| len).sum();
            if room < HEADER_LEN {
                return Err(VirtioError::MalformedChain {
                    queue: RX,
                    reason: "receive buffer shorter than a packet header".into(),
                });
            }
            let len = if let Some(header) = self.control.pop_front() {
                self.scratch[..HEADER_LEN].copy_from_slice(&header.to_bytes());
                HEADER_LEN
            } else {
                match self.read_host_data(room - HEADER_LEN) {
                    Some(len) => len,
                    None => {
                        queue.go_to_previous_position();
                        continue;
                    }
                }
            };
            write_scattered(mem, &buffers, &self.scratch[..len])?;
            queue
                .add_used(mem, u32::from(head) as u16, len as u32)
                .map_err(|source| VirtioError::Queue { queue: RX, source })?;
            used = true;
        }
    }

    /// The next connection with host bytes the guest can take now.
    fn next_readable(&self) -> Option<Key> {
        self.readable.iter().copied().find(|key| {
            self.conns.get(key).is_some_and(|c| {
                c.state.phase == Phase::Established
                    && !c.state.host_done_sending
                    && c.peer_credit() > 0
            })
        })
    }

    /// Reads host bytes of the next readable connection into the scratch buffer behind an RW
    /// header; `None` when that connection had nothing after all (or ended: its shutdown is
    /// queued instead).
    fn read_host_data(&mut self, room: usize) -> Option<usize> {
        let key = self.next_readable()?;
        let cid = self.params.cid;
        let limit = room.min(MAX_PAYLOAD);
        let conn = self.conns.get_mut(&key)?;
        let read = conn.read_from_host(&mut self.scratch[HEADER_LEN..HEADER_LEN + limit]);
        match read {
            Ok(0) => {
                conn.state.host_done_sending = true;
                let shutdown = conn.header(cid, Op::Shutdown, 0, SHUTDOWN_SEND);
                self.queue_control(shutdown);
                self.readable.remove(&key);
                None
            }
            Ok(len) => {
                let header = conn.header(cid, Op::Rw, len as u32, 0);
                self.scratch[..HEADER_LEN].copy_from_slice(&header.to_bytes());
                self.counters.tx_bytes += len as u64;
                Some(HEADER_LEN + len)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable.remove(&key);
                None
            }
            Err(_) => {
                self.drop_connection(key, true);
                None
            }
        }
    }

    /// Takes the guest's packets.
    fn take_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0usize;
            let mut malformed = None;
            for desc in chain {
                if desc.is_write_only() {
                    malformed = Some("device-writable buffer in a transmit chain");
                    break;
                }
                let take = (desc.len() as usize).min(self.scratch.len() - len);
                mem.read_slice(&mut self.scratch[len..len + take], desc.addr())
                    .map_err(VirtioError::Memory)?;
                len += take;
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|source| VirtioError::Queue { queue: TX, source })?;
            used = true;
            if let Some(reason) = malformed {
                return Err(VirtioError::MalformedChain {
                    queue: TX,
                    reason: reason.into(),
                });
            }
            let Ok(header) = Header::parse(&self.scratch[..len]) else {
                self.counters.bad_packets += 1;
                continue;
            };
            let end = (HEADER_LEN + header.len as usize).min(len);
            let payload = self.scratch[HEADER_LEN..end].to_vec();
            self.handle_guest_packet(&header, &payload);
        }
        // Replies and newly possible data go out on the receive queue.
        if !self.control.is_empty() || !self.readable.is_empty() {
            let _ = self.kick.write(1);
        }
        Ok(used)
    }

    fn deliver_reset_event(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        if !self.reset_event {
            return Ok(false);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let Some(desc) = chain
            .into_iter()
            .find(|d| d.is_write_only() && d.len() >= 4)
        else {
            return Err(VirtioError::MalformedChain {
                queue: EVENT,
                reason: "event buffer shorter than an event".into(),
            });
        };
        mem.write_obj(EVENT_TRANSPORT_RESET, desc.addr())
            .map_err(VirtioError::Memory)?;
        queue
            .add_used(mem, head, 4)
            .map_err(|source| VirtioError::Queue {
                queue: EVENT,
                source,
            })?;
        self.reset_event = false;
        Ok(true)
    }
}

fn write_scattered(
    mem: &GuestMemoryMmap,
    buffers: &[(GuestAddress, usize)],
    bytes: &[u8],
) -> Result<(), VirtioError> {
    let mut written = 0;
    for (addr, len) in buffers {
        if written == bytes.len() {
            break;
        }
        let take = (*len).min(bytes.len() - written);
        mem.write_slice(&bytes[written..written + take], *addr)
            .map_err(VirtioError::Memory)?;
        written += take;
    }
    Ok(())
}

impl VirtioDevice for Vsock {
    type State = VsockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.params.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock config is read-only; write at {offset:#x} ignored");
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), VirtioError> {
        Ok(())
    }

    fn ready_fds(&self) -> Vec<(RawFd, u16)> {
        vec![(self.epoll.as_raw_fd(), RX)]
    }

    fn needs_notification(&self, index: u16) -> bool {
        index != RX || self.rx_starved
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        match index {
            RX => {
                self.poll_host();
                self.fill_rx(queue, mem)
            }
            TX => self.take_tx(queue, mem),
            EVENT => self.deliver_reset_event(queue, mem),
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {
        // The driver is gone: so are its connections.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.drop_connection(key, false);
        }
        self.control.clear();
        self.reset_event = false;
        self.rx_starved = true;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = self.counters;
        [
            ("tx_bytes", c.tx_bytes),
            ("rx_bytes", c.rx_bytes),
            ("connections", c.connections),
            ("open_connections", self.conns.len() as u64),
            ("closed_connections", c.closed_connections),
            ("refused_connects", c.refused_connects),
            ("bad_packets", c.bad_packets),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    fn state(&self) -> VsockState {
        VsockState {
            counters: self.counters,
            conns: self.conns.values().map(|c| c.state.clone()).collect(),
            pending: self
                .pending
                .values()
                .map(|p| PendingConnectState {
                    line: p.line.clone(),
                })
                .collect(),
            control: self.control.iter().copied().collect(),
            next_local_port: self.next_local_port,
            reset_event: self.reset_event,
        }
    }

    fn set_state(&mut self, state: VsockState) -> Result<(), VirtioError> {
        let (conns, pending) = self.handed_over.take().unwrap_or_default();
        self.counters = state.counters;
        self.next_local_port = state.next_local_port;
        self.reset_event = state.reset_event;
        if conns.is_empty() && pending.is_empty() {
            // The sockets did not come across (a kexec): every connection is gone, which the
            // guest learns from a transport reset; its listeners stay.
            if !state.conns.is_empty() {
                self.counters.closed_connections += state.conns.len() as u64;
                self.reset_event = true;
            }
            return Ok(());
        }
        if conns.len() != state.conns.len() || pending.len() != state.pending.len() {
            return Err(VirtioError::Unsupported(format!(
                "{} connection sockets for {} saved connections",
                conns.len(),
                state.conns.len()
            )));
        }
        for (stream, conn_state) in conns.into_iter().zip(state.conns) {
            let conn = Connection::new(stream, conn_state).map_err(VirtioError::Backend)?;
            let key = (conn.state.local_port, conn.state.peer_port);
            self.add_connection(conn).map_err(VirtioError::Backend)?;
            self.counters.connections -= 1;
            self.readable.insert(key);
            self.update_interest(key);
        }
        for (stream, pending_state) in pending.into_iter().zip(state.pending) {
            stream.set_nonblocking(true).map_err(VirtioError::Backend)?;
            let token = self
                .watch(stream.as_raw_fd(), EventSet::IN)
                .map_err(VirtioError::Backend)?;
            self.pending.insert(
                token,
                PendingConnect {
                    stream,
                    line: pending_state.line,
                    since: Instant::now(),
                },
            );
        }
        self.control = state.control.into_iter().collect();
        Ok(())
    }
}

mod host;
#[cfg(test)]
mod tests;
