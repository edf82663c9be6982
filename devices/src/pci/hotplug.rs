//! The PCI hot-plug controller: how the VMM tells the guest that a bus 0 slot gained a device
//! or should give one up, and how the guest says it has let a device go.
//!
//! One register page of four 32-bit registers; bit n of each stands for slot n:
//!
//! | offset | name | guest access |
//! |---|---|---|
//! | 0x0 | `INSERTED` | read; the read clears it: slots that gained a device |
//! | 0x4 | `REMOVE_REQUESTED` | read; the read clears it: slots the host asks the guest to release |
//! | 0x8 | `EJECT` | write: slots the guest has released (the VMM then removes their devices) |
//! | 0xc | `PRESENT` | read: slots that hold a device |
//!
//! Setting a bit in `INSERTED` or `REMOVE_REQUESTED` raises the controller's (edge) interrupt.
//! The DSDT's methods turn both into ACPI notifications (device check, eject request) and a
//! slot's `_EJ0` into the `EJECT` write; a guest without ACPI may poll the registers.

use std::fmt;
use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

/// `INSERTED` register offset.
pub const INSERTED: u64 = 0x0;
/// `REMOVE_REQUESTED` register offset.
pub const REMOVE_REQUESTED: u64 = 0x4;
/// `EJECT` register offset.
pub const EJECT: u64 = 0x8;
/// `PRESENT` register offset.
pub const PRESENT: u64 = 0xc;

/// Slot 0 is the host bridge: it is never inserted, removed or ejected.
const DEVICE_SLOTS: u32 = !1;

/// What the guest's eject write calls (the VMM then takes the slots with
/// [`PciHotplugController::take_ejected`]). It runs on the vCPU thread that wrote, so it should
/// only signal the VMM and return; an error is logged.
pub type EjectSignal = Box<dyn Fn() -> io::Result<()> + Send>;

/// The controller's state across a live update: notifications the guest has not read yet and
/// ejects the VMM has not acted on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHotplugState {
    /// Slots that hold a device.
    pub present: u32,
    /// `INSERTED`, unread.
    pub inserted: u32,
    /// `REMOVE_REQUESTED`, unread.
    pub remove_requested: u32,
    /// Slots the guest ejected that the VMM has not removed yet.
    pub ejected: u32,
}

impl liveupdate::state::Versioned for PciHotplugState {
    const VERSION: u16 = 1;
}

/// The controller, as an MMIO bus device.
pub struct PciHotplugController {
    state: PciHotplugState,
    irq: Arc<dyn IrqLine>,
    on_eject: EjectSignal,
}

impl fmt::Debug for PciHotplugController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciHotplugController")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl PciHotplugController {
    /// A controller with `state` (`PciHotplugState::default()` at boot, then the boot devices'
    /// slots marked with [`Self::set_present`]) that raises `irq` and calls `on_eject`.
    pub fn new(state: PciHotplugState, irq: Arc<dyn IrqLine>, on_eject: EjectSignal) -> Self {
        Self {
            state,
            irq,
            on_eject,
        }
    }

    /// The state to save.
    pub fn state(&self) -> PciHotplugState {
        self.state
    }

    /// Marks `slot` as holding a device (or not), without telling the guest: for devices
    /// placed at boot, and for a device the VMM removed.
    pub fn set_present(&mut self, slot: u8, present: bool) {
        let bit = slot_bit(slot);
        if present {
            self.state.present |= bit;
        } else {
            self.state.present &= !bit;
            self.state.remove_requested &= !bit;
            self.state.inserted &= !bit;
        }
    }

    /// A device was placed in `slot` on the running VM: the guest is told to look.
    pub fn notify_inserted(&mut self, slot: u8) -> io::Result<()> {
        let bit = slot_bit(slot);
        self.state.present |= bit;
        self.state.inserted |= bit;
        self.state.ejected &= !bit;
        self.irq.trigger()
    }

    /// Asks the guest to release the device in `slot`; its eject shows in
    /// [`Self::take_ejected`]. A slot without a device is ignored.
    pub fn request_removal(&mut self, slot: u8) -> io::Result<()> {
        let bit = slot_bit(slot) & self.state.present;
        if bit == 0 {
            return Ok(());
        }
        self.state.remove_requested |= bit;
        self.irq.trigger()
    }

    /// Withdraws a removal request the guest has not read yet (e.g. the host gave up waiting).
    pub fn withdraw_removal(&mut self, slot: u8) {
        self.state.remove_requested &= !slot_bit(slot);
    }

    /// The slots the guest ejected since the last call, as slot numbers.
    pub fn take_ejected(&mut self) -> Vec<u8> {
        let ejected = std::mem::take(&mut self.state.ejected);
        (1..32u8)
            .filter(|slot| ejected & (1 << slot) != 0)
            .collect()
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            INSERTED => std::mem::take(&mut self.state.inserted),
            REMOVE_REQUESTED => std::mem::take(&mut self.state.remove_requested),
            PRESENT => self.state.present,
            _ => 0,
        }
    }
}

/// The register bit of `slot`; 0 for the host bridge and for slots past 31.
fn slot_bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0) & DEVICE_SLOTS
}

impl BusDevice for PciHotplugController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "pci hotplug: ignored {}-byte read at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (EJECT, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) else {
            log::debug!(
                "pci hotplug: ignored {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        // Only a slot that holds a device can be ejected.
        let ejected = u32::from_le_bytes(bytes) & self.state.present & DEVICE_SLOTS;
        if ejected == 0 {
            return;
        }
        self.state.ejected |= ejected;
        self.state.remove_requested &= !ejected;
        if let Err(e) = (self.on_eject)() {
            log::warn!("pci hotplug: cannot signal an eject: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct CountingLine(AtomicUsize);

    impl IrqLine for CountingLine {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Fixture {
        controller: PciHotplugController,
        irq: Arc<CountingLine>,
        ejects: Arc<Mutex<usize>>,
    }

    fn fixture() -> Fixture {
        let irq = Arc::new(CountingLine::default());
        let ejects = Arc::new(Mutex::new(0));
        let counted = ejects.clone();
        let controller = PciHotplugController::new(
            PciHotplugState::default(),
            irq.clone(),
            Box::new(move || {
                *counted.lock().unwrap() += 1;
                Ok(())
            }),
        );
        Fixture {
            controller,
            irq,
            ejects,
        }
    }

    fn read(controller: &mut PciHotplugController, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        controller.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn insertion_raises_the_interrupt_and_reads_once() {
        let mut f = fixture();

        f.controller.notify_inserted(3).unwrap();

        assert_eq!(f.irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(read(&mut f.controller, INSERTED), 1 << 3);
        assert_eq!(read(&mut f.controller, INSERTED), 0);
        assert_eq!(read(&mut f.controller, PRESENT), 1 << 3);
    }

    #[test]
    fn removal_request_then_eject_reaches_the_vmm() {
        let mut f = fixture();
        f.controller.set_present(2, true);

        f.controller.request_removal(2).unwrap();
        let requested = read(&mut f.controller, REMOVE_REQUESTED);
        f.controller.write(EJECT, &(1u32 << 2).to_le_bytes());

        assert_eq!(requested, 1 << 2);
        assert_eq!(*f.ejects.lock().unwrap(), 1);
        assert_eq!(f.controller.take_ejected(), vec![2]);
        assert_eq!(f.controller.take_ejected(), Vec::<u8>::new());
    }

    #[test]
    fn removal_of_an_empty_slot_tells_the_guest_nothing() {
        let mut f = fixture();

        f.controller.request_removal(4).unwrap();

        assert_eq!(f.irq.0.load(Ordering::SeqCst), 0);
        assert_eq!(read(&mut f.controller, REMOVE_REQUESTED), 0);
    }

    #[test]
    fn eject_of_empty_slots_and_the_host_bridge_is_ignored() {
        let mut f = fixture();
        f.controller.set_present(1, true);

        f.controller.write(EJECT, &(0b1u32 | 1 << 9).to_le_bytes());

        assert_eq!(*f.ejects.lock().unwrap(), 0);
        assert!(f.controller.take_ejected().is_empty());
    }

    #[test]
    fn odd_sized_and_unknown_accesses_are_ignored() {
        let mut f = fixture();
        f.controller.set_present(1, true);
        f.controller.notify_inserted(1).unwrap();

        let mut byte = [0xffu8; 1];
        f.controller.read(INSERTED, &mut byte);
        f.controller.write(EJECT, &[2]);
        f.controller.write(PRESENT, &2u32.to_le_bytes());

        assert_eq!(byte, [0]);
        assert!(f.controller.take_ejected().is_empty());
        assert_eq!(read(&mut f.controller, INSERTED), 1 << 1);
        assert_eq!(read(&mut f.controller, 0x10), 0);
    }

    #[test]
    fn state_keeps_unread_notifications_across_a_rebuild() {
        let mut f = fixture();
        f.controller.set_present(5, true);
        f.controller.request_removal(5).unwrap();
        let state = f.controller.state();

        let mut rebuilt = PciHotplugController::new(state, f.irq.clone(), Box::new(|| Ok(())));

        assert_eq!(read(&mut rebuilt, REMOVE_REQUESTED), 1 << 5);
        assert_eq!(read(&mut rebuilt, PRESENT), 1 << 5);
    }

    #[test]
    fn removed_device_clears_its_pending_bits() {
        let mut f = fixture();
        f.controller.notify_inserted(6).unwrap();
        f.controller.request_removal(6).unwrap();

        f.controller.set_present(6, false);

        assert_eq!(read(&mut f.controller, INSERTED), 0);
        assert_eq!(read(&mut f.controller, REMOVE_REQUESTED), 0);
        assert_eq!(read(&mut f.controller, PRESENT), 0);
    }
}
