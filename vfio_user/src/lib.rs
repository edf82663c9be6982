//! vfio-user: attach PCI devices served by another process.
//!
//! - [`client`]: the VMM side, a [`devices::pci::PciDevice`] that forwards configuration space
//!   and BAR accesses to the server, shares guest RAM with `DMA_MAP` (the RAM memfds, by
//!   offset) and hands the server the eventfd of its MSI vector, which the VMM registers as a
//!   KVM irqfd: the server's signal reaches the guest without passing through the VMM.
//! - [`testdev`]: the reference device server (`vfio-user-testdev`), PCI 1234:5aa5.
//! - [`proto`]: our client side of the protocol (checked replies, timeouts, adoptable stream).
//!
//! The test device's server side is rust-vmm's `vfio_user` crate 0.1.7 (renamed
//! `vfio_user_proto` here). Its `Client` is not used: it trusts the server's message sizes (a
//! malformed reply panics it, which would take the VMM down) and cannot adopt a connected
//! stream, which a live update needs.
//!
//! # Limits of this first slice
//!
//! BAR 0 only, accessed through messages (no mmapped sparse areas); one MSI vector (no MSI-X,
//! no INTx); DMA regions are mapped once at attach (no unmap, no hot-added RAM); no hot-plug
//! (`vm.add-user-device`). Each protocol call waits at most [`proto::CALL_TIMEOUT`] (a server
//! that stops answering stalls the touching vCPU that long). A failed call (the server died,
//! timed out or sent a malformed reply) is logged once; from then on the device's registers
//! read all ones and writes are dropped, and the guest runs on.
//!
//! # Live update
//!
//! **What works (restart mode, tested in `tests/vfio_user.rs`)**: a device attached with
//! `--user-device socket=PATH,persist=on` whose server keeps the device running across a
//! reconnect (`vfio-user-testdev --persist`) is carried by a documented re-attach. The old
//! VMM's participant `vfio-user/<n>` saves [`VfioUserDeviceState`] (BAR registers, MSI
//! capability offset, DMA regions); the old VMM exits and its connection closes; the device
//! keeps DMA-ing into the RAM memfds it still maps, and counts the interrupts that fall due.
//! The new VMM, restoring, connects again *without* `DEVICE_RESET`
//! ([`VfioUserPciDevice::reattach`]): the same memfds at the same addresses (`DMA_MAP` of an
//! identical mapping is kept by the server), a new eventfd through `SET_IRQS` (the server
//! raises the interrupts it missed as one), the BARs where the guest put them, and the MSI
//! route from the interrupt state. The probe guest sees its counter continue and its MSI
//! arrive, with no restart. Without `persist=on` the update is refused in prepare, before the
//! pause, and the guest runs on. A fresh attach (boot, guest reboot) always resets the device.
//!
//! **Limits of the re-attach**: the server sees a disconnect and must be written to survive it
//! (the vfio-user protocol has no such notion; it is our documented contract). If the
//! successor connects while the old VMM is still attached, it waits for it, at most
//! [`proto::CALL_TIMEOUT`]. Interrupts due in the gap merge into one.
//!
//! **Handing the connection over instead** (for servers that must not see a disconnect), not
//! implemented: the socket and eventfd cannot go into the LUO session, which carries memfds
//! only (LUO's rule; the emulated holder in `liveupdate::emulated` enforces it too). They would
//! need a restart-mode side channel: the agent already passes fds with `SCM_RIGHTS`, so it
//! could hold per-session "restart-only attachments" (never handed to the kernel, dropped on
//! finish or cancel). The new VMM would then take the stream with
//! [`proto::Connection::adopt`] (no message sent) and register the *same* eventfd as its irqfd
//! (`InterruptManager::msi_vectors_with_fds`), so that signals sent during the pause wait in
//! the eventfd counter until KVM injects them.
//!
//! **Kernel mode (kexec)**: the server process does not survive a kexec, and kernel LUO
//! carries memfds (and, later, iommufd/VFIO), not sockets or eventfds. vfio-user updates are
//! restart-mode only; across a kexec the device to keep running is kernel VFIO (issue 6).
//!
//! **One participant for both** (issue 6): the participant here has the shape to share: its
//! state holds the common part (PCI BAR registers, DMA regions as guest address + size + memfd
//! offset; MSI routes live in the interrupt state) and the phases are the same: prepare checks
//! the device can be carried, pause and resume do nothing (the device keeps running), save
//! writes the state, restore adopts the device "never reset, never re-map". To share it, move
//! the participant behind a small backend trait (`carriable`, `state`, `adopt(state, fds)`)
//! whose vfio-user backend re-attaches as above and whose VFIO backend takes the cdev and
//! iommufd from the session (once the kernel preserves them) with the IOAS mappings in place.

pub mod client;
pub mod proto;
pub mod testdev;

pub use client::{DmaRegionState, UserDeviceError, VfioUserDeviceState, VfioUserPciDevice};
