//! The live-update side of a VM: saving it into a session, and rebuilding it from one.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use liveupdate::fault::{self, FaultStep};
use liveupdate::machine::{Incoming, MachineError, Outgoing, Timings};
use liveupdate::participant::AnyParticipant;
use liveupdate::session::Session;
use liveupdate::state::{StateError, StateSet, Versioned};

use crate::config::VmConfig;
use crate::cpu::{self, VcpuState};
use crate::device_manager::{DeviceContext, DeviceManager, HandedOverFds};
use crate::interrupts::{InterruptManager, InterruptState};
use crate::live_update::participants::{
    ClockState, ConfigParticipant, ConfigState, FailureInjector, InterruptsParticipant,
    MemoryParticipant, MemoryState, PitState, VcpuParticipant, VcpuSaves, VcpusParticipant,
    VcpusState, clock_participant, ids, irqchip_participant, pit_participant, realtime_ns,
};
use crate::memory::{GuestRam, MemoryError, vcpus_hint};
use crate::platform::{IrqchipsState, PlatformState};
use crate::state_format::StateFormat;
use crate::vcpu_thread::{BuildError, IdleVcpus, VcpuBuilder, VcpuEvent, VcpuSet};

use super::{Parts, Vm, VmError, create_bare_vm, create_vcpu};

/// A KVM VM (irqchip and PIT made) with guest RAM mapped and registered, built by a successor
/// ahead of the update while the old VMM still runs the guest on that same RAM.
#[derive(Debug)]
pub struct Prebuilt {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    /// vCPU threads started ahead, as many as the RAM's name says (see [`vcpus_hint`]).
    vcpu_threads: Option<IdleVcpus<VmError>>,
}

impl Prebuilt {
    /// Maps `ram_memfd` (all of guest RAM) into a new KVM VM.
    pub fn new(ram_memfd: File) -> Result<Self, VmError> {
        Self::timed(ram_memfd).map(|(prebuilt, _)| prebuilt)
    }

    /// [`Prebuilt::new`], with the time of each step: RAM mapped (`map_ram`), KVM VM with its
    /// irqchip and PIT made (`kvm_vm`), RAM registered with KVM (`memslots`).
    fn timed(ram_memfd: File) -> Result<(Self, BuildSteps), VmError> {
        let start = Instant::now();
        let size = ram_memfd
            .metadata()
            .map_err(|e| VmError::Memory(MemoryError::Memfd(e)))?
            .len();
        let ram = GuestRam::from_memfd(ram_memfd, size).map_err(VmError::Memory)?;
        let mapped = Instant::now();
        let (kvm, vm_fd) = create_bare_vm()?;
        let made = Instant::now();
        ram.register(&vm_fd).map_err(VmError::Memory)?;
        let steps = [
            ("map_ram", mapped - start),
            ("kvm_vm", made - mapped),
            ("memslots", made.elapsed()),
        ];
        let prebuilt = Self {
            kvm,
            vm_fd,
            ram,
            vcpu_threads: None,
        };
        Ok((prebuilt, steps))
    }

    /// Also starts the VM's vCPU threads ahead, if the RAM says how many vCPUs it has: they
    /// wait, and make and load their vCPUs once the state is there.
    pub fn with_vcpu_threads(mut self, on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>) -> Self {
        if let Some(count) = vcpus_hint(self.ram.memfd()) {
            match VcpuSet::spawn_idle(usize::from(count), on_event) {
                Ok(idle) => self.vcpu_threads = Some(idle),
                Err(e) => log::warn!("Cannot start vCPU threads ahead ({e}); they start later"),
            }
        }
        self
    }
}

/// The named steps of building a [`Prebuilt`], and their times.
type BuildSteps = [(&'static str, Duration); 3];

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

/// Makes vCPU `index` and loads `state` into it, its TSC moved on by the time since the old
/// VMM's pause (`paused_at_ns`), reckoned right before it is loaded. Runs on the vCPU's own
/// thread.
fn build_vcpu(
    vm_fd: &VmFd,
    index: u8,
    mut state: VcpuState,
    paused_at_ns: u64,
) -> Result<VcpuFd, VmError> {
    let vcpu = create_vcpu(vm_fd, index)?;
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
    state
        .restore(&vcpu)
        .map_err(|source| VmError::Vcpu { index, source })?;
    Ok(vcpu)
}

impl Vm {
    /// Rebuilds a VM from a live update's saved state, on the very same guest RAM, and starts
    /// it. Returns the configuration it was saved with.
    /// With `prebuilt`, the KVM VM and guest RAM made ahead are used. Also returns when the
    /// old VMM paused the guest (host realtime, ns since the epoch).
    pub fn restore(
        incoming: &mut Incoming,
        prebuilt: Option<Prebuilt>,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        resume: bool,
    ) -> Result<(Self, VmConfig, u64), VmError> {
        let states = incoming.states().ok_or(VmError::NoState)?;
        let config: ConfigState = take(states, ids::CONFIG)?;
        let config = config.config().map_err(VmError::Config)?;
        let memory: MemoryState = take(states, ids::MEMORY)?;
        let interrupt_state: InterruptState = take(states, ids::INTERRUPTS)?;
        let vcpus: VcpusState = take(states, ids::VCPUS)?;
        let vcpu_states = (0..vcpus.count)
            .map(|index| take::<VcpuState>(states, &ids::vcpu(index)))
            .collect::<Result<Vec<_>, _>>()?;
        let irqchips: IrqchipsState = take(states, ids::IRQCHIP)?;
        let pit: PitState = take(states, ids::PIT)?;
        let clock: ClockState = take(states, ids::CLOCK)?;
        let mut platform = PlatformState::from_parts(irqchips, pit.0, clock.0);
        let mut step = Instant::now();
        let Prebuilt {
            kvm,
            vm_fd,
            ram,
            vcpu_threads,
        } = match prebuilt {
            Some(prebuilt) if prebuilt.ram.size() == memory.size => prebuilt,
            Some(prebuilt) => {
                return Err(VmError::PrebuiltMismatch {
                    prebuilt: prebuilt.ram.size(),
                    saved: memory.size,
                });
            }
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
        // Each vCPU is made and loaded on its own thread, side by side and beside the devices.
        let msrs = cpu::msrs_of_restored(vcpu_states.first().ok_or(VmError::NoVcpu)?);
        let paused_at_ns = vcpus.paused_at_ns;
        let builders = (0u8..)
            .zip(vcpu_states)
            .map(|(index, state)| {
                let vm_fd = vm_fd.clone();
                Box::new(move || build_vcpu(&vm_fd, index, state, paused_at_ns))
                    as VcpuBuilder<VmError>
            })
            .collect();
        let pending = match vcpu_threads {
            Some(idle) => idle.build(builders),
            None => VcpuSet::spawn_building(builders, on_event.clone()),
        }
        .map_err(VmError::VcpuThreads)?;
        lap(incoming, "create_vcpus", &mut step);
        // Routes first: devices then claim their MSI groups by their saved placement.
        let interrupts = InterruptManager::restore(vm_fd.clone(), &interrupt_state)
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

        // The guest's clocks move on by the length of the pause: it must see real time pass,
        // neither jump back nor fall behind (each vCPU's TSC was moved on by its thread).
        let elapsed_ns = realtime_ns().saturating_sub(paused_at_ns);
        platform.clock.clock = platform.clock.clock.saturating_add(elapsed_ns);
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
        };
        fault::reached(FaultStep::Restore).map_err(VmError::Fault)?;
        // The guest runs on from here: whoever holds the session must never give its saved
        // state to another successor again. Told first, so no window lets a second restore in.
        fault::fail_point(FaultStep::Resume).map_err(VmError::Fault)?;
        incoming.mark_resumed().map_err(VmError::LiveUpdate)?;
        lap(incoming, "mark_resumed", &mut step);
        let vm = Self::start(parts, resume)?;
        lap(incoming, "start", &mut step);
        Ok((vm, config, vcpus.paused_at_ns))
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
        self.with_participants(config, format, |participants| {
            let mut update = Outgoing::new(session, participants);
            update.prepare().map_err(VmError::LiveUpdate)?;
            let waited = Instant::now();
            if let Err(why) = after_prepare() {
                update.cancel().map_err(VmError::LiveUpdate)?;
                return Err(VmError::UpdateStopped(why));
            }
            update.record("after_prepare", waited.elapsed());
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
        let mut config_part = ConfigParticipant(config);
        let mut memory = MemoryParticipant::new(&self.ram);
        let saves = VcpuSaves::new(self.vcpus.vcpus().len());
        let mut vcpus = VcpusParticipant::new(&self.vcpus, msrs, saves.clone());
        let mut each_vcpu: Vec<_> = (0..self.vcpus.vcpus().len())
            .map(|index| VcpuParticipant::new(&self.vcpus, index, msrs, saves.clone()))
            .collect();
        let mut interrupts = InterruptsParticipant(&self.interrupts);
        let mut irqchip = irqchip_participant(&self.vm_fd);
        let mut pit = pit_participant(&self.vm_fd);
        let mut clock = clock_participant(&self.vm_fd);
        let mut devices = self.devices.participants(format);
        // The vCPU set pauses first (the pause starts there), then each device's queue worker.
        let mut participants: Vec<&mut dyn AnyParticipant> =
            vec![&mut config_part, &mut memory, &mut vcpus];
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
