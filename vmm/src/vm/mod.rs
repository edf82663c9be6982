//! One running VM: KVM VM, guest RAM, vCPU threads and devices, built in the order KVM needs.
//! Saving a VM into a live-update session and rebuilding it from one is in `live_update`.

mod live_update;

pub use live_update::{PauseSpan, Prebuilt};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use liveupdate::machine::MachineError;
use thiserror::Error;

use crate::boot::{self, BootConfig, BootError};
use crate::config::VmConfig;
use crate::cpu::{self, CpuError, VcpuSetup};
use crate::device_manager::{DeviceContext, DeviceError, DeviceManager};
use crate::interrupts::{InterruptError, InterruptManager};
use crate::memory::{GuestRam, MemoryError};
use crate::platform::{self, PlatformError};
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
    /// The caller stopped the live update after prepare, before the pause (it was cancelled).
    #[error("The live update was stopped before the pause: {0}")]
    UpdateStopped(String),
    /// A VM needs at least one vCPU.
    #[error("The VM has no vCPU")]
    NoVcpu,
    /// The saved VM configuration does not parse.
    #[error("The saved VM configuration is invalid")]
    Config(#[source] crate::config::ConfigError),
    /// The fault injector's `fail@STEP` (a test hook, see `liveupdate::fault`).
    #[error("Fault injected for a test: {0}")]
    Fault(String),
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

/// What a VM is made of, its vCPU threads started (paused).
struct Parts {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    interrupts: InterruptManager,
    devices: DeviceManager,
    vcpus: VcpuSet,
    /// The MSRs a vCPU state carries (see [`Vm`]).
    msrs: &'static [u32],
    /// What each vCPU was given before it first ran (see [`Vm`]).
    setups: Arc<[VcpuSetup]>,
}

/// A KVM VM with `ram` registered as its memory, and its irqchip and PIT.
fn create_vm(ram: &GuestRam) -> Result<(Kvm, Arc<VmFd>), VmError> {
    create_vm_timed(ram).map(|(kvm, vm_fd, _)| (kvm, vm_fd))
}

/// The named steps of [`create_vm_timed`], and their times.
type CreateVmSteps = [(&'static str, Duration); 3];

/// [`create_vm`], with the time of each step: the KVM VM (`kvm_vm`), RAM registered
/// (`memslots`), irqchip and PIT (`irqchip`). In that order: making the irqchip leaves KVM
/// waiting out a grace period that the next memory slot change must wait for too (5-10 ms on
/// this development host, whatever the slot's size), where the changes before it take no such
/// wait. The irqchip must exist before any vCPU (KVM creates each vCPU's LAPIC from it).
fn create_vm_timed(ram: &GuestRam) -> Result<(Kvm, Arc<VmFd>, CreateVmSteps), VmError> {
    let start = Instant::now();
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
    let made = Instant::now();
    ram.register(&vm_fd).map_err(VmError::Memory)?;
    let registered = Instant::now();
    platform::create_platform(&vm_fd).map_err(VmError::Platform)?;
    let steps = [
        ("kvm_vm", made - start),
        ("memslots", registered - made),
        ("irqchip", registered.elapsed()),
    ];
    Ok((kvm, vm_fd, steps))
}

fn create_vcpu(vm_fd: &VmFd, index: u8) -> Result<VcpuFd, VmError> {
    vm_fd
        .create_vcpu(u64::from(index))
        .map_err(|source| VmError::CreateVcpu { index, source })
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
    /// Each vCPU's CPUID table and TSC rate, as given before it first ran: its saves carry
    /// them without asking KVM.
    setups: Arc<[VcpuSetup]>,
}

impl Vm {
    /// Builds the VM described by `config`, loads its kernel and starts it running.
    pub fn boot(
        config: &VmConfig,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    ) -> Result<Self, VmError> {
        let ram = GuestRam::new_for_vcpus(config.memory.size, config.cpus.boot_vcpus)
            .map_err(VmError::Memory)?;
        let (kvm, vm_fd) = create_vm(&ram)?;
        let interrupts = InterruptManager::new(vm_fd.clone()).map_err(VmError::Interrupts)?;
        let ctx = DeviceContext {
            config,
            memory: ram.memory(),
            vm: &vm_fd,
            interrupts: &interrupts,
            on_event: on_event.clone(),
            handed_over: None,
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
        let mut setups = Vec::with_capacity(usize::from(count));
        for index in 0..count {
            let vcpu = create_vcpu(&vm_fd, index)?;
            setups.push(
                cpu::configure_vcpu(&kvm, &vcpu, index, count)
                    .map_err(|source| VmError::Vcpu { index, source })?,
            );
            if index == 0 {
                boot::configure_boot_vcpu(&vcpu, &entry).map_err(VmError::Boot)?;
            }
            fds.push(vcpu);
        }
        let first = fds.first().ok_or(VmError::NoVcpu)?;
        let msrs = cpu::supported_msrs_cached(&kvm, first)
            .map_err(|source| VmError::Vcpu { index: 0, source })?;
        let vcpus = VcpuSet::start(fds, devices.buses(), on_event).map_err(VmError::VcpuThreads)?;
        let parts = Parts {
            kvm,
            vm_fd,
            ram,
            interrupts,
            devices,
            vcpus,
            msrs,
            setups: setups.into(),
        };
        Self::start(parts, true).map(|(vm, _)| vm)
    }

    /// With `resume`, lets the vCPUs run, then starts the device queue workers: a queue the
    /// guest kicks meanwhile waits in its eventfd, and each worker goes through every queue as
    /// it starts. Also returns when it let the vCPUs run (without `resume`, when it was
    /// called): host realtime, ns since the epoch.
    fn start(parts: Parts, resume: bool) -> Result<(Self, u64), VmError> {
        let Parts {
            kvm,
            vm_fd,
            ram,
            interrupts,
            mut devices,
            vcpus,
            msrs,
            setups,
        } = parts;
        let let_run_ns = crate::live_update::participants::realtime_ns();
        if resume {
            vcpus.resume();
            devices.start_workers().map_err(VmError::Devices)?;
        }
        let vm = Self {
            vcpus,
            devices,
            interrupts,
            vm_fd,
            ram,
            kvm,
            msrs,
            setups,
        };
        Ok((vm, let_run_ns))
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

    /// Attaches the last vfio-user device of `config` (the VM's configuration with the device
    /// appended) to the running VM, places it on the PCI bus and tells the guest (the PCI
    /// hot-plug controller); returns its slot. On error the VM is as before.
    pub fn add_user_device(&mut self, config: &VmConfig) -> Result<u8, DeviceError> {
        let index = config.user_devices.len().saturating_sub(1);
        self.hot_add(config, |devices, ctx| {
            devices.hot_add_user_device(ctx, index)
        })
    }

    /// Attaches the last kernel VFIO device of `config` (the VM's configuration with the
    /// device appended) to the running VM and places it on the PCI bus; returns its slot. As
    /// [`Self::add_user_device`], the guest is told; on error the VM is as before.
    pub fn add_vfio_device(&mut self, config: &VmConfig) -> Result<u8, DeviceError> {
        let index = config.devices.len().saturating_sub(1);
        self.hot_add(config, |devices, ctx| {
            devices.hot_add_vfio_device(ctx, index)
        })
    }

    /// Attaches the last network card of `config` (the VM's configuration with the card
    /// appended) to the running VM; returns its slot. On error the VM is as before.
    pub fn add_net(&mut self, config: &VmConfig) -> Result<u8, DeviceError> {
        let index = config.net.len().saturating_sub(1);
        self.hot_add(config, |devices, ctx| devices.hot_add_net(ctx, index))
    }

    /// The PCI slot of VFIO device `index` while it is attached.
    pub fn attached_vfio_slot(&self, index: usize) -> Option<u8> {
        self.devices.attached_vfio_slot(index)
    }

    /// Detached VFIO devices by index, each with whether a live update detached it.
    pub fn detached_vfio_devices(&self) -> Vec<(usize, bool)> {
        self.devices.detached_vfio_devices()
    }

    /// Asks the guest to release the device in `slot` (an ACPI eject request).
    pub fn request_removal(&self, slot: u8) -> Result<(), DeviceError> {
        self.devices.request_removal(slot)
    }

    /// Withdraws a removal request the guest has not acted on.
    pub fn withdraw_removal(&self, slot: u8) {
        self.devices.withdraw_removal(slot);
    }

    /// Takes the devices the guest ejected off the bus (`for_update`: VFIO indices a live
    /// update detaches). Returns the VFIO indices detached.
    pub fn detach_ejected(&mut self, for_update: &[usize]) -> Vec<usize> {
        self.devices.detach_ejected(&self.vm_fd, for_update)
    }

    /// The network cards the guest ejected since the last call, by index.
    pub fn take_unplugged_nets(&mut self) -> Vec<usize> {
        self.devices.take_unplugged_nets()
    }

    /// Attaches the vsock device of `config` (the VM's configuration with it added) to the
    /// running VM; returns its slot. On error the VM is as before.
    pub fn add_vsock(&mut self, config: &VmConfig) -> Result<u8, DeviceError> {
        self.hot_add(config, |devices, ctx| devices.hot_add_vsock(ctx))
    }

    /// Whether the guest ejected the vsock device since the last call.
    pub fn take_unplugged_vsock(&mut self) -> bool {
        self.devices.take_unplugged_vsock()
    }

    /// The PCI slot of the vsock device while it is attached.
    pub fn attached_vsock_slot(&self) -> Option<u8> {
        self.devices.attached_vsock_slot()
    }

    /// The PCI slot of network card `index` while it is attached.
    pub fn attached_net_slot(&self, index: usize) -> Option<u8> {
        self.devices.attached_net_slot(index)
    }

    /// Attaches detached VFIO device `index` of `config` again, in its slot, and tells the
    /// guest; returns the slot.
    pub fn reattach_vfio_device(
        &mut self,
        config: &VmConfig,
        index: usize,
    ) -> Result<u8, DeviceError> {
        self.hot_add(config, |devices, ctx| {
            devices.reattach_vfio_device(ctx, index)
        })
    }

    /// Runs `add` on the device manager with this running VM's device context.
    fn hot_add(
        &mut self,
        config: &VmConfig,
        add: impl FnOnce(&mut DeviceManager, &DeviceContext<'_>) -> Result<u8, DeviceError>,
    ) -> Result<u8, DeviceError> {
        let ctx = DeviceContext {
            config,
            memory: self.ram.memory(),
            vm: &self.vm_fd,
            interrupts: &self.interrupts,
            // Only the legacy devices, built at boot, raise VM events.
            on_event: Arc::new(|_| {}),
            handed_over: None,
        };
        add(&mut self.devices, &ctx)
    }

    /// Device counters by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.devices.counters()
    }

    /// Where each device sits (`vm.info`'s `device_tree`); `config` is the VM's configuration,
    /// removed devices included.
    pub fn device_tree(
        &self,
        config: &crate::config::VmConfig,
    ) -> crate::device_manager::DeviceTree {
        self.devices.device_tree(config)
    }

    /// The taps this VMM created again after a kexec.
    pub fn recreated_taps(&self) -> Vec<String> {
        self.devices.recreated_taps()
    }

    /// Host input for the serial port or the console; returns how many bytes the guest's
    /// device took.
    pub fn push_input(&mut self, port: crate::host_console::Port, bytes: &[u8]) -> usize {
        self.devices.push_input(port, bytes)
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
