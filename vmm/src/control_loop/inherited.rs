//! `--liveupdate inherit=` on the control loop: live updates into the session the service
//! manager passed (`crate::live_update::inherited`), and the requests that void such an update.

use std::collections::BTreeMap;

use crate::api::{ApiError, ApiRequest, ApiResponse, LiveUpdateConfig};
use crate::live_update::{self, LiveUpdateError};

use super::{Next, VmState, Vmm};

impl Vmm {
    /// `--liveupdate inherit=`: a live update goes into the inherited session and the guest
    /// stays paused here (the process lives on until stopped); resuming, rebooting, shutting
    /// down or deleting the VM first voids the state saved in the session. Everything else, and
    /// every request without an inherited session, is given back for `handle_api`.
    #[allow(clippy::type_complexity)]
    pub(super) fn inherited_api(
        &mut self,
        request: ApiRequest,
    ) -> Result<(Result<ApiResponse, ApiError>, Next), Box<ApiRequest>> {
        let Some(inherited) = self.inherited.as_mut() else {
            return Err(Box::new(request));
        };
        match request {
            // The saved VM is left behind: a kexec must not bring it back.
            ApiRequest::VmResume
            | ApiRequest::VmReboot
            | ApiRequest::VmShutdown
            | ApiRequest::VmDelete
                if self.state == VmState::Paused =>
            {
                inherited.void_update();
                Err(Box::new(request))
            }
            ApiRequest::VmLiveUpdate(body) => {
                Ok((self.live_update_inherited(&body), Next::Continue))
            }
            other => Err(Box::new(other)),
        }
    }

    fn live_update_inherited(
        &mut self,
        request: &LiveUpdateConfig,
    ) -> Result<ApiResponse, ApiError> {
        let session = request.session.as_str();
        let status = |e: LiveUpdateError| ApiError::from_error(e.status(), &e);
        let Some(config) = self.config.clone() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        let format = self.state_format(&config, request)?;
        let Some(inherited) = self.inherited.as_mut() else {
            return Err(ApiError::not_found("VM is not created"));
        };
        inherited.check_update(session).map_err(status)?;
        let was_paused = match (self.state, self.vm.as_mut()) {
            (VmState::Running, Some(_)) => false,
            (VmState::Paused, Some(_)) => true,
            (state, _) => {
                return Err(ApiError::conflict(format!(
                    "Cannot live-update a VM that is {state:?}"
                )));
            }
        };
        self.emit("vm", "live-update-started");
        // An inherited session is always a kernel (kexec) session.
        let detached = self.detach_for_kexec(&config, || Ok(true))?;
        // A device the guest ejected on its own meanwhile is now marked removed.
        let config = self.config.clone().unwrap_or(config);
        let (Some(inherited), Some(vm)) = (self.inherited.as_mut(), self.vm.as_mut()) else {
            return Err(ApiError::conflict(
                "Cannot live-update a VM that is not booted",
            ));
        };
        match inherited.run_outgoing(vm, &config, format, session) {
            Ok(timings) => {
                let properties = live_update::timings_properties(&timings);
                self.emit_with("vm", "live-update-handed-over", Some(&properties));
                self.state = VmState::Paused;
                Ok(ApiResponse::Json(live_update::timings_body(
                    session, &timings,
                )))
            }
            Err(error) => {
                if was_paused {
                    vm.pause();
                }
                self.reattach(&config, &detached);
                let mut properties = BTreeMap::new();
                properties.insert("error".to_string(), error.to_string());
                self.emit_with("vm", "live-update-cancelled", Some(&properties));
                Err(status(error))
            }
        }
    }
}
