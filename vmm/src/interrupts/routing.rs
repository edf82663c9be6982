//! The GSI routing table as KVM gets it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use devices::interrupt::MsiMessage;
use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_IRQ_ROUTES, KvmIrqRouting, kvm_irq_routing_entry,
    kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip, kvm_irq_routing_msi,
};
use kvm_ioctls::VmFd;

use super::error::InterruptError;
use super::lines::{LegacyIrq, MsiGroup};
use super::state::MsiGroupState;

/// Number of IOAPIC pins; also the first GSI used for MSI.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI of MSI routes.
pub const MSI_GSI_START: u32 = IOAPIC_PINS;
/// Pins 0..16 also go to the two 8259 PICs (master 0..8, slave 8..16).
const PIC_PINS: u32 = 16;
/// KVM refuses GSIs from `KVM_MAX_IRQ_ROUTES` up.
pub(super) const GSI_LIMIT: u32 = KVM_MAX_IRQ_ROUTES as u32;

/// What the manager and every group it handed out share: the VM and the table.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) vm: Arc<VmFd>,
    pub(super) table: Mutex<Table>,
}

/// Our copy of the routing state; KVM's table is rebuilt from it on every change.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Every MSI group, handed out or restored and not yet claimed again.
    pub(super) groups: Vec<MsiGroupState>,
    /// The first GSIs of the restored groups no device has claimed again yet.
    pub(super) unclaimed: BTreeSet<u32>,
    /// The legacy line of each pin that has one.
    pub(super) lines: BTreeMap<u32, Arc<LegacyIrq>>,
    /// Groups claimed disarmed, for [`super::InterruptManager::arm_handed_over`].
    pub(super) disarmed: Vec<Weak<MsiGroup>>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere cannot leave the table half-written: every change is one
        // assignment, so a poisoned lock still guards consistent data.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// [`Self::push_routes`] of the table as it is now.
    pub(super) fn push_current(&self) -> Result<(), InterruptError> {
        self.push_routes(&self.lock())
    }

    /// Replaces KVM's whole routing table with the legacy routes plus every connected MSI
    /// vector. Called with the table locked, so concurrent changes reach KVM in order.
    pub(super) fn push_routes(&self, table: &Table) -> Result<(), InterruptError> {
        let mut entries: Vec<kvm_irq_routing_entry> = (0..IOAPIC_PINS)
            .map(|pin| irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin))
            .chain((0..PIC_PINS).map(|pin| {
                let chip = if pin < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                irqchip_route(pin, chip, pin % 8)
            }))
            .collect();
        for group in &table.groups {
            for (gsi, route) in (group.first_gsi..).zip(&group.routes) {
                if let Some(message) = route {
                    entries.push(msi_route(gsi, message));
                }
            }
        }
        let routing =
            KvmIrqRouting::from_entries(&entries).map_err(|_| InterruptError::InvalidState {
                reason: "more routes than KVM takes",
            })?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(InterruptError::Routing)
    }

    pub(super) fn set_route(
        &self,
        first_gsi: u32,
        vector: u16,
        message: Option<MsiMessage>,
    ) -> Result<(), InterruptError> {
        let mut table = self.lock();
        let index = table.groups.iter().position(|g| g.first_gsi == first_gsi);
        let routes = index
            .and_then(|i| table.groups.get_mut(i))
            .map(|g| &mut g.routes)
            .ok_or(InterruptError::InvalidState {
                reason: "unknown MSI group",
            })?;
        let count = routes.len();
        let route = routes
            .get_mut(usize::from(vector))
            .ok_or(InterruptError::InvalidVector { vector, count })?;
        if *route == message {
            return Ok(());
        }
        let previous = std::mem::replace(route, message);
        let result = self.push_routes(&table);
        if result.is_err()
            && let Some(route) = index
                .and_then(|i| table.groups.get_mut(i))
                .and_then(|g| g.routes.get_mut(usize::from(vector)))
        {
            // Keep our copy equal to what KVM has.
            *route = previous;
        }
        result
    }
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_route(gsi: u32, message: &MsiMessage) -> kvm_irq_routing_entry {
    // Both halves fit in 32 bits, so neither conversion can fail.
    let address_lo = u32::try_from(message.address & 0xffff_ffff).unwrap_or_default();
    let address_hi = u32::try_from(message.address >> 32).unwrap_or_default();
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo,
                address_hi,
                data: message.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}
