//! The common configuration structure: feature negotiation, device status and queue setup.

use virtio_queue::QueueT;

use super::{VIRTIO_MSI_NO_VECTOR, VirtioPciDevice};
use crate::virtio::device::VirtioDevice;

pub(super) const ACKNOWLEDGE: u8 = 1;
pub(super) const DRIVER: u8 = 2;
pub(super) const DRIVER_OK: u8 = 4;
pub(super) const FEATURES_OK: u8 = 8;
pub(super) const NEEDS_RESET: u8 = 0x40;
/// Indirect descriptors: virtio-queue follows them for every device.
pub(super) const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Event index interrupt/notification suppression, handled by the transport's queue loop.
pub(super) const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Modern (virtio 1.x) device.
pub(super) const VIRTIO_F_VERSION_1: u64 = 1 << 32;

// Register offsets in the common configuration (virtio 1.x, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DESC_HI: u64 = 0x24;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DRIVER_HI: u64 = 0x2c;
const QUEUE_DEVICE: u64 = 0x30;
const QUEUE_DEVICE_HI: u64 = 0x34;

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.device.features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.device_status
    }

    /// Features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = usize::from(self.queue_select);
        (index < self.queues.len()).then_some(index)
    }

    pub(super) fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let queue = self.selected_queue();
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => {
                feature_half(self.offered_features(), self.device_feature_select)
            }
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => feature_half(self.driver_features, self.driver_feature_select),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.config_msix_vector),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.device_status),
            (CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(self.queues[q].size())),
            (QUEUE_MSIX_VECTOR, 2) => queue.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| {
                u64::from(self.queue_msix_vectors[q])
            }),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(self.queues[q].ready())),
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |q| q as u64),
            (QUEUE_DESC..=QUEUE_DEVICE_HI, 4 | 8) => match queue {
                Some(q) => address_part(&self.queues[q], offset, data.len()),
                None => 0,
            },
            _ => {
                log::debug!(
                    "Virtio common config read at {offset:#x} len {} ignored",
                    data.len()
                );
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (out, byte) in data.iter_mut().zip(bytes) {
            *out = byte;
        }
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        for (slot, byte) in bytes.iter_mut().zip(data) {
            *slot = *byte;
        }
        let value = u64::from_le_bytes(bytes);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => self.config_msix_vector = self.checked_vector(value as u16),
            (DEVICE_STATUS, 1) => self.write_status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            _ => self.write_queue_register(offset, data.len(), value),
        }
    }

    /// A vector the table has, or NO_VECTOR (which the driver reads back as a refusal).
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, half: u32) {
        if self.device_status & FEATURES_OK != 0 {
            log::debug!("Driver features written after FEATURES_OK ignored");
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(half) << shift);
    }

    fn write_queue_register(&mut self, offset: u64, len: usize, value: u64) {
        let Some(q) = self.selected_queue() else {
            log::debug!("Write to queue register {offset:#x} of absent queue ignored");
            return;
        };
        if offset == QUEUE_MSIX_VECTOR && len == 2 {
            self.queue_msix_vectors[q] = self.checked_vector(value as u16);
            return;
        }
        let queue = &mut self.queues[q];
        if queue.ready() {
            log::debug!("Write to queue register {offset:#x} of an enabled queue ignored");
            return;
        }
        let low = Some(value as u32);
        let high = Some((value >> 32) as u32);
        match (offset, len) {
            (QUEUE_SIZE, 2) => queue.set_size(value as u16),
            (QUEUE_ENABLE, 2) => queue.set_ready(value & 1 == 1),
            (QUEUE_DESC, 4) => queue.set_desc_table_address(low, None),
            (QUEUE_DESC_HI, 4) => queue.set_desc_table_address(None, low),
            (QUEUE_DESC, 8) => queue.set_desc_table_address(low, high),
            (QUEUE_DRIVER, 4) => queue.set_avail_ring_address(low, None),
            (QUEUE_DRIVER_HI, 4) => queue.set_avail_ring_address(None, low),
            (QUEUE_DRIVER, 8) => queue.set_avail_ring_address(low, high),
            (QUEUE_DEVICE, 4) => queue.set_used_ring_address(low, None),
            (QUEUE_DEVICE_HI, 4) => queue.set_used_ring_address(None, low),
            (QUEUE_DEVICE, 8) => queue.set_used_ring_address(low, high),
            _ => log::debug!("Virtio common config write at {offset:#x} len {len} ignored"),
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly_set = status & !self.device_status;
        let mut status = status;
        if newly_set & FEATURES_OK != 0 && !self.features_acceptable() {
            // The driver reads FEATURES_OK back and gives up when it is clear.
            log::warn!("Driver features {:#x} refused", self.driver_features);
            status &= !FEATURES_OK;
        }
        // NEEDS_RESET is the device's bit: the driver cannot clear it except by reset.
        self.device_status = status | (self.device_status & NEEDS_RESET);
        if newly_set & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        self.driver_features & !self.offered_features() == 0
            && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        let status = self.device_status;
        if status & (ACKNOWLEDGE | DRIVER | FEATURES_OK) != ACKNOWLEDGE | DRIVER | FEATURES_OK {
            log::warn!("DRIVER_OK without a completed negotiation (status {status:#x})");
            self.set_needs_reset();
            return;
        }
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            queue.set_event_idx(event_idx);
            if queue.ready() && !queue.is_valid(&self.mem) {
                log::warn!("Virtio queue {index} set up with unusable addresses or size");
                self.device_status |= NEEDS_RESET;
            }
        }
        if self.device_status & NEEDS_RESET != 0 {
            self.signal_config();
            return;
        }
        if let Err(e) = self.device.activate(self.driver_features) {
            log::warn!("Virtio device activation failed: {e}");
            self.set_needs_reset();
        }
    }

    /// Device reset: everything negotiated is forgotten, queues return to their power-on
    /// state. MSI-X is PCI state and stays.
    pub(super) fn reset(&mut self) {
        self.device.reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_msix_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.config_msix_vector = VIRTIO_MSI_NO_VECTOR;
        self.device_status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.isr = 0;
    }
}

fn feature_half(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

/// The part of a queue address register at `offset` (4-byte halves or 8-byte whole).
fn address_part<Q: QueueT>(queue: &Q, offset: u64, len: usize) -> u64 {
    let base = offset & !7;
    let address = match base {
        QUEUE_DESC => queue.desc_table(),
        QUEUE_DRIVER => queue.avail_ring(),
        _ => queue.used_ring(),
    };
    match (offset % 8, len) {
        (0, 8) => address,
        (0, _) => address & 0xffff_ffff,
        _ => address >> 32,
    }
}
