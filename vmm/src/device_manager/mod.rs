//! Creates the guest's devices, puts them on the port and MMIO buses, and wires their interrupts
//! (irqfd) and queue notifications (ioeventfd) into KVM.
//!
//! `legacy` builds the port devices, `pci` the virtio-pci devices and their wiring, and
//! `participants` turns each device into a live-update participant. Every device is registered
//! once in `registry` with its participants and its PCI place (`placement`), which a live update
//! saves and the restoring VMM places each device by.
//!
//! `hotplug` places a device on the PCI bus of a running VM (`vm.add-user-device`), and
//! `unplug` takes one off when the guest has released it (and puts a detached one back).
//! `tree` describes where each device sits, for `vm.info`.

mod handover;
mod host_end;
mod hotplug;
mod legacy;
mod net;
mod participants;
mod pci;
mod placement;
mod registry;
#[cfg(test)]
mod test_fixture;
mod tree;
mod unplug;
mod user;
mod vfio;
mod vsock;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use devices::bus::{Bus, BusError, lock};
use devices::legacy::{Cmos, Serial};
use devices::pci::root::SharedPciDevice;
use devices::pci::{BarAllocator, PciError, PciHotplugController, PciHotplugState, PciRoot};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::console::Console;
use devices::virtio::pci::{VirtioPciDevice, VirtioPciError};
use devices::virtio::rng::{Rng, RngConfig, RngError};
use kvm_ioctls::VmFd;
use liveupdate::participant::AnyParticipant;
use liveupdate::state::{StateError, StateSet};
use log::warn;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

use crate::config::{ConsoleConfig, ConsoleMode, VmConfig};
use crate::host_console::{HostEnd, Port};
use crate::interrupts::{InterruptError, InterruptManager, MsiGroupState};
use crate::layout;
use crate::state_format::StateFormat;
use crate::vcpu_thread::{Buses, VcpuEvent};

use handover::CarriedDeviceParticipant;
use host_end::HostEndParticipant;
pub use host_end::{HostEndHandover, HostEndState};
use legacy::{LegacyDevices, add_legacy};
pub use net::{adopt_inherited_fds_for, adopt_inherited_tap_fds, forget_tap_fds, give_tap_fds};
pub(crate) use participants::HandedOverFds;
use participants::{StateOnly, Unregistered, VirtioParticipant, envelope};
use pci::{IoEvents, MmioRelocator, PciBuilder, PendingSlots, VirtioEntry};
pub use placement::{DevicePlacement, MsiPlacement, PciRootState, PciRootStateV1, Placement};
use registry::DeviceRegistry;
pub use tree::{DeviceNode, DeviceTree, PciBarType, Resource, pci_bdf};
#[cfg(test)]
pub(crate) use {net::NetTapState, vfio::DetachedVfioState, vsock::VsockSocketsState};

/// Errors from building the devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// A device could not be placed on a bus.
    #[error("Cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// An interrupt could not be set up.
    #[error("Cannot set up device interrupts")]
    Interrupt(#[source] InterruptError),
    /// An output file could not be opened.
    #[error("Cannot open {path}")]
    OutputFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pty or socket of the serial port or the console could not be set up.
    #[error("Cannot set up the host side of a serial port or console")]
    HostEnd(#[source] crate::host_console::HostEndError),
    /// PCI setup failed (no slot, no BAR space).
    #[error("PCI setup failed")]
    Pci(#[source] PciError),
    /// A virtio transport could not be built.
    #[error("Cannot create virtio device {id}")]
    Virtio {
        /// Device id.
        id: String,
        /// Why.
        #[source]
        source: VirtioPciError,
    },
    /// A disk could not be opened.
    #[error("Cannot open disk {id}")]
    Block {
        /// Device id.
        id: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The entropy source could not be opened.
    #[error("Cannot open the rng source")]
    Rng(#[source] RngError),
    /// KVM refused an ioeventfd.
    #[error("Cannot register a queue notification with KVM")]
    IoEvent(#[source] kvm_ioctls::Error),
    /// A saved device state could not be used.
    #[error("Cannot restore device {id}")]
    Restore {
        /// Device id.
        id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A vfio-user device could not be attached.
    #[error("Cannot attach the vfio-user device at {socket}")]
    UserDevice {
        /// The server's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: vfio_user::UserDeviceError,
    },
    /// The configuration has no vfio-user device at this index.
    #[error("The configuration has no vfio-user device {index}")]
    NoSuchUserDevice {
        /// Index in `user_devices`.
        index: usize,
    },
    /// A network card could not be set up.
    #[error("Cannot set up network card {id}")]
    Net {
        /// Card id.
        id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The vsock device could not be set up.
    #[error("Cannot set up vsock device {id}")]
    Vsock {
        /// Device id.
        id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Its configuration is not usable (e.g. the socket path exists).
    #[error("Invalid vsock configuration")]
    VsockConfig(#[source] crate::config::ConfigError),
    /// The configuration has no network card at this index.
    #[error("The configuration has no network card {index}")]
    NoSuchNet {
        /// Index in `net`.
        index: usize,
    },
    /// The configuration has no VFIO device at this index.
    #[error("The configuration has no VFIO device {index}")]
    NoSuchVfioDevice {
        /// Index in `devices`.
        index: usize,
    },
    /// A device was added without a live-update participant: the VMM restoring the VM after a
    /// live update would not find it.
    #[error("Device {id} has no live-update participant")]
    NoParticipant {
        /// Device id.
        id: String,
    },
    /// A device id was registered twice.
    #[error("Device {id} is registered already")]
    AlreadyRegistered {
        /// Device id.
        id: String,
    },
    /// A hot-add built no PCI device, or more than one.
    #[error("A hot-add must place one PCI device, not {count}")]
    HotAddCount {
        /// How many it placed.
        count: usize,
    },
    /// A kernel VFIO device could not be attached.
    #[error("Cannot attach the VFIO device {}", path.display())]
    Vfio {
        /// Its sysfs path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ::vfio::VfioDeviceError,
    },
    /// A queue worker thread could not start.
    #[error("Cannot start the queue worker of {id}")]
    Worker {
        /// Device id.
        id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// All devices of one VM.
pub struct DeviceManager {
    buses: Buses,
    serial: Option<Arc<Mutex<Serial>>>,
    cmos: Arc<Mutex<Cmos>>,
    pci_root: Arc<Mutex<PciRoot>>,
    console: Option<Arc<Mutex<VirtioPciDevice<Console>>>>,
    /// The ptys and sockets the serial port and the console write to.
    host_ends: Vec<Arc<HostEnd>>,
    virtio: Vec<VirtioEntry>,
    nets: Vec<net::NetSlot>,
    /// Network cards the guest ejected, until the control loop takes note.
    unplugged_nets: Vec<usize>,
    vsock: Option<vsock::VsockSlot>,
    /// The guest ejected the vsock device, until the control loop takes note.
    unplugged_vsock: bool,
    user_devices: Vec<user::UserDeviceEntry>,
    vfio_devices: Vec<vfio::VfioSlot>,
    /// Tells the guest about devices added and devices to release; hears its ejects.
    hotplug: Arc<Mutex<PciHotplugController>>,
    /// What placing a device after boot needs: every PCI function (to find free BAR space),
    /// the next free slot, and where queue notifications are registered.
    pci_devices: Vec<SharedPciDevice>,
    next_slot: u8,
    ioevents: Arc<Mutex<IoEvents>>,
    /// Every device, with its participants and its PCI place: what a live update saves and
    /// what the restoring VMM places each device by.
    registry: DeviceRegistry,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<_> = self.virtio.iter().map(|e| e.id.as_str()).collect();
        f.debug_struct("DeviceManager")
            .field("virtio", &ids)
            .finish_non_exhaustive()
    }
}

/// What building the devices needs from the VM.
pub(crate) struct DeviceContext<'a> {
    /// The VM's configuration.
    pub config: &'a VmConfig,
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
    /// The KVM VM.
    pub vm: &'a Arc<VmFd>,
    /// Interrupt routing.
    pub interrupts: &'a InterruptManager,
    /// Where guest reset requests go.
    pub on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    /// On a restart-mode restore, the fds the previous VMM attached to the session.
    pub handed_over: Option<&'a HandedOverFds>,
}

/// Participant ids of the devices, stable across builds.
pub mod ids {
    /// The COM1 16550.
    pub const SERIAL: &str = "serial/com1";
    /// The CMOS RTC.
    pub const CMOS: &str = "cmos";
    /// The PCI root (host bridge and config address register).
    pub const PCI_ROOT: &str = "pci/root";
    /// The PCI hot-plug controller.
    pub const PCI_HOTPLUG: &str = "pci/hotplug";
    /// A vfio-user device, by its position on the command line.
    pub fn user_device(index: usize) -> String {
        format!("vfio-user/{index}")
    }
    /// A kernel VFIO device, by its position in the configuration.
    pub fn vfio_device(index: usize) -> String {
        format!("vfio/{index}")
    }
    /// A virtio-pci device, by device id.
    pub fn virtio(id: &str) -> String {
        format!("virtio/{id}")
    }
    /// Whether `id` is a virtio device's (one with a queue worker).
    pub fn is_virtio(id: &str) -> bool {
        id.starts_with("virtio/")
    }
    /// The taps of a network card, by card id.
    pub fn net_tap(id: &str) -> String {
        format!("net/{id}")
    }
    /// The host sockets of the vsock device, by device id.
    pub fn vsock_sockets(id: &str) -> String {
        format!("vsock/{id}")
    }
}

fn restore_error(id: &str) -> impl FnOnce(StateError) -> DeviceError + '_ {
    move |e| DeviceError::Restore {
        id: id.to_string(),
        source: Box::new(e),
    }
}

impl DeviceManager {
    /// Builds every device the configuration asks for; with `restore`, each device takes its
    /// saved state instead of its power-on state, and its saved slot and MSI group (by device
    /// id, whatever the build order).
    pub(crate) fn build(
        ctx: &DeviceContext<'_>,
        mut restore: Option<&mut StateSet>,
    ) -> Result<Self, DeviceError> {
        let pio = Arc::new(RwLock::new(Bus::new()));
        let mmio = Arc::new(RwLock::new(Bus::new()));
        let LegacyDevices {
            serial,
            cmos,
            serial_end,
        } = add_legacy(ctx, &pio, restore.as_deref_mut())?;
        let mut host_ends: Vec<_> = serial_end.into_iter().collect();
        let ioevents = Arc::new(Mutex::new(IoEvents::default()));
        let relocator = MmioRelocator {
            vm: ctx.vm.clone(),
            mmio: mmio.clone(),
            ioevents: ioevents.clone(),
        };
        let mut root = PciRoot::new(Some(Arc::new(relocator)));
        let mut registry = DeviceRegistry::default();
        if serial.is_some() {
            registry.register(ids::SERIAL, vec![ids::SERIAL.into()], None)?;
        }
        for id in [ids::CMOS, ids::PCI_ROOT, ids::PCI_HOTPLUG] {
            registry.register(id, vec![id.into()], None)?;
        }
        let mut saved_next_slot = 1;
        let mut saved = None;
        if let Some(states) = restore.as_deref_mut() {
            let state: PciRootState = states
                .take(ids::PCI_ROOT)
                .map_err(restore_error(ids::PCI_ROOT))?;
            root.set_state(&PciRootStateV1 {
                config_address: state.config_address,
            });
            let placement = match state.placement {
                Some(placement) => placement,
                None => Placement::build_order(ctx.config, &ctx.interrupts.save().msi_groups)
                    .map_err(|reason| DeviceError::Restore {
                        id: ids::PCI_ROOT.into(),
                        source: reason.into(),
                    })?,
            };
            saved_next_slot = placement.next_slot;
            saved = Some(placement.by_id());
        }
        let mut pci = PciBuilder {
            root: PendingSlots::new(1),
            bars: BarAllocator::new(layout::PCI_MMIO_START, layout::PCI_MMIO_END),
            ctx,
            ioevents: ioevents.clone(),
            mmio: mmio.clone(),
            restore,
            saved,
            registry,
            virtio: Vec::new(),
        };
        for (index, disk) in ctx.config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{index}"));
            let block = Block::new(&BlockConfig {
                path: disk.path.clone(),
                readonly: disk.readonly,
                serial: disk.id.clone(),
            })
            .map_err(|source| DeviceError::Block {
                id: id.clone(),
                source,
            })?;
            pci.add(block, &id, Vec::new())?;
        }
        let mut console = None;
        if ctx.config.console.mode != ConsoleMode::Off {
            let (output, end) = output_for(
                ctx,
                &ctx.config.console,
                Port::Console,
                pci.restore.as_deref_mut(),
            )?;
            host_ends.extend(end);
            console = Some(pci.add(Console::new(output), "_console", Vec::new())?);
        }
        let rng = Rng::new(&RngConfig {
            src: ctx.config.rng.src.clone(),
        })
        .map_err(DeviceError::Rng)?;
        pci.add(rng, "_rng", Vec::new())?;
        let mut nets = Vec::new();
        for index in 0..ctx.config.net.len() {
            nets.push(pci.add_net(index)?);
        }
        let vsock = pci.add_vsock()?;
        let mut user_devices = Vec::new();
        for (index, device) in ctx.config.user_devices.iter().enumerate() {
            user_devices.push(pci.add_user_device(index, device)?);
        }
        let mut vfio_devices = Vec::new();
        for (index, device) in ctx.config.devices.iter().enumerate() {
            vfio_devices.push(pci.add_vfio_device(index, device)?);
        }
        let mut hotplug_state = None;
        if let Some(states) = pci.restore.as_deref_mut() {
            // States saved before the controller existed have none.
            if states.envelope(ids::PCI_HOTPLUG).is_some() {
                let state: PciHotplugState = states
                    .take(ids::PCI_HOTPLUG)
                    .map_err(restore_error(ids::PCI_HOTPLUG))?;
                hotplug_state = Some(state);
            }
            // The groups of devices removed before the save: no device claims them now.
            let dropped = ctx
                .interrupts
                .drop_unclaimed()
                .map_err(DeviceError::Interrupt)?;
            if !dropped.is_empty() {
                log::debug!("MSI groups of removed devices dropped (first GSIs {dropped:?})");
            }
        }
        let PciBuilder {
            root: slots,
            virtio,
            mut registry,
            saved,
            ..
        } = pci;
        for end in &host_ends {
            let id = host_end::id(end.port());
            registry.register(&id, vec![id.clone()], None)?;
        }
        // Every place the state saved must have found its device.
        if let Some(unplaced) = saved
            .iter()
            .flat_map(|saved| saved.keys())
            .find(|id| registry.get(id).is_none())
        {
            return Err(DeviceError::Restore {
                id: unplaced.clone(),
                source: "the saved state places this device, which the configuration does not \
                         have"
                    .into(),
            });
        }
        let pci_devices = slots.added().iter().map(|(_, d)| d.clone()).collect();
        let hotplug = add_hotplug_controller(ctx, &mmio, hotplug_state, slots.added())?;
        let next_slot = slots
            .commit(&mut root)
            .map_err(DeviceError::Pci)?
            .max(saved_next_slot);
        let pci_root = Arc::new(Mutex::new(root));
        write_bus(&pio)
            .insert(
                pci_root.clone(),
                layout::PCI_CONFIG_PORT,
                devices::pci::root::PCI_CONFIG_IO_PORT_LEN,
            )
            .map_err(DeviceError::Bus)?;
        Ok(Self {
            buses: Buses { pio, mmio },
            serial,
            cmos,
            pci_root,
            console,
            host_ends,
            virtio,
            nets,
            unplugged_nets: Vec::new(),
            vsock,
            unplugged_vsock: false,
            user_devices,
            vfio_devices,
            hotplug,
            pci_devices,
            next_slot,
            ioevents,
            registry,
        })
    }

    /// Where every registered device is, and the slot the next hot-add takes.
    fn placement(&self) -> Placement {
        Placement {
            next_slot: self.next_slot,
            devices: self.registry.placement(),
        }
    }

    /// Checks that the devices' state can be written as `format` reads it: a format without
    /// placement (release 0.1.0) places devices in the order of `config`, so every device
    /// must sit where that order (and the MSI `groups` in their order) puts it.
    pub fn check_state_format(
        &self,
        config: &VmConfig,
        groups: &[MsiGroupState],
        format: StateFormat,
    ) -> Result<(), String> {
        if !format.without_placement() {
            return Ok(());
        }
        self.placement()
            .check_build_order(config, groups)
            .map_err(|why| {
                format!(
                    "Cannot write the VM's state as release {} reads it: that release places the \
                 devices in the order of the configuration, and {why}",
                    format.release
                )
            })
    }

    /// The devices as live-update participants: each pauses (its queue worker stops, after
    /// finishing the requests it holds) and saves its state.
    ///
    /// The list is the registry's: its participants in registration order. A registered
    /// participant this manager has no participant for, or one the registry does not list,
    /// fails the update in prepare, while the VM runs on.
    ///
    /// The PCI root's state is written as `format` reads it (see [`Self::check_state_format`]).
    pub fn participants(&mut self, format: StateFormat) -> Vec<Box<dyn AnyParticipant + '_>> {
        let registry = &self.registry;
        let mut list: Vec<Box<dyn AnyParticipant + '_>> = Vec::new();
        if let Some(serial) = &self.serial {
            list.push(Box::new(StateOnly {
                id: ids::SERIAL.into(),
                save: Box::new(move || envelope(ids::SERIAL, &lock(serial).state())),
            }));
        }
        let cmos = &self.cmos;
        list.push(Box::new(StateOnly {
            id: ids::CMOS.into(),
            save: Box::new(move || envelope(ids::CMOS, &lock(cmos).state())),
        }));
        let root = &self.pci_root;
        let placement = self.placement();
        list.push(Box::new(StateOnly {
            id: ids::PCI_ROOT.into(),
            save: Box::new(move || {
                let register = lock(root).state();
                if format.without_placement() {
                    return envelope(ids::PCI_ROOT, &register);
                }
                let state = PciRootState {
                    config_address: register.config_address,
                    placement: Some(placement.clone()),
                };
                envelope(ids::PCI_ROOT, &state)
            }),
        }));
        let hotplug = &self.hotplug;
        list.push(Box::new(StateOnly {
            id: ids::PCI_HOTPLUG.into(),
            save: Box::new(move || envelope(ids::PCI_HOTPLUG, &lock(hotplug).state())),
        }));
        for entry in &mut self.virtio {
            list.push(Box::new(VirtioParticipant {
                entry,
                was_running: false,
            }));
        }
        for slot in &self.nets {
            if let net::NetSlot::Attached(entry) = slot {
                list.push(Box::new(net::NetTapParticipant { entry }));
            }
        }
        if let Some(vsock::VsockSlot::Attached(entry)) = &self.vsock {
            list.push(Box::new(vsock::VsockSocketsParticipant { entry }));
        }
        for end in &self.host_ends {
            list.push(Box::new(HostEndParticipant {
                end,
                handover: None,
            }));
        }
        for entry in &self.user_devices {
            list.push(Box::new(CarriedDeviceParticipant { entry }));
        }
        for slot in &self.vfio_devices {
            match slot {
                vfio::VfioSlot::Attached(entry) => {
                    list.push(Box::new(CarriedDeviceParticipant { entry }));
                }
                vfio::VfioSlot::Detached(detached) => {
                    let state = vfio::DetachedVfioState {
                        slot: detached.slot,
                        reattach_after_update: detached.reattach_after_update,
                    };
                    let id = detached.id.clone();
                    list.push(Box::new(StateOnly {
                        id: id.clone(),
                        save: Box::new(move || envelope(&id, &state)),
                    }));
                }
            }
        }
        let mut built: BTreeMap<String, Box<dyn AnyParticipant + '_>> =
            list.into_iter().map(|p| (p.id(), p)).collect();
        let mut walked: Vec<Box<dyn AnyParticipant + '_>> = registry
            .participant_ids()
            .map(|id| {
                built.remove(id).unwrap_or_else(|| {
                    Box::new(Unregistered {
                        id: id.to_string(),
                        reason: "registered, but its device has no participant to save it",
                    })
                })
            })
            .collect();
        walked.extend(built.into_keys().map(|id| {
            Box::new(Unregistered {
                id,
                reason: "its device is missing from the device registry",
            }) as Box<dyn AnyParticipant + '_>
        }));
        walked
    }

    /// The taps this VMM created again after a kexec (the host must attach them again).
    pub fn recreated_taps(&self) -> Vec<String> {
        self.nets
            .iter()
            .filter_map(|slot| match slot {
                net::NetSlot::Attached(entry) if entry.recreated => {
                    Some(entry.tap_name().to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// The buses the vCPUs route their exits to.
    pub fn buses(&self) -> &Buses {
        &self.buses
    }

    /// Starts the queue workers (at boot and on resume).
    pub fn start_workers(&mut self) -> Result<(), DeviceError> {
        for entry in &mut self.virtio {
            if entry.worker.is_none() {
                let worker = entry
                    .device
                    .start_worker()
                    .map_err(|source| DeviceError::Worker {
                        id: entry.id.clone(),
                        source,
                    })?;
                entry.worker = Some(worker);
            }
        }
        Ok(())
    }

    /// Stops the queue workers; requests in flight complete first.
    pub fn stop_workers(&mut self) {
        for entry in &mut self.virtio {
            if let Some(worker) = entry.worker.take() {
                worker.stop();
            }
        }
    }

    /// Counters of every device, by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut all: BTreeMap<String, BTreeMap<String, u64>> = self
            .virtio
            .iter()
            .map(|e| (e.id.clone(), e.device.counters()))
            .collect();
        if let Some(serial) = &self.serial {
            let c = lock(serial).counters();
            all.insert(
                "_serial".into(),
                BTreeMap::from([
                    ("out_bytes".to_string(), c.bytes_out),
                    ("in_bytes".to_string(), c.bytes_in),
                ]),
            );
        }
        all
    }

    /// Host input for the serial port or the console. Returns how many bytes were taken;
    /// the rest must be offered again later (the serial FIFO is full).
    pub fn push_input(&mut self, port: Port, bytes: &[u8]) -> usize {
        match (port, &self.serial, &self.console) {
            (Port::Serial, Some(serial), _) => match lock(serial).enqueue_input(bytes) {
                Ok(n) => n,
                Err(e) => {
                    warn!("Serial input: {e}");
                    bytes.len()
                }
            },
            (Port::Console, _, Some(console)) => {
                let mut console = lock(console);
                let dropped = console.device_mut().push_input(bytes);
                if dropped > 0 {
                    warn!("Console input buffer full: {dropped} bytes dropped");
                }
                console.kick(0);
                bytes.len()
            }
            _ => bytes.len(),
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Environment variable that makes devices whose host side no kernel can carry (taps, vsock
/// sockets) hand it over as across a kexec even in restart mode (set to `1`): a test hook, so
/// what the VMM restoring after a kexec does is proved on a host without a kexec. The old
/// VMM's taps and sockets then close when it exits, as a kexec would close them.
pub const AS_ACROSS_KEXEC_ENV: &str = "CHV_TEST_AS_ACROSS_KEXEC";

fn as_across_kexec() -> bool {
    std::env::var(AS_ACROSS_KEXEC_ENV).is_ok_and(|v| v == "1")
}

/// The PCI hot-plug controller on the MMIO bus, with `state` on a restore; at boot it knows
/// the devices in `placed` as present.
fn add_hotplug_controller(
    ctx: &DeviceContext<'_>,
    mmio: &RwLock<Bus>,
    state: Option<PciHotplugState>,
    placed: &[(u8, SharedPciDevice)],
) -> Result<Arc<Mutex<PciHotplugController>>, DeviceError> {
    let irq = ctx
        .interrupts
        .legacy_line(layout::PCI_HOTPLUG_IRQ)
        .map_err(DeviceError::Interrupt)?;
    let on_event = ctx.on_event.clone();
    let mut controller = PciHotplugController::new(
        state.unwrap_or_default(),
        irq,
        Box::new(move || {
            on_event(VcpuEvent::DeviceEjected);
            Ok(())
        }),
    );
    if state.is_none() {
        for (slot, _) in placed {
            controller.set_present(*slot, true);
        }
    }
    let controller = Arc::new(Mutex::new(controller));
    write_bus(mmio)
        .insert(
            controller.clone(),
            layout::PCI_HOTPLUG_START,
            layout::PCI_HOTPLUG_SIZE,
        )
        .map_err(DeviceError::Bus)?;
    Ok(controller)
}

/// Takes a bus for writing; a poisoned lock still holds a consistent bus (inserts are atomic).
fn write_bus(bus: &RwLock<Bus>) -> RwLockWriteGuard<'_, Bus> {
    bus.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a serial port or console writes the guest's output.
type GuestOutput = Box<dyn Write + Send>;

/// Where the output of `port` goes, as `config` says, and its pty or socket if it has one
/// (from the saved handover on a restore).
fn output_for(
    ctx: &DeviceContext<'_>,
    config: &ConsoleConfig,
    port: Port,
    restore: Option<&mut StateSet>,
) -> Result<(GuestOutput, Option<Arc<HostEnd>>), DeviceError> {
    if let Some(end) = host_end::host_end(port, config, restore, ctx.handed_over)? {
        return Ok((end.writer(), Some(end)));
    }
    let output: GuestOutput = match config.mode {
        ConsoleMode::Tty => Box::new(io::stdout()),
        ConsoleMode::File => {
            // Appended to, never truncated: after a reboot or a live update the guest's earlier
            // output stays in the file.
            let path = config.file.clone().unwrap_or_default();
            let file = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| DeviceError::OutputFile { path, source })?;
            Box::new(file)
        }
        // Pty and Socket have an end (above).
        ConsoleMode::Null | ConsoleMode::Off | ConsoleMode::Pty | ConsoleMode::Socket => {
            Box::new(io::sink())
        }
    };
    Ok((output, None))
}
