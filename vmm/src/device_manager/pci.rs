//! virtio-pci devices: a PCI slot, a BAR on the MMIO bus, MSI-X vectors and ioeventfds each.

use std::collections::BTreeMap;
use std::io::{self};
use std::sync::{Arc, Mutex, RwLock};

use devices::bus::{Bus, lock};
use devices::pci::{BarAllocator, BarRelocator, PciBarRegion, PciDevice, PciRoot};
use devices::virtio::device::VirtioDevice;
use devices::virtio::pci::{BAR_SIZE, QueueWorker, VirtioPciDevice, spawn_queue_worker};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use liveupdate::state::{Envelope, StateSet};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceContext, DeviceError, ids, restore_error, write_bus};

/// A virtio-pci device of any type, as the manager drives it.
pub(super) trait ManagedVirtio: Send + Sync {
    fn start_worker(&self) -> io::Result<QueueWorker>;
    fn counters(&self) -> BTreeMap<String, u64>;
    fn save(&self, id: &str) -> Result<Envelope, postcard::Error>;
}

/// Version of `VirtioPciState` in the state blob.
pub(super) const VIRTIO_STATE_VERSION: u16 = 1;

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

pub(super) struct VirtioEntry {
    pub(super) id: String,
    pub(super) device: Box<dyn ManagedVirtio>,
    pub(super) worker: Option<QueueWorker>,
}

/// Where each BAR's queue notifications are registered, so a BAR move can follow.
#[derive(Default)]
pub(super) struct IoEvents {
    pub(super) by_bar: BTreeMap<u64, Vec<(u64, EventFd)>>,
}

/// Moves a BAR on the MMIO bus and its ioeventfds in KVM when the guest reprograms it.
pub(super) struct MmioRelocator {
    pub(super) vm: Arc<VmFd>,
    pub(super) mmio: Arc<RwLock<Bus>>,
    pub(super) ioevents: Arc<Mutex<IoEvents>>,
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

pub(super) struct PciBuilder<'a, 'b, 's> {
    pub(super) root: PciRoot,
    pub(super) bars: BarAllocator,
    pub(super) ctx: &'a DeviceContext<'b>,
    pub(super) ioevents: Arc<Mutex<IoEvents>>,
    pub(super) mmio: Arc<RwLock<Bus>>,
    pub(super) restore: Option<&'s mut StateSet>,
    pub(super) virtio: Vec<VirtioEntry>,
}

impl PciBuilder<'_, '_, '_> {
    /// Wraps `device` in a virtio-pci transport (fresh, or from its saved state), plugs it into
    /// a slot and its BAR into the MMIO bus, and registers its queue notifications with KVM.
    pub(super) fn add<D: VirtioDevice + 'static>(
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
