//! Creates the guest's devices, puts them on the port and MMIO buses, and wires their interrupts
//! (irqfd) and queue notifications (ioeventfd) into KVM.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};

use devices::bus::{Bus, BusError, lock};
use devices::legacy::{Cmos, CmosState, I8042, Serial, SerialState, system_clock};
use devices::pci::{
    BarAllocator, BarRelocator, PciBarRegion, PciDevice, PciError, PciRoot, PciRootState,
};
use devices::virtio::block::{Block, BlockConfig, BlockError};
use devices::virtio::console::Console;
use devices::virtio::device::VirtioDevice;
use devices::virtio::pci::{
    BAR_SIZE, QueueWorker, VirtioPciDevice, VirtioPciError, spawn_queue_worker,
};
use devices::virtio::rng::{Rng, RngConfig, RngError};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::state::{Envelope, StateError, StateSet};
use log::warn;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleConfig, ConsoleMode, VmConfig};
use crate::interrupts::{InterruptError, InterruptManager};
use crate::layout;
use crate::vcpu_thread::{Buses, VcpuEvent};

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
    /// A console mode we do not implement.
    #[error("{device} mode {mode:?} is not supported")]
    UnsupportedMode {
        /// "serial" or "console".
        device: &'static str,
        /// The mode.
        mode: ConsoleMode,
    },
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

/// A virtio-pci device of any type, as the manager drives it.
trait ManagedVirtio: Send + Sync {
    fn start_worker(&self) -> io::Result<QueueWorker>;
    fn counters(&self) -> BTreeMap<String, u64>;
    fn save(&self, id: &str) -> Result<Envelope, postcard::Error>;
}

/// Version of `VirtioPciState` in the state blob.
const VIRTIO_STATE_VERSION: u16 = 1;

impl<D: VirtioDevice + 'static> ManagedVirtio for Arc<Mutex<VirtioPciDevice<D>>> {
    fn start_worker(&self) -> io::Result<QueueWorker> {
        spawn_queue_worker(self.clone())
    }
    fn counters(&self) -> BTreeMap<String, u64> {
        lock(self).counters()
    }
    fn save(&self, id: &str) -> Result<Envelope, postcard::Error> {
        Envelope::wrap(id, VIRTIO_STATE_VERSION, &lock(self).state())
    }
}

struct VirtioEntry {
    id: String,
    device: Box<dyn ManagedVirtio>,
    worker: Option<QueueWorker>,
}

/// Where each BAR's queue notifications are registered, so a BAR move can follow.
#[derive(Default)]
struct IoEvents {
    by_bar: BTreeMap<u64, Vec<(u64, EventFd)>>,
}

/// Moves a BAR on the MMIO bus and its ioeventfds in KVM when the guest reprograms it.
struct MmioRelocator {
    vm: Arc<VmFd>,
    mmio: Arc<RwLock<Bus>>,
    ioevents: Arc<Mutex<IoEvents>>,
}

impl BarRelocator for MmioRelocator {
    fn move_bar(&self, old_base: u64, new_base: u64, len: u64) -> io::Result<()> {
        {
            let mut mmio = write_bus(&self.mmio);
            let device = mmio.remove(old_base).map_err(io::Error::other)?;
            mmio.insert(device, new_base, len)
                .map_err(io::Error::other)?;
        }
        let mut ioevents = lock(&self.ioevents);
        if let Some(events) = ioevents.by_bar.remove(&old_base) {
            for (offset, evt) in &events {
                self.vm
                    .unregister_ioevent(evt, &IoEventAddress::Mmio(old_base + offset), NoDatamatch)
                    .map_err(io::Error::other)?;
                self.vm
                    .register_ioevent(evt, &IoEventAddress::Mmio(new_base + offset), NoDatamatch)
                    .map_err(io::Error::other)?;
            }
            ioevents.by_bar.insert(new_base, events);
        }
        Ok(())
    }
}

/// All devices of one VM.
pub struct DeviceManager {
    buses: Buses,
    serial: Option<Arc<Mutex<Serial>>>,
    cmos: Arc<Mutex<Cmos>>,
    pci_root: Arc<Mutex<PciRoot>>,
    serial_is_tty: bool,
    console: Option<Arc<Mutex<VirtioPciDevice<Console>>>>,
    console_is_tty: bool,
    virtio: Vec<VirtioEntry>,
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
}

/// Participant ids of the devices, stable across builds.
pub mod ids {
    /// The COM1 16550.
    pub const SERIAL: &str = "serial/com1";
    /// The CMOS RTC.
    pub const CMOS: &str = "cmos";
    /// The PCI root (host bridge and config address register).
    pub const PCI_ROOT: &str = "pci/root";
    /// A virtio-pci device, by device id.
    pub fn virtio(id: &str) -> String {
        format!("virtio/{id}")
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
    /// saved state instead of its power-on state. Devices are always built in the same order,
    /// so MSI vector groups line up with the restored interrupt routes.
    pub(crate) fn build(
        ctx: &DeviceContext<'_>,
        mut restore: Option<&mut StateSet>,
    ) -> Result<Self, DeviceError> {
        let pio = Arc::new(RwLock::new(Bus::new()));
        let mmio = Arc::new(RwLock::new(Bus::new()));
        let LegacyDevices { serial, cmos } = add_legacy(ctx, &pio, restore.as_deref_mut())?;
        let ioevents = Arc::new(Mutex::new(IoEvents::default()));
        let relocator = MmioRelocator {
            vm: ctx.vm.clone(),
            mmio: mmio.clone(),
            ioevents: ioevents.clone(),
        };
        let mut pci = PciBuilder {
            root: PciRoot::new(Some(Arc::new(relocator))),
            bars: BarAllocator::new(layout::PCI_MMIO_START, layout::PCI_MMIO_END),
            ctx,
            ioevents,
            mmio: mmio.clone(),
            restore,
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
            pci.add(block, &id)?;
        }
        let mut console = None;
        if ctx.config.console.mode != ConsoleMode::Off {
            let device = Console::new(output_for(&ctx.config.console, "console")?);
            console = Some(pci.add(device, "_console")?);
        }
        let rng = Rng::new(&RngConfig {
            src: ctx.config.rng.src.clone(),
        })
        .map_err(DeviceError::Rng)?;
        pci.add(rng, "_rng")?;
        if let Some(states) = pci.restore.as_deref_mut() {
            let state: PciRootState = states
                .take(ids::PCI_ROOT, PCI_ROOT_STATE_VERSION)
                .map_err(restore_error(ids::PCI_ROOT))?;
            pci.root.set_state(&state);
        }
        let virtio = std::mem::take(&mut pci.virtio);
        let pci_root = Arc::new(Mutex::new(pci.root));
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
            serial_is_tty: ctx.config.serial.mode == ConsoleMode::Tty,
            console,
            console_is_tty: ctx.config.console.mode == ConsoleMode::Tty,
            virtio,
        })
    }

    /// The devices as live-update participants: each pauses (its queue worker stops, after
    /// finishing the requests it holds) and saves its state.
    pub fn participants(&mut self) -> Vec<Box<dyn AnyParticipant + '_>> {
        let mut list: Vec<Box<dyn AnyParticipant + '_>> = Vec::new();
        if let Some(serial) = &self.serial {
            list.push(Box::new(StateOnly {
                id: ids::SERIAL,
                save: Box::new(move || {
                    envelope(ids::SERIAL, SERIAL_STATE_VERSION, &lock(serial).state())
                }),
            }));
        }
        let cmos = &self.cmos;
        list.push(Box::new(StateOnly {
            id: ids::CMOS,
            save: Box::new(move || envelope(ids::CMOS, CMOS_STATE_VERSION, &lock(cmos).state())),
        }));
        let root = &self.pci_root;
        list.push(Box::new(StateOnly {
            id: ids::PCI_ROOT,
            save: Box::new(move || {
                envelope(ids::PCI_ROOT, PCI_ROOT_STATE_VERSION, &lock(root).state())
            }),
        }));
        for entry in &mut self.virtio {
            list.push(Box::new(VirtioParticipant { entry }));
        }
        list
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

    /// Terminal input: to the serial port or the console, whichever uses the terminal.
    /// Returns how many bytes were taken; the rest must be offered again later.
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial_is_tty
            && let Some(serial) = &self.serial
        {
            return match lock(serial).enqueue_input(bytes) {
                Ok(n) => n,
                Err(e) => {
                    warn!("Serial input: {e}");
                    bytes.len()
                }
            };
        }
        if self.console_is_tty
            && let Some(console) = &self.console
        {
            let mut console = lock(console);
            let dropped = console.device_mut().push_input(bytes);
            if dropped > 0 {
                warn!("Console input buffer full: {dropped} bytes dropped");
            }
            console.kick(0);
            return bytes.len();
        }
        bytes.len()
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

struct PciBuilder<'a, 'b, 's> {
    root: PciRoot,
    bars: BarAllocator,
    ctx: &'a DeviceContext<'b>,
    ioevents: Arc<Mutex<IoEvents>>,
    mmio: Arc<RwLock<Bus>>,
    restore: Option<&'s mut StateSet>,
    virtio: Vec<VirtioEntry>,
}

impl PciBuilder<'_, '_, '_> {
    /// Wraps `device` in a virtio-pci transport (fresh, or from its saved state), plugs it into
    /// a slot and its BAR into the MMIO bus, and registers its queue notifications with KVM.
    fn add<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        id: &str,
    ) -> Result<Arc<Mutex<VirtioPciDevice<D>>>, DeviceError> {
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
        let msi = self
            .ctx
            .interrupts
            .msi_vectors(vectors)
            .map_err(DeviceError::Interrupt)?;
        let memory = self.ctx.memory.clone();
        let virtio_error = |source| DeviceError::Virtio {
            id: id.to_string(),
            source,
        };
        let transport = match self.restore.as_deref_mut() {
            Some(states) => {
                let key = ids::virtio(id);
                let state = states
                    .take(&key, VIRTIO_STATE_VERSION)
                    .map_err(restore_error(&key))?;
                VirtioPciDevice::from_state(device, state, memory, msi).map_err(virtio_error)?
            }
            None => {
                let bar = self.bars.allocate(BAR_SIZE).map_err(DeviceError::Pci)?;
                VirtioPciDevice::new(device, memory, msi, bar).map_err(virtio_error)?
            }
        };
        // The guest may have moved the BAR: use where it is now, not where we first put it.
        let bar = transport.bars().first().map_or(0, |b| b.address);
        let mut events = Vec::new();
        for (offset, evt) in transport.ioeventfds() {
            self.ctx
                .vm
                .register_ioevent(evt, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                .map_err(DeviceError::IoEvent)?;
            let clone = evt.try_clone().map_err(|source| DeviceError::Worker {
                id: id.to_string(),
                source,
            })?;
            events.push((offset, clone));
        }
        lock(&self.ioevents).by_bar.insert(bar, events);
        let transport = Arc::new(Mutex::new(transport));
        self.root
            .add_device(transport.clone())
            .map_err(DeviceError::Pci)?;
        write_bus(&self.mmio)
            .insert(
                Arc::new(Mutex::new(PciBarRegion::new(transport.clone(), 0))),
                bar,
                BAR_SIZE,
            )
            .map_err(DeviceError::Bus)?;
        self.virtio.push(VirtioEntry {
            id: id.to_string(),
            device: Box::new(transport.clone()),
            worker: None,
        });
        Ok(transport)
    }
}

/// Versions of the device states in the state blob.
const SERIAL_STATE_VERSION: u16 = 1;
const CMOS_STATE_VERSION: u16 = 1;
const PCI_ROOT_STATE_VERSION: u16 = 1;

/// Serial (COM1), i8042 and CMOS on the port bus. The i8042 holds no state worth carrying.
fn add_legacy(
    ctx: &DeviceContext<'_>,
    pio: &RwLock<Bus>,
    mut restore: Option<&mut StateSet>,
) -> Result<LegacyDevices, DeviceError> {
    let mut pio = write_bus(pio);
    let mut serial = None;
    if ctx.config.serial.mode != ConsoleMode::Off {
        let irq = ctx
            .interrupts
            .legacy_line(layout::COM1_IRQ)
            .map_err(DeviceError::Interrupt)?;
        let output = output_for(&ctx.config.serial, "serial")?;
        let device = match restore.as_deref_mut() {
            Some(states) => {
                let state: SerialState = states
                    .take(ids::SERIAL, SERIAL_STATE_VERSION)
                    .map_err(restore_error(ids::SERIAL))?;
                Serial::from_state(&state, irq, output).map_err(|e| DeviceError::Restore {
                    id: ids::SERIAL.into(),
                    source: Box::new(e),
                })?
            }
            None => Serial::new(irq, output),
        };
        let device = Arc::new(Mutex::new(device));
        pio.insert(
            device.clone(),
            layout::COM1_PORT,
            devices::legacy::SERIAL_PORT_LEN,
        )
        .map_err(DeviceError::Bus)?;
        serial = Some(device);
    }
    let on_event = ctx.on_event.clone();
    let i8042 = I8042::new(Box::new(move || {
        on_event(VcpuEvent::Reset);
        Ok(())
    }));
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        layout::I8042_PORT,
        devices::legacy::I8042_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;
    let cmos = match restore {
        Some(states) => {
            let state: CmosState = states
                .take(ids::CMOS, CMOS_STATE_VERSION)
                .map_err(restore_error(ids::CMOS))?;
            Cmos::from_state(&state, system_clock()).map_err(|e| DeviceError::Restore {
                id: ids::CMOS.into(),
                source: Box::new(e),
            })?
        }
        None => Cmos::new(ctx.config.memory.size, system_clock()),
    };
    let cmos = Arc::new(Mutex::new(cmos));
    pio.insert(
        cmos.clone(),
        layout::CMOS_PORT,
        devices::legacy::CMOS_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;
    Ok(LegacyDevices { serial, cmos })
}

/// The legacy devices that have state.
struct LegacyDevices {
    serial: Option<Arc<Mutex<Serial>>>,
    cmos: Arc<Mutex<Cmos>>,
}

fn envelope<S: serde::Serialize>(
    id: &str,
    version: u16,
    state: &S,
) -> Result<Envelope, ParticipantError> {
    Envelope::wrap(id, version, state).map_err(|e| ParticipantError::BadState {
        id: id.to_string(),
        source: Box::new(e),
    })
}

/// A device that only needs its state saved: it changes only when a vCPU touches it, and the
/// vCPUs are paused before any device saves.
struct StateOnly<'a> {
    id: &'static str,
    save: Box<dyn Fn() -> Result<Envelope, ParticipantError> + 'a>,
}

impl AnyParticipant for StateOnly<'_> {
    fn id(&self) -> String {
        self.id.to_string()
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        (self.save)()
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// A virtio-pci device: its queue worker stops on pause, after completing what it holds.
struct VirtioParticipant<'a> {
    entry: &'a mut VirtioEntry,
}

impl AnyParticipant for VirtioParticipant<'_> {
    fn id(&self) -> String {
        ids::virtio(&self.entry.id)
    }
    fn prepare(&mut self, _files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        Ok(())
    }
    fn pause(&mut self) -> Result<(), ParticipantError> {
        if let Some(worker) = self.entry.worker.take() {
            worker.stop();
        }
        Ok(())
    }
    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let id = ids::virtio(&self.entry.id);
        self.entry
            .device
            .save(&id)
            .map_err(|e| ParticipantError::BadState {
                id: id.clone(),
                source: Box::new(e),
            })
    }
    fn resume(&mut self) -> Result<(), ParticipantError> {
        let worker = self
            .entry
            .device
            .start_worker()
            .map_err(|e| ParticipantError::Failed {
                id: ids::virtio(&self.entry.id),
                reason: format!("cannot restart the queue worker: {e}"),
            })?;
        self.entry.worker = Some(worker);
        Ok(())
    }
}

/// Takes a bus for writing; a poisoned lock still holds a consistent bus (inserts are atomic).
fn write_bus(bus: &RwLock<Bus>) -> RwLockWriteGuard<'_, Bus> {
    bus.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn output_for(
    config: &ConsoleConfig,
    device: &'static str,
) -> Result<Box<dyn Write + Send>, DeviceError> {
    match config.mode {
        ConsoleMode::Tty => Ok(Box::new(io::stdout())),
        ConsoleMode::Null | ConsoleMode::Off => Ok(Box::new(io::sink())),
        ConsoleMode::File => {
            let path = config.file.clone().unwrap_or_default();
            let file =
                File::create(&path).map_err(|source| DeviceError::OutputFile { path, source })?;
            Ok(Box::new(file))
        }
        mode => Err(DeviceError::UnsupportedMode { device, mode }),
    }
}
