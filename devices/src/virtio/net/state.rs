//! What a virtio-net device carries across a live update (its taps travel apart, as fds).

use serde::{Deserialize, Serialize};

/// Frame and byte counters, reported by `vm.counters` and kept across a live update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Bytes delivered to the guest (frames only, no vnet header).
    pub rx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes the guest sent (frames only).
    pub tx_bytes: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Frames read from the tap that did not fit the guest's buffer.
    pub rx_dropped: u64,
    /// Frames the tap refused (e.g. its interface is down).
    pub tx_dropped: u64,
}

/// The device's own state; the transport saves queues, status and its feature words itself.
/// Every frame is moved whole inside one `process_queue` call, so nothing is in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features the driver acknowledged at activation (0 before).
    pub acked_features: u64,
    /// Queue pairs the driver asked for through the control queue (0: never asked).
    pub active_pairs: u16,
    /// Counters so far.
    pub counters: NetCounters,
}

impl liveupdate::state::Versioned for NetState {
    const VERSION: u16 = 1;
}
