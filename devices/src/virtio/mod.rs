//! Virtio devices and their PCI transport.

pub mod block;
pub mod console;
pub mod device;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_driver;
pub mod vsock;
