//! Everything KVM holds for one vCPU, captured and restored in a safe order.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::error::{CpuError, kvm_err};
use super::msrs::{self, MSR_IA32_TSC_DEADLINE};
use super::{synced, sys};

/// The state of one vCPU, as plain data. The kvm-bindings structs serialise as the kernel's
/// bytes, so a newer kernel with longer structs still reads them (zero-padded).
///
/// Nested virtualisation state is not part of it: the guest CPUID hides VMX and SVM, and the
/// test machines' KVM fails `KVM_GET_NESTED_STATE` with EINVAL in any case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER and the APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended (XSAVE) register state.
    pub fpu: FpuState,
    /// Extended control registers (XCR0); `None` on hosts without XSAVE.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The in-kernel local APIC's register page.
    pub lapic: kvm_lapic_state,
    /// Every MSR of [`super::supported_msrs`], in that order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending and injected exceptions, interrupts, NMIs, SMIs, interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
}

/// Floating-point and vector register state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area of `KVM_GET_XSAVE`: 4096 bytes as 1024 little-endian words.
    Xsave(Vec<u32>),
    /// `KVM_GET_FPU` registers, used only where `KVM_GET_XSAVE` fails.
    Legacy(Box<LegacyFpu>),
}

/// The fields of `kvm_fpu` (which kvm-bindings gives no serde support).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct LegacyFpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl liveupdate::state::Versioned for VcpuState {
    const VERSION: u16 = 1;
}

/// What a vCPU was given before it first ran and keeps for its life: its CPUID table (as
/// given: KVM folds the guest's CR4, XCR0 and APIC base into a few bits of it as they change,
/// and does so again on a restore) and its TSC rate. A save carries these rather than asking
/// KVM, two ioctls fewer per vCPU in the pause.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuSetup {
    /// The CPUID table given with `KVM_SET_CPUID2`.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The TSC frequency in kHz, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl VcpuState {
    /// Captures the state of a vCPU that is not running (paused or not yet started), reading
    /// the MSRs `msr_indices` (from [`super::supported_msrs_cached`]).
    pub fn save(vcpu: &mut VcpuFd, msr_indices: &[u32]) -> Result<Self, CpuError> {
        Self::save_given(vcpu, msr_indices, None)
    }

    /// [`Self::save`] of a vCPU given `setup` before it first ran, which the state then
    /// carries instead of what KVM would report (see [`VcpuSetup`]); `None`: asks KVM.
    pub fn save_given(
        vcpu: &mut VcpuFd,
        msr_indices: &[u32],
        setup: Option<&VcpuSetup>,
    ) -> Result<Self, CpuError> {
        Self::save_parts(vcpu, msr_indices, setup, true)
    }

    /// [`Self::save_given`] of a vCPU whose thread just left the guest while others may still
    /// deliver interrupts to it: everything but the LAPIC (left at its default), which
    /// [`Self::refresh_after_pause`] reads once they have stopped.
    pub fn save_parked(
        vcpu: &mut VcpuFd,
        msr_indices: &[u32],
        setup: Option<&VcpuSetup>,
    ) -> Result<Self, CpuError> {
        Self::save_parts(vcpu, msr_indices, setup, false)
    }

    fn save_parts(
        vcpu: &mut VcpuFd,
        msr_indices: &[u32],
        setup: Option<&VcpuSetup>,
        with_lapic: bool,
    ) -> Result<Self, CpuError> {
        // MP state first: KVM_GET_MP_STATE makes KVM process a pending INIT or SIPI, which
        // rewrites registers; everything read after it is consistent with it.
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        // The events are read with the registers: neither changes while the vCPU is out of
        // the guest (reading the LAPIC and MSRs changes no event).
        let (regs, sregs, vcpu_events) = match synced::read(vcpu) {
            Some(read) => read,
            None => (
                vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
                vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
                vcpu.get_vcpu_events()
                    .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            ),
        };
        let vcpu = &*vcpu;
        let fpu = save_fpu(vcpu)?;
        let xcrs = match fpu {
            FpuState::Xsave(_) => {
                let xcrs = vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
                // KVM reports no XCRs (nr_xcrs 0) when the host has no XSAVE.
                (xcrs.nr_xcrs > 0).then_some(xcrs)
            }
            FpuState::Legacy(_) => None,
        };
        let debugregs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = if with_lapic {
            vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?
        } else {
            kvm_lapic_state::default()
        };
        let msrs = msrs::get_msrs(vcpu, msr_indices)?;
        let (cpuid, tsc_khz) = match setup {
            Some(setup) => (setup.cpuid.clone(), setup.tsc_khz),
            None => (
                vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_CPUID2"))?
                    .as_slice()
                    .to_vec(),
                vcpu.get_tsc_khz().ok(),
            ),
        };
        Ok(Self {
            cpuid,
            tsc_khz,
            mp_state,
            regs,
            sregs,
            fpu,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
        })
    }

    /// Brings this state, saved from `vcpu` as its thread left the guest while other vCPUs and
    /// devices still ran, up to date once they have all stopped. Outside the guest a vCPU's
    /// registers, FPU, debug registers and MSRs change only by its own `KVM_RUN`; what others
    /// change is read again: the LAPIC (interrupts delivered to it), the pending events (NMIs,
    /// SMIs) and the MP state. An INIT or SIPI from another vCPU shows as a new MP state (KVM
    /// applies it as the MP state is read, rewriting the registers): then everything is read
    /// again, and this returns true (the TSC was read anew too).
    pub fn refresh_after_pause(
        &mut self,
        vcpu: &mut VcpuFd,
        msr_indices: &[u32],
        setup: Option<&VcpuSetup>,
    ) -> Result<bool, CpuError> {
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        if mp_state != self.mp_state {
            *self = Self::save_given(vcpu, msr_indices, setup)?;
            return Ok(true);
        }
        self.vcpu_events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        self.lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        Ok(false)
    }

    /// Loads this state into `vcpu`, a fresh vCPU (created, never run) with the same id in a
    /// VM that has the in-kernel irqchip. Do not call [`super::configure_vcpu`] before it.
    pub fn restore(&self, vcpu: &mut VcpuFd) -> Result<(), CpuError> {
        self.restore_onto(vcpu, None).map(|_| ())
    }

    /// [`Self::restore`] onto a vCPU given `ahead` beforehand (with
    /// [`super::give_cpuid_and_host_tsc_rate`], while the old VMM still ran the guest): its
    /// CPUID table is loaded only if this state's differs. Returns what the vCPU was given.
    pub fn restore_onto(
        &self,
        vcpu: &mut VcpuFd,
        ahead: Option<&VcpuSetup>,
    ) -> Result<VcpuSetup, CpuError> {
        // Everything from the (untrusted) state is checked before the first ioctl.
        let fpu = self.fpu_to_load()?;
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| CpuError::InvalidState {
            reason: "too many CPUID entries",
        })?;

        // 1. CPUID before anything: KVM checks MSR writes, XCR0 and the XSAVE features against
        //    it. KVM refuses KVM_SET_CPUID2 after the first KVM_RUN, hence a fresh vCPU, which
        //    may have been given another table ahead.
        // 2. TSC frequency before the TSC MSR: KVM converts the TSC value with the current
        //    ratio. The host's rate first (see `use_host_tsc_rate`), then the saved one if it
        //    differs (needs TSC scaling on the host).
        match ahead {
            Some(ahead) if ahead.cpuid == self.cpuid => {}
            Some(_) => vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?,
            None => {
                vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
                super::use_host_tsc_rate(vcpu)?;
            }
        }
        let tsc_khz = self.restore_tsc_khz(vcpu, ahead.and_then(|a| a.tsc_khz))?;
        // 3. MP state before registers and events: entering INIT_RECEIVED/SIPI_RECEIVED
        //    changes pending events, which steps 4 or 9 then set exactly.
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        // 4. Registers, then the events. KVM_SET_REGS drops a pending exception and
        //    KVM_SET_SREGS may queue an interrupt: both are undone by the events after them.
        //    SREGS also sets the APIC base (xAPIC or x2APIC mode), which the LAPIC restore in
        //    step 6 depends on. All three in one KVM_RUN through the run page where KVM takes
        //    them so (not from an UNINITIALIZED vCPU); else two ioctls here and the events in
        //    step 9.
        let mut events = self.vcpu_events;
        events.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        let events_loaded = self.mp_state.mp_state != KVM_MP_STATE_UNINITIALIZED
            && synced::write(vcpu, &self.regs, &self.sregs, &events);
        if !events_loaded {
            vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
            vcpu.set_sregs(&self.sregs)
                .map_err(kvm_err("KVM_SET_SREGS"))?;
        }
        let vcpu = &*vcpu;
        // 5. FPU/XSAVE, then XCR0, then debug registers (no mutual constraints beyond CPUID).
        match &fpu {
            FpuLoad::Xsave(xsave) => {
                sys::set_xsave(vcpu, xsave).map_err(kvm_err("KVM_SET_XSAVE"))?
            }
            FpuLoad::Legacy(fpu) => vcpu.set_fpu(fpu).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        // A fresh vCPU has the reset values, which a guest that sets no breakpoint keeps.
        if self.debugregs != reset_debugregs() {
            vcpu.set_debug_regs(&self.debugregs)
                .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        }
        // 6. LAPIC after SREGS (APIC base and mode) and before the MSRs: KVM silently drops a
        //    TSC_DEADLINE write unless the LVT timer is already in TSC-deadline mode.
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        // 7. MSRs, TSC included; 8. TSC_DEADLINE after them, because the deadline is compared
        //    with the guest TSC, which must already hold its restored value. One call: KVM
        //    writes the entries in their order.
        let mut in_order = self.msrs.clone();
        in_order.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
        msrs::set_msrs(vcpu, &in_order)?;
        // 9. Events (if step 4 could not), last as explained in steps 3 and 4.
        //    KVM_GET_VCPU_EVENTS does not flag the SIPI vector as valid; we do (above), so a
        //    vCPU caught between INIT and SIPI keeps it.
        if events.smi.latched_init != 0 {
            // Rare in a running guest: KVM resets the vCPU (INIT) when it next runs.
            log::warn!(
                "vCPU state with a latched INIT (mp_state {}, apic_base {:#x})",
                self.mp_state.mp_state,
                self.sregs.apic_base
            );
        }
        if !events_loaded {
            vcpu.set_vcpu_events(&events)
                .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(VcpuSetup {
            cpuid: self.cpuid.clone(),
            tsc_khz,
        })
    }

    /// The value of MSR `index` in this state, if it was captured.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|e| e.index == index).map(|e| e.data)
    }

    /// The FPU state as KVM takes it; the XSAVE area is checked for size.
    fn fpu_to_load(&self) -> Result<FpuLoad, CpuError> {
        match &self.fpu {
            FpuState::Xsave(words) => {
                let mut xsave = kvm_xsave::default();
                if words.len() != xsave.region.len() {
                    return Err(CpuError::InvalidState {
                        reason: "XSAVE area is not 4096 bytes",
                    });
                }
                xsave.region.copy_from_slice(words);
                Ok(FpuLoad::Xsave(Box::new(xsave)))
            }
            FpuState::Legacy(fpu) => Ok(FpuLoad::Legacy(Box::new(fpu.to_kvm()))),
        }
    }

    /// Sets the saved TSC frequency on `vcpu`, which runs at the host's (`host_khz`, if known
    /// already); returns the frequency it runs at then.
    fn restore_tsc_khz(
        &self,
        vcpu: &VcpuFd,
        host_khz: Option<u32>,
    ) -> Result<Option<u32>, CpuError> {
        let Some(khz) = self.tsc_khz else {
            return Ok(host_khz);
        };
        let current = host_khz.or_else(|| vcpu.get_tsc_khz().ok());
        if current == Some(khz) {
            return Ok(current);
        }
        match vcpu.set_tsc_khz(khz) {
            Ok(()) => Ok(Some(khz)),
            // Without TSC scaling KVM takes only the host's own frequency. A new host kernel
            // (after a kexec) may have calibrated it slightly differently, and a snapshot may
            // come from another host: the guest runs on at the host's rate, as after a
            // migration between such hosts, rather than not at all. A guest on kvmclock keeps
            // its time; one that counts raw TSC ticks sees its clock run off by the ratio.
            Err(e) if e.errno() == libc::EINVAL => {
                let host = current.unwrap_or_default();
                log::warn!(
                    "TSC frequency {khz} kHz refused (no TSC scaling); the guest's TSC runs at \
                     the host's {host} kHz, {:+.2} % off",
                    (f64::from(host) - f64::from(khz)) * 100.0 / f64::from(khz.max(1))
                );
                // The refused call left KVM's idea of the frequency at `khz`: put it back.
                super::use_host_tsc_rate(vcpu).map(|()| current)
            }
            Err(e) => Err(kvm_err("KVM_SET_TSC_KHZ")(e)),
        }
    }
}

/// The debug registers of a vCPU at reset (as KVM makes it): no breakpoint, DR6 and DR7 at
/// their architectural reset values.
fn reset_debugregs() -> kvm_debugregs {
    kvm_debugregs {
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        ..Default::default()
    }
}

/// [`FpuState`] in KVM's structs, ready for the ioctl.
enum FpuLoad {
    Xsave(Box<kvm_xsave>),
    Legacy(Box<kvm_fpu>),
}

/// XSAVE where KVM offers it (all x86-64 kernels do unless the guest state is encrypted),
/// legacy FPU registers otherwise.
fn save_fpu(vcpu: &VcpuFd) -> Result<FpuState, CpuError> {
    match vcpu.get_xsave() {
        Ok(xsave) => Ok(FpuState::Xsave(xsave.region.to_vec())),
        Err(e) => {
            log::debug!("KVM_GET_XSAVE failed ({e}), saving legacy FPU state");
            let fpu = vcpu.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
            Ok(FpuState::Legacy(Box::new(LegacyFpu::from_kvm(&fpu))))
        }
    }
}

impl LegacyFpu {
    fn from_kvm(fpu: &kvm_fpu) -> Self {
        Self {
            fpr: fpu.fpr,
            fcw: fpu.fcw,
            fsw: fpu.fsw,
            ftwx: fpu.ftwx,
            last_opcode: fpu.last_opcode,
            last_ip: fpu.last_ip,
            last_dp: fpu.last_dp,
            xmm: fpu.xmm,
            mxcsr: fpu.mxcsr,
        }
    }

    fn to_kvm(&self) -> kvm_fpu {
        kvm_fpu {
            fpr: self.fpr,
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            xmm: self.xmm,
            mxcsr: self.mxcsr,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::{VcpuExit, VmFd};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::cpu::test_util;
    use crate::cpu::{MSR_IA32_TSC, lapic_register, set_lapic_register, supported_msrs_cached};
    use crate::memory::GuestRam;

    const SYSENTER_CS: u32 = 0x174;
    const LSTAR: u32 = 0xc000_0082;
    const APIC_TPR: usize = 0x80;
    const APIC_SVR: usize = 0xf0;
    const APIC_LVTT: usize = 0x320;
    /// LVT timer in TSC-deadline mode (bits 18:17 = 2), vector 0x30.
    const LVTT_TSC_DEADLINE: u32 = (2 << 17) | 0x30;
    const CODE_ADDR: u64 = 0x1000;
    /// mov ax, 0x42; out 0x10, al; hlt (real mode)
    const GUEST_CODE: [u8; 6] = [0xb8, 0x42, 0x00, 0xe6, 0x10, 0xf4];

    /// A configured vCPU 0 with a distinctive value in each part of its state, set to run
    /// [`GUEST_CODE`] in real mode. Returns its state.
    fn distinctive_state(kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> VcpuState {
        let mut vcpu = test_util::vcpu(kvm, vm, 0, 1);
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678_9abc_def0;
        regs.rbx = 0xfeed;
        regs.rip = CODE_ADDR;
        regs.rflags = 0x46;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut xcrs = vcpu.get_xcrs().unwrap();
        xcrs.xcrs[0].value = 0x3;
        vcpu.set_xcrs(&xcrs).unwrap();
        let mut debugregs = vcpu.get_debug_regs().unwrap();
        debugregs.db[0] = 0xdead_0000;
        vcpu.set_debug_regs(&debugregs).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        set_lapic_register(&mut lapic, APIC_SVR, 0x1ff);
        set_lapic_register(&mut lapic, APIC_TPR, 0x20);
        set_lapic_register(&mut lapic, APIC_LVTT, LVTT_TSC_DEADLINE);
        vcpu.set_lapic(&lapic).unwrap();
        let tsc = msrs::get_msrs(&vcpu, &[MSR_IA32_TSC]).unwrap()[0].data;
        let entries = [
            (SYSENTER_CS, 0x10),
            (LSTAR, 0xffff_ffff_8100_0000),
            (MSR_IA32_TSC_DEADLINE, tsc + (1 << 40)),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        msrs::set_msrs(&vcpu, &entries).unwrap();
        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.masked = 1;
        events.nmi.pending = 1;
        vcpu.set_vcpu_events(&events).unwrap();

        let indices = supported_msrs_cached(kvm, &vcpu).unwrap();
        VcpuState::save(&mut vcpu, indices).unwrap()
    }

    /// The state without the TSC, which keeps counting between two saves.
    fn without_tsc(state: &VcpuState) -> VcpuState {
        let mut state = state.clone();
        state.msrs.retain(|e| e.index != MSR_IA32_TSC);
        state
    }

    #[test]
    fn state_restored_into_fresh_vcpu_saves_back_equal() {
        let kvm = test_util::kvm();
        let saved = distinctive_state(&kvm, &test_util::vm(&kvm));
        let vm = test_util::vm(&kvm);
        let mut fresh = vm.create_vcpu(0).unwrap();

        saved.restore(&mut fresh).unwrap();
        let msrs = supported_msrs_cached(&kvm, &fresh).unwrap();
        let resaved = VcpuState::save(&mut fresh, msrs).unwrap();

        assert_eq!(without_tsc(&resaved), without_tsc(&saved));
        assert!(resaved.msr(MSR_IA32_TSC) >= saved.msr(MSR_IA32_TSC));
        assert_eq!(resaved.regs.rax, 0x1234_5678_9abc_def0);
        assert_eq!(resaved.msr(SYSENTER_CS), Some(0x10));
        assert!(resaved.msr(MSR_IA32_TSC_DEADLINE).is_some_and(|d| d != 0));
        assert_eq!(lapic_register(&resaved.lapic, APIC_TPR), 0x20);
        assert_eq!(lapic_register(&resaved.lapic, APIC_LVTT), LVTT_TSC_DEADLINE);
        assert_eq!(resaved.xcrs.unwrap().xcrs[0].value, 0x3);
        assert_eq!(resaved.debugregs.db[0], 0xdead_0000);
        assert_eq!(resaved.vcpu_events.nmi.masked, 1);
        assert_eq!(resaved.vcpu_events.nmi.pending, 1);
    }

    #[test]
    fn an_application_processor_never_started_restores_as_saved() {
        // Its MP state (UNINITIALIZED) has KVM ignore the run page: the registers and events
        // go in by their ioctls.
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let mut ap = test_util::vcpu(&kvm, &vm, 1, 2);
        let mut regs = ap.get_regs().unwrap();
        regs.rbx = 0x0a9;
        ap.set_regs(&regs).unwrap();
        let msrs = supported_msrs_cached(&kvm, &ap).unwrap();
        let saved = VcpuState::save(&mut ap, msrs).unwrap();
        let mut fresh = test_util::vm(&kvm).create_vcpu(1).unwrap();

        saved.restore(&mut fresh).unwrap();
        let resaved = VcpuState::save(&mut fresh, msrs).unwrap();

        assert_eq!(saved.mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED);
        assert_eq!(without_tsc(&resaved), without_tsc(&saved));
        assert_eq!(resaved.regs.rbx, 0x0a9);
    }

    #[test]
    fn a_fresh_vcpu_has_the_reset_debug_registers_a_restore_leaves_unset() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let vcpu = vm.create_vcpu(0).unwrap();

        assert_eq!(vcpu.get_debug_regs().unwrap(), reset_debugregs());
    }

    /// CR4.OSXSAVE (KVM reflects it in CPUID leaf 1).
    const CR4_OSXSAVE: u64 = 1 << 18;

    /// A booted vCPU 0 of 1 whose guest turned XSAVE on, and what it was given at boot.
    fn vcpu_with_xsave_on(kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> (VcpuFd, VcpuSetup) {
        let vcpu = vm.create_vcpu(0).unwrap();
        let setup = crate::cpu::configure_vcpu(kvm, &vcpu, 0, 1).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr4 |= CR4_OSXSAVE;
        vcpu.set_sregs(&sregs).unwrap();
        let mut xcrs = vcpu.get_xcrs().unwrap();
        xcrs.xcrs[0].value = 0x3;
        vcpu.set_xcrs(&xcrs).unwrap();
        (vcpu, setup)
    }

    fn cpuid_of(vcpu: &VcpuFd) -> Vec<kvm_cpuid_entry2> {
        vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .unwrap()
            .as_slice()
            .to_vec()
    }

    /// A fresh vCPU 0 with `state` loaded, given `ahead` first if any.
    fn restored(
        kvm: &kvm_ioctls::Kvm,
        state: &VcpuState,
        ahead: Option<Vec<kvm_cpuid_entry2>>,
    ) -> VcpuFd {
        let mut vcpu = test_util::vm(kvm).create_vcpu(0).unwrap();
        let given = ahead.map(|entries| crate::cpu::give_cpuid_and_host_tsc_rate(&vcpu, entries));
        state
            .restore_onto(&mut vcpu, given.transpose().unwrap().as_ref())
            .unwrap();
        vcpu
    }

    #[test]
    fn a_save_carries_the_cpuid_and_tsc_rate_given_and_restores_as_one_that_asked_kvm() {
        let kvm = test_util::kvm();
        let (mut vcpu, setup) = vcpu_with_xsave_on(&kvm, &test_util::vm(&kvm));
        let msrs = supported_msrs_cached(&kvm, &vcpu).unwrap();

        let given = VcpuState::save_given(&mut vcpu, msrs, Some(&setup)).unwrap();
        let asked = VcpuState::save(&mut vcpu, msrs).unwrap();

        assert_eq!(given.cpuid, setup.cpuid);
        assert_eq!(given.tsc_khz, setup.tsc_khz);
        assert_ne!(
            given.cpuid, asked.cpuid,
            "KVM reports the guest's XSAVE in CPUID"
        );
        // KVM folds the restored CR4 and XCR0 into the table again.
        assert_eq!(
            cpuid_of(&restored(&kvm, &given, None)),
            cpuid_of(&restored(&kvm, &asked, None))
        );
    }

    #[test]
    fn a_vcpu_given_its_cpuid_ahead_restores_as_a_fresh_one_and_another_table_is_replaced() {
        let kvm = test_util::kvm();
        let (mut vcpu, setup) = vcpu_with_xsave_on(&kvm, &test_util::vm(&kvm));
        let msrs = supported_msrs_cached(&kvm, &vcpu).unwrap();
        let state = VcpuState::save_given(&mut vcpu, msrs, Some(&setup)).unwrap();
        let supported = crate::cpu::supported_cpuid(&kvm).unwrap();
        let other_topology = crate::cpu::boot_cpuid(&supported, 0, 2).unwrap();
        assert_ne!(other_topology, setup.cpuid);

        let from_scratch = cpuid_of(&restored(&kvm, &state, None));
        let same_ahead = cpuid_of(&restored(&kvm, &state, Some(setup.cpuid.clone())));
        let other_ahead = cpuid_of(&restored(&kvm, &state, Some(other_topology)));

        assert_eq!(same_ahead, from_scratch);
        assert_eq!(other_ahead, from_scratch);
    }

    /// vCPU 0 of a fresh VM with a distinctive state, and that state as saved.
    fn saved_vcpu(kvm: &kvm_ioctls::Kvm, vm: &VmFd) -> (VcpuFd, VcpuState, &'static [u32]) {
        let saved = distinctive_state(kvm, &test_util::vm(kvm));
        let mut vcpu = vm.create_vcpu(0).unwrap();
        saved.restore(&mut vcpu).unwrap();
        let msrs = supported_msrs_cached(kvm, &vcpu).unwrap();
        (vcpu, saved, msrs)
    }

    #[test]
    fn a_refresh_after_the_pause_reads_the_nmi_and_lapic_others_gave_the_parked_vcpu() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let (mut vcpu, _, msrs) = saved_vcpu(&kvm, &vm);
        let mut events = vcpu.get_vcpu_events().unwrap();
        events.nmi.pending = 0;
        vcpu.set_vcpu_events(&events).unwrap();
        let mut state = VcpuState::save_parked(&mut vcpu, msrs, None).unwrap();
        assert_eq!(state.vcpu_events.nmi.pending, 0);

        // Another vCPU's NMI and a device's interrupt reach the parked vCPU.
        vcpu.nmi().unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        let irr = lapic_register(&lapic, 0x210) | 1 << 4;
        set_lapic_register(&mut lapic, 0x210, irr);
        vcpu.set_lapic(&lapic).unwrap();
        let read_again = state.refresh_after_pause(&mut vcpu, msrs, None).unwrap();

        assert!(!read_again);
        assert_eq!(state.vcpu_events.nmi.pending, 1);
        assert_eq!(lapic_register(&state.lapic, 0x210) & 1 << 4, 1 << 4);
        assert_eq!(
            without_tsc(&state),
            without_tsc(&VcpuState::save(&mut vcpu, msrs).unwrap())
        );
    }

    #[test]
    fn a_vcpu_whose_mp_state_changed_after_its_save_is_read_again_whole() {
        let kvm = test_util::kvm();
        let vm = test_util::vm(&kvm);
        let (mut vcpu, _, msrs) = saved_vcpu(&kvm, &vm);
        let mut state = VcpuState::save(&mut vcpu, msrs).unwrap();

        // As an INIT does: a new MP state, and registers rewritten with it.
        let mut mp_state = state.mp_state;
        mp_state.mp_state = kvm_bindings::KVM_MP_STATE_HALTED;
        vcpu.set_mp_state(mp_state).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x5150;
        vcpu.set_regs(&regs).unwrap();
        let read_again = state.refresh_after_pause(&mut vcpu, msrs, None).unwrap();

        assert!(read_again);
        assert_eq!(state.mp_state.mp_state, kvm_bindings::KVM_MP_STATE_HALTED);
        assert_eq!(state.regs.rax, 0x5150);
    }

    #[test]
    fn restored_vcpu_runs_guest_code() {
        let kvm = test_util::kvm();
        let saved = distinctive_state(&kvm, &test_util::vm(&kvm));
        let vm = test_util::vm(&kvm);
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.memory()
            .write_slice(&GUEST_CODE, GuestAddress(CODE_ADDR))
            .unwrap();
        ram.register(&vm).unwrap();
        let mut fresh = vm.create_vcpu(0).unwrap();
        saved.restore(&mut fresh).unwrap();

        let exit = fresh.run().unwrap();

        assert!(
            matches!(exit, VcpuExit::IoOut(0x10, [0x42])),
            "unexpected exit {exit:?}"
        );
    }

    #[test]
    fn vcpu_state_survives_json_round_trip() {
        let kvm = test_util::kvm();
        let saved = distinctive_state(&kvm, &test_util::vm(&kvm));

        let json = serde_json::to_string(&saved).unwrap();
        let decoded: VcpuState = serde_json::from_str(&json).unwrap();

        assert_eq!(decoded, saved);
    }

    #[test]
    fn legacy_fpu_converts_to_kvm_and_back_unchanged() {
        let fpu = LegacyFpu {
            fpr: [[7; 16]; 8],
            fcw: 0x37f,
            fsw: 1,
            ftwx: 2,
            last_opcode: 3,
            last_ip: 4,
            last_dp: 5,
            xmm: [[9; 16]; 16],
            mxcsr: 0x1f80,
        };

        assert_eq!(LegacyFpu::from_kvm(&fpu.to_kvm()), fpu);
    }

    #[test]
    fn truncated_xsave_area_is_refused_before_touching_the_vcpu() {
        let kvm = test_util::kvm();
        let mut saved = distinctive_state(&kvm, &test_util::vm(&kvm));
        saved.fpu = FpuState::Xsave(vec![0; 10]);
        let vm = test_util::vm(&kvm);
        let mut fresh = vm.create_vcpu(0).unwrap();
        let regs_before = fresh.get_regs().unwrap();

        let result = saved.restore(&mut fresh);

        assert!(matches!(result, Err(CpuError::InvalidState { .. })));
        assert_eq!(fresh.get_regs().unwrap(), regs_before);
    }
}
