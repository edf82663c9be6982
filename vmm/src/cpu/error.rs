//! The error type of the `cpu` module.

use thiserror::Error;

/// Errors from configuring a vCPU or moving its state in and out of KVM.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM ioctl failed; `op` names it.
    #[error("KVM refused {op}")]
    Kvm {
        /// The ioctl, e.g. `KVM_SET_CPUID2`.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted or returned fewer MSRs than asked for; `index` is the first one refused.
    #[error("KVM refused MSR {index:#x} ({op})")]
    Msr {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        op: &'static str,
        /// The refused MSR.
        index: u32,
    },
    /// vCPU `id` does not fit a topology of `total` vCPUs.
    #[error("Invalid vCPU topology: vCPU {id} of {total}")]
    InvalidTopology {
        /// The vCPU's id.
        id: u8,
        /// The number of vCPUs.
        total: u8,
    },
    /// KVM's guest XSAVE area is larger than the 4096-byte `kvm_xsave` this module moves.
    #[error("Guest XSAVE area of {size} bytes is not supported")]
    XsaveTooLarge {
        /// `KVM_CAP_XSAVE2`.
        size: usize,
    },
    /// A saved state is malformed (e.g. from a corrupt or hostile blob).
    #[error("Invalid vCPU state: {reason}")]
    InvalidState {
        /// What is wrong.
        reason: &'static str,
    },
}

/// Shorthand to wrap a KVM error with the ioctl's name.
pub(super) fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { op, source }
}
