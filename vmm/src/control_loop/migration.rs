//! cloud-hypervisor's local migration (`send-migration local=on`, `receive-migration`) as a
//! restart-mode live update: the receiving VMM serves a session agent of its own (userspace
//! sessions, as `ch-luod --emulate`) on the `receiver_url` socket and waits there for the VM
//! like a successor started ahead; the sending VMM live-updates its VM into that agent. Guest
//! RAM and device fds pass over the socket, nothing is copied, and the pause is the live
//! update's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use liveupdate::agent::{AgentServer, AgentState, HandoverMode, ShutdownHandle, effective_uid};
use liveupdate::emulated::EmulatedProvider;
use log::{info, warn};

use crate::api::{ApiError, ApiResponse, LiveUpdateConfig};
use crate::config::{ReceiveMigrationData, RestoreConfig, SendMigrationData};
use crate::live_update::{self, IncomingFrom, LiveUpdateError, Restored};

use super::Vmm;

/// The session a local migration moves the VM in (the receiver's agent holds no other).
const MIGRATION_SESSION: &str = "local-migration";
/// How long a receiver waits for the sender, as cloud-hypervisor's default `timeout_s`.
const RECEIVE_WAIT: Duration = Duration::from_secs(3600);

/// A `vm.receive-migration` in progress: its caller waits for the answer.
pub(super) struct Receiving {
    reply: Sender<Result<ApiResponse, ApiError>>,
    agent: ShutdownHandle,
    agent_thread: JoinHandle<()>,
    socket: PathBuf,
}

impl Vmm {
    /// `vm.send-migration`: live-updates the VM into the receiver's agent. On success the VM
    /// is gone from this process.
    pub(super) fn send_migration(&mut self, request: &SendMigrationData) -> Result<(), ApiError> {
        let socket = request
            .local_socket()
            .map_err(|e| ApiError::from_error(e.status(), &e))?;
        self.emit("vm", "migration-started");
        let update = LiveUpdateConfig {
            session: MIGRATION_SESSION.to_string(),
            state_format: None,
        };
        match self.hand_over(&socket, &update) {
            Ok(timings) => {
                let properties = live_update::timings_properties(&timings);
                self.emit_with("vm", "migration-finished", Some(&properties));
                Ok(())
            }
            Err(error) => {
                let properties = BTreeMap::from([("error".to_string(), error.messages.join(": "))]);
                self.emit_with("vm", "migration-failed", Some(&properties));
                Err(error)
            }
        }
    }

    /// `vm.receive-migration`: serves an agent on the receiver socket and starts waiting for
    /// the VM there. The caller's answer comes once the VM runs here (or the receive failed).
    pub(super) fn start_receive(
        &mut self,
        request: &ReceiveMigrationData,
        reply: Sender<Result<ApiResponse, ApiError>>,
    ) {
        match self.serve_receiver(request) {
            Ok((socket, agent, agent_thread)) => {
                info!("Waiting for a migration on {}", socket.display());
                self.emit("vm", "migration-receive-ready");
                let restore = RestoreConfig {
                    session: MIGRATION_SESSION.to_string(),
                    resume: true,
                    net_fds: Vec::new(),
                    timeout: Some(RECEIVE_WAIT),
                };
                let from = IncomingFrom::Agent(socket.clone(), RECEIVE_WAIT);
                self.receiving = Some(Receiving {
                    reply,
                    agent,
                    agent_thread,
                    socket,
                });
                self.start_restore(restore, from);
            }
            Err(error) => {
                if reply.send(Err(error)).is_err() {
                    warn!("API client went away before its answer");
                }
            }
        }
    }

    fn serve_receiver(
        &self,
        request: &ReceiveMigrationData,
    ) -> Result<(PathBuf, ShutdownHandle, JoinHandle<()>), ApiError> {
        if self.config.is_some() || self.restoring.is_some() || self.receiving.is_some() {
            return Err(ApiError::conflict(
                "A VM exists (or is being received) already: a migration is received by a VMM without one",
            ));
        }
        let socket = request
            .local_socket()
            .map_err(|e| ApiError::from_error(e.status(), &e))?;
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = HandoverMode::Restart(Box::new(move |name: &str| holder.handover(name)));
        let state = AgentState::new(Box::new(provider), handover, effective_uid());
        let server =
            AgentServer::bind(&socket, 0o600, state).map_err(|e| ApiError::from_error(400, &e))?;
        let shutdown = server.shutdown_handle();
        let thread = std::thread::Builder::new()
            .name("migration-agent".into())
            .spawn(move || {
                if let Err(e) = server.run() {
                    warn!("The migration receiver's agent failed: {e}");
                }
            })
            .map_err(|e| ApiError::internal(&e))?;
        Ok((socket, shutdown, thread))
    }

    /// Answers the `vm.receive-migration` caller once the restore is over, and stops serving
    /// the receiver socket. Returns the result when no receive was in progress.
    pub(super) fn end_receive(
        &mut self,
        restore: &RestoreConfig,
        result: Result<Restored, LiveUpdateError>,
    ) -> Option<Result<Restored, LiveUpdateError>> {
        let Some(receiving) = self.receiving.take() else {
            return Some(result);
        };
        receiving.agent.shutdown();
        if receiving.agent_thread.join().is_err() {
            warn!("The migration receiver's agent thread panicked");
        }
        let answer = match result {
            Ok(restored) => {
                self.finish_restore(restore.resume, restored);
                info!("Migration received on {}", receiving.socket.display());
                self.emit("vm", "migration-receive-finished");
                Ok(ApiResponse::Empty)
            }
            Err(error) => {
                // Nothing ran here: this VMM stays empty and may receive again.
                self.restoring = None;
                let error = ApiError::from_error(500, &error);
                let properties = BTreeMap::from([("error".to_string(), error.messages.join(": "))]);
                self.emit_with("vm", "migration-receive-failed", Some(&properties));
                Err(error)
            }
        };
        if receiving.reply.send(answer).is_err() {
            warn!("The receive-migration caller went away before its answer");
        }
        None
    }
}
