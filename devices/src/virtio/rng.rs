//! virtio-rng (entropy device, type 4): fills the driver's buffers from a host source file.
//!
//! One queue; each request is a chain of device-writable buffers, filled from `src` (by
//! default `/dev/urandom`). There is no device configuration space and no feature bit.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use crate::virtio::device::{VirtioDevice, VirtioError};

/// Virtio device type of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// Most bytes served for one buffer, so a guest cannot make us read without bound.
const MAX_BYTES_PER_BUFFER: u32 = 64 * 1024;

/// Errors from creating an rng device.
#[derive(Debug, Error)]
pub enum RngError {
    /// The entropy source could not be opened.
    #[error("Failed to open entropy source {path}")]
    Open {
        /// The source path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// Configuration of an rng device (cloud-hypervisor's `--rng src=...`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Host file the entropy is read from.
    pub src: PathBuf,
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: PathBuf::from("/dev/urandom"),
        }
    }
}

/// The rng device's own state: only its counters (the queue lives in the transport).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Bytes handed to the guest so far.
    pub entropy_bytes: u64,
    /// Requests completed so far.
    pub requests: u64,
}

impl liveupdate::state::Versioned for RngState {
    const VERSION: u16 = 1;
}

/// A virtio entropy device.
#[derive(Debug)]
pub struct Rng {
    source: File,
    queue_max_sizes: [u16; 1],
    counters: RngState,
}

impl Rng {
    /// An rng reading from `config.src`.
    pub fn new(config: &RngConfig) -> Result<Self, RngError> {
        Self::open(&config.src)
    }

    fn open(path: &Path) -> Result<Self, RngError> {
        let source = File::open(path).map_err(|source| RngError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            source,
            queue_max_sizes: [QUEUE_SIZE],
            counters: RngState::default(),
        })
    }
}

impl VirtioDevice for Rng {
    type State = RngState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng has no config space; write at {offset:#x} ignored");
    }

    fn activate(&mut self, _acked_features: u64) -> Result<(), VirtioError> {
        Ok(())
    }

    fn ready_fds(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        Vec::new()
    }

    fn needs_notification(&self, _index: u16) -> bool {
        true
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut written: u32 = 0;
            for desc in chain {
                if !desc.is_write_only() {
                    log::debug!("virtio-rng: device-readable buffer on queue {index} skipped");
                    continue;
                }
                let len = desc.len().min(MAX_BYTES_PER_BUFFER) as usize;
                // A short read (a regular file at its end) fills what it can.
                let count = mem
                    .read_volatile_from(desc.addr(), &mut self.source, len)
                    .map_err(VirtioError::Memory)?;
                written = written.saturating_add(count as u32);
            }
            queue
                .add_used(mem, head, written)
                .map_err(|source| VirtioError::Queue {
                    queue: index,
                    source,
                })?;
            self.counters.entropy_bytes += u64::from(written);
            self.counters.requests += 1;
            used = true;
        }
        Ok(used)
    }

    fn reset(&mut self) {}

    fn counters(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([
            ("entropy_bytes".to_string(), self.counters.entropy_bytes),
            ("requests".to_string(), self.counters.requests),
        ])
    }

    fn state(&self) -> RngState {
        self.counters.clone()
    }

    fn set_state(&mut self, state: RngState) -> Result<(), VirtioError> {
        self.counters = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::test_driver::{Desc, TestQueue, guest_memory, pattern_file};

    #[test]
    fn request_is_filled_from_source_and_counted() {
        let source = pattern_file(64);
        let mut rng = Rng::new(&RngConfig {
            src: source.as_path().to_path_buf(),
        })
        .unwrap();
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        let head = tq.add_chain(&mem, &[Desc::writable(0x8000, 16)]);

        let used = rng.process_queue(0, &mut queue, &mem).unwrap();
        let mut buf = [0u8; 16];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();

        assert!(used);
        assert_eq!(tq.used_entry(&mem, 0), (u32::from(head), 16));
        assert_eq!(buf.to_vec(), (0..16).collect::<Vec<u8>>());
        assert_eq!(rng.counters()["entropy_bytes"], 16);
    }

    #[test]
    fn readable_buffers_get_no_bytes() {
        let source = pattern_file(64);
        let mut rng = Rng::new(&RngConfig {
            src: source.as_path().to_path_buf(),
        })
        .unwrap();
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::readable(0x8000, 16)]);

        rng.process_queue(0, &mut queue, &mem).unwrap();

        assert_eq!(tq.used_entry(&mem, 0), (0, 0));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8001)).unwrap(), 0);
    }

    #[test]
    fn missing_source_is_an_open_error() {
        let config = RngConfig {
            src: PathBuf::from("/nonexistent/entropy"),
        };

        let result = Rng::new(&config);

        assert!(matches!(result, Err(RngError::Open { .. })));
    }

    #[test]
    fn default_source_is_urandom() {
        assert_eq!(RngConfig::default().src, PathBuf::from("/dev/urandom"));
    }
}
