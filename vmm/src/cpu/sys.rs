//! The one vCPU ioctl kvm-ioctls marks `unsafe`: `KVM_SET_XSAVE`.
#![allow(unsafe_code)]

use kvm_bindings::kvm_xsave;
use kvm_ioctls::VcpuFd;

/// Loads `xsave` into the vCPU (`KVM_SET_XSAVE`).
///
/// kvm-ioctls marks this `unsafe` because, once a process has enabled dynamic XSTATE features
/// for guests (`arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, AMX), KVM reads more than the 4096
/// bytes of `kvm_xsave`. See
/// <https://docs.kernel.org/virt/kvm/api.html#kvm-set-xsave> and
/// <https://docs.kernel.org/arch/x86/xstate.html>.
pub(super) fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: this process never requests dynamic guest XSTATE permissions, so KVM's guest
    // XSAVE size stays at 4096 bytes (`configure_vcpu` checks `KVM_CAP_XSAVE2` against
    // `size_of::<kvm_xsave>()`) and KVM reads only within `*xsave`.
    unsafe { vcpu.set_xsave(xsave) }
}
