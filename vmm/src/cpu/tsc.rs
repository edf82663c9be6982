//! The frequency of the guest's TSC.
//!
//! On a host without a constant TSC, KVM gives every new vCPU the frequency the kvm module saw
//! when it loaded. The kernel may refine its own TSC frequency later; if the two differ by more
//! than KVM's tolerance (250 ppm) and the CPU cannot scale the TSC, KVM refuses the vCPU's
//! frequency and leaves its TSC ratio at zero. KVM then believes the guest's TSC stands still:
//! LAPIC timer deadlines never fall due and kvmclock jumps. (Seen in the nested test bed, where
//! the L1 kernel's early calibration under QEMU TCG is often off by some hundred ppm.)
//! Asking for the host's own frequency (`KVM_SET_TSC_KHZ` with 0) always succeeds and sets a
//! proper ratio, so every vCPU gets it explicitly before anything reads its TSC.

use kvm_ioctls::VcpuFd;

use super::error::{CpuError, kvm_err};

/// Runs `vcpu`'s TSC at the host's current TSC frequency.
pub fn use_host_tsc_rate(vcpu: &VcpuFd) -> Result<(), CpuError> {
    vcpu.set_tsc_khz(0).map_err(kvm_err("KVM_SET_TSC_KHZ"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{kvm, vm};

    #[test]
    fn a_vcpu_set_to_the_host_rate_reports_a_frequency_and_accepts_it_again() {
        let kvm = kvm();
        let vm = vm(&kvm);
        let vcpu = vm.create_vcpu(0).unwrap();

        use_host_tsc_rate(&vcpu).unwrap();
        let khz = vcpu.get_tsc_khz().unwrap();

        assert!(khz > 100_000, "TSC frequency {khz} kHz is implausible");
        vcpu.set_tsc_khz(khz).unwrap();
        assert_eq!(vcpu.get_tsc_khz().unwrap(), khz);
    }
}
