//! Helpers for the KVM tests of `cpu`, `platform` and `interrupts`.

use kvm_ioctls::{Kvm, VcpuFd, VmFd};

/// Opens /dev/kvm or fails the test saying what is missing.
pub fn kvm() -> Kvm {
    Kvm::new().unwrap_or_else(|e| panic!("needs /dev/kvm: load kvm_intel/kvm_amd ({e})"))
}

/// A VM with the in-kernel irqchip and PIT.
pub fn vm(kvm: &Kvm) -> VmFd {
    let vm = kvm.create_vm().expect("create VM");
    crate::platform::create_platform(&vm).expect("create platform");
    vm
}

/// vCPU `id` of `total`, configured for boot.
pub fn vcpu(kvm: &Kvm, vm: &VmFd, id: u8, total: u8) -> VcpuFd {
    let vcpu = vm.create_vcpu(u64::from(id)).expect("create vCPU");
    super::configure_vcpu(kvm, &vcpu, id, total).expect("configure vCPU");
    vcpu
}

/// Points `vcpu` at `rip` in real mode (code segment at 0), interrupts off: where the tests'
/// small guest programs run.
pub fn start_real_mode_at(vcpu: &VcpuFd, rip: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    let mut regs = vcpu.get_regs()?;
    regs.rip = rip;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
}
