//! Saving and restoring a virtio-pci device across a live update.

use std::sync::Arc;

use liveupdate::state::{DecodeError, Versioned, decode_prefix};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{VirtioPciDevice, VirtioPciError, common};
use crate::interrupt::MsiVectors;
use crate::pci::{MsixConfig, MsixState, PciConfigurationState};
use crate::virtio::device::VirtioDevice;

/// A virtqueue's state, with serde.
///
/// This mirrors `virtio_queue::QueueState` field for field: `virtio-queue-ser` 0.14 (the
/// newest release) is built against virtio-queue 0.17, so its `QueueStateSer` does not
/// convert to or from the 0.18 `QueueState` we use. Drop this for `QueueStateSer` once a
/// matching release exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// Maximum size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Queue enabled by the driver.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for VirtqueueState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<VirtqueueState> for QueueState {
    fn from(s: VirtqueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Everything a virtio-pci device needs to resume exactly where it stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VirtioPciState<S> {
    /// Device status register.
    pub device_status: u8,
    /// Features offered when the state was saved (informational: restore checks that the
    /// driver's features are still offered).
    pub device_features: u64,
    /// Device feature select register.
    pub device_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Driver feature select register.
    pub driver_feature_select: u32,
    /// Queue select register.
    pub queue_select: u16,
    /// Each queue, including its enable bit and ring positions.
    pub queues: Vec<VirtqueueState>,
    /// MSI-X vector of each queue.
    pub queue_msix_vectors: Vec<u16>,
    /// MSI-X vector for configuration changes.
    pub config_msix_vector: u16,
    /// Unread ISR bits.
    pub isr: u8,
    /// Configuration generation.
    pub config_generation: u8,
    /// MSI-X table, pending bits and control.
    pub msix: MsixState,
    /// PCI configuration registers, including BAR 0's address.
    pub pci: PciConfigurationState,
    /// The device's own state.
    pub device: S,
}

/// Each virtio device's envelope carries its own device state's version: the transport's shape
/// is part of every device's, so a change to `VirtioPciState` bumps each device's `VERSION`.
impl<S: Versioned> Versioned for VirtioPciState<S> {
    const VERSION: u16 = S::VERSION;

    /// The device's state is the last field: the transport is read as it is, and the bytes
    /// after it through the device state's own upgrade.
    fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, DecodeError>> {
        let (transport, device) = match decode_prefix::<VirtioPciState<()>>(bytes) {
            Ok(split) => split,
            Err(e) => return Some(Err(e)),
        };
        Some(S::read_older(version, device)?.map(|device| transport.with_device(device)))
    }
}

impl VirtioPciState<()> {
    fn with_device<S>(self, device: S) -> VirtioPciState<S> {
        let Self {
            device_status,
            device_features,
            device_feature_select,
            driver_features,
            driver_feature_select,
            queue_select,
            queues,
            queue_msix_vectors,
            config_msix_vector,
            isr,
            config_generation,
            msix,
            pci,
            device: (),
        } = self;
        VirtioPciState {
            device_status,
            device_features,
            device_feature_select,
            driver_features,
            driver_feature_select,
            queue_select,
            queues,
            queue_msix_vectors,
            config_msix_vector,
            isr,
            config_generation,
            msix,
            pci,
            device,
        }
    }
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Captures the transport and device state. Quiesce first (stop the [`super::QueueWorker`])
    /// so no queue is mid-request.
    pub fn state(&self) -> VirtioPciState<D::State> {
        VirtioPciState {
            device_status: self.device_status,
            device_features: self.offered_features(),
            device_feature_select: self.device_feature_select,
            driver_features: self.driver_features,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            queue_msix_vectors: self.queue_msix_vectors.clone(),
            config_msix_vector: self.config_msix_vector,
            isr: self.isr,
            config_generation: self.config_generation,
            msix: self.msix.state(),
            pci: self.config.state(),
            device: self.device.state(),
        }
    }

    /// Rebuilds a device from `state`: `device` is freshly created with the same
    /// configuration, gets its own state back, and is activated again when the driver had
    /// set DRIVER_OK. Live MSI-X vectors are pushed to `msi` again.
    pub fn from_state(
        device: D,
        state: VirtioPciState<D::State>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
    ) -> Result<Self, VirtioPciError> {
        let bar_address = state
            .pci
            .bar_addresses
            .first()
            .copied()
            .flatten()
            .unwrap_or(0);
        let mut dev = Self::new(device, mem, msi.clone(), bar_address)?;
        let mismatch = |reason| Err(VirtioPciError::StateMismatch { reason });
        // A newer binary may offer more; what the driver accepted must still be offered.
        if state.driver_features & !dev.offered_features() != 0 {
            return mismatch("accepted features are no longer offered");
        }
        if state.queues.len() != dev.queues.len()
            || state.queue_msix_vectors.len() != dev.queues.len()
        {
            return mismatch("number of queues differs");
        }
        if state.msix.table.len() != usize::from(dev.msix.num_vectors()) {
            return mismatch("number of MSI-X vectors differs");
        }
        for (index, saved) in state.queues.iter().enumerate() {
            if saved.max_size != dev.queues[index].max_size() {
                return mismatch("queue maximum size differs");
            }
            dev.queues[index] = Queue::try_from(QueueState::from(*saved)).map_err(|source| {
                VirtioPciError::QueueState {
                    queue: index,
                    source,
                }
            })?;
        }
        dev.config
            .set_state(&state.pci)
            .map_err(VirtioPciError::Pci)?;
        dev.msix = match MsixConfig::from_state(&state.msix, msi) {
            Some(msix) => msix,
            None => return mismatch("MSI-X state is inconsistent"),
        };
        dev.device_status = state.device_status;
        dev.device_feature_select = state.device_feature_select;
        dev.driver_features = state.driver_features;
        dev.driver_feature_select = state.driver_feature_select;
        dev.queue_select = state.queue_select;
        dev.queue_msix_vectors = state.queue_msix_vectors;
        dev.config_msix_vector = state.config_msix_vector;
        dev.isr = state.isr;
        dev.config_generation = state.config_generation;
        dev.device
            .set_state(state.device)
            .map_err(VirtioPciError::Device)?;
        let live = common::DRIVER_OK;
        if dev.device_status & (live | common::NEEDS_RESET) == live {
            dev.device
                .activate(dev.driver_features)
                .map_err(VirtioPciError::Device)?;
        }
        Ok(dev)
    }
}
