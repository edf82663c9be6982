//! The seam between the virtio-pci transport and each device's own logic.
//!
//! The transport owns the virtqueues, feature negotiation, status and interrupts; a device only
//! turns available descriptors into work and used descriptors. That keeps every device testable
//! with a plain `GuestMemoryMmap` and a `Queue`, without PCI or KVM.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::os::fd::RawFd;

use liveupdate::state::Versioned;
use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Errors a device reports while handling a queue or being activated.
#[derive(Debug, Error)]
pub enum VirtioError {
    /// A descriptor chain the device cannot use (wrong direction, too short, out of bounds).
    #[error("Malformed descriptor chain on queue {queue}: {reason}")]
    MalformedChain {
        /// The queue the chain came from.
        queue: u16,
        /// What was wrong with it.
        reason: String,
    },
    /// The virtqueue itself failed (bad ring addresses and the like).
    #[error("Virtqueue {queue} failed")]
    Queue {
        /// The failing queue.
        queue: u16,
        /// What virtio-queue reported.
        #[source]
        source: virtio_queue::Error,
    },
    /// Guest memory could not be accessed.
    #[error("Guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// The device's backend (file, host device) failed.
    #[error("Device backend failed")]
    Backend(#[source] std::io::Error),
    /// The driver asked for something the device does not support.
    #[error("Unsupported: {0}")]
    Unsupported(String),
}

/// A virtio device's own logic, driven by the transport.
pub trait VirtioDevice: Send {
    /// The device's own state, saved and restored across a live update inside its transport's
    /// [`super::pci::VirtioPciState`], whose envelope carries this type's version.
    type State: Clone + Debug + PartialEq + Versioned + Send;

    /// Virtio device type (2 block, 3 console, 4 entropy).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK having accepted `acked_features`.
    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError>;
    /// Host fds whose readiness means a queue may have work although the driver did not notify
    /// it (a tap with frames for the receive queue), each with that queue's index. The queue
    /// worker watches them edge-triggered, so the device must consume until `WouldBlock` or
    /// until the queue has no buffers left (the driver's next notification resumes it).
    fn ready_fds(&self) -> Vec<(RawFd, u16)>;
    /// Whether the driver must notify queue `index` when it adds buffers, asked each time the
    /// device has done with the queue. False suits a queue the device serves on another
    /// trigger while it still has buffers (a receive queue filled whenever its tap has
    /// frames): each notification is a VM exit the guest pays for.
    fn needs_notification(&self, index: u16) -> bool;
    /// Handles the available buffers of queue `index`. Returns true when used buffers were
    /// added, so that the transport interrupts the guest if the driver wants it.
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError>;
    /// The driver reset the device: forget everything negotiated.
    fn reset(&mut self);
    /// Counters for `vm.counters` (e.g. `read_bytes`, `write_ops`).
    fn counters(&self) -> BTreeMap<String, u64>;
    /// Captures the device's own state (not the transport's).
    fn state(&self) -> Self::State;
    /// Puts back a state captured by [`VirtioDevice::state`].
    fn set_state(&mut self, state: Self::State) -> Result<(), VirtioError>;
}

/// Copies the bytes of a device configuration space `config` at `offset` into `data`; bytes past
/// its end read as zero (a driver may read any width anywhere in the region).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
