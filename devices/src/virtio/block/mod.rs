//! virtio-blk: a disk backed by a raw image file (or a host block device).
//!
//! Requests complete synchronously inside `process_queue`, with positioned I/O on the file, so a
//! paused device never has a request half done and its state is only the negotiated features and
//! the counters. No discard, write-zeroes, multiqueue or asynchronous I/O.

mod device;
mod disk;
mod request;
mod state;

pub use device::{Block, BlockConfig};
pub use disk::BlockError;
pub use state::{BlockCounters, BlockState};
