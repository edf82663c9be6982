//! Local APIC register access in `kvm_lapic_state` and the LINT pin setup.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::error::{CpuError, kvm_err};

/// LVT LINT0 register offset.
const APIC_LVT_LINT0: usize = 0x350;
/// LVT LINT1 register offset.
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode field of an LVT entry (bits 10:8).
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
/// Delivery mode ExtINT: the interrupt comes from the 8259 PIC.
const APIC_MODE_EXTINT: u32 = 0x700;
/// Delivery mode NMI.
const APIC_MODE_NMI: u32 = 0x400;

/// Reads the 32-bit LAPIC register at `offset` (e.g. 0x80 for TPR); 0 past the page.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    match lapic.regs.get(offset..offset + 4) {
        Some(bytes) => {
            let mut word = [0u8; 4];
            for (dst, src) in word.iter_mut().zip(bytes) {
                *dst = src.cast_unsigned();
            }
            u32::from_le_bytes(word)
        }
        None => 0,
    }
}

/// Writes the 32-bit LAPIC register at `offset`; ignored past the page.
pub fn set_lapic_register(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    if let Some(bytes) = lapic.regs.get_mut(offset..offset + 4) {
        for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *dst = src.cast_signed();
        }
    }
}

/// Wires LINT0 as ExtINT (the PIC's output, how legacy PIC interrupts reach the BSP) and
/// LINT1 as NMI, as on a PC; Linux expects this virtual-wire setup at boot.
///
/// Only the delivery modes change; the mask bits stay as KVM set them (KVM leaves LINT0
/// unmasked on the BSP and masks the LVT entries of APs).
pub(super) fn set_lint_pins(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let lvt = lapic_register(&lapic, offset);
        set_lapic_register(&mut lapic, offset, (lvt & !APIC_DELIVERY_MODE_MASK) | mode);
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util;

    #[test]
    fn register_round_trips_little_endian() {
        let mut lapic = kvm_lapic_state::default();

        set_lapic_register(&mut lapic, 0x80, 0x1234_5680);

        assert_eq!(lapic.regs[0x80], -0x80);
        assert_eq!(lapic_register(&lapic, 0x80), 0x1234_5680);
    }

    #[test]
    fn register_past_the_page_reads_zero_and_ignores_writes() {
        let mut lapic = kvm_lapic_state::default();

        set_lapic_register(&mut lapic, 0x3fe, 0xffff_ffff);

        assert_eq!(lapic_register(&lapic, 0x3fe), 0);
        assert_eq!(lapic.regs[0x3fe], 0);
    }

    #[test]
    fn configured_vcpus_have_lint0_extint_and_lint1_nmi() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);

        let bsp = test_util::vcpu(&kvm, &vm, 0, 2);
        let ap = test_util::vcpu(&kvm, &vm, 1, 2);

        for vcpu in [bsp, ap] {
            let lapic = vcpu.get_lapic().unwrap();
            assert_eq!(
                lapic_register(&lapic, APIC_LVT_LINT0) & 0x700,
                APIC_MODE_EXTINT
            );
            assert_eq!(
                lapic_register(&lapic, APIC_LVT_LINT1) & 0x700,
                APIC_MODE_NMI
            );
        }
    }
}
