//! The VM-wide pieces KVM emulates in the kernel: the 8259 PICs, the IOAPIC (one
//! `KVM_CREATE_IRQCHIP` creates both, plus a LAPIC per vCPU created afterwards), the 8254 PIT
//! and the kvmclock, with their state for live update. Routing of device interrupts lives in
//! [`crate::interrupts`].

use std::fmt;
use std::mem::offset_of;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data,
    kvm_ioapic_state, kvm_irqchip, kvm_pit_config, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zerocopy::IntoBytes;

/// Guest address of the three pages KVM uses for the real-mode TSS on Intel (VMX).
pub const TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest address of the identity-mapped page table page KVM uses on Intel (VMX), just
/// below the TSS. Both sit in the 32-bit MMIO hole, where no RAM or device is.
pub const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Number of IOAPIC pins (redirection entries) of KVM's IOAPIC.
pub const IOAPIC_PINS: usize = 24;

/// Errors from creating the platform devices or moving their state.
#[derive(Debug, Error)]
pub enum PlatformError {
    /// A KVM ioctl failed; `op` names it.
    #[error("KVM refused {op}")]
    Kvm {
        /// The ioctl, e.g. `KVM_CREATE_IRQCHIP`.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved state is malformed (e.g. from a corrupt or hostile blob).
    #[error("Invalid platform state: {reason}")]
    InvalidState {
        /// What is wrong.
        reason: &'static str,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PlatformError {
    move |source| PlatformError::Kvm { op, source }
}

/// Creates the in-kernel platform of a new VM. Call it before creating any vCPU.
pub fn create_platform(vm: &VmFd) -> Result<(), PlatformError> {
    // The identity map and TSS pages first: KVM refuses KVM_SET_IDENTITY_MAP_ADDR once a vCPU
    // exists, and VMX needs both to run real-mode guest code.
    vm.set_identity_map_address(IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    let tss = usize::try_from(TSS_ADDRESS).map_err(|_| PlatformError::InvalidState {
        reason: "TSS address",
    })?;
    vm.set_tss_address(tss)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    // The irqchip before any vCPU: a vCPU gets an in-kernel LAPIC only if the irqchip exists
    // when it is created. It also installs KVM's default GSI routing (GSI n to IOAPIC pin n,
    // and to the PIC for n < 16), which `InterruptManager` later replaces with the same plus
    // MSI routes.
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    // The PIT after the irqchip, which it raises IRQ 0 on. Without KVM_PIT_SPEAKER_DUMMY KVM
    // also emulates port 0x61 (PIT channel 2 gate and output), which Linux uses to calibrate.
    vm.create_pit2(kvm_pit_config {
        flags: 0,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))
}

/// One in-kernel interrupt controller's state (`kvm_irqchip`: a PIC or the IOAPIC).
///
/// A newtype only because kvm-bindings derives neither `Debug` nor `PartialEq` for it.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IrqchipState(pub kvm_irqchip);

impl PartialEq for IrqchipState {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqchipState")
            .field("chip_id", &self.0.chip_id)
            .field("bytes", &self.0.as_bytes())
            .finish()
    }
}

/// The three in-kernel interrupt controllers (a live-update participant of its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IrqchipsState {
    /// The master 8259 PIC.
    pub pic_master: IrqchipState,
    /// The slave 8259 PIC.
    pub pic_slave: IrqchipState,
    /// The IOAPIC.
    pub ioapic: IrqchipState,
}

impl liveupdate::state::Versioned for IrqchipsState {
    const VERSION: u16 = 1;
}

impl IrqchipsState {
    /// Captures the PICs and the IOAPIC of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, PlatformError> {
        Ok(Self {
            pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        })
    }
}

/// Captures the PIT (`KVM_GET_PIT2`).
pub fn save_pit(vm: &VmFd) -> Result<kvm_pit_state2, PlatformError> {
    vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))
}

/// Captures the kvmclock (`KVM_GET_CLOCK`).
pub fn save_clock(vm: &VmFd) -> Result<kvm_clock_data, PlatformError> {
    vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))
}

/// The platform devices' state, as plain data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformState {
    /// The master 8259 PIC.
    pub pic_master: IrqchipState,
    /// The slave 8259 PIC.
    pub pic_slave: IrqchipState,
    /// The IOAPIC.
    pub ioapic: IrqchipState,
    /// The 8254 PIT's three channels and flags.
    pub pit: kvm_pit_state2,
    /// The kvmclock: `clock` in ns; `realtime` and `host_tsc` when `flags` says KVM filled
    /// them (`KVM_CLOCK_REALTIME`, `KVM_CLOCK_HOST_TSC`).
    pub clock: kvm_clock_data,
}

impl PlatformState {
    /// Captures the platform state of a VM whose vCPUs are paused.
    pub fn save(vm: &VmFd) -> Result<Self, PlatformError> {
        Ok(Self::from_parts(
            IrqchipsState::save(vm)?,
            save_pit(vm)?,
            save_clock(vm)?,
        ))
    }

    /// The whole platform state from its parts (saved by separate participants).
    pub fn from_parts(irqchips: IrqchipsState, pit: kvm_pit_state2, clock: kvm_clock_data) -> Self {
        let IrqchipsState {
            pic_master,
            pic_slave,
            ioapic,
        } = irqchips;
        Self {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        }
    }

    /// Loads this state into `vm`, made by [`create_platform`]. Call it after the vCPU states
    /// are restored and just before the vCPUs resume.
    pub fn restore(&self, vm: &VmFd) -> Result<(), PlatformError> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.0.chip_id != id {
                return Err(PlatformError::InvalidState {
                    reason: "irqchip ids out of place",
                });
            }
        }
        // 1. The PICs and the IOAPIC before the PIT: KVM_SET_PIT2 restarts the PIT's timer,
        //    and its next tick must land in the restored chips, not in reset ones that would
        //    be overwritten afterwards.
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(&chip.0)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        // 2. The PIT. KVM reloads each channel's count from now (`count_load_time` is not
        //    restored), so a running counter restarts its current period once.
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // 3. The clock last, as late as possible: kvmclock reads `clock` at this ioctl and runs
        //    on from there, so the guest's monotonic clock does not see the pause. Flags go
        //    back as 0: KVM_CLOCK_TSC_STABLE is output-only (kernels before 5.16 refuse any
        //    flag with EINVAL). KVM_CLOCK_REALTIME would make KVM add the wall-clock time
        //    elapsed since `realtime`, i.e. show the pause to the guest; `realtime` and
        //    `host_tsc` stay in the state so that a live update can opt into that later
        //    (meaningful only with the same, synchronised host wall clock).
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }

    /// The IOAPIC redirection entry of `pin` (vector, delivery mode, mask, destination).
    pub fn ioapic_redirection(&self, pin: usize) -> Option<u64> {
        let offset = redirection_offset(pin)?;
        let bytes = self.ioapic.0.as_bytes().get(offset..offset + 8)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// Sets the IOAPIC redirection entry of `pin`; returns false for a pin that does not exist.
    pub fn set_ioapic_redirection(&mut self, pin: usize, entry: u64) -> bool {
        let Some(offset) = redirection_offset(pin) else {
            return false;
        };
        match self.ioapic.0.as_mut_bytes().get_mut(offset..offset + 8) {
            Some(bytes) => {
                bytes.copy_from_slice(&entry.to_le_bytes());
                true
            }
            None => false,
        }
    }
}

/// Byte offset of redirection entry `pin` in a `kvm_irqchip` holding the IOAPIC.
fn redirection_offset(pin: usize) -> Option<usize> {
    (pin < IOAPIC_PINS)
        .then(|| offset_of!(kvm_irqchip, chip) + offset_of!(kvm_ioapic_state, redirtbl) + pin * 8)
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<IrqchipState, PlatformError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(IrqchipState(chip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util;

    /// Redirection entry: vector 0x31, fixed, physical destination 0, edge, masked.
    const MASKED_VECTOR_0X31: u64 = (1 << 16) | 0x31;
    const CLOCK_NS: u64 = 5_000_000_000;

    /// A platform with the PIT channel 0 in mode 2, IOAPIC pin 4 programmed, clock at 5 s.
    fn distinctive_state(vm: &VmFd) -> PlatformState {
        let mut pit = vm.get_pit2().unwrap();
        pit.channels[0].mode = 2;
        pit.channels[0].count = 1000;
        vm.set_pit2(&pit).unwrap();
        let mut state = PlatformState::save(vm).unwrap();
        assert!(state.set_ioapic_redirection(4, MASKED_VECTOR_0X31));
        vm.set_irqchip(&state.ioapic.0).unwrap();
        vm.set_clock(&kvm_clock_data {
            clock: CLOCK_NS,
            ..Default::default()
        })
        .unwrap();
        PlatformState::save(vm).unwrap()
    }

    /// PIT channels without `count_load_time`, which KVM resets on every load.
    fn pit_without_load_time(state: &PlatformState) -> kvm_pit_state2 {
        let mut pit = state.pit;
        for channel in &mut pit.channels {
            channel.count_load_time = 0;
        }
        pit
    }

    #[test]
    fn platform_state_restored_into_fresh_vm_saves_back_equal() {
        let kvm = test_util::kvm();
        let saved = distinctive_state(&test_util::vm(&kvm));
        let vm = test_util::vm(&kvm);

        saved.restore(&vm).unwrap();
        let resaved = PlatformState::save(&vm).unwrap();

        assert_eq!(resaved.pic_master, saved.pic_master);
        assert_eq!(resaved.pic_slave, saved.pic_slave);
        assert_eq!(resaved.ioapic, saved.ioapic);
        assert_eq!(resaved.ioapic_redirection(4), Some(MASKED_VECTOR_0X31));
        assert_eq!(
            pit_without_load_time(&resaved),
            pit_without_load_time(&saved)
        );
        assert_eq!(
            (resaved.pit.channels[0].mode, resaved.pit.channels[0].count),
            (2, 1000)
        );
        assert!(resaved.clock.clock >= saved.clock.clock);
        assert!(resaved.clock.clock < saved.clock.clock + 1_000_000_000);
    }

    #[test]
    fn platform_state_survives_json_round_trip() {
        let kvm = test_util::kvm();
        let saved = distinctive_state(&test_util::vm(&kvm));

        let json = serde_json::to_string(&saved).unwrap();
        let decoded: PlatformState = serde_json::from_str(&json).unwrap();

        assert_eq!(decoded, saved);
    }

    #[test]
    fn restore_refuses_swapped_irqchips() {
        let kvm = test_util::kvm();
        let mut saved = distinctive_state(&test_util::vm(&kvm));
        std::mem::swap(&mut saved.pic_master, &mut saved.ioapic);

        let result = saved.restore(&test_util::vm(&kvm));

        assert!(matches!(result, Err(PlatformError::InvalidState { .. })));
    }

    #[test]
    fn second_irqchip_is_refused_with_an_error() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);

        let result = create_platform(&vm);

        assert!(matches!(result, Err(PlatformError::Kvm { .. })));
    }

    #[test]
    fn redirection_entry_of_missing_pin_is_none() {
        let kvm = test_util::kvm();
        let mut state = PlatformState::save(&test_util::vm(&kvm)).unwrap();

        assert_eq!(state.ioapic_redirection(IOAPIC_PINS), None);
        assert!(!state.set_ioapic_redirection(IOAPIC_PINS, 0));
    }
}
