//! PCI placement: virtio-pci devices (a slot, a BAR on the MMIO bus, MSI-X vectors and
//! ioeventfds each), the slots a builder hands out, and [`PciBuilder::place`] for any PCI
//! function built elsewhere (vfio-user, kernel VFIO).
//!
//! Slots reach the PCI root only in [`PendingSlots::commit`], once a device is fully wired, so
//! the guest never finds a half-added function, at boot or on hot-add.

use std::collections::BTreeMap;
use std::io::{self};
use std::sync::{Arc, Mutex, RwLock};

use devices::bus::{Bus, lock};
use devices::pci::root::SharedPciDevice;
use devices::pci::{
    BarAllocator, BarRelocator, PciBarInfo, PciBarRegion, PciDevice, PciError, PciRoot,
};
use devices::virtio::device::VirtioDevice;
use devices::virtio::pci::{BAR_SIZE, QueueWorker, VirtioPciDevice, spawn_queue_worker};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use liveupdate::state::{Envelope, StateSet};
use vmm_sys_util::eventfd::EventFd;

use super::placement::{DevicePlacement, MsiPlacement};
use super::registry::DeviceRegistry;
use super::{DeviceContext, DeviceError, ids, restore_error, write_bus};
use crate::interrupts::MsiGroup;

/// A virtio-pci device of any type, as the manager drives it.
pub(super) trait ManagedVirtio: Send + Sync {
    fn start_worker(&self) -> io::Result<QueueWorker>;
    fn counters(&self) -> BTreeMap<String, u64>;
    fn save(&self, id: &str) -> Result<Envelope, postcard::Error>;
    fn bars(&self) -> Vec<PciBarInfo>;
}

impl<D: VirtioDevice + 'static> ManagedVirtio for Arc<Mutex<VirtioPciDevice<D>>> {
    fn start_worker(&self) -> io::Result<QueueWorker> {
        spawn_queue_worker(self.clone())
    }
    fn counters(&self) -> BTreeMap<String, u64> {
        lock(self).counters()
    }
    fn save(&self, id: &str) -> Result<Envelope, postcard::Error> {
        Envelope::wrap(id, &lock(self).state())
    }
    fn bars(&self) -> Vec<PciBarInfo> {
        lock(self).bars()
    }
}

pub(super) struct VirtioEntry {
    pub(super) id: String,
    /// Its PCI slot on bus 0.
    pub(super) slot: u8,
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

/// Slots 1..32 of bus 0 (slot 0 is the host bridge).
const PCI_SLOTS: u8 = 32;

/// The slots a builder gave out, with their devices, not yet in the PCI root.
pub(super) struct PendingSlots {
    next: u8,
    added: Vec<(u8, SharedPciDevice)>,
}

impl PendingSlots {
    /// Hands out slots from `next` up (the manager never frees one, so all below are taken).
    pub(super) fn new(next: u8) -> Self {
        Self {
            next,
            added: Vec::new(),
        }
    }

    /// The slot the next device without a saved place takes.
    pub(super) fn next_slot(&self) -> u8 {
        self.next
    }

    /// Reserves `slot` for `device` (a device placed where its saved state says); the next
    /// free slot moves past it.
    pub(super) fn add_device_at(
        &mut self,
        slot: u8,
        device: SharedPciDevice,
    ) -> Result<u8, PciError> {
        if slot >= PCI_SLOTS && slot == self.next {
            return Err(PciError::NoFreeSlot);
        }
        if slot == 0 || slot >= PCI_SLOTS || self.added.iter().any(|(taken, _)| *taken == slot) {
            return Err(PciError::SlotUnavailable { slot });
        }
        self.added.push((slot, device));
        self.next = self.next.max(slot + 1);
        Ok(slot)
    }

    /// The devices reserved so far, with their slots.
    pub(super) fn added(&self) -> &[(u8, SharedPciDevice)] {
        &self.added
    }

    /// Puts every reserved device into `root`, in order; returns the next free slot. Fails only
    /// if a slot is taken (only the manager fills slots, so its count would be wrong); `root`
    /// then holds the devices before that one. The PCI root has no removal, so a hot-add
    /// reserves one device: on error the root holds nothing of it.
    pub(super) fn commit(self, root: &mut PciRoot) -> Result<u8, PciError> {
        for (slot, device) in self.added {
            root.add_device_at(slot, device)?;
        }
        Ok(self.next)
    }
}

pub(super) struct PciBuilder<'a, 'b, 's> {
    /// The slots of the devices this builder adds (named for the root they go into).
    pub(super) root: PendingSlots,
    pub(super) bars: BarAllocator,
    pub(super) ctx: &'a DeviceContext<'b>,
    pub(super) ioevents: Arc<Mutex<IoEvents>>,
    pub(super) mmio: Arc<RwLock<Bus>>,
    pub(super) restore: Option<&'s mut StateSet>,
    /// On a restore, where each device was (every device built must have its place here).
    pub(super) saved: Option<BTreeMap<String, DevicePlacement>>,
    /// The devices registered so far, with those this builder adds (see [`DeviceRegistry`]).
    pub(super) registry: DeviceRegistry,
    pub(super) virtio: Vec<VirtioEntry>,
}

impl PciBuilder<'_, '_, '_> {
    /// The saved place of device `id` on a restore (an error if the state has none for it);
    /// `None` when building afresh.
    pub(super) fn saved_place(&self, id: &str) -> Result<Option<&DevicePlacement>, DeviceError> {
        let Some(saved) = &self.saved else {
            return Ok(None);
        };
        saved.get(id).map(Some).ok_or_else(|| DeviceError::Restore {
            id: id.to_string(),
            source: "the saved placement has no such device".into(),
        })
    }

    /// The first GSI of device `id`'s saved MSI group, on a restore.
    pub(super) fn saved_gsi(&self, id: &str) -> Result<Option<u32>, DeviceError> {
        let Some(place) = self.saved_place(id)? else {
            return Ok(None);
        };
        place
            .msi
            .map(|msi| Some(msi.first_gsi))
            .ok_or_else(|| DeviceError::Restore {
                id: id.to_string(),
                source: "the saved placement gives the device no MSI vectors".into(),
            })
    }

    /// `count` MSI vectors for device `id`: its saved group on a restore, new ones otherwise.
    fn msi_group(&self, id: &str, count: u16) -> Result<Arc<MsiGroup>, DeviceError> {
        match self.saved_gsi(id)? {
            Some(first_gsi) => self.ctx.interrupts.saved_msi_vectors(first_gsi, count),
            None => self.ctx.interrupts.msi_vectors(count),
        }
        .map_err(DeviceError::Interrupt)
    }

    /// Gives device `id` its slot (its saved one on a restore, the next free one otherwise)
    /// and registers it, carried by `participants`, at that slot with its MSI group `msi`.
    fn take_slot(
        &mut self,
        id: &str,
        device: SharedPciDevice,
        msi: Option<&MsiGroup>,
        participants: Vec<String>,
    ) -> Result<u8, DeviceError> {
        let slot = match self.saved_place(id)? {
            Some(place) => place.slot,
            None => self.root.next_slot(),
        };
        let placement = DevicePlacement {
            id: id.to_string(),
            slot,
            function: 0,
            msi: msi.map(msi_placement),
        };
        self.registry.register(id, participants, Some(placement))?;
        self.root.add_device_at(slot, device).map_err(|e| {
            self.registry.unregister(id);
            DeviceError::Pci(e)
        })
    }

    /// Registers a detached device, carried by `participants`, which keeps its slot and MSI
    /// group but is on no bus.
    pub(super) fn keep_place(
        &mut self,
        id: &str,
        slot: u8,
        msi: &MsiGroup,
        participants: Vec<String>,
    ) -> Result<(), DeviceError> {
        let placement = DevicePlacement {
            id: id.to_string(),
            slot,
            function: 0,
            msi: Some(msi_placement(msi)),
        };
        self.registry.register(id, participants, Some(placement))
    }

    /// Wraps `device` in a virtio-pci transport (fresh, or from its saved state), plugs it into
    /// a slot and its BAR into the MMIO bus, and registers its queue notifications with KVM.
    /// Registers it as `virtio/<id>`, carried by its own participant and `also`.
    pub(super) fn add<D: VirtioDevice + 'static>(
        &mut self,
        device: D,
        id: &str,
        also: Vec<String>,
    ) -> Result<Arc<Mutex<VirtioPciDevice<D>>>, DeviceError> {
        let key = ids::virtio(id);
        let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
        let msi = self.msi_group(&key, vectors)?;
        let group = msi.clone();
        let memory = self.ctx.memory.clone();
        let virtio_error = |source| DeviceError::Virtio {
            id: id.to_string(),
            source,
        };
        let transport = match self.restore.as_deref_mut() {
            Some(states) => {
                let state = states.take(&key).map_err(restore_error(&key))?;
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
        let participants = std::iter::once(key.clone()).chain(also).collect();
        let slot = self.take_slot(&key, transport.clone(), Some(&group), participants)?;
        write_bus(&self.mmio)
            .insert(
                Arc::new(Mutex::new(PciBarRegion::new(transport.clone(), 0))),
                bar,
                BAR_SIZE,
            )
            .map_err(DeviceError::Bus)?;
        self.virtio.push(VirtioEntry {
            id: id.to_string(),
            slot,
            device: Box::new(transport.clone()),
            worker: None,
        });
        Ok(transport)
    }

    /// Places a built PCI function, device `id` with MSI group `msi` carried by `participants`:
    /// each of its BARs on the MMIO bus, then a slot. Returns the slot. On error nothing of it
    /// stays on the bus. The BARs must come from `self.bars`.
    pub(super) fn place(
        &mut self,
        id: &str,
        device: SharedPciDevice,
        msi: Option<&MsiGroup>,
        participants: Vec<String>,
    ) -> Result<u8, DeviceError> {
        let bars = lock(&device).bars();
        let mut mmio = write_bus(&self.mmio);
        for (placed, bar) in bars.iter().enumerate() {
            let region = Arc::new(Mutex::new(PciBarRegion::new(device.clone(), bar.index)));
            if let Err(e) = mmio.insert(region, bar.address, bar.size) {
                for bar in &bars[..placed] {
                    let _ = mmio.remove(bar.address);
                }
                return Err(DeviceError::Bus(e));
            }
        }
        drop(mmio);
        self.take_slot(id, device, msi, participants)
            .inspect_err(|_| {
                let mut mmio = write_bus(&self.mmio);
                for bar in &bars {
                    let _ = mmio.remove(bar.address);
                }
            })
    }
}

fn msi_placement(msi: &MsiGroup) -> MsiPlacement {
    MsiPlacement {
        first_gsi: msi.first_gsi(),
        vectors: u16::try_from(msi.eventfds().len()).unwrap_or(u16::MAX),
    }
}
