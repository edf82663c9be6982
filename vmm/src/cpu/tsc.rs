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
//!
//! Across a live update the guest's TSC must count the pause as time that passed, as it would
//! on a real machine, so the guest's own clock measures the pause truly: the saving side notes
//! each vCPU's TSC as of the pause instant (read a little later, so moved back by the time in
//! between), and the restoring side moves it forward by the host time since that instant, just
//! before loading it ([`shift_saved_tsc`] both times).

use kvm_ioctls::VcpuFd;

use super::error::{CpuError, kvm_err};
use super::msrs::{MSR_IA32_TSC, get_msrs};
use super::state::VcpuState;

/// How far a guest's TSC may read from the value just loaded before it counts as not kept.
const TSC_KEPT_WITHIN_MS: u64 = 1000;

/// Moves the TSC saved in `state` by `delta_ns` nanoseconds of host time (back if negative),
/// at `khz` ticks per millisecond. A state without the TSC MSR is left as it is.
pub fn shift_saved_tsc(state: &mut VcpuState, delta_ns: i64, khz: u32) {
    let ticks = i128::from(delta_ns) * i128::from(khz) / 1_000_000;
    // Wraps like the TSC itself; a shift of more than 2^63 ticks is no real pause.
    let ticks = i64::try_from(ticks).unwrap_or(if ticks < 0 { i64::MIN } else { i64::MAX });
    for msr in &mut state.msrs {
        if msr.index == MSR_IA32_TSC {
            msr.data = msr.data.wrapping_add_signed(ticks);
        }
    }
}

/// Runs `vcpu`'s TSC at the host's current TSC frequency.
pub fn use_host_tsc_rate(vcpu: &VcpuFd) -> Result<(), CpuError> {
    vcpu.set_tsc_khz(0).map_err(kvm_err("KVM_SET_TSC_KHZ"))
}

/// Reads `vcpu`'s TSC right after `state` was loaded into it (at `khz`) and warns when KVM did
/// not keep the loaded value: some KVMs (seen: the paravirtualised `kvm_pvm` of the test
/// machines) accept a guest TSC write and go on giving the guest the host's TSC. The guest's
/// clock then jumps by the difference, back if this host's TSC is behind the saved one.
pub fn warn_if_tsc_not_kept(vcpu: &VcpuFd, state: &VcpuState, khz: u32) {
    let Some(loaded) = state.msr(MSR_IA32_TSC) else {
        return;
    };
    let Some(read) = get_msrs(vcpu, &[MSR_IA32_TSC])
        .ok()
        .and_then(|read| read.first().map(|entry| entry.data))
    else {
        return;
    };
    let Some(jump_ms) = tsc_jump_ms(loaded, read, khz) else {
        return;
    };
    log::warn!(
        "KVM did not keep the guest's TSC: {loaded} loaded, {read} read back; the guest's clock \
         jumps {} by {:.1} s",
        if jump_ms < 0 { "back" } else { "forward" },
        jump_ms.unsigned_abs() as f64 / 1000.0
    );
}

/// The jump in ms (negative: back) from TSC value `loaded` to `read`, at `khz`, when it is
/// beyond [`TSC_KEPT_WITHIN_MS`].
fn tsc_jump_ms(loaded: u64, read: u64, khz: u32) -> Option<i64> {
    if khz == 0 {
        return None;
    }
    let ms = (i128::from(read) - i128::from(loaded)) / i128::from(khz);
    let ms = i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX });
    (ms.unsigned_abs() > TSC_KEPT_WITHIN_MS).then_some(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util::{kvm, vm};

    fn state_with_tsc(tsc: u64) -> VcpuState {
        let kvm = kvm();
        let vm = vm(&kvm);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut state = VcpuState::save(&mut vcpu, &[MSR_IA32_TSC]).unwrap();
        state.msrs[0].data = tsc;
        state
    }

    #[test]
    fn the_saved_tsc_moves_forward_and_back_by_host_time_at_the_guest_rate() {
        let mut state = state_with_tsc(5_000_000);

        // 1 ms forward at 2 GHz (2,000,000 kHz), then 1.5 ms back.
        shift_saved_tsc(&mut state, 1_000_000, 2_000_000);
        let forward = state.msrs[0].data;
        shift_saved_tsc(&mut state, -1_500_000, 2_000_000);

        assert_eq!(forward, 7_000_000);
        assert_eq!(state.msrs[0].data, 4_000_000);
    }

    #[test]
    fn a_tsc_read_back_within_a_second_of_the_loaded_value_is_kept() {
        // 2 GHz: 2,000,000 ticks per ms.
        assert_eq!(
            tsc_jump_ms(10_000_000_000, 10_000_000_000 + 2_000_000, 2_000_000),
            None
        );
        assert_eq!(
            tsc_jump_ms(10_000_000_000, 10_000_000_000 - 1_999_999_999, 2_000_000),
            None
        );
    }

    #[test]
    fn a_tsc_read_back_far_from_the_loaded_value_is_a_jump_back_or_forward() {
        assert_eq!(
            tsc_jump_ms(40_000_000_000, 10_000_000_000, 2_000_000),
            Some(-15_000)
        );
        assert_eq!(
            tsc_jump_ms(10_000_000_000, 16_000_000_000, 2_000_000),
            Some(3_000)
        );
        assert_eq!(tsc_jump_ms(u64::MAX, 0, 1), Some(i64::MIN));
    }

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
