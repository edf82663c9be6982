//! The guest CPUID: what KVM supports, with a simple, self-consistent topology.
//!
//! Topology: one socket of `total` cores, one thread per core, x2APIC id = initial APIC id =
//! the vCPU id. Leaf layouts are from the Intel SDM (CPUID instruction) and AMD APM vol. 3.

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// Leaf 0x1 ECX: VMX. Hidden so the guest never holds nested state (see the module docs).
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 0x1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 EDX: EBX[23:16] holds the logical processor count.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM. Hidden like VMX.
const EXT1_ECX_SVM: u32 = 1 << 2;
/// Level types of leaves 0xb and 0x1f (ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;
/// KVM's paravirtual signature leaf, "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// "AuthenticAMD" in leaf 0 EBX: AMD keeps its core count in leaf 0x8000_0008.
const AMD_VENDOR_EBX: u32 = 0x6874_7541;

/// Rewrites KVM's supported CPUID `entries` for vCPU `id` of `total` (`id < total`).
///
/// Sets the initial APIC id and logical count (leaf 0x1), the hypervisor bit, cache sharing and
/// core count (leaf 0x4), the x2APIC topology levels (leaves 0xb and 0x1f), the AMD core count
/// (leaf 0x8000_0008) and makes sure KVM's paravirtual signature leaf is present; the kvmclock
/// and other paravirtual features in leaf 0x4000_0001 stay as KVM reports them. VMX and SVM are
/// hidden.
pub fn apply_topology(entries: &mut Vec<kvm_cpuid_entry2>, id: u8, total: u8) {
    let total = u32::from(total.max(1));
    let id = u32::from(id);
    // Bits of the x2APIC id that number cores in the package: the core level's shift.
    let core_bits = total.next_power_of_two().trailing_zeros();
    let max_basic = leaf(entries, 0).map_or(0, |e| e.eax);
    let is_amd = leaf(entries, 0).is_some_and(|e| e.ebx == AMD_VENDOR_EBX);

    for entry in entries.iter_mut() {
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (id << 24) | (total << 16);
                entry.ecx = (entry.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_VMX;
                if total > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                }
            }
            0x4 if entry.eax & 0x1f != 0 => {
                // EAX[31:26]: core ids in the package - 1; EAX[25:14]: logical ids sharing the
                // cache - 1 (only the last level, L3, is shared between cores).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { (1 << core_bits) - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (((1 << core_bits) - 1) << 26) | (sharing << 14);
            }
            0x8000_0001 => entry.ecx &= !EXT1_ECX_SVM,
            0x8000_0008 if is_amd => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC id bits for the core.
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (total - 1);
            }
            _ => {}
        }
    }

    for function in [0xb, 0x1f] {
        if max_basic >= function {
            entries.retain(|e| e.function != function);
            entries.extend((0..3).map(|index| topology_entry(function, index, id, total)));
        }
    }

    if leaf(entries, KVM_SIGNATURE_LEAF).is_none() {
        let max = if leaf(entries, KVM_FEATURES_LEAF).is_some() {
            KVM_FEATURES_LEAF
        } else {
            KVM_SIGNATURE_LEAF
        };
        entries.push(kvm_cpuid_entry2 {
            function: KVM_SIGNATURE_LEAF,
            eax: max,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

/// Sub-leaf `index` of the x2APIC topology leaf `function` (0xb or 0x1f; same layout).
///
/// Level 0 is SMT (one thread per core: shift 0, one processor), level 1 is the core level
/// (shift to the package id, `total` processors), level 2 ends the list (type 0).
fn topology_entry(function: u32, index: u32, id: u32, total: u32) -> kvm_cpuid_entry2 {
    let core_bits = total.next_power_of_two().trailing_zeros();
    let (shift, count, level_type) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (core_bits, total, LEVEL_TYPE_CORE),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: (level_type << 8) | index,
        edx: id,
        ..Default::default()
    }
}

fn leaf(entries: &[kvm_cpuid_entry2], function: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A reduced copy of what the test machine's KVM reports (Intel).
    fn intel_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x0, 0, 0x24, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(0x1, 0, 0xa0671, 0x0002_0800, 0x8120_2020, 0x0f8b_fbff),
            entry(0x4, 0, 0x0400_0121, 0x02c0_003f, 0x3f, 0),
            entry(0x4, 3, 0x0400_4163, 0x03c0_003f, 0x7_7fff, 0),
            entry(0x4, 4, 0, 0, 0, 0),
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0x1f, 0, 0, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0x105, 0x2010_0800),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_carries_apic_id_count_htt_and_hypervisor_bit() {
        let mut entries = intel_like();

        apply_topology(&mut entries, 3, 4);

        let leaf1 = find(&entries, 0x1, 0);
        assert_eq!(leaf1.ebx, 0x0304_0800);
        assert_eq!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, LEAF1_ECX_HYPERVISOR);
        assert_eq!(leaf1.ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT, LEAF1_EDX_HTT);
    }

    #[test]
    fn x2apic_leaves_describe_smt_and_core_levels() {
        let mut entries = intel_like();

        apply_topology(&mut entries, 2, 3);

        for function in [0xb, 0x1f] {
            let smt = find(&entries, function, 0);
            let core = find(&entries, function, 1);
            let end = find(&entries, function, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));
            assert_eq!(core.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
    }

    #[test]
    fn leaf4_shares_only_the_last_level_cache_between_cores() {
        let mut entries = intel_like();

        apply_topology(&mut entries, 0, 4);

        assert_eq!(find(&entries, 0x4, 0).eax, (3 << 26) | 0x121);
        assert_eq!(find(&entries, 0x4, 3).eax, (3 << 26) | (3 << 14) | 0x163);
        assert_eq!(find(&entries, 0x4, 4).eax, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt_and_svm_is_hidden() {
        let mut entries = intel_like();

        apply_topology(&mut entries, 0, 1);

        assert_eq!(find(&entries, 0x1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&entries, 0x8000_0001, 0).ecx, 0x101);
    }

    #[test]
    fn missing_kvm_signature_leaf_is_added() {
        let mut entries = intel_like();

        apply_topology(&mut entries, 0, 1);

        let signature = find(&entries, KVM_SIGNATURE_LEAF, 0);
        let bytes: Vec<u8> = [signature.ebx, signature.ecx, signature.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
    }

    #[test]
    fn amd_core_count_goes_to_leaf_0x8000_0008() {
        let mut entries = vec![
            entry(0x0, 0, 0x10, AMD_VENDOR_EBX, 0, 0),
            entry(0x8000_0008, 0, 0x3030, 0, 0, 0),
        ];

        apply_topology(&mut entries, 0, 3);

        assert_eq!(find(&entries, 0x8000_0008, 0).ecx, (2 << 12) | 2);
    }
}
