//! The VM's pieces as live-update participants, in the order the machine must drive them:
//! configuration and memory first (nothing to pause), then the virtio queue workers (they stop
//! while the guest still runs: what it queues meanwhile waits in its rings, which a worker goes
//! through as it starts), then the vCPUs (the pause starts when they stop), then every other
//! device (its outside end, which a vCPU may still be talking to, is let go once the vCPUs are
//! parked), then the interrupt routes and the irqchip, PIT and clock, which only change while
//! vCPUs or devices run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use liveupdate::fault::{self, Fault, FaultStep};
use liveupdate::participant::{FileSink, Participant, ParticipantError};
use liveupdate::session::Token;
use liveupdate::state::Versioned;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::cpu::{self, CpuError, VcpuSetup, VcpuState};
use crate::interrupts::{InterruptManager, InterruptState};
use crate::memory::GuestRam;
use crate::platform::{self, IrqchipsState};
use crate::vcpu_thread::VcpuSet;
use devices::bus::lock;

/// Participant ids, shared by the saving and the restoring side.
pub mod ids {
    /// The VM configuration.
    pub const CONFIG: &str = "config";
    /// Guest RAM.
    pub const MEMORY: &str = "memory";
    /// The vCPU set (pausing it starts the pause).
    pub const VCPUS: &str = "vcpus";
    /// One vCPU.
    pub fn vcpu(index: usize) -> String {
        format!("vcpu/{index}")
    }
    /// MSI routes.
    pub const INTERRUPTS: &str = "interrupts";
    /// The PICs and the IOAPIC.
    pub const IRQCHIP: &str = "irqchip";
    /// The 8254 PIT.
    pub const PIT: &str = "pit";
    /// The kvmclock.
    pub const CLOCK: &str = "clock";
}

/// Guest RAM's token in every session: a successor started ahead of the update finds it there
/// without reading the state (restart mode).
pub const RAM_TOKEN: Token = 1;

fn failed(id: &str, reason: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::Failed {
        id: id.to_string(),
        reason: reason.to_string(),
    }
}

/// Nanoseconds since the Unix epoch: the one clock that runs on across a kexec too.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The VM configuration, in cloud-hypervisor's JSON shape. It is kept as JSON because its
/// serde attributes leave absent fields out, which only a self-describing encoding carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// `VmConfig` as JSON.
    pub json: String,
}

impl Versioned for ConfigState {
    const VERSION: u16 = 1;
}

impl ConfigState {
    /// The configuration it holds.
    pub fn config(&self) -> Result<VmConfig, crate::config::ConfigError> {
        VmConfig::from_saved_json(self.json.as_bytes())
    }
}

/// The VM configuration travels with the state, so the successor needs no other input.
#[derive(Debug)]
pub struct ConfigParticipant<'a> {
    config: &'a VmConfig,
    /// Written as it prepares, guest still running: nothing changes the configuration while
    /// an update runs, and JSON has no place in the pause.
    json: Option<String>,
}

impl<'a> ConfigParticipant<'a> {
    /// The configuration of the VM being updated.
    pub fn new(config: &'a VmConfig) -> Self {
        Self { config, json: None }
    }

    fn json(&self) -> Result<String, ParticipantError> {
        serde_json::to_string(self.config).map_err(|e| failed(ids::CONFIG, e))
    }
}

impl Participant for ConfigParticipant<'_> {
    type State = ConfigState;

    fn id(&self) -> String {
        ids::CONFIG.into()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        self.json = Some(self.json()?);
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<ConfigState, ParticipantError> {
        let json = match self.json.take() {
            Some(json) => json,
            None => self.json()?,
        };
        Ok(ConfigState { json })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// Where guest RAM went: the memfd's token and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// RAM size in bytes (the memfd's size).
    pub size: u64,
    /// Token of the RAM memfd in the session.
    pub memfd_token: Token,
}

impl Versioned for MemoryState {
    const VERSION: u16 = 1;
}

/// Guest RAM: preserved while the guest still runs (in the kernel that pins every page, the
/// slowest step of all), never copied.
#[derive(Debug)]
pub struct MemoryParticipant<'a> {
    ram: &'a GuestRam,
    token: Option<Token>,
}

impl<'a> MemoryParticipant<'a> {
    /// Guest RAM of the VM being updated.
    pub fn new(ram: &'a GuestRam) -> Self {
        Self { ram, token: None }
    }
}

impl Participant for MemoryParticipant<'_> {
    type State = MemoryState;

    fn id(&self) -> String {
        ids::MEMORY.into()
    }
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        use std::os::fd::AsFd;
        files.preserve_reserved(self.ram.memfd().as_fd(), RAM_TOKEN)?;
        self.token = Some(RAM_TOKEN);
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<MemoryState, ParticipantError> {
        let memfd_token = self
            .token
            .ok_or_else(|| failed(ids::MEMORY, "saved before it was prepared"))?;
        Ok(MemoryState {
            size: self.ram.size(),
            memfd_token,
        })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// The vCPU set: how many vCPUs there are, and when they were paused, so the successor can
/// move the guest's clocks forward by the length of the pause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpusState {
    /// Number of vCPUs (each saved as `vcpu/<index>`).
    pub count: usize,
    /// Host `CLOCK_REALTIME` (ns since the epoch) right after the vCPUs stopped.
    pub paused_at_ns: u64,
}

impl Versioned for VcpusState {
    const VERSION: u16 = 1;
}

/// A vCPU's state as saved while its thread was parked for the pause.
#[derive(Debug)]
struct ParkedSave {
    state: Result<VcpuState, CpuError>,
    /// Host realtime right after its TSC was read.
    tsc_read_at_ns: u64,
}

/// What the vCPU threads noted and saved at the pause, shared by the set's and each vCPU's
/// participant.
#[derive(Debug, Default)]
pub struct VcpuSaves {
    /// Per vCPU: host realtime when its thread left the guest for the pause (0: it did not).
    stopped_at_ns: Vec<AtomicU64>,
    parked: Vec<Mutex<Option<ParkedSave>>>,
    /// Host realtime once every vCPU had stopped (0 before the pause).
    paused_at_ns: AtomicU64,
}

impl VcpuSaves {
    /// Room for `count` vCPUs.
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(Self {
            stopped_at_ns: (0..count).map(|_| AtomicU64::new(0)).collect(),
            parked: (0..count).map(|_| Mutex::new(None)).collect(),
            paused_at_ns: AtomicU64::new(0),
        })
    }

    fn take(&self, index: usize) -> Option<ParkedSave> {
        self.parked.get(index).and_then(|slot| lock(slot).take())
    }

    /// Forgets the stamps and saves of an earlier pause.
    fn clear(&self) {
        for stamp in &self.stopped_at_ns {
            stamp.store(0, Ordering::SeqCst);
        }
        for slot in &self.parked {
            *lock(slot) = None;
        }
    }
}

/// The vCPU set: pausing it starts the guest-visible pause. Each vCPU thread saves its vCPU as
/// it parks, beside the others still stopping; the set's save then has the parked threads, and
/// this thread with them, read again side by side what others can change in a parked vCPU (see
/// [`VcpuState::refresh_after_pause`]), which each vCPU's participant ([`VcpuParticipant`])
/// then hands in.
///
/// That part is read only then, once every participant has paused: until the devices' queue
/// workers have stopped and outside devices' interrupts are detached, an interrupt may still
/// reach a LAPIC, and one that came after its LAPIC was saved would be lost to the guest (a
/// queue that never hears of its used buffers stalls).
#[derive(Debug)]
pub struct VcpusParticipant<'a> {
    set: &'a VcpuSet,
    msrs: &'static [u32],
    /// What each vCPU was given before it first ran, which its state carries.
    setups: Arc<[VcpuSetup]>,
    saves: Arc<VcpuSaves>,
    /// Whether the vCPUs ran before the pause: a VM paused by the user stays paused when the
    /// update is cancelled or a snapshot is done.
    was_running: bool,
}

impl<'a> VcpusParticipant<'a> {
    /// The vCPUs of the VM, each given its `setups` entry before it first ran; at the save
    /// each vCPU is saved (with the MSRs `msrs`) into `saves`.
    pub fn new(
        set: &'a VcpuSet,
        msrs: &'static [u32],
        setups: Arc<[VcpuSetup]>,
        saves: Arc<VcpuSaves>,
    ) -> Self {
        Self {
            set,
            msrs,
            setups,
            saves,
            was_running: false,
        }
    }
}

impl Participant for VcpusParticipant<'_> {
    type State = VcpusState;

    fn id(&self) -> String {
        ids::VCPUS.into()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        self.was_running = self.set.is_running();
        // Nothing of an earlier pause (one cancelled) may pass for this one's.
        self.saves.clear();
        let (saves, msrs, setups) = (self.saves.clone(), self.msrs, self.setups.clone());
        // With one vCPU nothing runs beside its save: on its thread it would only hold up the
        // pause where that thread waits for a CPU (a host busy with many guests), while the
        // saving thread, running already, takes it on in the save.
        let save_as_parked = self.set.vcpus().len() > 1;
        self.set.pause_with(Arc::new(move |index, vcpu| {
            let index = usize::from(index);
            if let Some(stamp) = saves.stopped_at_ns.get(index) {
                stamp.store(realtime_ns(), Ordering::SeqCst);
            }
            if !save_as_parked {
                return;
            }
            // Saved as it parks, beside the other vCPUs still stopping: the save then only
            // reads again what others may change meanwhile.
            let state = VcpuState::save_parked(vcpu, msrs, setups.get(index));
            let save = ParkedSave {
                state,
                tsc_read_at_ns: realtime_ns(),
            };
            if let Some(slot) = saves.parked.get(index) {
                *lock(slot) = Some(save);
            }
        }));
        // The pause starts once every vCPU has stopped: the last thread's stamp, or now when
        // no thread was running.
        let last_stop = self
            .saves
            .stopped_at_ns
            .iter()
            .map(|stamp| stamp.load(Ordering::SeqCst))
            .max()
            .filter(|&stamp| stamp != 0);
        let paused_at_ns = last_stop.unwrap_or_else(realtime_ns);
        self.saves
            .paused_at_ns
            .store(paused_at_ns, Ordering::SeqCst);
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<VcpusState, ParticipantError> {
        // Every participant has paused: no interrupt can reach a LAPIC any more.
        let (saves, msrs, setups) = (self.saves.clone(), self.msrs, self.setups.clone());
        self.set.run_parked(Arc::new(move |index, vcpu| {
            let index = usize::from(index);
            let setup = setups.get(index);
            let save = match saves.take(index) {
                Some(ParkedSave {
                    state: Ok(mut state),
                    tsc_read_at_ns,
                }) => {
                    let refreshed = state.refresh_after_pause(vcpu, msrs, setup);
                    ParkedSave {
                        tsc_read_at_ns: match refreshed {
                            Ok(true) => realtime_ns(),
                            _ => tsc_read_at_ns,
                        },
                        state: refreshed.map(|_| state),
                    }
                }
                // Parked before this pause (a VM paused by its user), or its save failed.
                _ => ParkedSave {
                    state: VcpuState::save_given(vcpu, msrs, setup),
                    tsc_read_at_ns: realtime_ns(),
                },
            };
            if let Some(slot) = saves.parked.get(index) {
                *lock(slot) = Some(save);
            }
        }));
        Ok(VcpusState {
            count: self.set.vcpus().len(),
            paused_at_ns: self.saves.paused_at_ns.load(Ordering::SeqCst),
        })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        if self.was_running {
            self.set.resume();
        }
        Ok(())
    }
}

/// One vCPU's registers, MSRs, LAPIC and events (paused with the whole set before it, whose
/// save saved them).
#[derive(Debug)]
pub struct VcpuParticipant<'a> {
    set: &'a VcpuSet,
    index: usize,
    msrs: &'a [u32],
    saves: Arc<VcpuSaves>,
}

impl<'a> VcpuParticipant<'a> {
    /// vCPU `index` of `set`, which the set's save saved into `saves`; `msrs` is the list of MSRs
    /// to save here if it did not.
    pub fn new(set: &'a VcpuSet, index: usize, msrs: &'a [u32], saves: Arc<VcpuSaves>) -> Self {
        Self {
            set,
            index,
            msrs,
            saves,
        }
    }
}

impl Participant for VcpuParticipant<'_> {
    type State = VcpuState;

    fn id(&self) -> String {
        ids::vcpu(self.index)
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<VcpuState, ParticipantError> {
        let vcpu = self
            .set
            .vcpus()
            .get(self.index)
            .ok_or_else(|| failed(&self.id(), "no such vCPU"))?;
        // A vCPU whose thread did not save it (stopped after a failure) is saved here.
        let saved = match self.saves.take(self.index) {
            Some(saved) => saved,
            None => ParkedSave {
                state: VcpuState::save(&mut lock(vcpu), self.msrs),
                tsc_read_at_ns: realtime_ns(),
            },
        };
        let mut state = saved.state.map_err(|e| failed(&self.id(), e))?;
        // The TSC as of the pause instant, which the successor moves on by the pause.
        let paused_at_ns = self.saves.paused_at_ns.load(Ordering::SeqCst);
        let since_pause =
            i64::try_from(i128::from(saved.tsc_read_at_ns) - i128::from(paused_at_ns)).unwrap_or(0);
        let khz = state
            .tsc_khz
            .or_else(|| lock(vcpu).get_tsc_khz().ok())
            .unwrap_or(0);
        cpu::shift_saved_tsc(&mut state, -since_pause, khz);
        Ok(state)
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// The MSI routes the guest programmed.
#[derive(Debug)]
pub struct InterruptsParticipant<'a>(pub &'a InterruptManager);

impl Participant for InterruptsParticipant<'_> {
    type State = InterruptState;

    fn id(&self) -> String {
        ids::INTERRUPTS.into()
    }
    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        use std::os::fd::AsFd;
        // For a successor started ahead (see `routes_ahead`); it does without them.
        if files.successor_may_run_ahead() {
            let handed = super::routes_ahead::routes_file(&self.0.save()).and_then(|file| {
                files
                    .preserve_reserved(file.as_fd(), super::routes_ahead::ROUTES_TOKEN)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = handed {
                log::debug!("No MSI routes for a successor ahead: {e}");
            }
        }
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<InterruptState, ParticipantError> {
        Ok(self.0.save())
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// A participant that only saves a piece of VM-wide KVM state: it changes only while vCPUs or
/// devices run, and both are paused before anything saves.
#[derive(Debug)]
pub struct KvmStateParticipant<'a, S> {
    id: &'static str,
    vm: &'a kvm_ioctls::VmFd,
    save: fn(&kvm_ioctls::VmFd) -> Result<S, crate::platform::PlatformError>,
}

/// The PICs and the IOAPIC.
pub fn irqchip_participant(vm: &kvm_ioctls::VmFd) -> KvmStateParticipant<'_, IrqchipsState> {
    KvmStateParticipant {
        id: ids::IRQCHIP,
        vm,
        save: IrqchipsState::save,
    }
}

/// The PIT.
pub fn pit_participant(vm: &kvm_ioctls::VmFd) -> KvmStateParticipant<'_, PitState> {
    KvmStateParticipant {
        id: ids::PIT,
        vm,
        save: |vm| platform::save_pit(vm).map(PitState),
    }
}

/// The kvmclock (last of all: read as late as possible).
pub fn clock_participant(vm: &kvm_ioctls::VmFd) -> KvmStateParticipant<'_, ClockState> {
    KvmStateParticipant {
        id: ids::CLOCK,
        vm,
        save: |vm| platform::save_clock(vm).map(ClockState),
    }
}

/// The PIT's channels and flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PitState(pub kvm_bindings::kvm_pit_state2);

impl Versioned for PitState {
    const VERSION: u16 = 1;
}

/// The kvmclock, in ns (with KVM's `realtime` and `host_tsc` when it filled them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClockState(pub kvm_bindings::kvm_clock_data);

impl Versioned for ClockState {
    const VERSION: u16 = 1;
}

impl<S> Participant for KvmStateParticipant<'_, S>
where
    S: Versioned + std::fmt::Debug + Clone + PartialEq,
{
    type State = S;

    fn id(&self) -> String {
        self.id.into()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<S, ParticipantError> {
        (self.save)(self.vm).map_err(|e| failed(self.id, e))
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// The fault injector's hook in the old VMM's prepare, pause and save (see
/// [`liveupdate::fault`], `CHV_TEST_FAULT`); placed last, so every real participant has done
/// that step when it fails or the process dies.
#[derive(Debug)]
pub struct FailureInjector {
    fault: Fault,
}

impl FailureInjector {
    /// An injector if this process is armed for prepare, pause or save.
    pub fn from_env() -> Option<Self> {
        fault::armed()
            .filter(|f| {
                matches!(
                    f.step,
                    FaultStep::Prepare | FaultStep::Pause | FaultStep::Save
                )
            })
            .map(|fault| Self { fault })
    }

    fn check(&self, step: FaultStep) -> Result<(), ParticipantError> {
        fault::reached_with(Some(self.fault), step).map_err(|why| failed("fault-injection", why))
    }
}

impl Participant for FailureInjector {
    type State = ();

    fn id(&self) -> String {
        "fault-injection".into()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        self.check(FaultStep::Prepare)
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        self.check(FaultStep::Pause)
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        self.check(FaultStep::Save)
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use devices::bus::Bus;
    use kvm_bindings::kvm_msi;
    use kvm_ioctls::VmFd;
    use liveupdate::emulated::EmulatedProvider;
    use liveupdate::session::SessionProvider;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::cpu::test_util;
    use crate::cpu::{lapic_register, set_lapic_register};
    use crate::vcpu_thread::Buses;

    /// A real-mode guest that halts with interrupts off, forever: `cli; hlt; jmp $-1`.
    const HALT_CODE: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];
    const MSRS: &[u32] = &[cpu::MSR_IA32_TSC];

    /// A running VM (in-kernel irqchip) whose vCPU 0 is halted in `HALT_CODE`, its LAPIC
    /// accepting interrupts (which stay pending in the IRR: the guest never takes them).
    struct HaltedGuest {
        set: VcpuSet,
        vm: VmFd,
        _ram: GuestRam,
    }

    impl HaltedGuest {
        /// `count` vCPUs (the others wait for a SIPI that never comes).
        fn with_vcpus(count: u64) -> Self {
            let kvm = test_util::kvm();
            let vm = test_util::vm(&kvm);
            let ram = GuestRam::new(64 << 20).unwrap();
            ram.memory()
                .write_slice(&HALT_CODE, GuestAddress(0x1000))
                .unwrap();
            ram.register(&vm).unwrap();
            let vcpus = (0..count)
                .map(|id| {
                    let vcpu = vm.create_vcpu(id).unwrap();
                    test_util::start_real_mode_at(&vcpu, 0x1000).unwrap();
                    let mut lapic = vcpu.get_lapic().unwrap();
                    // Spurious vector register: bit 8 software-enables the LAPIC.
                    set_lapic_register(&mut lapic, 0xf0, 0x1ff);
                    vcpu.set_lapic(&lapic).unwrap();
                    vcpu
                })
                .collect();
            let buses = Buses {
                pio: Arc::new(RwLock::new(Bus::new())),
                mmio: Arc::new(RwLock::new(Bus::new())),
            };
            let set = VcpuSet::start(vcpus, &buses, Arc::new(|_| {})).unwrap();
            set.resume();
            Self { set, vm, _ram: ram }
        }

        /// An MSI to vCPU 0 (LAPIC id 0, fixed delivery) with `vector`, as a device raises it.
        fn raise_msi(&self, vector: u32) {
            let msi = kvm_msi {
                address_lo: 0xfee0_0000,
                data: vector,
                ..Default::default()
            };
            self.vm.signal_msi(msi).unwrap();
        }
    }

    fn irr_has(state: &VcpuState, vector: u32) -> bool {
        let offset = 0x200 + usize::try_from(vector / 32).unwrap() * 0x10;
        lapic_register(&state.lapic, offset) & (1 << (vector % 32)) != 0
    }

    #[test]
    fn an_interrupt_raised_between_the_vcpus_stopping_and_the_save_is_in_the_saved_lapic() {
        // Arrange: the vCPUs run (halted in the guest) until the update pauses them; each
        // thread saves its vCPU as it parks.
        let guest = HaltedGuest::with_vcpus(2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let saves = VcpuSaves::new(2);
        let mut vcpus = VcpusParticipant::new(&guest.set, MSRS, Arc::new([]), saves.clone());
        let mut vcpu0 = VcpuParticipant::new(&guest.set, 0, MSRS, saves);
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let mut files = FileSink::new(session.as_mut());

        // Act: the vCPUs stop first; a device whose queue worker has not stopped yet raises an
        // MSI; then everything is saved.
        vcpus.pause().unwrap();
        vcpu0.pause().unwrap();
        guest.raise_msi(0x44);
        let set_state = vcpus.save(&mut files).unwrap();
        let state = vcpu0.save(&mut files).unwrap();

        // Assert: the successor's LAPIC gets it, so the guest hears of the device's work.
        assert!(
            irr_has(&state, 0x44),
            "the MSI raised after the pause is lost"
        );
        assert_eq!(set_state.count, 2);
        assert_ne!(set_state.paused_at_ns, 0);
    }

    #[test]
    fn an_nmi_sent_between_the_vcpus_stopping_and_the_save_is_in_the_saved_events() {
        // Arrange: two vCPUs run (halted in the guest) until the update pauses them, and their
        // threads save them as they park.
        let guest = HaltedGuest::with_vcpus(2);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let saves = VcpuSaves::new(2);
        let mut vcpus = VcpusParticipant::new(&guest.set, MSRS, Arc::new([]), saves.clone());
        let mut vcpu0 = VcpuParticipant::new(&guest.set, 0, MSRS, saves.clone());
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let mut files = FileSink::new(session.as_mut());

        // Act: another vCPU, stopping later, sends it an NMI; then everything is saved.
        vcpus.pause().unwrap();
        let saved_as_parked = lock(&saves.parked[0]).is_some();
        lock(&guest.set.vcpus()[0]).nmi().unwrap();
        vcpus.save(&mut files).unwrap();
        let state = vcpu0.save(&mut files).unwrap();

        // Assert: the NMI waits in the saved state for the successor's vCPU.
        assert!(saved_as_parked);
        assert_eq!(state.vcpu_events.nmi.pending, 1, "the NMI is lost");
    }
}
