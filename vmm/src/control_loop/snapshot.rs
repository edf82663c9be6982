//! `vm.snapshot`, `vm.restore` and `--restore source_url=file:///dir` on the control loop (see
//! `crate::snapshot`). Both run on the loop itself: a snapshot pauses the guest only while it
//! is written, and a restore happens in a VMM that has no VM to serve meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::{ApiError, ApiResponse};
use crate::config::{SnapshotRestore, VmSnapshotConfig};
use crate::live_update;
use crate::snapshot::{self, SnapshotError};

use super::{VmState, Vmm, VmmEvent};

impl Vmm {
    /// `vm.snapshot`: writes the booted VM into the request's directory; the guest runs on (a
    /// paused VM stays paused). Event `vm/snapshotted` says how long the guest was paused
    /// (`guest_paused_us`).
    pub(super) fn snapshot(&mut self, request: &VmSnapshotConfig) -> Result<ApiResponse, ApiError> {
        let dir = request
            .directory()
            .map_err(|e| ApiError::from_error(400, &e))?;
        let Some(config) = self.config.clone() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        if !matches!(self.state, VmState::Running | VmState::Paused) || self.vm.is_none() {
            return Err(ApiError::conflict(format!(
                "Cannot snapshot a VM that is {:?}",
                self.state
            )));
        }
        self.emit("vm", "snapshotting");
        let result = match self.vm.as_mut() {
            Some(vm) => snapshot::snapshot(vm, &config, &dir),
            None => {
                return Err(ApiError::conflict(
                    "Cannot snapshot a VM that is not booted",
                ));
            }
        };
        match result {
            Ok(timings) => {
                let mut properties = live_update::timings_properties(&timings);
                properties.insert("destination".into(), dir.display().to_string());
                self.emit_with("vm", "snapshotted", Some(&properties));
                Ok(ApiResponse::Empty)
            }
            Err(error) => {
                let properties = BTreeMap::from([("error".to_string(), error.to_string())]);
                self.emit_with("vm", "snapshot-failed", Some(&properties));
                Err(ApiError::from_error(error.status(), &error))
            }
        }
    }

    /// `vm.restore`: restores a snapshot in a VMM without a VM.
    pub(super) fn restore_snapshot(
        &mut self,
        restore: &SnapshotRestore,
    ) -> Result<ApiResponse, ApiError> {
        if self.config.is_some() || self.restoring.is_some() || self.receiving.is_some() {
            return Err(ApiError::conflict(
                "A VM exists already: a snapshot is restored in a VMM without one",
            ));
        }
        self.restore_from_directory(restore)
            .map_err(|e| ApiError::from_error(e.status(), &e))?;
        Ok(ApiResponse::Empty)
    }

    /// Restores the snapshot `restore` names and installs its VM, running or paused. On error
    /// nothing was started and this VMM stays without a VM.
    pub(super) fn restore_from_directory(
        &mut self,
        restore: &SnapshotRestore,
    ) -> Result<(), SnapshotError> {
        self.emit("vm", "restoring");
        let events = self.events.clone();
        let on_vcpu_event = Arc::new(move |event| {
            let _ = events.send(VmmEvent::Vcpu(event));
        });
        match snapshot::restore(&restore.directory, restore.resume, on_vcpu_event) {
            Ok(restored) => {
                self.finish_restore(restore.resume, restored);
                if restore.resume {
                    // As cloud-hypervisor, which resumes a restored VM as a second step.
                    self.emit("vm", "resuming");
                    self.emit("vm", "resumed");
                }
                Ok(())
            }
            Err(error) => {
                let properties = BTreeMap::from([("error".to_string(), error.to_string())]);
                self.emit_with("vm", "restore-failed", Some(&properties));
                Err(error)
            }
        }
    }
}
