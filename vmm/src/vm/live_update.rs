//! The live-update side of a VM: saving it into a session, and rebuilding it from one.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use liveupdate::fault::{self, FaultStep};
use liveupdate::machine::{Incoming, MachineError, Outgoing, Timings};
use liveupdate::participant::AnyParticipant;
use liveupdate::session::Session;
use liveupdate::state::{StateError, StateSet, Versioned};

use crate::config::VmConfig;
use crate::cpu::{self, VcpuSetup, VcpuState};
use crate::device_manager::{DeviceContext, DeviceManager, HandedOverFds};
use crate::interrupts::{InterruptManager, InterruptState};
use crate::live_update::participants::{
    ClockState, ConfigParticipant, ConfigState, FailureInjector, InterruptsParticipant,
    MemoryParticipant, MemoryState, PitState, VcpuParticipant, VcpuSaves, VcpusParticipant,
    VcpusState, clock_participant, ids, irqchip_participant, pit_participant, realtime_ns,
};
use crate::live_update::pause_priority::PausePriority;
use crate::memory::{GuestRam, MemoryError, vcpus_hint};
use crate::platform::{IrqchipsState, PlatformState};
use crate::state_format::StateFormat;
use crate::sys;
use crate::vcpu_thread::{BuildError, IdleVcpus, VcpuBuilder, VcpuEvent, VcpuMaker, VcpuSet};

use super::{CreateVmSteps, Parts, Vm, VmError, create_vcpu, create_vm_timed};

/// A KVM VM (irqchip and PIT made) with guest RAM mapped and registered, built by a successor
/// ahead of the update while the old VMM still runs the guest on that same RAM.
#[derive(Debug)]
pub struct Prebuilt {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    /// vCPU threads started ahead, as many as the RAM's name says (see [`vcpus_hint`]).
    vcpu_threads: Option<IdleVcpus<VmError>>,
    /// Per vCPU made ahead: the CPUID table and TSC rate its thread gave it, those a boot of
    /// that many vCPUs gives (the old VMM's saved state carries the same unless its VM came
    /// from elsewhere: then the restore loads the saved table over it).
    given_ahead: VcpuSetupSlots,
    /// The restoring thread and the vCPU threads, raised for the pause once this successor is
    /// ready ([`Prebuilt::raise_pause_priority`]), until the guest runs again.
    priority: PausePriority,
    /// The MSI routes KVM was given ahead ([`Prebuilt::route_ahead`]).
    routed_ahead: Option<InterruptState>,
}

/// Per vCPU index: a vCPU's setup once known (what it was given ahead, taken by its restore;
/// or what its restore gave it).
type VcpuSetupSlots = Arc<[Mutex<Option<VcpuSetup>>]>;

impl Prebuilt {
    /// Maps `ram_memfd` (all of guest RAM) into a new KVM VM.
    pub fn new(ram_memfd: File) -> Result<Self, VmError> {
        Self::timed(ram_memfd).map(|(prebuilt, _)| prebuilt)
    }

    /// [`Prebuilt::new`], with the time of each step: RAM mapped (`map_ram`), then those of
    /// [`super::create_vm_timed`].
    fn timed(ram_memfd: File) -> Result<(Self, BuildSteps), VmError> {
        let start = Instant::now();
        let size = ram_memfd
            .metadata()
            .map_err(|e| VmError::Memory(MemoryError::Memfd(e)))?
            .len();
        let ram = GuestRam::from_memfd(ram_memfd, size).map_err(VmError::Memory)?;
        let mapped = start.elapsed();
        let (prebuilt, [kvm_vm, memslots, irqchip]) = Self::built_on(ram)?;
        Ok((prebuilt, [("map_ram", mapped), kvm_vm, memslots, irqchip]))
    }

    /// A new KVM VM on `ram`, no vCPU threads started ahead yet.
    fn built_on(ram: GuestRam) -> Result<(Self, CreateVmSteps), VmError> {
        let (kvm, vm_fd, steps) = create_vm_timed(&ram)?;
        let prebuilt = Self {
            kvm,
            vm_fd,
            ram,
            vcpu_threads: None,
            given_ahead: Arc::new([]),
            priority: PausePriority::default(),
            routed_ahead: None,
        };
        Ok((prebuilt, steps))
    }

    /// Also starts the VM's vCPU threads ahead, if the RAM says how many vCPUs it has: each
    /// makes its vCPU, gives it the CPUID table and TSC rate of a boot (the slowest ioctl of a
    /// restore is `KVM_SET_CPUID2`), waits, and loads the vCPU's state once the state is there.
    pub fn with_vcpu_threads(mut self, on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>) -> Self {
        if let Some(count) = vcpus_hint(self.ram.memfd()) {
            let vm_fd = self.vm_fd.clone();
            let supported = cpu::supported_cpuid(&self.kvm)
                .map_err(|e| log::debug!("No CPUID ahead: {e}"))
                .ok();
            let given_ahead: VcpuSetupSlots = (0..count).map(|_| Mutex::new(None)).collect();
            self.given_ahead = given_ahead.clone();
            let maker: VcpuMaker = Arc::new(move |index| {
                let mut vcpu = vm_fd.create_vcpu(u64::from(index))?;
                let given = supported
                    .as_deref()
                    .map(|supported| cpu::boot_cpuid(supported, index, count))
                    .transpose()
                    .and_then(|entries| {
                        entries
                            .map(|entries| cpu::give_cpuid_and_host_tsc_rate(&vcpu, entries))
                            .transpose()
                    });
                match (given, given_ahead.get(usize::from(index))) {
                    (Ok(given), Some(slot)) => *lock(slot) = given,
                    (Err(e), _) => log::debug!("vCPU {index}: no CPUID ahead ({e})"),
                    (Ok(_), None) => {}
                }
                // Once without entering the guest, now rather than in the pause: the run page
                // is faulted in and KVM's first-run work done (30-40 us for a VM's first
                // KVM_RUN on the test hosts, 6 later). Whatever it says, the restore loads all.
                let _ = cpu::run_without_entering(&mut vcpu);
                Ok(vcpu)
            });
            match VcpuSet::spawn_idle(usize::from(count), on_event, Some(maker)) {
                Ok(idle) => self.vcpu_threads = Some(idle),
                Err(e) => log::warn!("Cannot start vCPU threads ahead ({e}); they start later"),
            }
        }
        self
    }

    /// Gives KVM the MSI routes of `routes` now, while the old VMM still runs the guest; the
    /// restore sets them only if the saved ones differ.
    pub fn route_ahead(&mut self, routes: InterruptState) -> Result<(), VmError> {
        InterruptManager::restore(self.vm_fd.clone(), &routes).map_err(VmError::Interrupts)?;
        self.routed_ahead = Some(routes);
        Ok(())
    }

    /// Raises the calling thread, which restores the VM, and the vCPU threads started ahead to
    /// the pause's priority ([`PausePriority`]); they sleep until the handover, and go back to
    /// their own once the guest runs again.
    pub fn raise_pause_priority(&mut self) {
        let vcpu_threads = self.vcpu_threads.as_ref().map(IdleVcpus::thread_ids);
        self.priority = PausePriority::raise(
            std::iter::once(sys::current_tid()).chain(vcpu_threads.into_iter().flatten()),
        );
    }

    /// Withdraws the pause's CPU latency request taken when ready (see [`PausePriority`]):
    /// the handover is late.
    pub fn let_cpus_idle(&mut self) {
        self.priority.let_cpus_idle();
    }

    /// Whether threads started ahead made more vCPUs than a state of `count` has.
    fn has_vcpus_beyond(&self, count: usize) -> bool {
        self.vcpu_threads
            .as_ref()
            .is_some_and(|idle| idle.make_vcpus_ahead() && idle.len() > count)
    }

    /// A new KVM VM on the same RAM, without the threads and vCPUs made ahead.
    fn rebuilt(self) -> Result<Self, VmError> {
        let Self { ram, .. } = self;
        Self::built_on(ram).map(|(prebuilt, _)| prebuilt)
    }
}

/// When the guest stopped in the old VMM and when it ran again in this one (host realtime,
/// ns since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct PauseSpan {
    /// The old VMM's last vCPU left the guest.
    pub paused_at_ns: u64,
    /// This VMM's first vCPU went into the guest (or, if it did not within
    /// [`FIRST_ENTRY_WAIT`], this VMM let them run; without a resume, it finished the restore).
    pub resumed_at_ns: u64,
}

/// How long a restore waits for a vCPU to go into the guest, for the end of the pause.
const FIRST_ENTRY_WAIT: Duration = Duration::from_millis(100);

/// The named steps of building a [`Prebuilt`], and their times.
type BuildSteps = [(&'static str, Duration); 4];

fn take<S: Versioned>(states: &mut StateSet, id: &str) -> Result<S, VmError> {
    states
        .take(id)
        .map_err(|e| VmError::LiveUpdate(MachineError::State(e)))
}

/// Records the time since `since` as step `name` of the restore, and restarts the clock.
fn lap(incoming: &mut Incoming, name: &str, since: &mut Instant) {
    let now = Instant::now();
    incoming
        .timings_mut()
        .record(name, now.duration_since(*since));
    *since = now;
}

/// Makes vCPU `index` (unless it was `made` ahead, and maybe `given` its CPUID and TSC rate)
/// and loads `state` into it, its TSC moved on by the time since the old VMM's pause
/// (`paused_at_ns`), reckoned right before it is loaded. Runs on the vCPU's own thread, or on
/// the restoring thread if that one comes for it first. Returns the vCPU and what it was given.
fn build_vcpu(
    vm_fd: &VmFd,
    index: u8,
    made: Option<(VcpuFd, Option<VcpuSetup>)>,
    mut state: VcpuState,
    paused_at_ns: u64,
) -> Result<(VcpuFd, VcpuSetup), VmError> {
    let made_ahead = made.is_some();
    let (mut vcpu, given) = match made {
        Some(made) => made,
        None => (create_vcpu(vm_fd, index)?, None),
    };
    let khz = state
        .tsc_khz
        .or_else(|| vcpu.get_tsc_khz().ok())
        .unwrap_or(0);
    let elapsed_ns = realtime_ns().saturating_sub(paused_at_ns);
    cpu::shift_saved_tsc(
        &mut state,
        i64::try_from(elapsed_ns).unwrap_or(i64::MAX),
        khz,
    );
    let setup = state
        .restore_onto(&mut vcpu, given.as_ref())
        .map_err(|source| VmError::Vcpu { index, source })?;
    // Not in a restart-mode pause (vCPUs made ahead): there the host, and its TSC, stay.
    if index == 0 && !made_ahead {
        cpu::warn_if_tsc_not_kept(&vcpu, &state, khz);
    }
    Ok((vcpu, setup))
}

impl Vm {
    /// Rebuilds a VM from a live update's saved state, on the very same guest RAM, and starts
    /// it. Returns the configuration it was saved with.
    /// With `prebuilt`, the KVM VM and guest RAM made ahead are used. Also returns when the
    /// old VMM paused the guest and when it runs again here.
    pub fn restore(
        incoming: &mut Incoming,
        prebuilt: Option<Prebuilt>,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        resume: bool,
    ) -> Result<(Self, VmConfig, PauseSpan), VmError> {
        let states = incoming.states().ok_or(VmError::NoState)?;
        let memory: MemoryState = take(states, ids::MEMORY)?;
        let vcpus: VcpusState = take(states, ids::VCPUS)?;
        // Each vCPU's state is decoded where it is loaded: on the vCPU's thread, which starts
        // before this thread decodes the rest.
        let vcpu_states = (0..vcpus.count)
            .map(|index| {
                states
                    .take_envelope(&ids::vcpu(index))
                    .map_err(|e| VmError::LiveUpdate(MachineError::State(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if vcpu_states.is_empty() {
            return Err(VmError::NoVcpu);
        }
        let mut step = Instant::now();
        let Prebuilt {
            kvm,
            vm_fd,
            ram,
            vcpu_threads,
            given_ahead,
            priority,
            routed_ahead,
        } = match prebuilt {
            Some(prebuilt) if prebuilt.ram.size() != memory.size => {
                return Err(VmError::PrebuiltMismatch {
                    prebuilt: prebuilt.ram.size(),
                    saved: memory.size,
                });
            }
            Some(prebuilt) if prebuilt.has_vcpus_beyond(vcpu_states.len()) => {
                // The RAM's hint lied: KVM cannot take back the vCPUs made ahead.
                log::warn!(
                    "{} vCPUs were made ahead for a state of {}: building the VM again",
                    prebuilt.vcpu_threads.as_ref().map_or(0, IdleVcpus::len),
                    vcpu_states.len()
                );
                prebuilt.rebuilt()?
            }
            Some(prebuilt) => prebuilt,
            None => {
                let memfd = incoming
                    .take_file(
                        memory.memfd_token,
                        "guest RAM (a memfd: LUO's memfd file handler)",
                    )
                    .map_err(VmError::LiveUpdate)?;
                let (prebuilt, steps) = Prebuilt::timed(File::from(memfd))?;
                for (name, took) in steps {
                    incoming.timings_mut().record(name, took);
                }
                prebuilt
            }
        };
        lap(incoming, "create_vm", &mut step);
        // Each vCPU is loaded on its own thread (made there ahead, or now), side by side and
        // beside the devices; the restoring thread takes on those not started when it is done.
        let paused_at_ns = vcpus.paused_at_ns;
        let loaded: VcpuSetupSlots = (0..vcpu_states.len()).map(|_| Mutex::new(None)).collect();
        let builders = (0u8..)
            .zip(vcpu_states)
            .map(|(index, state)| {
                let (vm_fd, given_ahead, loaded) =
                    (vm_fd.clone(), given_ahead.clone(), loaded.clone());
                Box::new(move |made: Option<VcpuFd>| {
                    let slot = usize::from(index);
                    let made = made.map(|vcpu| {
                        let given = given_ahead.get(slot).and_then(|given| lock(given).take());
                        (vcpu, given)
                    });
                    let state: VcpuState = state
                        .decode()
                        .map_err(|e| VmError::LiveUpdate(MachineError::State(e)))?;
                    // The MSRs every later save reads: those the state has.
                    cpu::msrs_of_restored(&state);
                    let (vcpu, setup) = build_vcpu(&vm_fd, index, made, state, paused_at_ns)?;
                    if let Some(loaded) = loaded.get(slot) {
                        *lock(loaded) = Some(setup);
                    }
                    Ok(vcpu)
                }) as VcpuBuilder<VmError>
            })
            .collect();
        let pending = match vcpu_threads {
            Some(idle) => idle.build(builders),
            None => VcpuSet::spawn_building(builders, on_event.clone()),
        }
        .map_err(VmError::VcpuThreads)?;
        lap(incoming, "create_vcpus", &mut step);
        let states = incoming.states().ok_or(VmError::NoState)?;
        let config: ConfigState = take(states, ids::CONFIG)?;
        let config = config.config().map_err(VmError::Config)?;
        let interrupt_state: InterruptState = take(states, ids::INTERRUPTS)?;
        let irqchips: IrqchipsState = take(states, ids::IRQCHIP)?;
        let pit: PitState = take(states, ids::PIT)?;
        let clock: ClockState = take(states, ids::CLOCK)?;
        let mut platform = PlatformState::from_parts(irqchips, pit.0, clock.0);
        lap(incoming, "decode", &mut step);
        // Routes first: devices then claim their MSI groups by their saved placement.
        let (interrupts, routes) =
            InterruptManager::restore_aside(vm_fd.clone(), &interrupt_state, routed_ahead.as_ref())
                .map_err(VmError::Interrupts)?;
        // Restart mode: outside devices' connections and eventfds, attached beside the session
        // (those no device claims close when this drops, after the build).
        let handed_over =
            HandedOverFds::new(incoming.take_attachments().map_err(VmError::LiveUpdate)?);
        let ctx = DeviceContext {
            config: &config,
            memory: ram.memory(),
            vm: &vm_fd,
            interrupts: &interrupts,
            on_event: on_event.clone(),
            handed_over: Some(&handed_over),
        };
        let states = incoming.states().ok_or(VmError::NoState)?;
        let devices = DeviceManager::build(&ctx, Some(states)).map_err(VmError::Devices)?;
        drop(handed_over);
        // Everything saved must have found its owner before the guest runs again.
        let leftovers = states.remaining();
        if !leftovers.is_empty() {
            return Err(VmError::LiveUpdate(MachineError::State(
                StateError::Orphans { ids: leftovers },
            )));
        }
        lap(incoming, "devices", &mut step);
        let vcpu_set = pending.finish(devices.buses()).map_err(|e| match e {
            BuildError::Failed(_, error) => error,
            BuildError::Lost(index) => VmError::VcpuThreads(std::io::Error::other(format!(
                "vCPU thread {index} ended while loading its state"
            ))),
        })?;
        lap(incoming, "vcpus", &mut step);
        let msrs = cpu::restored_msrs().ok_or(VmError::NoVcpu)?;
        let setups = loaded
            .iter()
            .map(|setup| lock(setup).take().ok_or(VmError::NoVcpu))
            .collect::<Result<Arc<[VcpuSetup]>, _>>()?;

        // The guest's clocks move on by the length of the pause: it must see real time pass,
        // neither jump back nor fall behind (each vCPU's TSC was moved on by its thread).
        let elapsed_ns = realtime_ns().saturating_sub(paused_at_ns);
        platform.clock.clock = platform.clock.clock.saturating_add(elapsed_ns);
        routes.wait().map_err(VmError::Interrupts)?;
        // Last before running: the PIT and kvmclock start counting from here.
        platform.restore(&vm_fd).map_err(VmError::Platform)?;
        // The LAPICs are in place: interrupts that waited in handed-over eventfds may come.
        interrupts.arm_handed_over().map_err(VmError::Interrupts)?;
        lap(incoming, "platform", &mut step);
        let parts = Parts {
            kvm,
            vm_fd,
            ram,
            interrupts,
            devices,
            vcpus: vcpu_set,
            msrs,
            setups,
        };
        fault::reached(FaultStep::Restore).map_err(VmError::Fault)?;
        // The guest runs on from here: whoever holds the session must never give its saved
        // state to another successor again. Told first, so no window lets a second restore in.
        fault::fail_point(FaultStep::Resume).map_err(VmError::Fault)?;
        incoming.mark_resumed().map_err(VmError::LiveUpdate)?;
        lap(incoming, "mark_resumed", &mut step);
        let started_ns = realtime_ns();
        let (vm, let_run_ns) = Self::start(parts, resume)?;
        // `start` up to the vCPUs' release, `workers` after it.
        let until_let_run = Duration::from_nanos(let_run_ns.saturating_sub(started_ns));
        let timings = incoming.timings_mut();
        timings.record("start", until_let_run);
        timings.record("workers", step.elapsed().saturating_sub(until_let_run));
        // The pause ends as the first vCPU goes into the guest, as it began when the last
        // left it (both stamped by the vCPU threads themselves).
        let entered_ns = resume
            .then(|| vm.vcpus.first_entry_ns(FIRST_ENTRY_WAIT))
            .flatten();
        drop(priority);
        let span = PauseSpan {
            paused_at_ns: vcpus.paused_at_ns,
            resumed_at_ns: entered_ns.unwrap_or(let_run_ns),
        };
        Ok((vm, config, span))
    }

    /// Checks that this VM's state can be written as `format` reads it (before anything of an
    /// update runs); the reason otherwise.
    pub fn check_state_format(&self, config: &VmConfig, format: StateFormat) -> Result<(), String> {
        let groups = self.interrupts.save().msi_groups;
        self.devices.check_state_format(config, &groups, format)
    }

    /// Runs a live update of this VM into `session`: prepare (guest running), freeze (paused,
    /// state saved as `format` reads it), then `carrier` takes the session. On failure the VM runs on.
    /// `after_prepare` runs between prepare and freeze, guest still running (e.g. to let a
    /// successor build its VM on the preserved RAM).
    pub fn live_update(
        &mut self,
        config: &VmConfig,
        format: StateFormat,
        session: Box<dyn Session>,
        state_file: File,
        after_prepare: impl FnOnce() -> Result<(), String>,
        carrier: impl FnOnce(Box<dyn Session>) -> Result<(), String>,
    ) -> Result<Timings, VmError> {
        let pause_threads: Vec<_> = std::iter::once(sys::current_tid())
            .chain(self.vcpus.thread_ids())
            .collect();
        self.with_participants(config, format, |participants| {
            let mut update = Outgoing::new(session, participants);
            update.prepare().map_err(VmError::LiveUpdate)?;
            let waited = Instant::now();
            if let Err(why) = after_prepare() {
                update.cancel().map_err(VmError::LiveUpdate)?;
                return Err(VmError::UpdateStopped(why));
            }
            update.record("after_prepare", waited.elapsed());
            // This thread and the vCPU threads run the pause; back to their own priority once
            // it is handed over (or cancelled).
            let _priority = PausePriority::raise(pause_threads);
            update.freeze(state_file).map_err(VmError::LiveUpdate)?;
            // Logged now: across a kexec the handover never returns to report them.
            log::info!("VM frozen: {:?}", update.timings().steps);
            update.handover(carrier).map_err(VmError::LiveUpdate)?;
            Ok(update.timings().clone())
        })
    }

    /// Snapshots this VM into `session`: prepare, freeze, then `writer` writes the session out
    /// and the VM resumes in place (a paused VM stays paused). On failure the VM runs on too.
    pub fn snapshot(
        &mut self,
        config: &VmConfig,
        session: Box<dyn Session>,
        state_file: File,
        writer: impl FnOnce(Box<dyn Session>) -> Result<(), String>,
    ) -> Result<Timings, VmError> {
        self.with_participants(config, StateFormat::current(), |participants| {
            let mut update = Outgoing::new(session, participants);
            update.prepare().map_err(VmError::LiveUpdate)?;
            update.freeze(state_file).map_err(VmError::LiveUpdate)?;
            update.snapshot(writer).map_err(VmError::LiveUpdate)?;
            Ok(update.timings().clone())
        })
    }

    /// Runs `drive` over every participant of the VM, in the order the machine must drive them.
    fn with_participants<R>(
        &mut self,
        config: &VmConfig,
        format: StateFormat,
        drive: impl FnOnce(Vec<&mut dyn AnyParticipant>) -> R,
    ) -> R {
        let msrs = self.msrs;
        let mut config_part = ConfigParticipant::new(config);
        let mut memory = MemoryParticipant::new(&self.ram);
        let saves = VcpuSaves::new(self.vcpus.vcpus().len());
        let mut vcpus =
            VcpusParticipant::new(&self.vcpus, msrs, self.setups.clone(), saves.clone());
        let mut each_vcpu: Vec<_> = (0..self.vcpus.vcpus().len())
            .map(|index| VcpuParticipant::new(&self.vcpus, index, msrs, saves.clone()))
            .collect();
        let mut interrupts = InterruptsParticipant(&self.interrupts);
        let mut irqchip = irqchip_participant(&self.vm_fd);
        let mut pit = pit_participant(&self.vm_fd);
        let mut clock = clock_participant(&self.vm_fd);
        // The virtio queue workers stop first, the guest still running: what it queues
        // meanwhile waits in its rings, which every worker goes through as it starts (here on
        // a cancel, or in the successor). Then the vCPU set (the pause starts there), then the
        // other devices, whose outside ends a vCPU may still be talking to.
        let (mut queue_workers, mut devices): (Vec<_>, Vec<_>) = self
            .devices
            .participants(format)
            .into_iter()
            .partition(|device| crate::device_manager::ids::is_virtio(&device.id()));
        let mut participants: Vec<&mut dyn AnyParticipant> = vec![&mut config_part, &mut memory];
        participants.extend(
            queue_workers
                .iter_mut()
                .map(|d| d.as_mut() as &mut dyn AnyParticipant),
        );
        participants.push(&mut vcpus);
        participants.extend(each_vcpu.iter_mut().map(|v| v as &mut dyn AnyParticipant));
        participants.extend(
            devices
                .iter_mut()
                .map(|d| d.as_mut() as &mut dyn AnyParticipant),
        );
        participants.push(&mut interrupts);
        participants.push(&mut irqchip);
        participants.push(&mut pit);
        participants.push(&mut clock);
        let mut injector = FailureInjector::from_env();
        if let Some(injector) = injector.as_mut() {
            participants.push(injector);
        }
        drive(participants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_memfd_for(vcpus: u8) -> File {
        let ram =
            GuestRam::new_for_vcpus(64 << 20, vcpus).expect("needs memfd_create (a Linux host)");
        ram.memfd().try_clone().unwrap()
    }

    #[test]
    fn vcpus_made_ahead_for_a_state_with_fewer_vcpus_make_the_vm_be_built_again() {
        let prebuilt = Prebuilt::new(ram_memfd_for(4))
            .expect("needs /dev/kvm (load kvm_intel or kvm_amd, run as root)")
            .with_vcpu_threads(Arc::new(|_| {}));
        let fits_four = !prebuilt.has_vcpus_beyond(4);
        let beyond_two = prebuilt.has_vcpus_beyond(2);

        let rebuilt = prebuilt.rebuilt().unwrap();

        assert!(fits_four && beyond_two);
        assert!(rebuilt.vcpu_threads.is_none());
        // A new VM: vCPU 0 was not made in it yet.
        rebuilt.vm_fd.create_vcpu(0).unwrap();
    }
}
