//! vfio-user: attach PCI devices served by another process.
//!
//! - [`client`]: the VMM side, a [`devices::pci::PciDevice`] that forwards configuration space
//!   and BAR accesses to the server, shares guest RAM with `DMA_MAP` (the RAM memfds, by
//!   offset) and hands the server the eventfd of its MSI vector, which the VMM registers as a
//!   KVM irqfd: the server's signal reaches the guest without passing through the VMM.
//! - [`testdev`]: the reference device server (`vfio-user-testdev`), PCI 1234:5aa5.
//! - [`proto`]: our client side of the protocol (checked replies, timeouts, adoptable stream).
//! - [`state`]: what a live update saves of an attached device.
//!
//! The test device's server side is rust-vmm's `vfio_user` crate 0.1.7 (renamed
//! `vfio_user_proto` here). Its `Client` is not used: it trusts the server's message sizes (a
//! malformed reply panics it, which would take the VMM down) and cannot adopt a connected
//! stream, which a live update needs.
//!
//! The BAR and expansion ROM registers, the MSI capability walk and the MSI message decoding
//! are shared with kernel VFIO (`devices::pci::passthrough`).
//!
//! # Limits
//!
//! BAR 0 only, accessed through messages (no mmapped sparse areas); no expansion ROM; one MSI
//! vector (no MSI-X, no INTx); DMA regions are mapped once at attach (no unmap, no hot-added
//! RAM). Hot-add (`vm.add-user-device`) is announced to the guest through the PCI hot-plug
//! controller (ACPI; a guest without it rescans PCI); there is no removal
//! (`vm.remove-device` refuses a vfio-user device). Each protocol call waits at most
//! [`proto::CALL_TIMEOUT`] (a server
//! that stops answering stalls the touching vCPU that long). A failed call (the server died,
//! timed out or sent a malformed reply) is logged once; from then on the device's registers
//! read all ones and writes are dropped, and the guest runs on.
//!
//! # Live update
//!
//! **Handing the connection over (restart mode, tested in `tests/vfio_user.rs`)**: the server
//! never sees the VMM change. In prepare (guest running), participant `vfio-user/<n>` checks
//! the server answers and attaches the connected socket and the MSI eventfd to its session as
//! *restart-only attachments* (`liveupdate::participant::FileSink::attach`): the agent
//! (`ch-luod --emulate`) holds copies, never gives them to a kernel, and moves them with the
//! session. In pause it stops all traffic on the connection
//! ([`VfioUserPciDevice::set_handed_over`]) and unregisters its KVM irqfd, so from then on the
//! server's signals wait in the eventfd's counter instead of reaching a LAPIC whose state is
//! being saved. Save writes [`VfioUserDeviceState`] (BAR registers and size, MSI capability
//! offset, DMA regions, the attachment tokens). The old VMM exits: its descriptors close, the
//! agent's and then the successor's copies keep the connection open, so the server reads no
//! EOF and keeps DMA-ing into the RAM memfds it maps (the very memfds the successor maps).
//! The successor takes the stream with [`proto::Connection::adopt`]
//! ([`VfioUserPciDevice::adopt`]: no message, no `DMA_MAP`, no `SET_IRQS`) and claims the
//! *same* eventfd for its MSI vector, registered as its irqfd only once the vCPUs and LAPICs
//! are restored: KVM then injects what waited. No interrupt is lost; signals sent during the
//! pause merge into one, as a pending MSI would (a driver that needs each one counted uses the
//! test device's acknowledge mode, where the next interrupt waits for the acknowledgement).
//! Any server works, `persist` or not. A cancelled update (a later participant fails) lets the
//! old VMM talk again and re-registers its irqfd; the agent closes its copies.
//!
//! Kernel mode, or a session without an agent, refuses attachments
//! (`SessionError::AttachmentsUnsupported`): the participant refuses the update in prepare,
//! before the pause, and the guest runs on.
//!
//! **Re-attach, for snapshots and states from older VMMs** (no attachment tokens): the
//! successor connects again *without* `DEVICE_RESET` ([`VfioUserPciDevice::reattach`]): its
//! RAM memfds at the same addresses (`DMA_MAP` of an identical mapping is kept by the server;
//! the same range from another memfd, a restored snapshot's RAM, replaces the old mapping in
//! the test device), a new eventfd through `SET_IRQS` (the server raises the interrupts it
//! missed as one), the BARs where the guest put them. It needs a server that keeps the device
//! across a reconnect (`vfio-user-testdev --persist`, `persist=on`, see
//! [`VfioUserPciDevice::set_server_persists`]): the server sees a disconnect, and the
//! interrupt raised at `SET_IRQS` reaches the guest before its LAPIC is restored (lost, until
//! the next). A snapshot (a session that takes no attachments but that the host's processes
//! outlive) saves the state without tokens, for this re-attach, and leaves the device with
//! the VM, which runs on; a device whose server does not persist is refused. A fresh attach
//! (boot, guest reboot, hot-add) always resets the device.
//!
//! **Kernel mode (kexec)**: the server process does not survive a kexec, and kernel LUO
//! carries memfds (and, later, iommufd/VFIO), not sockets or eventfds. vfio-user updates are
//! restart-mode only; across a kexec the device to keep running is kernel VFIO (issue 6).
//!
//! **One participant for both**: the VMM carries this device and a kernel VFIO device with the
//! same participant (`vmm/src/device_manager/handover.rs`, `CarriedDeviceParticipant`): the
//! MSI eventfd is attached first (a refusal means a kexec is coming), then the device's own fds
//! (here the connection; for VFIO the cdev and the iommufd), pause stops the VMM's traffic and
//! disarms the irqfd, save writes the device's state with the tokens, resume gives it back
//! after a cancel. Each device only says which fds to carry, how its tokens are laid out and
//! why it cannot cross a kexec.

pub mod client;
pub mod proto;
pub mod state;
pub mod testdev;

pub use client::{UserDeviceError, VfioUserPciDevice};
pub use state::{DmaRegionState, HandoverTokens, VfioUserDeviceState, VfioUserDeviceStateV1};
