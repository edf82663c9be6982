//! What a virtio-blk device carries across a live update.

use serde::{Deserialize, Serialize};

/// Request counters, reported by `vm.counters` and kept across a live update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounters {
    /// Bytes read from the disk into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: u64,
    /// Completed read requests.
    pub read_ops: u64,
    /// Completed write requests.
    pub write_ops: u64,
    /// Completed flush requests.
    pub flush_ops: u64,
}

/// The device's own state; the transport saves queues, status and its feature words itself.
///
/// There is deliberately no list of in-flight requests: every request is completed (data moved,
/// status written, chain put on the used ring) inside one `process_queue` call, so once the
/// device is quiesced nothing is half done.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features the driver acknowledged at activation (0 before).
    pub acked_features: u64,
    /// Counters so far.
    pub counters: BlockCounters,
}

impl liveupdate::state::Versioned for BlockState {
    const VERSION: u16 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_state_survives_json_round_trip() {
        let state = BlockState {
            acked_features: 1 << 9,
            counters: BlockCounters {
                read_bytes: 4096,
                write_ops: 3,
                ..BlockCounters::default()
            },
        };

        let decoded: BlockState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        assert_eq!(decoded, state);
    }
}
