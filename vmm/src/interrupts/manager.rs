//! The interrupt manager: hands out lines and vectors, saves and restores the routes.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::error::InterruptError;
use super::lines::{LegacyIrq, MsiGroup};
use super::routing::{IOAPIC_PINS, Shared, Table};
use super::state::{InterruptState, MsiGroupState, next_free_gsi, validate};

/// Owns the VM's GSI routing table and hands out interrupt lines and MSI vectors.
#[derive(Debug, Clone)]
pub struct InterruptManager {
    shared: Arc<Shared>,
}

/// KVM's routing table on its way in, from [`InterruptManager::restore_aside`].
#[derive(Debug)]
#[must_use = "wait for the routes before the guest runs"]
pub struct RoutesPending(Option<std::thread::JoinHandle<Result<(), InterruptError>>>);

impl RoutesPending {
    /// Returns once KVM has the table; its error if KVM refused it.
    pub fn wait(self) -> Result<(), InterruptError> {
        match self.0.map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(InterruptError::InvalidState {
                reason: "the thread setting the routes panicked",
            }),
        }
    }
}

impl InterruptManager {
    /// Takes over the routing table of `vm`, which has the in-kernel irqchip, with only the
    /// legacy routes in it.
    pub fn new(vm: Arc<VmFd>) -> Result<Self, InterruptError> {
        Self::restore(vm, &InterruptState::default())
    }

    /// Takes over the routing table of `vm` with the MSI groups of `state` routed at once.
    /// Each device then claims its group again by the first GSI its saved placement names,
    /// with [`Self::saved_msi_vectors`] or [`Self::saved_msi_vectors_with_fds`]; the groups
    /// nobody claims (devices removed before the save) go with [`Self::drop_unclaimed`].
    pub fn restore(vm: Arc<VmFd>, state: &InterruptState) -> Result<Self, InterruptError> {
        let manager = Self::restored_table(vm, state)?;
        manager.shared.push_current()?;
        Ok(manager)
    }

    /// Like [`Self::restore`], but KVM gets the routing table on a thread of its own: a live
    /// update's pause goes on building devices meanwhile. `KVM_SET_GSI_ROUTING` waits for an
    /// SRCU grace period of the VM's interrupt routes (0.3-0.5 ms on the test hosts), which
    /// costs no CPU. Devices may claim their groups and register irqfds before it is done
    /// (an irqfd finds its route only when it fires); every push writes the whole table
    /// under its lock, so whichever comes last leaves KVM with the current one.
    /// [`RoutesPending::wait`] before the guest runs. When KVM was given the routes of `state`
    /// already (`routed_ahead`, by a successor started ahead), nothing is set.
    pub fn restore_aside(
        vm: Arc<VmFd>,
        state: &InterruptState,
        routed_ahead: Option<&InterruptState>,
    ) -> Result<(Self, RoutesPending), InterruptError> {
        let manager = Self::restored_table(vm, state)?;
        if routed_ahead == Some(state) {
            return Ok((manager, RoutesPending(None)));
        }
        let shared = Arc::clone(&manager.shared);
        let push = move || shared.push_current();
        let pending = match std::thread::Builder::new()
            .name("gsi-routes".into())
            .spawn(push)
        {
            Ok(thread) => RoutesPending(Some(thread)),
            Err(e) => {
                log::warn!("Cannot start a thread for the GSI routes ({e}); set them here");
                manager.shared.push_current()?;
                RoutesPending(None)
            }
        };
        Ok((manager, pending))
    }

    fn restored_table(vm: Arc<VmFd>, state: &InterruptState) -> Result<Self, InterruptError> {
        validate(state)?;
        Ok(Self {
            shared: Arc::new(Shared {
                vm,
                table: Mutex::new(Table {
                    groups: state.msi_groups.clone(),
                    unclaimed: state.msi_groups.iter().map(|g| g.first_gsi).collect(),
                    ..Table::default()
                }),
            }),
        })
    }

    /// Captures the routing state. Saving while vCPUs or devices run is safe but may miss a
    /// route change made at the same moment; save from the frozen VM.
    pub fn save(&self) -> InterruptState {
        InterruptState {
            msi_groups: self.shared.lock().groups.clone(),
        }
    }

    /// The edge-triggered line of IOAPIC `pin` (0..24): one eventfd write per interrupt.
    /// Asking again for the same pin returns the same line (a shared IRQ).
    pub fn legacy_line(&self, pin: u32) -> Result<Arc<LegacyIrq>, InterruptError> {
        check_pin(pin)?;
        let mut table = self.shared.lock();
        if let Some(line) = table.lines.get(&pin) {
            return Ok(Arc::clone(line));
        }
        self.register_line(&mut table, pin, new_eventfd()?)
    }

    /// Like [`Self::legacy_line`], but with an existing eventfd (e.g. one handed over by the
    /// previous VMM and still held by an outside device).
    pub fn legacy_line_with_fd(
        &self,
        pin: u32,
        eventfd: EventFd,
    ) -> Result<Arc<LegacyIrq>, InterruptError> {
        check_pin(pin)?;
        let mut table = self.shared.lock();
        if table.lines.contains_key(&pin) {
            return Err(InterruptError::PinInUse { pin });
        }
        self.register_line(&mut table, pin, eventfd)
    }

    /// `count` new MSI vectors on consecutive GSIs after every group, each with a new eventfd
    /// registered as irqfd.
    pub fn msi_vectors(&self, count: u16) -> Result<Arc<MsiGroup>, InterruptError> {
        self.msi_vectors_with_fds(new_eventfds(count)?)
    }

    /// Like [`Self::msi_vectors`], one vector per eventfd given.
    pub fn msi_vectors_with_fds(
        &self,
        eventfds: Vec<EventFd>,
    ) -> Result<Arc<MsiGroup>, InterruptError> {
        self.claim_msi_group(None, eventfds, true)
    }

    /// The restored group whose first GSI is `first_gsi`, with `count` new eventfds: a device
    /// placed where its saved state says.
    pub fn saved_msi_vectors(
        &self,
        first_gsi: u32,
        count: u16,
    ) -> Result<Arc<MsiGroup>, InterruptError> {
        self.claim_msi_group(Some(first_gsi), new_eventfds(count)?, true)
    }

    /// Like [`Self::saved_msi_vectors`], one vector per eventfd given (e.g. handed over by the
    /// previous VMM). With `armed` false the eventfds are not registered as irqfds until
    /// [`MsiGroup::arm`]: for eventfds handed over whose pending signals must reach the guest
    /// only once its vCPUs (and their LAPICs) are restored.
    pub fn saved_msi_vectors_with_fds(
        &self,
        first_gsi: u32,
        eventfds: Vec<EventFd>,
        armed: bool,
    ) -> Result<Arc<MsiGroup>, InterruptError> {
        self.claim_msi_group(Some(first_gsi), eventfds, armed)
    }

    fn claim_msi_group(
        &self,
        saved_at: Option<u32>,
        eventfds: Vec<EventFd>,
        armed: bool,
    ) -> Result<Arc<MsiGroup>, InterruptError> {
        let count = eventfds.len();
        let mut table = self.shared.lock();
        let first_gsi = match saved_at {
            Some(first_gsi) => {
                let saved = table
                    .groups
                    .iter()
                    .find(|g| g.first_gsi == first_gsi && table.unclaimed.contains(&first_gsi))
                    .ok_or(InterruptError::NoSavedGroup { first_gsi })?;
                if saved.routes.len() != count {
                    return Err(InterruptError::GroupMismatch {
                        first_gsi,
                        saved: saved.routes.len(),
                        requested: count,
                    });
                }
                first_gsi
            }
            None => next_free_gsi(&table.groups, count)?,
        };
        if armed {
            register_irqfds(&self.shared.vm, first_gsi, &eventfds)?;
        }
        if saved_at.is_none() {
            table.groups.push(MsiGroupState {
                first_gsi,
                routes: vec![None; count],
            });
        }
        table.unclaimed.remove(&first_gsi);
        let group = Arc::new(MsiGroup {
            shared: Arc::clone(&self.shared),
            first_gsi,
            eventfds,
            armed: Mutex::new(armed),
        });
        if !armed {
            table.disarmed.push(Arc::downgrade(&group));
        }
        Ok(group)
    }

    /// Forgets the restored groups no device claimed (their devices were removed before the
    /// save), with their routes. Returns their first GSIs.
    pub fn drop_unclaimed(&self) -> Result<Vec<u32>, InterruptError> {
        let mut table = self.shared.lock();
        let unclaimed = std::mem::take(&mut table.unclaimed);
        if unclaimed.is_empty() {
            return Ok(Vec::new());
        }
        table.groups.retain(|g| !unclaimed.contains(&g.first_gsi));
        self.shared.push_routes(&table)?;
        Ok(unclaimed.into_iter().collect())
    }

    /// How many MSI groups the table holds (see [`Self::release_msi_groups_from`]).
    pub fn msi_group_count(&self) -> usize {
        self.shared.lock().groups.len()
    }

    /// Forgets the MSI groups handed out from `count` on, whose devices are gone (a failed
    /// hot-add): the next group takes their GSIs again and a saved state does not list them.
    /// Their irqfds go away with their eventfds: KVM drops an irqfd once the last holder of
    /// its eventfd closes it (an outside server that got a dup closes it when it lets go).
    pub fn release_msi_groups_from(&self, count: usize) -> Result<(), InterruptError> {
        let mut table = self.shared.lock();
        if count >= table.groups.len() {
            return Ok(());
        }
        if !table.unclaimed.is_empty() {
            return Err(InterruptError::InvalidState {
                reason: "restored MSI groups are not all claimed",
            });
        }
        table.groups.truncate(count);
        self.shared.push_routes(&table)
    }

    /// Arms every group claimed disarmed (a live update's restore calls this once the vCPUs
    /// and their LAPICs are restored, so the signals that waited in the handed-over eventfds
    /// reach the guest as it resumes).
    pub fn arm_handed_over(&self) -> Result<(), InterruptError> {
        let groups = std::mem::take(&mut self.shared.lock().disarmed);
        for group in groups.iter().filter_map(std::sync::Weak::upgrade) {
            group.arm()?;
        }
        Ok(())
    }

    fn register_line(
        &self,
        table: &mut Table,
        pin: u32,
        eventfd: EventFd,
    ) -> Result<Arc<LegacyIrq>, InterruptError> {
        self.shared
            .vm
            .register_irqfd(&eventfd, pin)
            .map_err(|source| InterruptError::Irqfd { gsi: pin, source })?;
        let line = Arc::new(LegacyIrq { pin, eventfd });
        table.lines.insert(pin, Arc::clone(&line));
        Ok(line)
    }
}

/// Registers `eventfds` as the irqfds of consecutive GSIs from `first_gsi`; all or none.
pub(super) fn register_irqfds(
    vm: &VmFd,
    first_gsi: u32,
    eventfds: &[EventFd],
) -> Result<(), InterruptError> {
    let mut registered = Vec::with_capacity(eventfds.len());
    for (gsi, eventfd) in (first_gsi..).zip(eventfds) {
        if let Err(source) = vm.register_irqfd(eventfd, gsi) {
            unregister_irqfds(vm, registered);
            return Err(InterruptError::Irqfd { gsi, source });
        }
        registered.push((gsi, eventfd));
    }
    Ok(())
}

/// Unregisters irqfds, logging (not failing on) any KVM refuses.
fn unregister_irqfds<'a>(vm: &VmFd, irqfds: impl IntoIterator<Item = (u32, &'a EventFd)>) {
    for (gsi, eventfd) in irqfds {
        if let Err(e) = vm.unregister_irqfd(eventfd, gsi) {
            log::warn!("Cannot unregister the irqfd of GSI {gsi}: {e}");
        }
    }
}

fn check_pin(pin: u32) -> Result<(), InterruptError> {
    if pin >= IOAPIC_PINS {
        return Err(InterruptError::InvalidPin { pin });
    }
    Ok(())
}

fn new_eventfd() -> Result<EventFd, InterruptError> {
    EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)
}

fn new_eventfds(count: u16) -> Result<Vec<EventFd>, InterruptError> {
    (0..count).map(|_| new_eventfd()).collect()
}

#[cfg(test)]
mod tests {
    use std::thread::sleep;
    use std::time::{Duration, Instant};

    use devices::interrupt::{IrqLine, MsiMessage, MsiVectors};
    use kvm_ioctls::VcpuFd;

    use super::*;
    use crate::cpu::test_util;
    use crate::cpu::{lapic_register, set_lapic_register};
    use crate::interrupts::routing::GSI_LIMIT;
    use crate::platform::PlatformState;

    /// MSI to the LAPIC with id 0, fixed delivery.
    const MSI_ADDRESS_CPU0: u64 = 0xfee0_0000;

    /// A VM with platform and a configured vCPU 0 whose LAPIC accepts interrupts.
    fn vm_with_vcpu() -> (Arc<VmFd>, VcpuFd) {
        let kvm = test_util::kvm();
        let vm = Arc::new(test_util::vm(&kvm));
        let vcpu = test_util::vcpu(&kvm, &vm, 0, 1);
        let mut lapic = vcpu.get_lapic().unwrap();
        // Spurious vector register: bit 8 software-enables the LAPIC.
        set_lapic_register(&mut lapic, 0xf0, 0x1ff);
        vcpu.set_lapic(&lapic).unwrap();
        (vm, vcpu)
    }

    fn irr_has(vcpu: &VcpuFd, vector: u32) -> bool {
        let lapic = vcpu.get_lapic().unwrap();
        let offset = 0x200 + usize::try_from(vector / 32).unwrap() * 0x10;
        lapic_register(&lapic, offset) & (1 << (vector % 32)) != 0
    }

    /// Waits up to a second for KVM's irqfd worker to deliver `vector`.
    fn delivered(vcpu: &VcpuFd, vector: u32) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if irr_has(vcpu, vector) {
                return true;
            }
            sleep(Duration::from_millis(5));
        }
        false
    }

    fn msi(vector: u32) -> Option<MsiMessage> {
        Some(MsiMessage {
            address: MSI_ADDRESS_CPU0,
            data: vector,
        })
    }

    #[test]
    fn msi_route_delivers_vector_to_lapic() {
        let (vm, vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();
        let group = manager.msi_vectors(2).unwrap();

        group.configure(1, msi(0x41)).unwrap();
        group.trigger(1).unwrap();

        assert!(delivered(&vcpu, 0x41));
    }

    #[test]
    fn removed_msi_route_delivers_nothing_until_routed_again() {
        let (vm, vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();
        let group = manager.msi_vectors(1).unwrap();
        group.configure(0, msi(0x42)).unwrap();

        group.configure(0, None).unwrap();
        group.trigger(0).unwrap();
        sleep(Duration::from_millis(100));
        let while_removed = irr_has(&vcpu, 0x42);
        group.configure(0, msi(0x42)).unwrap();
        group.trigger(0).unwrap();

        assert!(!while_removed);
        assert!(delivered(&vcpu, 0x42));
    }

    #[test]
    fn disarmed_group_keeps_the_signal_in_its_eventfd_until_armed() {
        let (vm, vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();
        let group = manager.msi_vectors(1).unwrap();
        group.configure(0, msi(0x43)).unwrap();

        group.disarm().unwrap();
        group.trigger(0).unwrap();
        sleep(Duration::from_millis(100));
        let while_disarmed = irr_has(&vcpu, 0x43);
        group.arm().unwrap();

        assert!(!while_disarmed);
        assert!(group.is_armed());
        assert!(
            delivered(&vcpu, 0x43),
            "the waiting signal was not injected"
        );
    }

    #[test]
    fn group_claimed_disarmed_delivers_a_pending_signal_once_armed() {
        let (vm, vcpu) = vm_with_vcpu();
        let saved = {
            let manager = InterruptManager::new(Arc::clone(&vm)).unwrap();
            let group = manager.msi_vectors(1).unwrap();
            group.configure(0, msi(0x44)).unwrap();
            manager.save()
        };
        let restored = InterruptManager::restore(vm, &saved).unwrap();
        // Signalled by an outside device while no VMM listened.
        let handed_over = EventFd::new(EFD_NONBLOCK).unwrap();
        handed_over.write(1).unwrap();

        let group = restored
            .saved_msi_vectors_with_fds(24, vec![handed_over.try_clone().unwrap()], false)
            .unwrap();
        sleep(Duration::from_millis(100));
        let before_arm = irr_has(&vcpu, 0x44);
        restored.arm_handed_over().unwrap();

        assert!(!before_arm);
        assert!(group.is_armed());
        assert!(delivered(&vcpu, 0x44));
    }

    #[test]
    fn legacy_line_delivers_through_ioapic() {
        let (vm, vcpu) = vm_with_vcpu();
        let mut platform = PlatformState::save(&vm).unwrap();
        // Vector 0x51, fixed, physical destination 0, edge, unmasked.
        assert!(platform.set_ioapic_redirection(5, 0x51));
        vm.set_irqchip(&platform.ioapic.0).unwrap();
        let manager = InterruptManager::new(Arc::clone(&vm)).unwrap();

        manager.legacy_line(5).unwrap().trigger().unwrap();

        assert!(delivered(&vcpu, 0x51));
    }

    #[test]
    fn same_pin_returns_the_same_line() {
        let (vm, _vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();

        let first = manager.legacy_line(4).unwrap();
        let second = manager.legacy_line(4).unwrap();

        assert!(Arc::ptr_eq(&first, &second));
        assert!(matches!(
            manager.legacy_line_with_fd(4, new_eventfd().unwrap()),
            Err(InterruptError::PinInUse { pin: 4 })
        ));
    }

    #[test]
    fn missing_pin_and_vector_are_errors() {
        let (vm, _vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();
        let group = manager.msi_vectors(1).unwrap();

        assert!(matches!(
            manager.legacy_line(IOAPIC_PINS),
            Err(InterruptError::InvalidPin { pin: 24 })
        ));
        assert!(group.trigger(1).is_err());
        assert!(group.configure(1, msi(0x40)).is_err());
    }

    #[test]
    fn groups_get_consecutive_gsis_from_24() {
        let (vm, _vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();

        let first = manager.msi_vectors(3).unwrap();
        let second = manager.msi_vectors(2).unwrap();

        assert_eq!((first.first_gsi(), second.first_gsi()), (24, 27));
        assert_eq!(second.eventfds().len(), 2);
    }

    #[test]
    fn interrupt_state_round_trips_into_new_vm() {
        let (vm, _vcpu) = vm_with_vcpu();
        let manager = InterruptManager::new(vm).unwrap();
        manager
            .msi_vectors(2)
            .unwrap()
            .configure(0, msi(0x40))
            .unwrap();
        let group = manager.msi_vectors(3).unwrap();
        group
            .configure(
                2,
                Some(MsiMessage {
                    address: 0x1_fee0_1000,
                    data: 0x4041,
                }),
            )
            .unwrap();
        let saved = manager.save();
        let json = serde_json::to_string(&saved).unwrap();
        let decoded: InterruptState = serde_json::from_str(&json).unwrap();
        let (new_vm, vcpu) = vm_with_vcpu();

        let restored = InterruptManager::restore(new_vm, &decoded).unwrap();
        // Claimed by placement, not in the saved order.
        let second = restored.saved_msi_vectors(26, 3).unwrap();
        let first = restored.saved_msi_vectors(24, 2).unwrap();
        let third = restored.msi_vectors(1).unwrap();

        assert_eq!(decoded, saved);
        assert_eq!(
            (first.first_gsi(), second.first_gsi(), third.first_gsi()),
            (24, 26, 29)
        );
        assert_eq!(restored.save().msi_groups[..2], saved.msi_groups[..]);
        first.trigger(0).unwrap();
        assert!(delivered(&vcpu, 0x40), "restored route is live in KVM");
    }

    #[test]
    fn routes_set_ahead_are_set_again_only_if_the_saved_ones_differ() {
        let one_route = |vector| InterruptState {
            msi_groups: vec![MsiGroupState {
                first_gsi: 24,
                routes: vec![msi(vector)],
            }],
        };
        let saved = one_route(0x40);
        for (ahead, sets_again) in [(one_route(0x40), false), (one_route(0x50), true)] {
            let (vm, vcpu) = vm_with_vcpu();
            drop(InterruptManager::restore(vm.clone(), &ahead).unwrap());

            let (restored, pending) =
                InterruptManager::restore_aside(vm, &saved, Some(&ahead)).unwrap();

            assert_eq!(pending.0.is_some(), sets_again, "ahead: {ahead:?}");
            pending.wait().unwrap();
            restored
                .saved_msi_vectors(24, 1)
                .unwrap()
                .trigger(0)
                .unwrap();
            assert!(delivered(&vcpu, 0x40), "ahead: {ahead:?}");
            assert!(!irr_has(&vcpu, 0x50));
        }
    }

    #[test]
    fn restored_group_claimed_with_other_size_is_refused() {
        let (vm, _vcpu) = vm_with_vcpu();
        let state = InterruptState {
            msi_groups: vec![MsiGroupState {
                first_gsi: 24,
                routes: vec![None; 2],
            }],
        };
        let manager = InterruptManager::restore(vm, &state).unwrap();

        let result = manager.saved_msi_vectors(24, 5);

        assert!(matches!(
            result,
            Err(InterruptError::GroupMismatch {
                saved: 2,
                requested: 5,
                ..
            })
        ));
    }

    #[test]
    fn saved_group_is_claimed_once_and_an_unknown_one_is_refused() {
        let (vm, _vcpu) = vm_with_vcpu();
        let state = InterruptState {
            msi_groups: vec![MsiGroupState {
                first_gsi: 24,
                routes: vec![None; 2],
            }],
        };
        let manager = InterruptManager::restore(vm, &state).unwrap();

        let first = manager
            .saved_msi_vectors(24, 2)
            .map(|group| group.first_gsi());
        let again = manager.saved_msi_vectors(24, 2);
        let unknown = manager.saved_msi_vectors(30, 1);

        assert_eq!(first.unwrap(), 24);
        assert!(matches!(
            again,
            Err(InterruptError::NoSavedGroup { first_gsi: 24 })
        ));
        assert!(matches!(
            unknown,
            Err(InterruptError::NoSavedGroup { first_gsi: 30 })
        ));
    }

    #[test]
    fn groups_of_removed_devices_are_dropped_and_their_gsis_stay_free_until_the_end() {
        let (vm, _vcpu) = vm_with_vcpu();
        let group = |first_gsi, count| MsiGroupState {
            first_gsi,
            routes: vec![msi(0x40); count],
        };
        let state = InterruptState {
            msi_groups: vec![group(24, 2), group(26, 3), group(29, 1)],
        };
        let manager = InterruptManager::restore(vm, &state).unwrap();
        manager.saved_msi_vectors(24, 2).unwrap();
        manager.saved_msi_vectors(29, 1).unwrap();

        let dropped = manager.drop_unclaimed().unwrap();
        let next = manager.msi_vectors(1).unwrap();

        assert_eq!(dropped, vec![26]);
        assert_eq!(
            manager.save().msi_groups,
            vec![
                group(24, 2),
                group(29, 1),
                MsiGroupState {
                    first_gsi: 30,
                    routes: vec![None]
                }
            ]
        );
        assert_eq!(next.first_gsi(), 30);
    }

    #[test]
    fn restore_refuses_overlapping_or_out_of_range_groups() {
        let (vm, _vcpu) = vm_with_vcpu();
        let group = |first_gsi, count| MsiGroupState {
            first_gsi,
            routes: vec![None; count],
        };
        let overlapping = InterruptState {
            msi_groups: vec![group(24, 4), group(26, 1)],
        };
        let legacy_range = InterruptState {
            msi_groups: vec![group(20, 1)],
        };
        let past_limit = InterruptState {
            msi_groups: vec![group(GSI_LIMIT - 1, 2)],
        };

        for state in [overlapping, legacy_range, past_limit] {
            let result = InterruptManager::restore(Arc::clone(&vm), &state);
            assert!(matches!(result, Err(InterruptError::InvalidState { .. })));
        }
    }
}
