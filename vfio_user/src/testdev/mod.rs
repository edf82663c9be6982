//! `vfio-user-testdev`: a small PCI device served over vfio-user, used by the tests.
//!
//! PCI 1234:5aa5, class ff/00, one 4 KiB memory BAR (BAR 0) of 32-bit registers (see
//! [`regs::reg`]) and one MSI vector (64-bit MSI capability at 0x40). Once the driver sets
//! CONTROL bit 0 with a DMA buffer of at least 16 bytes, a DMA engine thread writes, `RATE_HZ`
//! times a second, one record at the start of the buffer: the counter (u64 LE, advanced
//! before each write) and the time (u64 LE, ns since the Unix epoch). Every `BATCH` records it
//! signals the MSI eventfd the client gave it (if MSI is enabled) and counts the interrupt.
//! With CONTROL bit 1 set, each interrupt waits for the driver's write to `IRQ_ACK` before the
//! next is raised (one that falls due meanwhile is raised on the acknowledgement), so none
//! merges with another and a driver's count of the interrupts it took equals `IRQ_COUNT` (or
//! trails it by the one in flight). `CLIENT_SEQ` says which client this is, 1 for the first:
//! a VMM replaced with its connection handed over keeps its number, a reconnect does not.
//!
//! Clients are served one after another (a VMM reconnects when its guest reboots); each new
//! client finds the device at power-on, unless `persist` is set: then the device keeps running
//! (DMA included) while no client is attached and the next client takes it over as it is.
//!
//! DMA goes into the regions the client shares with `DMA_MAP` (the VMM's guest RAM memfds),
//! mapped here with `vm-memory`.

pub mod regs;
mod server;

pub use server::{TestDev, TestDevError, TestDevOptions, serve};
