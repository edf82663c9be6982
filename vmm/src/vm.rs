//! One running VM: KVM VM, guest RAM, vCPU threads and devices, built in the order KVM needs.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use liveupdate::machine::{Incoming, MachineError, Outgoing, Timings};
use liveupdate::participant::AnyParticipant;
use liveupdate::session::Session;
use liveupdate::state::{StateError, StateSet};
use thiserror::Error;

use crate::boot::{self, BootConfig, BootError};
use crate::config::VmConfig;
use crate::cpu::{self, CpuError, VcpuState};
use crate::device_manager::{DeviceContext, DeviceError, DeviceManager};
use crate::interrupts::{InterruptError, InterruptManager, InterruptState};
use crate::live_update::participants::{
    ClockState, ConfigParticipant, ConfigState, FailureInjector, InterruptsParticipant,
    MemoryParticipant, MemoryState, PitState, VcpuParticipant, VcpusParticipant, VcpusState,
    clock_participant, ids, irqchip_participant, pit_participant, realtime_ns,
};
use crate::memory::{GuestRam, MemoryError};
use crate::platform::{self, IrqchipsState, PlatformError, PlatformState};
use crate::vcpu_thread::{VcpuEvent, VcpuSet};

/// Errors from building or running a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("Cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM refused to create the VM or a vCPU.
    #[error("KVM refused to create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A vCPU could not be created.
    #[error("Cannot create vCPU {index}")]
    CreateVcpu {
        /// Index of the vCPU.
        index: u8,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The irqchip, PIT or clock could not be set up.
    #[error("Cannot set up the interrupt controller and timer")]
    Platform(#[source] PlatformError),
    /// Guest RAM could not be set up.
    #[error("Cannot set up guest RAM")]
    Memory(#[source] MemoryError),
    /// Interrupt routing could not be set up.
    #[error("Cannot set up interrupt routing")]
    Interrupts(#[source] InterruptError),
    /// A device could not be created.
    #[error("Cannot create the devices")]
    Devices(#[source] DeviceError),
    /// The configuration names no kernel.
    #[error("No kernel to boot: set payload.kernel (--kernel)")]
    NoKernel,
    /// The kernel could not be loaded.
    #[error("Cannot load the kernel")]
    Boot(#[source] BootError),
    /// A vCPU could not be configured.
    #[error("Cannot configure vCPU {index}")]
    Vcpu {
        /// Index of the vCPU.
        index: u8,
        /// Why.
        #[source]
        source: CpuError,
    },
    /// The vCPU threads could not start.
    #[error("Cannot start the vCPU threads")]
    VcpuThreads(#[source] std::io::Error),
    /// A live update failed (the VM runs on where it was).
    #[error("Live update failed")]
    LiveUpdate(#[source] MachineError),
    /// A VM needs at least one vCPU.
    #[error("The VM has no vCPU")]
    NoVcpu,
    /// The saved VM configuration does not parse.
    #[error("The saved VM configuration is invalid")]
    Config(#[source] crate::config::ConfigError),
    /// The live-update state was already used.
    #[error("The live-update state was already used")]
    NoState,
    /// The VM built ahead has another RAM size than the saved VM.
    #[error("The VM built ahead has {prebuilt} bytes of RAM, the saved VM {saved}")]
    PrebuiltMismatch {
        /// RAM of the prebuilt VM.
        prebuilt: u64,
        /// RAM of the saved VM.
        saved: u64,
    },
}

/// A KVM VM (irqchip and PIT made) with guest RAM mapped and registered, built by a successor
/// ahead of the update while the old VMM still runs the guest on that same RAM.
#[derive(Debug)]
pub struct Prebuilt {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
}

impl Prebuilt {
    /// Maps `ram_memfd` (all of guest RAM) into a new KVM VM.
    pub fn new(ram_memfd: File) -> Result<Self, VmError> {
        let size = ram_memfd
            .metadata()
            .map_err(|e| VmError::Memory(MemoryError::Memfd(e)))?
            .len();
        let ram = GuestRam::from_memfd(ram_memfd, size).map_err(VmError::Memory)?;
        let (kvm, vm_fd) = create_vm(&ram)?;
        Ok(Self { kvm, vm_fd, ram })
    }
}

/// What a VM is made of, before its vCPU threads start.
struct Parts {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    interrupts: InterruptManager,
    devices: DeviceManager,
    vcpus: Vec<VcpuFd>,
}

/// A KVM VM with its irqchip and PIT, and `ram` registered as its memory.
fn create_vm(ram: &GuestRam) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
    // The irqchip must exist before any vCPU (KVM creates each vCPU's LAPIC from it).
    platform::create_platform(&vm_fd).map_err(VmError::Platform)?;
    ram.register(&vm_fd).map_err(VmError::Memory)?;
    Ok((kvm, vm_fd))
}

fn create_vcpu(vm_fd: &VmFd, index: u8) -> Result<VcpuFd, VmError> {
    vm_fd
        .create_vcpu(u64::from(index))
        .map_err(|source| VmError::CreateVcpu { index, source })
}

fn take<S: serde::de::DeserializeOwned>(
    states: &mut StateSet,
    id: &str,
    version: u16,
) -> Result<S, VmError> {
    states
        .take(id, version)
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

/// Moves a saved vCPU's TSC forward by `elapsed_ns` at the guest's TSC rate.
fn advance_tsc(mut state: VcpuState, elapsed_ns: u64, vcpu: &VcpuFd) -> VcpuState {
    let khz = state
        .tsc_khz
        .or_else(|| vcpu.get_tsc_khz().ok())
        .unwrap_or(0);
    let ticks = u128::from(elapsed_ns) * u128::from(khz) / 1_000_000;
    let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
    for msr in &mut state.msrs {
        if msr.index == cpu::MSR_IA32_TSC {
            msr.data = msr.data.wrapping_add(ticks);
        }
    }
    state
}

/// A booted VM. Dropping it stops the vCPUs and devices and releases guest RAM.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: vCPU threads stop before the devices they call into, and both
    // before the VM and its memory go away.
    vcpus: VcpuSet,
    devices: DeviceManager,
    interrupts: InterruptManager,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    kvm: Kvm,
    /// The MSRs a vCPU state carries, probed before the vCPUs ran: once they run, a halted
    /// guest keeps its vCPU inside KVM_RUN and nobody else may touch it until it is paused.
    msrs: &'static [u32],
}

impl Vm {
    /// Builds the VM described by `config`, loads its kernel and starts it running.
    pub fn boot(
        config: &VmConfig,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    ) -> Result<Self, VmError> {
        let ram = GuestRam::new(config.memory.size).map_err(VmError::Memory)?;
        let (kvm, vm_fd) = create_vm(&ram)?;
        let interrupts = InterruptManager::new(vm_fd.clone()).map_err(VmError::Interrupts)?;
        let ctx = DeviceContext {
            config,
            memory: ram.memory(),
            vm: &vm_fd,
            interrupts: &interrupts,
            on_event: on_event.clone(),
        };
        let devices = DeviceManager::build(&ctx, None).map_err(VmError::Devices)?;

        let count = config.cpus.boot_vcpus;
        let kernel = config.payload.kernel.as_deref().ok_or(VmError::NoKernel)?;
        let entry = boot::load_kernel(
            ram.memory(),
            &BootConfig {
                kernel,
                initramfs: config.payload.initramfs.as_deref(),
                cmdline: config.payload.cmdline.as_deref().unwrap_or(""),
                vcpus: count,
            },
        )
        .map_err(VmError::Boot)?;
        let mut fds = Vec::with_capacity(usize::from(count));
        for index in 0..count {
            let vcpu = create_vcpu(&vm_fd, index)?;
            cpu::configure_vcpu(&kvm, &vcpu, index, count)
                .map_err(|source| VmError::Vcpu { index, source })?;
            if index == 0 {
                boot::configure_boot_vcpu(&vcpu, &entry).map_err(VmError::Boot)?;
            }
            fds.push(vcpu);
        }
        Self::start(
            Parts {
                kvm,
                vm_fd,
                ram,
                interrupts,
                devices,
                vcpus: fds,
            },
            on_event,
            true,
        )
    }

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
        let config: ConfigState = take(states, ids::CONFIG, 1)?;
        let config = config.config().map_err(VmError::Config)?;
        let memory: MemoryState = take(states, ids::MEMORY, 1)?;
        let interrupt_state: InterruptState = take(states, ids::INTERRUPTS, 1)?;
        let vcpus: VcpusState = take(states, ids::VCPUS, 1)?;
        let vcpu_states = (0..vcpus.count)
            .map(|index| take::<VcpuState>(states, &ids::vcpu(index), VcpuState::VERSION))
            .collect::<Result<Vec<_>, _>>()?;
        let irqchips: IrqchipsState = take(states, ids::IRQCHIP, IrqchipsState::VERSION)?;
        let pit: PitState = take(states, ids::PIT, 1)?;
        let clock: ClockState = take(states, ids::CLOCK, 1)?;
        let mut platform = PlatformState::from_parts(irqchips, pit.0, clock.0);
        let mut step = Instant::now();
        let Prebuilt { kvm, vm_fd, ram } = match prebuilt {
            Some(prebuilt) if prebuilt.ram.size() == memory.size => prebuilt,
            Some(prebuilt) => {
                return Err(VmError::PrebuiltMismatch {
                    prebuilt: prebuilt.ram.size(),
                    saved: memory.size,
                });
            }
            None => {
                let memfd = incoming
                    .take_file(memory.memfd_token)
                    .map_err(VmError::LiveUpdate)?;
                Prebuilt::new(File::from(memfd))?
            }
        };
        lap(incoming, "create_vm", &mut step);
        // Routes first: devices then claim their MSI groups in the saved order.
        let interrupts = InterruptManager::restore(vm_fd.clone(), &interrupt_state)
            .map_err(VmError::Interrupts)?;
        let ctx = DeviceContext {
            config: &config,
            memory: ram.memory(),
            vm: &vm_fd,
            interrupts: &interrupts,
            on_event: on_event.clone(),
        };
        let states = incoming.states().ok_or(VmError::NoState)?;
        let devices = DeviceManager::build(&ctx, Some(states)).map_err(VmError::Devices)?;
        // Everything saved must have found its owner before the guest runs again.
        let leftovers = states.remaining();
        if !leftovers.is_empty() {
            return Err(VmError::LiveUpdate(MachineError::State(
                StateError::Orphans { ids: leftovers },
            )));
        }
        lap(incoming, "devices", &mut step);

        // The guest's clocks move on by the length of the pause: it must see real time pass,
        // neither jump back nor fall behind.
        let elapsed_ns = realtime_ns().saturating_sub(vcpus.paused_at_ns);
        log::info!(
            "Guest paused {elapsed_ns} ns ago; TSC kHz {:?}, kvmclock {} ns",
            vcpu_states.first().and_then(|v| v.tsc_khz),
            platform.clock.clock
        );
        let mut fds = Vec::with_capacity(vcpu_states.len());
        for index in (0u8..).take(vcpu_states.len()) {
            fds.push(create_vcpu(&vm_fd, index)?);
        }
        lap(incoming, "create_vcpus", &mut step);
        for ((index, state), vcpu) in (0u8..).zip(vcpu_states).zip(&fds) {
            let state = advance_tsc(state, elapsed_ns, vcpu);
            state
                .restore(vcpu)
                .map_err(|source| VmError::Vcpu { index, source })?;
        }
        lap(incoming, "vcpus", &mut step);
        platform.clock.clock = platform.clock.clock.saturating_add(elapsed_ns);
        // Last before running: the PIT and kvmclock start counting from here.
        platform.restore(&vm_fd).map_err(VmError::Platform)?;
        lap(incoming, "platform", &mut step);
        let parts = Parts {
            kvm,
            vm_fd,
            ram,
            interrupts,
            devices,
            vcpus: fds,
        };
        let vm = Self::start(parts, on_event, resume)?;
        lap(incoming, "start", &mut step);
        Ok((vm, config, vcpus.paused_at_ns))
    }

    /// Starts the vCPU threads and device workers; the vCPUs run only with `resume`.
    fn start(
        parts: Parts,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        resume: bool,
    ) -> Result<Self, VmError> {
        let Parts {
            kvm,
            vm_fd,
            ram,
            interrupts,
            mut devices,
            vcpus,
        } = parts;
        let first = vcpus.first().ok_or(VmError::NoVcpu)?;
        let msrs = cpu::supported_msrs_cached(&kvm, first)
            .map_err(|source| VmError::Vcpu { index: 0, source })?;
        let vcpus =
            VcpuSet::start(vcpus, devices.buses(), on_event).map_err(VmError::VcpuThreads)?;
        if resume {
            devices.start_workers().map_err(VmError::Devices)?;
            vcpus.resume();
        }
        Ok(Self {
            vcpus,
            devices,
            interrupts,
            vm_fd,
            ram,
            kvm,
            msrs,
        })
    }

    /// Runs a live update of this VM into `session`: prepare (guest running), freeze (paused,
    /// state saved), then `carrier` takes the session. On failure the VM runs on.
    /// `after_prepare` runs between prepare and freeze, guest still running (e.g. to let a
    /// successor build its VM on the preserved RAM).
    pub fn live_update(
        &mut self,
        config: &VmConfig,
        session: Box<dyn Session>,
        state_file: File,
        after_prepare: impl FnOnce(),
        carrier: impl FnOnce(Box<dyn Session>) -> Result<(), String>,
    ) -> Result<Timings, VmError> {
        let msrs = self.msrs;
        let mut config_part = ConfigParticipant(config);
        let mut memory = MemoryParticipant::new(&self.ram);
        let mut vcpus = VcpusParticipant::new(&self.vcpus);
        let mut each_vcpu: Vec<_> = (0..self.vcpus.vcpus().len())
            .map(|index| VcpuParticipant::new(&self.vcpus, index, msrs))
            .collect();
        let mut interrupts = InterruptsParticipant(&self.interrupts);
        let mut irqchip = irqchip_participant(&self.vm_fd);
        let mut pit = pit_participant(&self.vm_fd);
        let mut clock = clock_participant(&self.vm_fd);
        let mut devices = self.devices.participants();
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
        let mut update = Outgoing::new(session, participants);
        update.prepare().map_err(VmError::LiveUpdate)?;
        let waited = Instant::now();
        after_prepare();
        update.record("after_prepare", waited.elapsed());
        update.freeze(state_file).map_err(VmError::LiveUpdate)?;
        update.handover(carrier).map_err(VmError::LiveUpdate)?;
        Ok(update.timings().clone())
    }

    /// Stops the vCPUs, then the device queue workers: the guest sees time pass, nothing else.
    pub fn pause(&mut self) {
        self.vcpus.pause();
        self.devices.stop_workers();
    }

    /// Restarts device workers, then the vCPUs.
    pub fn resume(&mut self) -> Result<(), VmError> {
        self.devices.start_workers().map_err(VmError::Devices)?;
        self.vcpus.resume();
        Ok(())
    }

    /// Device counters by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.devices.counters()
    }

    /// Terminal input; returns how many bytes the guest's device took.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        self.devices.push_input(bytes)
    }

    /// Guest RAM (for live update and for tests).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// The interrupt routes of the VM.
    pub fn interrupts(&self) -> &InterruptManager {
        &self.interrupts
    }

    /// The KVM system handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}
