//! The unsafe corner of `boot`: `ByteValued` promises for the MP table structures, and (tests
//! only) a KVM VM that maps a `GuestMemoryMmap`.
#![allow(unsafe_code)]

use vm_memory::ByteValued;

use super::mptable::{
    MpBus, MpConfigHeader, MpFloatingPointer, MpInterrupt, MpIoApic, MpProcessor,
};

// SAFETY: packed struct of integers and byte arrays: no padding, every bit pattern is valid.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: packed struct of integers and byte arrays: no padding, every bit pattern is valid.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: packed struct of integers and arrays of integers: no padding, any bits are valid.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: packed struct of integers and byte arrays: no padding, every bit pattern is valid.
unsafe impl ByteValued for MpBus {}
// SAFETY: packed struct of integers: no padding, every bit pattern is valid.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: packed struct of integers: no padding, every bit pattern is valid.
unsafe impl ByteValued for MpInterrupt {}

#[cfg(test)]
pub(super) use test_vm::TestVm;

#[cfg(test)]
mod test_vm {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuFd, VmFd};
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// A VM with one vCPU whose memory slots map `mem`. The fields drop in order, so the
    /// vCPU and VM are gone before the mappings they point at.
    #[derive(Debug)]
    pub(in super::super) struct TestVm {
        vcpu: VcpuFd,
        _vm: VmFd,
        _mem: GuestMemoryMmap,
    }

    impl TestVm {
        /// Creates the VM, maps every region of `mem` as a memory slot and adds vCPU 0.
        pub(in super::super) fn new(
            kvm: &Kvm,
            mem: GuestMemoryMmap,
        ) -> Result<Self, kvm_ioctls::Error> {
            let vm = kvm.create_vm()?;
            for (slot, region) in mem.iter().enumerate() {
                let slot_region = kvm_userspace_memory_region {
                    slot: u32::try_from(slot).unwrap_or(u32::MAX),
                    flags: 0,
                    guest_phys_addr: region.start_addr().raw_value(),
                    memory_size: region.len(),
                    userspace_addr: region.as_ptr() as u64,
                };
                // SAFETY: the mapping belongs to `mem`, which this struct owns and drops only
                // after the VM and vCPU.
                unsafe { vm.set_user_memory_region(slot_region) }?;
            }
            let vcpu = vm.create_vcpu(0)?;
            Ok(Self {
                vcpu,
                _vm: vm,
                _mem: mem,
            })
        }

        /// The vCPU, to configure and run.
        pub(in super::super) fn vcpu(&mut self) -> &mut VcpuFd {
            &mut self.vcpu
        }
    }
}
