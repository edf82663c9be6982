//! Hot-unplug on the control loop: `vm.remove-device`, devices the guest ejected leave the VM
//! (and its configuration, keeping their place until the next boot), and the opt-in
//! `kexec=detach` policy: before a kexec-mode live update the guest is asked to release each
//! such VFIO device (which no kernel can carry across a kexec), and the VMM that restores the
//! VM on the new kernel attaches them again. A cancelled update attaches them again at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use log::{error, info};

use crate::api::{ApiError, ApiResponse, PciDeviceInfo};
use crate::config::{KexecPolicy, VmConfig};

use super::{VmState, Vmm};

/// How long the guest has to release the devices before a kexec-mode update is refused.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the VMM looks for the guest's ejects meanwhile.
const RELEASE_POLL: Duration = Duration::from_millis(5);

/// A device `vm.remove-device` can take out, by kind and index in the configuration.
#[derive(Clone, Copy)]
enum Removable {
    Vsock,
    Net(usize),
    Vfio(usize),
}

impl Vmm {
    /// `vm.remove-device`: before boot the device leaves the configuration; on a running VM
    /// the guest is asked to release it, and it leaves when the guest ejects it. Kernel VFIO
    /// devices, network cards and the vsock device, for now.
    pub(super) fn remove_device(
        &mut self,
        id: &str,
        state: VmState,
    ) -> Result<ApiResponse, ApiError> {
        let Some(config) = self.config.as_mut() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        let removable = if config.vsock_id().as_deref() == Some(id)
            && config.vsock.as_ref().is_some_and(|vsock| !vsock.removed)
        {
            Removable::Vsock
        } else if let Some(index) = config.present_net_index(id) {
            Removable::Net(index)
        } else if let Some(index) = config.vfio_device_index(id) {
            Removable::Vfio(index)
        } else {
            return Err(if config.has_device_id(id) {
                ApiError::bad_request(format!(
                    "Device {id} cannot be removed: only kernel VFIO devices, network cards and \
                     the vsock device can be, for now"
                ))
            } else {
                ApiError::not_found(format!("No device with id {id}"))
            });
        };
        let vm = match (state, self.vm.as_ref()) {
            (VmState::Running | VmState::Paused, Some(vm)) => vm,
            _ => {
                match removable {
                    Removable::Vsock => config.vsock = None,
                    Removable::Net(index) => {
                        config.remove_net(index);
                        crate::device_manager::forget_tap_fds(id);
                    }
                    Removable::Vfio(index) => config.remove_vfio_device(index),
                }
                return Ok(ApiResponse::Empty);
            }
        };
        let slot = match removable {
            Removable::Vsock => vm.attached_vsock_slot(),
            Removable::Net(index) => vm.attached_net_slot(index),
            Removable::Vfio(index) => vm.attached_vfio_slot(index),
        }
        .ok_or_else(|| ApiError::conflict(format!("Device {id} is not attached now")))?;
        info!("Asking the guest to release device {id} (slot {slot}): vm.remove-device");
        vm.request_removal(slot)
            .map_err(|e| ApiError::from_error(500, &e))?;
        Ok(ApiResponse::Empty)
    }

    /// The guest ejected devices: they leave the bus and the configuration (event
    /// vm/device-unplugged each).
    pub(super) fn take_ejected_devices(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        let removed = vm.detach_ejected(&[]);
        let nets = vm.take_unplugged_nets();
        let vsock = vm.take_unplugged_vsock();
        self.note_removed(&removed);
        self.note_removed_nets(&nets);
        if vsock
            && let Some(config) = self.config.as_mut()
            && let Some(device) = config.vsock.as_mut()
        {
            device.removed = true;
            let id = config.vsock_id().unwrap_or_default();
            self.emit_device("device-unplugged", &id, None);
        }
    }

    /// Network cards `indices` left the VM for good: marked removed in the configuration
    /// (keeping their place until the next boot), event vm/device-unplugged each.
    fn note_removed_nets(&mut self, indices: &[usize]) {
        let Some(config) = self.config.as_mut() else {
            return;
        };
        let mut ids = Vec::new();
        for index in indices {
            if let Some(net) = config.net.get_mut(*index) {
                net.removed = true;
            }
            ids.push(config.net_id(*index));
        }
        for id in ids {
            self.emit_device("device-unplugged", &id, None);
        }
    }

    /// VFIO devices `indices` left the VM for good: they are marked removed in the
    /// configuration (keeping their place until the next boot).
    fn note_removed(&mut self, indices: &[usize]) {
        let Some(config) = self.config.as_mut() else {
            return;
        };
        let mut ids = Vec::new();
        for index in indices {
            if let Some(device) = config.devices.get_mut(*index) {
                device.removed = true;
            }
            ids.push(config.vfio_device_id(*index));
        }
        for id in ids {
            self.emit_device("device-unplugged", &id, None);
        }
    }

    /// Before a live update: in kexec mode (`runs_kexec` tells, asked only when there is a
    /// device to detach), has the guest release every attached VFIO device with
    /// `kexec=detach`, and returns their indices (empty in restart mode, which carries them
    /// running). If the guest does not release them all in time, the update is refused
    /// (event vm/live-update-cancelled) and those it released come back.
    pub(super) fn detach_for_kexec(
        &mut self,
        config: &VmConfig,
        runs_kexec: impl FnOnce() -> Result<bool, ApiError>,
    ) -> Result<Vec<usize>, ApiError> {
        self.release_for_kexec(config, runs_kexec)
            .inspect_err(|error| {
                let mut properties = BTreeMap::new();
                properties.insert("error".to_string(), error.messages.join(": "));
                self.emit_with("vm", "live-update-cancelled", Some(&properties));
            })
    }

    fn release_for_kexec(
        &mut self,
        config: &VmConfig,
        runs_kexec: impl FnOnce() -> Result<bool, ApiError>,
    ) -> Result<Vec<usize>, ApiError> {
        let Some(vm) = self.vm.as_mut() else {
            return Ok(Vec::new());
        };
        let wanted: Vec<(usize, u8)> = (config.devices.iter().enumerate())
            .filter(|(_, device)| device.kexec == KexecPolicy::Detach)
            .filter_map(|(index, _)| vm.attached_vfio_slot(index).map(|slot| (index, slot)))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        if !runs_kexec()? {
            return Ok(Vec::new());
        }
        let indices: Vec<usize> = wanted.iter().map(|(index, _)| *index).collect();
        for (index, slot) in &wanted {
            info!("Asking the guest to release VFIO device {index} (slot {slot}) for a kexec");
            vm.request_removal(*slot)
                .map_err(|e| ApiError::from_error(500, &e))?;
        }
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        let mut released = Vec::new();
        loop {
            released.extend(vm.detach_ejected(&indices));
            let pending: Vec<&(usize, u8)> = (wanted.iter())
                .filter(|(index, _)| !released.contains(index))
                .collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for (_, slot) in &pending {
                    vm.withdraw_removal(*slot);
                }
                let names: Vec<String> = (pending.iter())
                    .map(|(index, _)| config.vfio_device_id(*index))
                    .collect();
                let (kept, on_its_own): (Vec<usize>, Vec<usize>) =
                    released.into_iter().partition(|i| indices.contains(i));
                self.note_removed(&on_its_own);
                self.reattach(config, &kept);
                return Err(ApiError::new(
                    500,
                    format!(
                        "The guest did not release VFIO device(s) {} within {RELEASE_TIMEOUT:?} \
                         (kexec=detach); the update is not started and the VM runs on",
                        names.join(", ")
                    ),
                ));
            }
            std::thread::sleep(RELEASE_POLL);
        }
        let (for_update, on_its_own): (Vec<usize>, Vec<usize>) =
            released.into_iter().partition(|i| indices.contains(i));
        for index in &for_update {
            let id = config.vfio_device_id(*index);
            self.emit_device("device-unplugged", &id, None);
        }
        self.note_removed(&on_its_own);
        Ok(for_update)
    }

    /// Attaches detached VFIO devices `indices` again (event vm/device-added each, or
    /// vm/device-reattach-failed: the VM runs on without it).
    pub(super) fn reattach(&mut self, config: &VmConfig, indices: &[usize]) {
        for index in indices {
            let Some(vm) = self.vm.as_mut() else {
                return;
            };
            let id = config.vfio_device_id(*index);
            match vm.reattach_vfio_device(config, *index) {
                Ok(slot) => {
                    let info = PciDeviceInfo::new(id.clone(), slot);
                    self.emit_device("device-added", &id, Some(info.bdf));
                }
                Err(e) => {
                    error!("Cannot attach VFIO device {id} again: {e}; the VM runs without it");
                    let mut properties = BTreeMap::new();
                    properties.insert("id".to_string(), id);
                    properties.insert("error".to_string(), format!("{e}"));
                    self.emit_with("vm", "device-reattach-failed", Some(&properties));
                }
            }
        }
    }

    /// After a restore: attaches again the devices the previous VMM detached for the update.
    pub(super) fn reattach_after_update(&mut self) {
        let (Some(vm), Some(config)) = (self.vm.as_ref(), self.config.clone()) else {
            return;
        };
        // The others were removed (vm.remove-device or the guest's own eject) and stay out.
        let indices: Vec<usize> = (vm.detached_vfio_devices().into_iter())
            .filter_map(|(index, for_update)| for_update.then_some(index))
            .collect();
        if !indices.is_empty() {
            info!("Attaching again the VFIO devices detached for the update: {indices:?}");
            self.reattach(&config, &indices);
        }
    }

    fn emit_device(&self, event: &str, id: &str, bdf: Option<String>) {
        let mut properties = BTreeMap::new();
        properties.insert("id".to_string(), id.to_string());
        if let Some(bdf) = bdf {
            properties.insert("bdf".to_string(), bdf);
        }
        self.emit_with("vm", event, Some(&properties));
    }
}
