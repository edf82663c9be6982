//! The virtio-pci transport, modern interface only (virtio 1.x, device ids 0x1040 + type).
//!
//! One 64-bit, non-prefetchable memory BAR 0 of [`BAR_SIZE`] bytes holds every register
//! region at a fixed offset, announced by vendor-specific capabilities:
//!
//! | offset | region |
//! |---|---|
//! | 0x0000 | common configuration (cfg_type 1) |
//! | 0x1000 | ISR status (cfg_type 3) |
//! | 0x2000 | device-specific configuration (cfg_type 4) |
//! | 0x3000 | notifications, 4 bytes per queue (cfg_type 2, `notify_off_multiplier` 4) |
//! | 0x4000 | MSI-X table |
//! | 0x5000 | MSI-X pending-bit array |
//!
//! Interrupts are MSI-X only: one vector per queue plus one for configuration changes. There
//! is no legacy INTx line; with MSI-X disabled the ISR bits are still set but nothing is
//! signalled (Linux always uses MSI-X for virtio-pci when it is offered).
//!
//! Queue notifications arrive either as MMIO writes to the notify region (processed at once)
//! or, once the VMM registered [`VirtioPciDevice::ioeventfds`] with KVM, on those eventfds,
//! served by a [`QueueWorker`].

mod common;
mod regions;
mod state;
mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::interrupt::MsiVectors;
use crate::pci::{MsixConfig, PciBarInfo, PciConfiguration, PciError, PciIds};
use crate::virtio::device::{VirtioDevice, VirtioError};

pub use state::{VirtioPciState, VirtqueueState};
pub use worker::{QueueWorker, spawn_queue_worker};

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification region in BAR 0; queue `i` is notified at `+ 4 * i`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_LEN: u64 = 0x1000;
const COMMON_CFG_LEN: u64 = 0x38;
/// At most one vector per queue plus one fits the 4 KiB table region.
const MAX_QUEUES: usize = 255;
/// "No vector" in the msix vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// Errors from building or restoring a virtio-pci device.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The device has no queues or more than the transport can notify.
    #[error("Unsupported number of queues: {count}")]
    QueueCount {
        /// Number of queues the device asked for.
        count: usize,
    },
    /// A queue's maximum size is not a power of two in 1..=32768.
    #[error("Invalid maximum size {size} for queue {queue}")]
    QueueSize {
        /// Queue index.
        queue: usize,
        /// Requested size.
        size: u16,
    },
    /// The PCI configuration could not be built or restored.
    #[error("PCI configuration failed")]
    Pci(#[source] PciError),
    /// An ioeventfd could not be created.
    #[error("Failed to create queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// A saved state does not fit this device.
    #[error("Saved virtio-pci state does not match the device: {reason}")]
    StateMismatch {
        /// What differs.
        reason: &'static str,
    },
    /// A saved queue state is invalid.
    #[error("Invalid saved state for queue {queue}")]
    QueueState {
        /// Queue index.
        queue: usize,
        /// What virtio-queue rejected.
        #[source]
        source: virtio_queue::Error,
    },
    /// The device refused its saved state or its activation on restore.
    #[error("Device restore failed")]
    Device(#[source] VirtioError),
}

/// A [`VirtioDevice`] behind the virtio-pci transport.
pub struct VirtioPciDevice<D: VirtioDevice> {
    device: D,
    mem: GuestMemoryMmap,
    config: PciConfiguration,
    msix: MsixConfig,
    msix_cap_offset: usize,
    queues: Vec<Queue>,
    queue_msix_vectors: Vec<u16>,
    queue_evts: Vec<EventFd>,
    config_msix_vector: u16,
    device_status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    isr: u8,
    config_generation: u8,
}

impl<D: VirtioDevice> fmt::Debug for VirtioPciDevice<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("device_status", &self.device_status)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

/// PCI class, subclass for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network controller, Ethernet
        2 => (0x01, 0x80), // mass storage, other
        3 => (0x07, 0x80), // communication, other
        _ => (0xff, 0x00), // unassigned class
    }
}

/// A vendor-specific virtio capability pointing at `length` bytes at `offset` in BAR 0.
fn virtio_capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![PCI_CAP_ID_VENDOR, 0, cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Wraps `device` with BAR 0 at `bar_address` (aligned to [`BAR_SIZE`], e.g. from
    /// [`crate::pci::BarAllocator`]); interrupts go through `msi`.
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        bar_address: u64,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount {
                count: max_sizes.len(),
            });
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(queue, &size)| {
                Queue::new(size).map_err(|_| VirtioPciError::QueueSize { queue, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let num_queues = queues.len();

        let device_type = device.device_type();
        let (class, subclass) = class_of(device_type);
        let ids = PciIds {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            // Modern-only devices use a subsystem id of 0x40 or more (virtio 1.x, 4.1.2.1).
            subsystem_id: 0x40,
        };
        let mut config = PciConfiguration::new(&ids);
        let bar = PciBarInfo {
            index: 0,
            address: bar_address,
            size: BAR_SIZE,
            is_64bit: true,
        };
        config.add_bar(&bar).map_err(VirtioPciError::Pci)?;

        let msix = MsixConfig::new(num_queues as u16 + 1, msi);
        let notify_len = NOTIFY_OFF_MULTIPLIER as u64 * num_queues as u64;
        let caps = [
            virtio_capability(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_LEN,
                &[],
            ),
            virtio_capability(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            virtio_capability(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                REGION_LEN,
                &[],
            ),
            virtio_capability(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for cap in &caps {
            config.add_capability(cap).map_err(VirtioPciError::Pci)?;
        }
        let msix_cap = msix.capability(0, MSIX_TABLE_OFFSET as u32, 0, MSIX_PBA_OFFSET as u32);
        let msix_cap_offset = config
            .add_capability(&msix_cap)
            .map_err(VirtioPciError::Pci)?;

        Ok(Self {
            device,
            mem,
            config,
            msix,
            msix_cap_offset,
            queues,
            queue_msix_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
            queue_evts,
            config_msix_vector: VIRTIO_MSI_NO_VECTOR,
            device_status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            isr: 0,
            config_generation: 0,
        })
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, mutably (e.g. to feed it console input before a [`Self::kick`]).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// One eventfd per queue with its notify offset inside BAR 0, for KVM ioeventfds at
    /// BAR 0 base + offset (2-byte writes, no data match).
    pub fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| {
                (
                    NOTIFY_OFFSET + u64::from(NOTIFY_OFF_MULTIPLIER) * i as u64,
                    evt,
                )
            })
            .collect()
    }

    /// Makes the device process queue `queue` now, as if the driver had notified it.
    pub fn kick(&mut self, queue: u16) {
        self.process_queue(queue);
    }

    /// The device's counters.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.device.counters()
    }

    /// Tells the driver the device configuration changed (bumps the generation, interrupts).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal_config();
    }

    fn signal_config(&mut self) {
        self.isr |= 2;
        if self.msix.enabled() && self.config_msix_vector != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(self.config_msix_vector);
        }
    }

    fn signal_queue(&mut self, queue: usize) {
        if self.msix.enabled() {
            let vector = self.queue_msix_vectors[queue];
            if vector != VIRTIO_MSI_NO_VECTOR {
                self.msix.trigger(vector);
            }
        } else {
            self.isr |= 1;
        }
    }

    /// Handles the available buffers of `index` if the device is live and the queue usable.
    pub(crate) fn process_queue(&mut self, index: u16) {
        let i = usize::from(index);
        if self.device_status & common::DRIVER_OK == 0
            || self.device_status & common::NEEDS_RESET != 0
        {
            return;
        }
        let Some(queue) = self.queues.get_mut(i) else {
            log::debug!("Notify of unknown queue {index} ignored");
            return;
        };
        if !queue.ready() {
            return;
        }
        if !queue.is_valid(&self.mem) {
            log::warn!("Virtio queue {index} is not valid; device needs reset");
            self.set_needs_reset();
            return;
        }
        match run_queue(&mut self.device, index, queue, &self.mem) {
            Ok(true) => match queue.needs_notification(&self.mem) {
                Ok(true) => self.signal_queue(i),
                Ok(false) => {}
                Err(e) => {
                    log::warn!("Virtio queue {index} event index unreadable: {e}");
                    self.set_needs_reset();
                }
            },
            Ok(false) => {}
            Err(e) => {
                log::warn!("Virtio queue {index} failed: {e}");
                self.set_needs_reset();
            }
        }
    }

    fn set_needs_reset(&mut self) {
        self.device_status |= common::NEEDS_RESET;
        self.signal_config();
    }
}

/// Runs the device on `queue` until the driver has nothing more for it. Notifications are
/// suppressed meanwhile, and re-enabling them (which with EVENT_IDX publishes `avail_event`)
/// rechecks for buffers added in between. Stops when the device makes no progress (e.g. a
/// receive queue waiting for input).
fn run_queue<D: VirtioDevice>(
    device: &mut D,
    index: u16,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, VirtioError> {
    let queue_error = |source| VirtioError::Queue {
        queue: index,
        source,
    };
    let mut used = false;
    loop {
        let before = queue.next_avail();
        queue.disable_notification(mem).map_err(queue_error)?;
        match device.process_queue(index, queue, mem) {
            Ok(added) => used |= added,
            // A bad chain is the driver's bug; the device skipped it, the queue still works.
            Err(VirtioError::MalformedChain { queue, reason }) => {
                log::warn!("Malformed chain on queue {queue}: {reason}");
                used = true;
            }
            Err(e) => return Err(e),
        }
        if !device.needs_notification(index) {
            // Served on another trigger: the driver's notifications stay off.
            return Ok(used);
        }
        let more = queue.enable_notification(mem).map_err(queue_error)?;
        if !more || queue.next_avail() == before {
            return Ok(used);
        }
    }
}

#[cfg(test)]
mod tests;
