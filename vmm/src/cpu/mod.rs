//! vCPU configuration and state: CPUID, MSRs, local APIC and every register KVM exposes.
//!
//! [`configure_vcpu`] prepares a freshly created vCPU for boot (CPUID topology, boot MSRs, LAPIC
//! LINT pins, MP state); it does not set the boot registers, which `boot` owns.
//! [`VcpuState`] captures and restores everything KVM holds for a vCPU, for live update.
//!
//! KVM facts this module relies on, checked on the paravirtualised KVM (`kvm_pvm`) of the test
//! machines: the MSR index list has 41 entries, all of which read and write back (but the
//! TSC, below), and KVM also emulates the 28 MTRRs it does not list (69 MSRs saved per vCPU);
//! XSAVE state fits the 4096-byte `kvm_xsave` (`KVM_CAP_XSAVE2` reports 4096); there is no TSC
//! scaling (`KVM_SET_TSC_KHZ` refuses any other frequency with EINVAL), and a write of a
//! guest's TSC is accepted but not kept (the guest reads the host's TSC);
//! `KVM_GET_NESTED_STATE` fails with EINVAL, so nested state is never captured (the guest
//! CPUID hides VMX and SVM, so a guest cannot hold nested state anyway).

mod cpuid;
mod error;
mod lapic;
mod msrs;
mod setup;
mod state;
mod synced;
mod sys;
#[cfg(test)]
pub(crate) mod test_util;
mod tsc;

pub use cpuid::apply_topology;
pub use error::CpuError;
pub use lapic::{lapic_register, set_lapic_register};
pub use msrs::{
    MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, msrs_of_restored, restored_msrs, supported_msrs,
    supported_msrs_cached,
};
pub use setup::{boot_cpuid, configure_vcpu, give_cpuid_and_host_tsc_rate, supported_cpuid};
pub use state::{FpuState, LegacyFpu, VcpuSetup, VcpuState};
pub use synced::run_without_entering;
pub use tsc::{shift_saved_tsc, use_host_tsc_rate, warn_if_tsc_not_kept};
