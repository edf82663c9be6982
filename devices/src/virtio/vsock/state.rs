//! What a virtio-vsock device carries across a live update. Its host sockets travel apart, as
//! fds, in the order the lists here give.

use serde::{Deserialize, Serialize};

use super::conn::ConnState;
use super::packet::Header;

/// Byte and connection counters, reported by `vm.counters` and kept across a live update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockCounters {
    /// Stream bytes delivered to the guest.
    pub tx_bytes: u64,
    /// Stream bytes the guest sent.
    pub rx_bytes: u64,
    /// Connections opened so far, either way.
    pub connections: u64,
    /// Connections that ended, either way (a vsock stream always ends with a reset), or were
    /// lost across a kexec.
    pub closed_connections: u64,
    /// Connections refused: nothing listens on a guest's host port, or a host process sent no
    /// valid `CONNECT` line in time.
    pub refused_connects: u64,
    /// Guest packets that were not stream packets for the host.
    pub bad_packets: u64,
}

/// A host process that had not finished its `CONNECT` line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingConnectState {
    /// What it had sent of the line.
    pub line: Vec<u8>,
}

/// The device's own state; the transport saves queues, status and its feature words itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Counters so far.
    pub counters: VsockCounters,
    /// Every open connection, with its credit and the bytes waiting for its host socket.
    pub conns: Vec<ConnState>,
    /// Host connections waiting for their `CONNECT` line.
    pub pending: Vec<PendingConnectState>,
    /// Packets for the guest not sent yet.
    pub control: Vec<Header>,
    /// The next host port to try for a host-initiated connection.
    pub next_local_port: u32,
    /// A transport reset waits for the guest's event buffer.
    pub reset_event: bool,
}

impl liveupdate::state::Versioned for VsockState {
    const VERSION: u16 = 1;
}
