//! Registers, special registers and pending events through the `kvm_run` page
//! (`KVM_CAP_SYNC_REGS`): one `KVM_RUN` that does not enter the guest instead of three ioctls,
//! for a save inside the pause (each vCPU ioctl costs 8-10 us on the test machines).
//!
//! KVM fills the page at the end of every `KVM_RUN` for the parts asked for in
//! `kvm_valid_regs`, with the very functions behind `KVM_GET_REGS`, `KVM_GET_SREGS` and
//! `KVM_GET_VCPU_EVENTS`; with `immediate_exit` set it returns EINTR before entering the
//! guest. The parts are asked for only for that one call: KVM would fill the page at every
//! exit of a running guest otherwise.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::{SyncReg, VcpuFd};

const PARTS: [SyncReg; 3] = [
    SyncReg::Register,
    SyncReg::SystemRegister,
    SyncReg::VcpuEvents,
];

/// One `KVM_RUN` with `immediate_exit` set: KVM does what it does before entering the guest
/// (loads the parts marked dirty in the run page, completes a port or MMIO access, fills the
/// parts asked for) and returns EINTR without entering it. `Ok` means it exited for something
/// it had to finish first.
pub fn run_without_entering(vcpu: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
    vcpu.set_kvm_immediate_exit(1);
    let result = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    result
}

/// The registers, special registers and pending events of `vcpu`, which is not running and
/// has no port or MMIO access left to complete; `None` when KVM does not give them this way
/// (the caller then asks with the three ioctls).
pub(super) fn read(vcpu: &mut VcpuFd) -> Option<(kvm_regs, kvm_sregs, kvm_vcpu_events)> {
    for part in PARTS {
        vcpu.set_sync_valid_reg(part);
    }
    let result = run_without_entering(vcpu);
    for part in PARTS {
        vcpu.clear_sync_valid_reg(part);
    }
    match result {
        Err(e) if e.errno() == libc::EINTR => {
            let synced = vcpu.sync_regs();
            Some((synced.regs, synced.sregs, synced.events))
        }
        // EINVAL: a KVM without these parts. An exit: KVM had something to finish first.
        _ => None,
    }
}

/// Loads `regs`, `sregs` and `events` into `vcpu` in that order (as the three ioctls would) in
/// one `KVM_RUN` that does not enter the guest; false when KVM did not take them this way (the
/// caller then uses the ioctls). `vcpu` must not be in the `UNINITIALIZED` MP state: KVM returns
/// from such a vCPU's `KVM_RUN` before it looks at the page.
pub(super) fn write(
    vcpu: &mut VcpuFd,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    events: &kvm_vcpu_events,
) -> bool {
    {
        let page = vcpu.sync_regs_mut();
        page.regs = *regs;
        page.sregs = *sregs;
        page.events = *events;
    }
    for part in PARTS {
        vcpu.set_sync_dirty_reg(part);
    }
    let result = run_without_entering(vcpu);
    // KVM clears each part it loaded; what is left was not loaded.
    let loaded = vcpu.get_kvm_run().kvm_dirty_regs == 0;
    for part in PARTS {
        vcpu.clear_sync_dirty_reg(part);
    }
    matches!(result, Err(e) if e.errno() == libc::EINTR) && loaded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::test_util;

    #[test]
    fn the_parts_read_through_the_run_page_are_those_the_ioctls_give() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let mut vcpu = test_util::vcpu(&kvm, &vm, 0, 1);
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.rip = 0x1000;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr2 = 0xdead_b000;
        vcpu.set_sregs(&sregs).unwrap();
        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        events.interrupt.shadow = 1;
        vcpu.set_vcpu_events(&events).unwrap();

        let (read_regs, read_sregs, read_events) = read(&mut vcpu).expect("KVM_CAP_SYNC_REGS");

        assert_eq!(read_regs, vcpu.get_regs().unwrap());
        assert_eq!(read_regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(read_sregs, vcpu.get_sregs().unwrap());
        assert_eq!(read_sregs.cr2, 0xdead_b000);
        assert_eq!(read_events, vcpu.get_vcpu_events().unwrap());
        assert_eq!(read_events.nmi.masked, 1);
    }

    #[test]
    fn a_vcpu_read_through_the_run_page_is_left_asking_for_nothing_and_not_entered() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let mut vcpu = test_util::vcpu(&kvm, &vm, 0, 1);
        let rip = vcpu.get_regs().unwrap().rip;

        read(&mut vcpu).expect("KVM_CAP_SYNC_REGS");

        let run = vcpu.get_kvm_run();
        assert_eq!(run.kvm_valid_regs, 0);
        assert_eq!(run.immediate_exit, 0);
        // Not entered: the guest (no RAM, nothing to run) did not move.
        assert_eq!(vcpu.get_regs().unwrap().rip, rip);
    }

    #[test]
    fn a_vcpu_run_without_entering_is_not_entered_and_still_takes_a_cpuid_table() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let mut vcpu = test_util::vcpu(&kvm, &vm, 0, 1);
        let rip = vcpu.get_regs().unwrap().rip;
        let mut cpuid = vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();

        let _ = run_without_entering(&mut vcpu);
        // KVM refuses a different table once the vCPU has entered the guest.
        let leaf = cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == 0)
            .unwrap();
        leaf.eax = leaf.eax.saturating_sub(1);

        assert_eq!(vcpu.get_kvm_run().immediate_exit, 0);
        assert_eq!(vcpu.get_regs().unwrap().rip, rip);
        vcpu.set_cpuid2(&cpuid).unwrap();
    }
}
