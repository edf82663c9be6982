//! Live update of a running VM through the session agent (`ch-luod`).
//!
//! Outgoing ([`run_outgoing`], in the old VMM): create a session at the agent, run the state
//! machine over the VM's participants (see [`participants`]), and hand the session over; on any
//! failure cancel it at the agent, so nothing stays preserved, and the guest runs on.
//!
//! Incoming ([`run_incoming`], in the successor): wait for the session to be handed over (a
//! successor may start first), read and check its state, rebuild the VM on the very same RAM
//! memfd, resume, finish. A state this build cannot use is refused before anything runs and the
//! session is left unfinished at the agent, so a build that can read it may take it.

pub mod participants;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use liveupdate::agent::{AgentClient, AgentError, AgentSession, ErrorKind};
use liveupdate::machine::{Incoming, MachineError, Timings};
use log::{info, warn};
use thiserror::Error;

use crate::config::{RestoreConfig, VmConfig};
use crate::sys;
use crate::vcpu_thread::VcpuEvent;
use crate::vm::{Vm, VmError};

/// How long a successor waits for its session to be handed over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(120);
/// How often a waiting successor asks the agent.
const HANDOVER_POLL: Duration = Duration::from_micros(200);

/// Why a live update or a restore failed.
#[derive(Debug, Error)]
pub enum LiveUpdateError {
    /// The agent could not be reached or refused a request.
    #[error("Session agent at {path} failed")]
    Agent {
        /// Its socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: AgentError,
    },
    /// The state memfd could not be created.
    #[error("Cannot create the state memfd")]
    StateFile(#[source] std::io::Error),
    /// The VM could not be updated or rebuilt.
    #[error("The VM could not be carried over")]
    Vm(#[source] VmError),
    /// The session's state could not be read.
    #[error("The session's state is unusable; the session is kept for a build that can read it")]
    State(#[source] MachineError),
    /// No handover came within [`HANDOVER_WAIT`].
    #[error("Session {session} was not handed over within {}s", HANDOVER_WAIT.as_secs())]
    NoHandover {
        /// The session.
        session: String,
    },
}

impl LiveUpdateError {
    /// The HTTP status for the API: 409 for a session name in use, 500 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::Agent { source, .. } if source.kind() == Some(ErrorKind::SessionExists) => 409,
            _ => 500,
        }
    }
}

/// Runs the live update of `vm` into session `name`, held by the agent at `agent`. On success
/// the session is handed over and `vm` must not run again; on failure it runs on.
pub fn run_outgoing(
    vm: &mut Vm,
    config: &VmConfig,
    agent: &Path,
    name: &str,
) -> Result<Timings, LiveUpdateError> {
    let agent_error = |source| LiveUpdateError::Agent {
        path: agent.to_path_buf(),
        source,
    };
    let mut client = AgentClient::connect(agent).map_err(agent_error)?;
    client.create_session(name).map_err(agent_error)?;
    let client = Arc::new(Mutex::new(client));
    let session = AgentSession::new(client.clone(), name);
    let state_file = sys::memfd_create(c"liveupdate-state").map_err(LiveUpdateError::StateFile)?;
    let result = vm.live_update(config, Box::new(session), state_file, |_session| {
        lock(&client).handover(name).map_err(|e| e.to_string())
    });
    match result {
        Ok(timings) => {
            info!("VM handed over in session {name:?}: {:?}", timings.steps);
            Ok(timings)
        }
        Err(error) => {
            // Unpreserve everything: a cancelled update must leave nothing pinned behind.
            if let Err(e) = lock(&client).cancel(name) {
                warn!("Cannot cancel session {name:?} at the agent: {e}");
            }
            Err(LiveUpdateError::Vm(error))
        }
    }
}

/// A VM taken over from a session.
#[derive(Debug)]
pub struct Restored {
    /// The running (or paused) VM.
    pub vm: Vm,
    /// Its configuration, as saved.
    pub config: VmConfig,
    /// Step timings of the takeover, plus `pause` as the host saw it (from the old VMM's
    /// pause to this resume), when the guest was resumed.
    pub timings: Timings,
}

/// Takes over the VM of session `restore.session` from the agent at `agent`.
pub fn run_incoming(
    agent: &Path,
    restore: &RestoreConfig,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
) -> Result<Restored, LiveUpdateError> {
    let name = restore.session.as_str();
    let agent_error = |source| LiveUpdateError::Agent {
        path: agent.to_path_buf(),
        source,
    };
    let start = Instant::now();
    let mut client = AgentClient::connect(agent).map_err(agent_error)?;
    wait_for_handover(&mut client, name).map_err(|e| match e {
        Some(source) => agent_error(source),
        None => LiveUpdateError::NoHandover {
            session: name.to_string(),
        },
    })?;
    let retrieved = Instant::now();
    let client = Arc::new(Mutex::new(client));
    let session = AgentSession::new(client, name);
    let mut incoming =
        Incoming::restore(Box::new(session)).map_err(|(_session, e)| LiveUpdateError::State(e))?;
    let (vm, config, paused_at_ns) =
        Vm::restore(&mut incoming, on_event, restore.resume).map_err(LiveUpdateError::Vm)?;
    let resumed_at_ns = participants::realtime_ns();
    let restored = Instant::now();
    if let Err(e) = incoming.finish() {
        // The VM runs; the agent keeps the session's resources until it is finished by hand.
        warn!("Cannot finish session {name:?}: {e}");
    }
    let mut timings = std::mem::take(incoming.timings_mut());
    timings.record("retrieve", retrieved.duration_since(start));
    timings.record("restore", restored.duration_since(retrieved));
    if restore.resume {
        timings.steps.push((
            "pause".into(),
            resumed_at_ns.saturating_sub(paused_at_ns) / 1000,
        ));
    }
    info!("VM restored from session {name:?}: {:?}", timings.steps);
    Ok(Restored {
        vm,
        config,
        timings,
    })
}

/// Retrieves the session, waiting while it has not been handed over yet. `Err(None)` on timeout.
fn wait_for_handover(client: &mut AgentClient, name: &str) -> Result<(), Option<AgentError>> {
    let deadline = Instant::now() + HANDOVER_WAIT;
    loop {
        match client.retrieve_session(name) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == Some(ErrorKind::NoSuchSession) && Instant::now() < deadline => {
                std::thread::sleep(HANDOVER_POLL);
            }
            Err(e) if e.kind() == Some(ErrorKind::NoSuchSession) => return Err(None),
            Err(e) => return Err(Some(e)),
        }
    }
}

/// Creates the empty memfd the state blob is written into.
pub fn state_memfd() -> std::io::Result<File> {
    sys::memfd_create(c"liveupdate-state")
}
