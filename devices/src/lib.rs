//! Guest-visible devices: 16550 serial, i8042 reset, CMOS RTC, the PCI root and virtio-pci
//! devices (block, console, rng).
//!
//! Device logic lives here and never touches KVM: devices see guest memory through vm-memory,
//! raise interrupts through the small traits in [`interrupt`], and are reached through the
//! read/write [`bus::BusDevice`] trait. The `vmm` crate does the plumbing (port/MMIO exits,
//! irqfd, ioeventfd, GSI routing).

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod virtio;
