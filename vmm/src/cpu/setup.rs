//! Boot-time vCPU setup: CPUID, boot MSRs, LAPIC LINT pins and MP state.

use kvm_bindings::{CpuId, kvm_cpuid_entry2, kvm_mp_state, kvm_xsave};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::error::{CpuError, kvm_err};
use super::state::VcpuSetup;
use super::{apply_topology, lapic, msrs};

/// The CPUID table vCPU `id` of `total` boots with: what KVM supports, with the topology of
/// `total` vCPUs and `id`'s APIC id. KVM's `supported` table ([`Kvm::get_supported_cpuid`]).
pub fn boot_cpuid(
    supported: &[kvm_cpuid_entry2],
    id: u8,
    total: u8,
) -> Result<Vec<kvm_cpuid_entry2>, CpuError> {
    if total == 0 || id >= total {
        return Err(CpuError::InvalidTopology { id, total });
    }
    let mut entries = supported.to_vec();
    apply_topology(&mut entries, id, total);
    Ok(entries)
}

/// KVM's supported CPUID table, the base of every vCPU's.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|cpuid| cpuid.as_slice().to_vec())
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// Prepares vCPU `id` (its KVM vCPU id) of `total` for boot, before its first `KVM_RUN`.
///
/// Requires the in-kernel irqchip (see [`crate::platform::create_platform`]). Sets, in this
/// order: CPUID (KVM checks later MSR and XCR0 writes against it, and refuses `KVM_SET_CPUID2`
/// once the vCPU has run), the boot MSRs, the LAPIC LINT pins, and checks the MP state. The
/// TSC runs at the host's frequency (see [`super::use_host_tsc_rate`]). Returns what it gave
/// the vCPU, which its saves then carry.
pub fn configure_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u8, total: u8) -> Result<VcpuSetup, CpuError> {
    check_xsave_size(kvm)?;
    let entries = boot_cpuid(&supported_cpuid(kvm)?, id, total)?;
    let setup = give_cpuid_and_host_tsc_rate(vcpu, entries)?;

    msrs::set_boot_msrs(vcpu)?;
    lapic::set_lint_pins(vcpu)?;
    ensure_boot_mp_state(vcpu, id)?;
    Ok(setup)
}

/// Gives a vCPU that never ran the CPUID table `entries` and the host's TSC rate.
pub fn give_cpuid_and_host_tsc_rate(
    vcpu: &VcpuFd,
    entries: Vec<kvm_cpuid_entry2>,
) -> Result<VcpuSetup, CpuError> {
    super::use_host_tsc_rate(vcpu)?;
    let cpuid = CpuId::from_entries(&entries).map_err(|_| CpuError::InvalidState {
        reason: "too many CPUID entries",
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    Ok(VcpuSetup {
        cpuid: entries,
        tsc_khz: vcpu.get_tsc_khz().ok(),
    })
}

/// Checks that KVM's guest XSAVE area fits `kvm_xsave`, which [`super::VcpuState`] moves with
/// `KVM_GET_XSAVE`/`KVM_SET_XSAVE`. It grows past 4096 bytes only if this process asks for
/// dynamic XSTATE features (AMX) with `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, which we never do.
fn check_xsave_size(kvm: &Kvm) -> Result<(), CpuError> {
    let size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    if size > std::mem::size_of::<kvm_xsave>() {
        return Err(CpuError::XsaveTooLarge { size });
    }
    Ok(())
}

/// Makes sure only the BSP runs at once.
///
/// KVM creates vCPU 0 (its default BSP id) RUNNABLE and every other vCPU UNINITIALIZED, i.e.
/// waiting for INIT/SIPI from the BSP, and with the in-kernel LAPIC it handles that wakeup
/// itself. We check this rather than trust it, and set the expected state if it differs.
fn ensure_boot_mp_state(vcpu: &VcpuFd, id: u8) -> Result<(), CpuError> {
    let expected = if id == 0 {
        KVM_MP_STATE_RUNNABLE
    } else {
        KVM_MP_STATE_UNINITIALIZED
    };
    let current = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    if current.mp_state != expected {
        log::warn!(
            "vCPU {id} was created in MP state {}, setting {expected}",
            current.mp_state
        );
        vcpu.set_mp_state(kvm_mp_state { mp_state: expected })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};

    use super::*;
    use crate::cpu::test_util;

    #[test]
    fn bsp_is_runnable_and_ap_waits_for_sipi() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);

        let bsp = test_util::vcpu(&kvm, &vm, 0, 2);
        let ap = test_util::vcpu(&kvm, &vm, 1, 2);

        assert_eq!(bsp.get_mp_state().unwrap().mp_state, KVM_MP_STATE_RUNNABLE);
        assert_eq!(
            ap.get_mp_state().unwrap().mp_state,
            KVM_MP_STATE_UNINITIALIZED
        );
    }

    #[test]
    fn configure_vcpu_rejects_id_outside_topology() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let vcpu = vm.create_vcpu(2).unwrap();

        let result = configure_vcpu(&kvm, &vcpu, 2, 2);

        assert!(matches!(
            result,
            Err(CpuError::InvalidTopology { id: 2, total: 2 })
        ));
    }

    #[test]
    fn configured_vcpu_sees_its_apic_id_in_cpuid() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);

        let vcpu = test_util::vcpu(&kvm, &vm, 1, 2);

        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
    }
}
