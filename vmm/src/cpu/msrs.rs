//! Model-specific registers: which ones a vCPU has, the boot values, bulk get and set.

use std::sync::OnceLock;

use kvm_bindings::{KVM_MAX_MSR_ENTRIES, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::{CpuError, kvm_err};

/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// The LAPIC TSC-deadline timer; only meaningful after the TSC and the LAPIC are restored.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs KVM emulates but leaves out of `KVM_GET_MSR_INDEX_LIST`: the MTRRs (variable pairs
/// 0x200..0x20f for KVM's 8 ranges, the fixed ranges, the default type). They are guest
/// state all the same, so [`supported_msrs`] probes them too.
const UNLISTED_MSRS: &[u32] = &[
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
    0x250,
    0x258,
    0x259,
    0x268,
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    MSR_MTRR_DEF_TYPE,
];

/// Boot values: SYSENTER/SYSCALL entry points cleared, fast strings on, MTRRs on with
/// write-back as default type (Linux otherwise maps all RAM uncached). The TSC is left as
/// KVM set it.
const BOOT_MSRS: &[(u32, u64)] = &[
    (MSR_IA32_SYSENTER_CS, 0),
    (MSR_IA32_SYSENTER_ESP, 0),
    (MSR_IA32_SYSENTER_EIP, 0),
    (MSR_STAR, 0),
    (MSR_LSTAR, 0),
    (MSR_CSTAR, 0),
    (MSR_SYSCALL_MASK, 0),
    (MSR_KERNEL_GS_BASE, 0),
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
];

/// Writes the boot MSR values.
pub(super) fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    set_msrs(vcpu, &entries)
}

/// The MSRs of `vcpu` that KVM lets us read: KVM's MSR index list plus the MTRRs, each probed
/// with `KVM_GET_MSRS` on `vcpu`.
///
/// Which MSRs exist depends on the vCPU's CPUID, so pass a configured vCPU. On the test
/// machines' `kvm_pvm` all 41 listed MSRs read back, plus the 28 MTRRs.
pub fn supported_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, CpuError> {
    let listed = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let listed = listed.as_slice();
    let unlisted = UNLISTED_MSRS.iter().filter(|i| !listed.contains(i));
    let candidates: Vec<u32> = listed.iter().chain(unlisted).copied().collect();

    let mut readable = Vec::with_capacity(candidates.len());
    for index in candidates {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| CpuError::InvalidState {
            reason: "MSR buffer",
        })?;
        match vcpu.get_msrs(&mut one) {
            Ok(1) => readable.push(index),
            _ => log::debug!("MSR {index:#x} is listed by KVM but not readable"),
        }
    }
    Ok(readable)
}

/// [`supported_msrs`], determined once per process (with the first vCPU asked) and cached.
///
/// Every vCPU of a VM gets the same CPUID features, so one probe serves them all.
pub fn supported_msrs_cached(kvm: &Kvm, vcpu: &VcpuFd) -> Result<&'static [u32], CpuError> {
    if let Some(list) = MSR_CACHE.get() {
        return Ok(list);
    }
    let list = supported_msrs(kvm, vcpu)?;
    Ok(MSR_CACHE.get_or_init(|| list))
}

/// The MSRs a restored vCPU state carries, taken as this process's list instead of probing
/// (about 70 `KVM_GET_MSRS` while the guest waits): the restored CPUID decides which MSRs
/// exist, so the next update saves the same ones. A list cached already is kept.
pub fn msrs_of_restored(state: &super::VcpuState) -> &'static [u32] {
    MSR_CACHE.get_or_init(|| state.msrs.iter().map(|e| e.index).collect())
}

/// The MSRs [`msrs_of_restored`] took, once it has.
pub fn restored_msrs() -> Option<&'static [u32]> {
    MSR_CACHE.get().map(Vec::as_slice)
}

static MSR_CACHE: OnceLock<Vec<u32>> = OnceLock::new();

/// Reads the MSRs `indices`, in chunks of what one `KVM_GET_MSRS` takes.
pub(super) fn get_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, CpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_buffer(&entries)?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if let Some(refused) = chunk.get(read) {
            return Err(CpuError::Msr {
                op: "KVM_GET_MSRS",
                index: *refused,
            });
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Writes `entries` in order, in chunks of what one `KVM_SET_MSRS` takes.
pub(super) fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), CpuError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let written = vcpu
            .set_msrs(&msrs_buffer(chunk)?)
            .map_err(kvm_err("KVM_SET_MSRS"))?;
        // KVM stops at the first MSR it refuses and returns how many it wrote.
        if let Some(refused) = chunk.get(written) {
            return Err(CpuError::Msr {
                op: "KVM_SET_MSRS",
                index: refused.index,
            });
        }
    }
    Ok(())
}

fn msrs_buffer(entries: &[kvm_msr_entry]) -> Result<Msrs, CpuError> {
    Msrs::from_entries(entries).map_err(|_| CpuError::InvalidState {
        reason: "too many MSRs in one call",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util;

    #[test]
    fn supported_msrs_include_tsc_sysenter_and_mtrr_default_type() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let vcpu = test_util::vcpu(&kvm, &vm, 0, 1);

        let msrs = supported_msrs(&kvm, &vcpu).unwrap();

        for index in [MSR_IA32_TSC, MSR_IA32_SYSENTER_CS, MSR_MTRR_DEF_TYPE] {
            assert!(msrs.contains(&index), "{index:#x} missing from {msrs:x?}");
        }
    }

    #[test]
    fn boot_msrs_read_back_after_configure() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let vcpu = test_util::vcpu(&kvm, &vm, 0, 1);
        let indices: Vec<u32> = BOOT_MSRS.iter().map(|&(index, _)| index).collect();

        let entries = get_msrs(&vcpu, &indices).unwrap();

        let values: Vec<(u32, u64)> = entries.iter().map(|e| (e.index, e.data)).collect();
        assert_eq!(values, BOOT_MSRS);
    }

    #[test]
    fn refused_msr_is_named_in_the_error() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let vcpu = test_util::vcpu(&kvm, &vm, 0, 1);

        let result = get_msrs(&vcpu, &[MSR_IA32_TSC, 0xdead_0000]);

        assert!(matches!(
            result,
            Err(CpuError::Msr {
                index: 0xdead_0000,
                ..
            })
        ));
    }
}
