//! Serves API requests on the control loop: each request acts on the VM in its current state,
//! or is refused with cloud-hypervisor's status.

use std::collections::BTreeMap;
use std::path::Path;

use liveupdate::machine::Timings;

use crate::api::{ApiError, ApiRequest, ApiResponse, LiveUpdateConfig, PassedFds, PciDeviceInfo};
use crate::config::{
    ConfigError, DeviceConfig, NetConfig, UserDeviceConfig, VmConfig, VsockConfig,
};
use crate::device_manager::{DeviceError, forget_tap_fds, give_tap_fds};
use crate::live_update;
use crate::state_format::StateFormat;

use super::{Next, Vm, VmState, Vmm};

impl Vmm {
    pub(super) fn handle_api(
        &mut self,
        request: ApiRequest,
    ) -> (Result<ApiResponse, ApiError>, Next) {
        match request {
            ApiRequest::VmmPing => (Ok(ApiResponse::Json(ping_body())), Next::Continue),
            ApiRequest::VmmShutdown => {
                self.shutdown_vm();
                (Ok(ApiResponse::Empty), Next::Exit)
            }
            ApiRequest::VmLiveUpdate(request) => {
                let agent = self.agent.clone();
                match self.hand_over(&agent, &request) {
                    // The guest now belongs to the session: this process is done.
                    Ok(timings) => {
                        let body = live_update::timings_body(&request.session, &timings);
                        (Ok(ApiResponse::Json(body)), Next::Exit)
                    }
                    Err(error) => (Err(error), Next::Continue),
                }
            }
            ApiRequest::VmSendMigration(request) => match self.send_migration(&request) {
                // As cloud-hypervisor: the source process exits once the VM has moved.
                Ok(()) => (Ok(ApiResponse::Empty), Next::Exit),
                Err(error) => (Err(error), Next::Continue),
            },
            ApiRequest::VmSnapshot(request) => (self.snapshot(&request), Next::Continue),
            ApiRequest::VmRestore(request) => (self.restore_snapshot(&request), Next::Continue),
            other => (self.handle_vm_request(other), Next::Continue),
        }
    }

    fn handle_vm_request(&mut self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        if let Some(session) = &self.restoring {
            if request == ApiRequest::VmInfo {
                // A successor waiting for its session says so (no configuration yet).
                return Ok(ApiResponse::Json(serde_json::json!({
                    "state": "Restoring",
                    "restoring": { "source_url": format!("{}{session}", crate::config::LUO_URL_SCHEME) },
                })));
            }
            return Err(ApiError::conflict(format!(
                "The VM is being restored from live-update session {session}"
            )));
        }
        if let ApiRequest::VmCreate(config) = request {
            return self.create(*config);
        }
        let Some(config) = self.config.as_ref() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        match (request, self.state) {
            (ApiRequest::VmInfo, state) => {
                let device_tree = self.vm.as_ref().map(|vm| vm.device_tree(config));
                // Removed devices keep their place until the next boot, out of sight.
                let mut config = config.clone();
                config.drop_removed_devices();
                let mut info = serde_json::json!({
                    "config": config.to_info_json(),
                    "state": state,
                    "memory_actual_size": config.memory.size,
                });
                // As cloud-hypervisor: only a booted VM has a device tree.
                if let Some(tree) = device_tree {
                    info["device_tree"] = serde_json::json!(tree);
                }
                Ok(ApiResponse::Json(info))
            }
            (ApiRequest::VmAddUserDevice(device), state) => self.add_user_device(device, state),
            (ApiRequest::VmAddDevice(device), state) => self.add_vfio_device(device, state),
            (ApiRequest::VmRemoveDevice(id), state) => self.remove_device(&id, state),
            (ApiRequest::VmAddNet(net, fds), state) => self.add_net(*net, &fds, state),
            (ApiRequest::VmAddVsock(vsock), state) => self.add_vsock(vsock, state),
            (ApiRequest::VmCounters, _) => {
                let counters = self.vm.as_ref().map(Vm::counters).unwrap_or_default();
                Ok(ApiResponse::Json(serde_json::json!(counters)))
            }
            (ApiRequest::VmBoot, VmState::Created | VmState::Shutdown) => {
                self.boot().map_err(|e| ApiError::internal(&e))?;
                Ok(ApiResponse::Empty)
            }
            (ApiRequest::VmPause, VmState::Running) => {
                self.emit("vm", "pausing");
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause();
                }
                self.state = VmState::Paused;
                self.emit("vm", "paused");
                Ok(ApiResponse::Empty)
            }
            (ApiRequest::VmResume, VmState::Paused) => {
                self.emit("vm", "resuming");
                if let Some(vm) = self.vm.as_mut() {
                    vm.resume().map_err(|e| ApiError::internal(&e))?;
                }
                self.state = VmState::Running;
                self.emit("vm", "resumed");
                Ok(ApiResponse::Empty)
            }
            (ApiRequest::VmShutdown, VmState::Running | VmState::Paused) => {
                self.shutdown_vm();
                Ok(ApiResponse::Empty)
            }
            (ApiRequest::VmReboot, VmState::Running | VmState::Paused) => {
                self.reboot().map_err(|e| ApiError::internal(&e))?;
                Ok(ApiResponse::Empty)
            }
            (ApiRequest::VmDelete, _) => {
                self.shutdown_vm();
                // Its pty and socket go with the VM.
                crate::host_console::close_all();
                self.config = None;
                self.state = VmState::Created;
                self.emit("vm", "deleted");
                Ok(ApiResponse::Empty)
            }
            (request, state) => Err(ApiError::conflict(format!(
                "Cannot {} a VM that is {state:?}",
                verb(&request)
            ))),
        }
    }

    /// Runs a live update of the VM into `session` through the session agent at `agent`. On
    /// success the VM is gone from this process; on failure it runs on (or stays paused).
    pub(super) fn hand_over(
        &mut self,
        agent: &Path,
        request: &LiveUpdateConfig,
    ) -> Result<Timings, ApiError> {
        let session = request.session.as_str();
        let Some(config) = self.config.clone() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        let was_paused = match self.state {
            VmState::Running => false,
            VmState::Paused => true,
            state => {
                return Err(ApiError::conflict(format!(
                    "Cannot live-update a VM that is {state:?}"
                )));
            }
        };
        if self.vm.is_none() {
            return Err(ApiError::conflict(
                "Cannot live-update a VM that is not booted",
            ));
        }
        let format = self.state_format(&config, request)?;
        self.emit("vm", "live-update-started");
        // Kexec mode: devices with kexec=detach leave the guest first (guest running).
        let runs_kexec = || {
            live_update::agent_runs_kexec(agent).map_err(|e| ApiError::from_error(e.status(), &e))
        };
        let detached = self.detach_for_kexec(&config, runs_kexec)?;
        // A device the guest ejected on its own meanwhile is now marked removed.
        let config = self.config.clone().unwrap_or(config);
        let Some(vm) = self.vm.as_mut() else {
            return Err(ApiError::conflict(
                "Cannot live-update a VM that is not booted",
            ));
        };
        match live_update::run_outgoing(vm, &config, format, agent, session) {
            Ok(handed_over) => {
                let timings = handed_over.timings;
                let properties = live_update::timings_properties(&timings);
                self.emit_with("vm", "live-update-handed-over", Some(&properties));
                if handed_over.successor_ready {
                    // The successor resumes the guest in a few milliseconds: answer then, so
                    // the caller's next steps do not take the CPUs from it meanwhile (and the
                    // answer says the guest runs again). A successor started on the answer
                    // is not waited for: the teardown waits for it instead.
                    live_update::wait_released(&handed_over.agent, session);
                    self.retire_vm(None);
                } else {
                    self.retire_vm(Some((handed_over.agent, session)));
                }
                self.state = VmState::Shutdown;
                Ok(timings)
            }
            Err(error) => {
                if was_paused && let Some(vm) = self.vm.as_mut() {
                    vm.pause();
                }
                self.reattach(&config, &detached);
                let mut properties = BTreeMap::new();
                properties.insert("error".to_string(), error.to_string());
                self.emit_with("vm", "live-update-cancelled", Some(&properties));
                Err(ApiError::from_error(error.status(), &error))
            }
        }
    }

    /// The state format `request` asks for, checked against the VM before anything of the
    /// update runs: an unknown release is a bad request, a VM whose state that release cannot
    /// hold (devices out of its order) a conflict.
    pub(super) fn state_format(
        &self,
        config: &VmConfig,
        request: &LiveUpdateConfig,
    ) -> Result<StateFormat, ApiError> {
        let format = StateFormat::requested(request.state_format.as_deref())
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let Some(vm) = &self.vm {
            vm.check_state_format(config, format)
                .map_err(ApiError::conflict)?;
        }
        Ok(format)
    }

    /// `vm.add-user-device`: before boot (or after a shutdown) the device joins the
    /// configuration and is attached at the next boot (204); on a booted VM it is attached
    /// now and placed on the PCI bus (200 with its id and BDF). Either way it stays in the
    /// configuration, so a reboot and a live update carry it. On error nothing changes.
    fn add_user_device(
        &mut self,
        device: UserDeviceConfig,
        state: VmState,
    ) -> Result<ApiResponse, ApiError> {
        device.check_socket()?;
        self.add_pci_device(
            state,
            |config| config.add_user_device(device),
            Vm::add_user_device,
        )
    }

    /// `vm.add-device`: as `vm.add-user-device`, for a kernel VFIO device (a host PCI
    /// function bound to vfio-pci, opened and reset on attach).
    fn add_vfio_device(
        &mut self,
        device: DeviceConfig,
        state: VmState,
    ) -> Result<ApiResponse, ApiError> {
        device.check_path()?;
        self.add_pci_device(
            state,
            |config| config.add_vfio_device(device),
            Vm::add_vfio_device,
        )
    }

    /// `vm.add-net`: as `vm.add-user-device`, for a network card, on taps opened by name or
    /// passed with the request (`SCM_RIGHTS`). Passed fds are checked to be taps before
    /// anything changes; a refused card closes them.
    fn add_net(
        &mut self,
        net: NetConfig,
        fds: &PassedFds,
        state: VmState,
    ) -> Result<ApiResponse, ApiError> {
        let fds = fds.take();
        for fd in &fds {
            let copy = fd.try_clone().map_err(|e| ApiError::internal(&e))?;
            tap::Tap::from_fd(copy).map_err(|e| ApiError::from_error(400, &e))?;
        }
        let mut added = None;
        let result = self.add_pci_device(
            state,
            |config| {
                let id = config.add_net(net)?;
                if !fds.is_empty() {
                    give_tap_fds(&id, fds);
                }
                added = Some(id.clone());
                Ok(id)
            },
            Vm::add_net,
        );
        if result.is_err()
            && let Some(id) = added
        {
            forget_tap_fds(&id);
        }
        result
    }

    /// `vm.add-vsock`: as `vm.add-user-device`, for the VM's one vsock device. Its socket path
    /// must be free (checked now, and again when it is bound).
    fn add_vsock(&mut self, vsock: VsockConfig, state: VmState) -> Result<ApiResponse, ApiError> {
        vsock.check_socket()?;
        self.add_pci_device(state, |config| config.add_vsock(vsock), Vm::add_vsock)
    }

    /// Adds a PCI device: `append` puts it last in a copy of the configuration (409 on a
    /// taken id), then it is either kept for the next boot (204) or `attach`ed to the booted
    /// VM (200 with its id and BDF, event vm/device-added). The configuration changes only
    /// once everything succeeded.
    fn add_pci_device(
        &mut self,
        state: VmState,
        append: impl FnOnce(&mut VmConfig) -> Result<String, ConfigError>,
        attach: impl FnOnce(&mut Vm, &VmConfig) -> Result<u8, DeviceError>,
    ) -> Result<ApiResponse, ApiError> {
        let Some(config) = self.config.as_ref() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        let mut updated = config.clone();
        let id = append(&mut updated).map_err(|e| ApiError::from_error(409, &e))?;
        let vm = match (state, self.vm.as_mut()) {
            (VmState::Running | VmState::Paused, Some(vm)) => vm,
            _ => {
                updated.validate()?;
                self.config = Some(updated);
                return Ok(ApiResponse::Empty);
            }
        };
        let slot =
            attach(vm, &updated).map_err(|e| ApiError::from_error(hot_add_status(&e), &e))?;
        self.config = Some(updated);
        let info = PciDeviceInfo::new(id, slot);
        let mut properties = BTreeMap::new();
        properties.insert("id".to_string(), info.id.clone());
        properties.insert("bdf".to_string(), info.bdf.clone());
        self.emit_with("vm", "device-added", Some(&properties));
        let body = serde_json::to_value(&info).map_err(|e| ApiError::internal(&e))?;
        Ok(ApiResponse::Json(body))
    }
}

/// A device the socket does not serve, or a host device VFIO cannot open (e.g. not bound to
/// vfio-pci), is the caller's error; a full bus is a conflict; the rest (KVM refusing a
/// route) is ours.
fn hot_add_status(error: &DeviceError) -> u16 {
    match error {
        DeviceError::UserDevice { .. } | DeviceError::Vfio { .. } => 400,
        DeviceError::Net { .. } | DeviceError::Vsock { .. } | DeviceError::VsockConfig(_) => 400,
        DeviceError::Pci(_) | DeviceError::Bus(_) => 409,
        _ => 500,
    }
}

fn ping_body() -> serde_json::Value {
    serde_json::json!({
        "build_version": env!("CARGO_PKG_VERSION"),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "features": ["kvm"],
    })
}

fn verb(request: &ApiRequest) -> &'static str {
    match request {
        ApiRequest::VmBoot => "boot",
        ApiRequest::VmPause => "pause",
        ApiRequest::VmResume => "resume",
        ApiRequest::VmShutdown => "shut down",
        ApiRequest::VmReboot => "reboot",
        _ => "act on",
    }
}
