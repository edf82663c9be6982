//! Virtio devices and their PCI transport.

pub mod device;
