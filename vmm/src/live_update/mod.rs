//! Live update of a running VM through the session agent (`ch-luod`), or through a session fd
//! the service manager passed ([`inherited`], `--liveupdate inherit=NAME`).
//!
//! Outgoing ([`run_outgoing`], in the old VMM): create a session at the agent, run the state
//! machine over the VM's participants (see [`participants`]), and hand the session over; on any
//! failure cancel it at the agent, so nothing stays preserved, and the guest runs on.
//!
//! Incoming ([`run_incoming`], in the successor): wait for the session to be handed over (a
//! successor may start first), read and check its state, rebuild the VM on the very same RAM
//! memfd, resume, finish. A state this build cannot use is refused before anything runs and the
//! session is left unfinished at the agent, so a build that can read it may take it.

pub mod inherited;
pub mod participants;
pub mod pause_priority;
pub mod routes_ahead;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use liveupdate::agent::{
    AgentClient, AgentError, AgentSession, Direction, ErrorKind, HeldBack, Taken,
};
use liveupdate::fault::{self, FaultStep};
use liveupdate::kernel::KernelSession;
use liveupdate::machine::{Incoming, MachineError, Timings};
use liveupdate::participant::STATE_TOKEN;
use liveupdate::session::{Session, SessionError};
use log::{info, warn};
use thiserror::Error;

use crate::config::{RestoreConfig, VmConfig};
use crate::state_format::StateFormat;
use crate::sys;
use crate::vcpu_thread::VcpuEvent;
use crate::vm::{PauseSpan, Prebuilt, Vm, VmError};
pub use inherited::Inherited;
use participants::RAM_TOKEN;
use pause_priority::PausePriority;

/// How long a successor waits for its session to be handed over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(120);
/// How long the old VMM waits, guest running, for a successor started ahead to build its VM.
pub const SUCCESSOR_WAIT: Duration = Duration::from_secs(5);
/// How long a kernel-mode live update waits, guest running, for the agent to finish loading
/// the next kernel.
pub const KEXEC_LOAD_WAIT: Duration = Duration::from_secs(60);
/// How often it looks meanwhile.
const KEXEC_LOAD_POLL: Duration = Duration::from_millis(20);
/// How often a waiting successor says it still waits.
const WAIT_REPORT: Duration = Duration::from_secs(10);
/// How often a successor started ahead looks for guest RAM in an outgoing session that exists
/// (the old VMM is preparing it).
const HANDOVER_POLL: Duration = Duration::from_micros(200);
/// How often, at most, it looks while there is no such session yet, with an agent that cannot
/// wait for it (`wait_prepared`): the wait doubles up to this, so successors waiting for their
/// update do not keep the agent busy (each look is two requests). It only delays the old VMM's
/// wait for the successor, with the guest running.
const HANDOVER_POLL_IDLE: Duration = Duration::from_millis(20);

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
    /// The fault injector's `fail@STEP` (a test hook, see `liveupdate::fault`).
    #[error("Fault injected for a test: {0}")]
    Fault(String),
    /// The restore thread could not start.
    #[error("Cannot start the restore thread")]
    Thread(#[source] std::io::Error),
    /// No handover came within the wait (by default [`HANDOVER_WAIT`]).
    #[error("Session {session} was not handed over within {}s ({known})", waited.as_secs())]
    NoHandover {
        /// The session.
        session: String,
        /// How long the successor waited.
        waited: Duration,
        /// What the agent knows of it.
        known: &'static str,
    },
    /// A kernel-mode agent (sessions come only across a kexec) holds no such incoming session:
    /// waiting cannot help.
    #[error(
        "The agent (kernel mode: sessions arrive only across a kexec) holds no incoming session {session:?}; incoming sessions: {incoming:?}"
    )]
    NoIncomingSession {
        /// The session asked for.
        session: String,
        /// The incoming sessions the agent holds.
        incoming: Vec<String>,
    },
    /// The request names a session other than the inherited one.
    #[error(
        "Session {asked:?} is not the inherited session: give {fd_name:?} (its kernel name is {kernel_name:?})"
    )]
    WrongSession {
        /// The name asked for.
        asked: String,
        /// The name the session was passed under.
        fd_name: String,
        /// The kernel's name of it.
        kernel_name: String,
    },
    /// The inherited session cannot take another update.
    #[error("Inherited session {session:?} takes no further live update: {why}")]
    SessionUsed {
        /// The session's fd name.
        session: String,
        /// Why not.
        why: &'static str,
    },
    /// An operation on the inherited session failed.
    #[error("Inherited session operation failed")]
    Session(#[source] SessionError),
    /// Kernel mode without a next kernel loaded at the agent: the guest would wait paused for
    /// a kexec that may never come.
    #[error(
        "No next kernel is loaded at the agent (kexec {phase}): load it first (ch-luod kexec); the guest was not paused"
    )]
    NoNextKernel {
        /// The agent's kexec phase: `idle`, or `loading` still after [`KEXEC_LOAD_WAIT`].
        phase: String,
    },
}

impl LiveUpdateError {
    /// The HTTP status for the API: 400 for a session other than the inherited one, 409 for a
    /// session name in use or an inherited session used already, 500 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::Agent { source, .. } if source.kind() == Some(ErrorKind::SessionExists) => 409,
            Self::WrongSession { .. } => 400,
            Self::SessionUsed { .. } | Self::NoNextKernel { .. } => 409,
            _ => 500,
        }
    }
}

/// Whether the agent at `agent` runs kexec-mode updates (it owns `/dev/liveupdate`), rather
/// than restart-mode ones.
pub fn agent_runs_kexec(agent: &Path) -> Result<bool, LiveUpdateError> {
    let agent_error = |source| LiveUpdateError::Agent {
        path: agent.to_path_buf(),
        source,
    };
    let mode = AgentClient::connect(agent)
        .and_then(|mut client| client.ping())
        .map_err(agent_error)?;
    Ok(mode == "kernel")
}

/// For a kernel-mode agent: the guest stays paused from its freeze until the kexec, so a live
/// update pauses it only once the agent has the next kernel loaded (`ch-luod kexec` before the
/// update), waiting up to [`KEXEC_LOAD_WAIT`] while it loads; run after prepare, so a device
/// that cannot cross a kexec at all says so first. An agent that refused the target (a
/// command line that would drop the sessions, an image that does not load) is idle: the update
/// is refused before the guest is paused. An agent too old to answer passes (with a warning).
fn check_next_kernel(client: &mut AgentClient) -> Result<(), LiveUpdateError> {
    let deadline = Instant::now() + KEXEC_LOAD_WAIT;
    loop {
        let phase = match client.kexec_status() {
            Ok(phase) => phase,
            Err(e) if e.kind() == Some(ErrorKind::BadRequest) => {
                warn!("The agent cannot tell whether a next kernel is loaded ({e}); going on");
                return Ok(());
            }
            Err(e) => return Err(agent_failure(client, e)),
        };
        match phase.as_str() {
            "loaded" => return Ok(()),
            "loading" if Instant::now() < deadline => std::thread::sleep(KEXEC_LOAD_POLL),
            _ => return Err(LiveUpdateError::NoNextKernel { phase }),
        }
    }
}

/// An old VMM's connection to the agent, shared by the steps of its update.
pub type AgentConnection = Arc<Mutex<AgentClient>>;

/// A live update handed over by [`run_outgoing`].
#[derive(Debug)]
pub struct HandedOver {
    /// Each step's time.
    pub timings: Timings,
    /// Whether a successor started ahead was ready when the guest paused: it takes the session
    /// at once and resumes the guest within milliseconds.
    pub successor_ready: bool,
    /// The update's connection to the agent, for [`wait_released`]: a new one would have the
    /// agent accept it and start a thread for it while the successor restores the guest.
    pub agent: AgentConnection,
}

/// Runs the live update of `vm` into session `name`, held by the agent at `agent`. On success
/// the session is handed over and `vm` must not run again; on failure it runs on.
pub fn run_outgoing(
    vm: &mut Vm,
    config: &VmConfig,
    format: StateFormat,
    agent: &Path,
    name: &str,
) -> Result<HandedOver, LiveUpdateError> {
    let agent_error = |source| LiveUpdateError::Agent {
        path: agent.to_path_buf(),
        source,
    };
    let mut client = AgentClient::connect(agent).map_err(agent_error)?;
    let kexec = client.ping().map_err(agent_error)? == "kernel";
    client.create_session(name).map_err(agent_error)?;
    let client = Arc::new(Mutex::new(client));
    // The state blob goes to the agent with the handover, not in a round trip of its own.
    let held_back = HeldBack::default();
    let session = AgentSession::new(client.clone(), name)
        .holding_back(STATE_TOKEN, held_back.clone())
        .in_restart_mode(!kexec);
    let state_file = state_memfd().map_err(LiveUpdateError::StateFile)?;
    // Kernel mode: the pause lasts until the kexec, so there must be a next kernel to go to.
    // Restart mode: a successor started ahead builds its VM on the preserved RAM meanwhile.
    let mut stopped = None;
    let mut successor_ready = false;
    let before_pause = || {
        // On the update's own connection: no second connection in the prepare phase.
        let checked = if kexec {
            check_next_kernel(&mut lock(&client))
        } else {
            Ok(())
        };
        if let Err(error) = checked {
            let why = error.to_string();
            stopped = Some(error);
            return Err(why);
        }
        let successor = lock(&client).wait_successor(name, SUCCESSOR_WAIT);
        match successor {
            Ok((true, true)) => {
                successor_ready = true;
                info!("Successor for session {name:?} is ready");
                wait_for_pause_slot(&mut lock(&client), name);
            }
            Ok((true, false)) => warn!(
                "Successor for session {name:?} not ready after {SUCCESSOR_WAIT:?}; pausing anyway"
            ),
            Ok((false, _)) => info!("No successor waits for session {name:?} yet"),
            Err(e) => warn!("Cannot ask the agent about a successor: {e}"),
        }
        Ok(())
    };
    let result = vm.live_update(
        config,
        format,
        Box::new(session),
        state_file,
        before_pause,
        |_session| {
            fault::fail_point(FaultStep::Handover)?;
            let state = lock(&held_back).take().map(|fd| (fd, STATE_TOKEN));
            lock(&client)
                .hand_over(name, state)
                .map_err(|e| e.to_string())?;
            // The successor has the session now: dying here loses nothing.
            fault::kill_point(FaultStep::Handover);
            Ok(())
        },
    );
    match result {
        Ok(timings) => {
            info!("VM handed over in session {name:?}: {:?}", timings.steps);
            Ok(HandedOver {
                timings,
                successor_ready,
                agent: client,
            })
        }
        Err(error) => {
            // Unpreserve everything: a cancelled update must leave nothing pinned behind.
            if let Err(e) = lock(&client).cancel(name) {
                warn!("Cannot cancel session {name:?} at the agent: {e}");
            }
            Err(stopped.unwrap_or(LiveUpdateError::Vm(error)))
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

/// Where a restore takes its session from.
#[derive(Debug)]
pub enum IncomingFrom {
    /// The session agent at this socket, waited for this long.
    Agent(PathBuf, Duration),
    /// The inherited session (or why it cannot be used).
    Inherited(Result<KernelSession, LiveUpdateError>),
}

impl IncomingFrom {
    /// The inherited session if there is one, else the agent at `agent`.
    pub fn new(agent: &Path, inherited: Option<&mut Inherited>, restore: &RestoreConfig) -> Self {
        match inherited {
            Some(inherited) => Self::Inherited(inherited.incoming_session(&restore.session)),
            None => Self::Agent(
                agent.to_path_buf(),
                restore.timeout.unwrap_or(HANDOVER_WAIT),
            ),
        }
    }
}

/// Takes over the VM of session `restore.session` from `from`.
pub fn run_incoming_from(
    from: IncomingFrom,
    restore: &RestoreConfig,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
) -> Result<Restored, LiveUpdateError> {
    match from {
        IncomingFrom::Agent(agent, wait) => run_incoming(&agent, wait, restore, on_event),
        IncomingFrom::Inherited(session) => {
            // The service manager retrieved it before this process started.
            let start = Instant::now();
            let retrieved_at_ns = participants::realtime_ns();
            let taken = TakeOver {
                start,
                retrieved: start,
                retrieved_at_ns,
                prebuilt: None,
            };
            take_over(Box::new(session?), taken, restore, on_event)
        }
    }
}

/// Takes over the VM of session `restore.session` from the agent at `agent`, waiting up to
/// `wait` for it to be handed over.
pub fn run_incoming(
    agent: &Path,
    wait: Duration,
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
    let (prebuilt, files) = wait_for_handover(&mut client, name, wait, &on_event)?;
    fault::reached(FaultStep::Retrieve).map_err(LiveUpdateError::Fault)?;
    let taken = TakeOver {
        start,
        retrieved: Instant::now(),
        retrieved_at_ns: participants::realtime_ns(),
        prebuilt,
    };
    let client = Arc::new(Mutex::new(client));
    take_over(
        Box::new(AgentSession::taken(client, name, files)),
        taken,
        restore,
        on_event,
    )
}

/// How far a takeover got before reading the session's state.
struct TakeOver {
    start: Instant,
    retrieved: Instant,
    retrieved_at_ns: u64,
    prebuilt: Option<Prebuilt>,
}

/// Reads the state of `session` (retrieved), rebuilds the VM, resumes it, finishes the session.
fn take_over(
    session: Box<dyn Session>,
    taken: TakeOver,
    restore: &RestoreConfig,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
) -> Result<Restored, LiveUpdateError> {
    let name = restore.session.as_str();
    // A successor started ahead raised itself as it said it was ready; one started after the
    // handover (after a kexec) restores at once.
    let _pause = taken
        .prebuilt
        .is_none()
        .then(|| PausePriority::raise([sys::current_tid()]));
    let mut incoming =
        Incoming::restore(session).map_err(|(_session, e)| LiveUpdateError::State(e))?;
    let (vm, config, span) = Vm::restore(&mut incoming, taken.prebuilt, on_event, restore.resume)
        .map_err(LiveUpdateError::Vm)?;
    let PauseSpan {
        paused_at_ns,
        resumed_at_ns,
    } = span;
    let restored = Instant::now();
    fault::kill_point(FaultStep::Resume);
    fault::kill_point(FaultStep::Finish);
    let finished = fault::fail_point(FaultStep::Finish)
        .map_err(|why| {
            MachineError::Session(SessionError::Os {
                operation: "finish",
                source: std::io::Error::other(why),
            })
        })
        .and_then(|()| incoming.finish());
    match finished {
        Ok(()) => info!("Session {name:?} finished"),
        // The VM runs; the agent released the session's files when it was marked resumed.
        Err(e) => warn!(
            "Cannot finish session {name:?}: {}",
            liveupdate::agent::protocol::error_chain(&e)
        ),
    }
    let mut timings = std::mem::take(incoming.timings_mut());
    timings.record("retrieve", taken.retrieved.duration_since(taken.start));
    timings.record("restore", restored.duration_since(taken.retrieved));
    if restore.resume {
        // As the host saw it: from the old VMM's vCPU pause to this resume, and the part of it
        // spent before this process had the session.
        let since_pause = |at: u64| at.saturating_sub(paused_at_ns) / 1000;
        timings
            .steps
            .push(("pause".into(), since_pause(resumed_at_ns)));
        timings
            .steps
            .push(("until_retrieved".into(), since_pause(taken.retrieved_at_ns)));
        // Both ends on the host's realtime clock, to line up many VMs updated at once.
        timings
            .steps
            .push(("paused_at_unix".into(), paused_at_ns / 1000));
        timings
            .steps
            .push(("resumed_at_unix".into(), resumed_at_ns / 1000));
    }
    info!("VM restored from session {name:?}: {:?}", timings.steps);
    Ok(Restored {
        vm,
        config,
        timings,
    })
}

/// The step timings as event properties: `<step>_us` = microseconds.
pub fn timings_properties(timings: &Timings) -> BTreeMap<String, String> {
    timings
        .steps
        .iter()
        .map(|(step, us)| (format!("{step}_us"), us.to_string()))
        .collect()
}

/// The API's answer to a live update: the session and each step's time in microseconds.
pub fn timings_body(session: &str, timings: &Timings) -> serde_json::Value {
    let timings_us: serde_json::Map<String, serde_json::Value> = timings
        .steps
        .iter()
        .map(|(step, us)| (step.clone(), (*us).into()))
        .collect();
    serde_json::json!({ "session": session, "timings_us": timings_us })
}

/// Retrieves the session, with its state file and the tokens of its attachments, waiting while
/// it has not been handed over yet. Meanwhile (restart mode), as soon as the old VMM has
/// preserved guest RAM, builds the KVM VM on it, so that the pause carries only vCPU and
/// device state, and starts the vCPU threads (reporting to `on_event`).
fn wait_for_handover(
    client: &mut AgentClient,
    name: &str,
    wait: Duration,
    on_event: &Arc<dyn Fn(VcpuEvent) + Send + Sync>,
) -> Result<(Option<Prebuilt>, Taken), LiveUpdateError> {
    let start = Instant::now();
    let deadline = start + wait;
    let mut prebuilt = None;
    let mut peek = true;
    // Agents before `wait_prepared` answer it `bad_request`: then look again and again.
    let mut wait_prepared = true;
    let mut idle_poll = HANDOVER_POLL;
    let mut next_report: Option<Instant> = None;
    // The first look does not wait: across a kexec the session is there already.
    let mut handover_wait = None;
    loop {
        let waited = handover_wait.take();
        match client.take_session(name, STATE_TOKEN, waited) {
            Ok(Ok(taken)) => return Ok((prebuilt, taken)),
            Ok(Err(e)) if e.kind() != Some(ErrorKind::NoSuchSession) => {
                return Err(agent_failure(client, e));
            }
            Ok(Err(_)) => {
                // Ready, yet no handover within a wait: the old VMM is slow, or stopped its
                // update. Idle CPUs need not poll while this waits on.
                if let (Some(_), Some(built)) = (waited, prebuilt.as_mut()) {
                    built.let_cpus_idle();
                }
            }
            Err(e) => return Err(agent_failure(client, e)),
        }
        let now = Instant::now();
        match next_report {
            None => {
                // Across a kexec every incoming session is there when the agent starts.
                if client.ping().map_err(|e| agent_failure(client, e))? == "kernel" {
                    let incoming = sessions_of(client, |d| d == Direction::Incoming);
                    return Err(LiveUpdateError::NoIncomingSession {
                        session: name.to_string(),
                        incoming,
                    });
                }
                info!(
                    "Waiting up to {}s for session {name:?} to be handed over",
                    wait.as_secs()
                );
                next_report = Some(now + WAIT_REPORT);
            }
            // Long waits are worth a warning at any log level.
            Some(at) if now >= at => {
                warn!(
                    "Still waiting for session {name:?} ({}s of {}s)",
                    now.duration_since(start).as_secs(),
                    wait.as_secs()
                );
                next_report = Some(now + WAIT_REPORT);
            }
            Some(_) => {}
        }
        if now >= deadline {
            let known = if sessions_of(client, |_| true).iter().any(|s| s == name) {
                "the agent holds it; the old VMM has not handed it over"
            } else {
                "the agent has no session of that name"
            };
            return Err(LiveUpdateError::NoHandover {
                session: name.to_string(),
                waited: wait,
                known,
            });
        }
        if peek {
            match client.peek(name, RAM_TOKEN) {
                Ok(memfd) => {
                    let mut built = Prebuilt::new(File::from(memfd))
                        .map_err(LiveUpdateError::Vm)?
                        .with_vcpu_threads(on_event.clone());
                    route_ahead(client, name, &mut built);
                    // Before it is ready: from then on the old VMM may pause, and the pause
                    // must not wait for what this does (it holds the mmap lock in read mode).
                    map_code_in();
                    // This thread restores the VM.
                    sys::warm_heap(WARM_HEAP);
                    built.raise_pause_priority();
                    prebuilt = Some(built);
                    peek = false;
                    info!("Guest RAM of session {name:?} mapped ahead of the handover");
                    if let Err(e) = client.successor_ready(name) {
                        warn!("Cannot tell the agent this successor is ready: {e}");
                    }
                    // The old VMM pauses now: wait for its handover, with nothing else to do.
                    handover_wait = Some((deadline - now).min(Duration::from_secs(1)));
                }
                // Not created or not prepared yet: the agent answers once it is (or gone).
                Err(e)
                    if wait_prepared
                        && matches!(
                            e.kind(),
                            Some(ErrorKind::NoSuchSession | ErrorKind::NoSuchToken)
                        ) =>
                {
                    let wait = (deadline - now).min(Duration::from_secs(1));
                    match client.wait_prepared(name, RAM_TOKEN, wait) {
                        Err(e) if e.kind() == Some(ErrorKind::BadRequest) => wait_prepared = false,
                        // Prepared, or still not (the wait ran out), or gone: look again.
                        _ => {}
                    }
                }
                // Not created yet: look again, less and less often.
                Err(e) if e.kind() == Some(ErrorKind::NoSuchSession) => {
                    std::thread::sleep(idle_poll);
                    idle_poll = (idle_poll * 2).min(HANDOVER_POLL_IDLE);
                }
                // Created, not prepared yet: look again shortly.
                Err(e) if e.kind() == Some(ErrorKind::NoSuchToken) => {
                    std::thread::sleep(HANDOVER_POLL);
                }
                // Kernel mode, or the session is no longer outgoing.
                Err(_) => peek = false,
            }
            continue;
        }
        // The agent answers the moment the session is handed over, and the retrieve that
        // follows the wait in the same round trip at once.
        handover_wait = Some((deadline - now).min(Duration::from_secs(1)));
    }
}

/// How much heap the thread that saves or restores a VM touches ahead of a live update's pause
/// ([`sys::warm_heap`]): encoding or decoding the state and building the devices allocate some
/// hundred KiB, whose pages would otherwise be first touched in the pause.
pub const WARM_HEAP: usize = 1 << 20;

/// Maps the program's code in ([`sys::populate_code`]): a live update's pause runs code that
/// runs once per process (the save, the restore), which would otherwise take its page faults
/// there (on the test hosts a fresh successor's state read and decode took 130 us, 55 us once
/// warm). A VMM does it as it starts, before any other thread runs, and a successor started
/// ahead before it says it is ready: some ms of CPU, not beside a fleet's updates. Never on a
/// thread beside running vCPUs: it holds the mmap lock, and a thread of low priority holding it
/// while a writer waits would stall every vCPU's page fault behind it (the likely cause of a
/// nested guest's boot that stalled in the test bed, with a nice-19 thread doing it there).
pub fn map_code_in() {
    match sys::populate_code() {
        Ok(bytes) => log::debug!("Code mapped in: {} KiB", bytes >> 10),
        Err(e) => log::debug!("Cannot map the code in: {e}"),
    }
}

/// Gives `built` the MSI routes the old VMM had as it prepared session `name`, if it left
/// them (see [`routes_ahead`]); the restore sets them otherwise.
fn route_ahead(client: &mut AgentClient, name: &str, built: &mut Prebuilt) {
    let routed = client
        .peek(name, routes_ahead::ROUTES_TOKEN)
        .map_err(|e| e.to_string())
        .and_then(|file| routes_ahead::read_routes(&File::from(file)))
        .and_then(|routes| {
            let groups = routes.msi_groups.len();
            built.route_ahead(routes).map_err(|e| e.to_string())?;
            Ok(groups)
        });
    match routed {
        Ok(groups) => info!("MSI routes of session {name:?} set ahead ({groups} groups)"),
        Err(e) => log::debug!("No MSI routes ahead: {e}"),
    }
}

/// The names of the sessions the agent lists whose direction passes `keep` (none if it cannot
/// say).
fn sessions_of(client: &mut AgentClient, keep: impl Fn(Direction) -> bool) -> Vec<String> {
    client
        .list()
        .map(|sessions| {
            sessions
                .into_iter()
                .filter(|s| keep(s.direction))
                .map(|s| s.name)
                .collect()
        })
        .unwrap_or_default()
}

fn agent_failure(client: &AgentClient, source: AgentError) -> LiveUpdateError {
    LiveUpdateError::Agent {
        path: client.path().to_path_buf(),
        source,
    }
}

/// Longest an old VMM waits for a pause slot (see [`liveupdate::agent::pause_slots`]).
const PAUSE_SLOT_WAIT: Duration = Duration::from_secs(2);

/// Old VMM, its successor ready (restart mode): waits, guest running, until the agent lets this
/// guest pause, so that a host updating all its VMs pauses a few at a time. Pauses anyway when
/// no slot comes in [`PAUSE_SLOT_WAIT`] or the agent has no slots (an older agent).
fn wait_for_pause_slot(client: &mut AgentClient, name: &str) {
    let start = Instant::now();
    match client.wait_pause_slot(name, PAUSE_SLOT_WAIT) {
        Ok(true) => log::debug!(
            "Pause slot for session {name:?} after {} us",
            start.elapsed().as_micros()
        ),
        Ok(false) => {
            warn!("No pause slot for session {name:?} in {PAUSE_SLOT_WAIT:?}; pausing anyway")
        }
        Err(e) if e.kind() == Some(ErrorKind::BadRequest) => {
            log::debug!("The agent has no pause slots: pausing now");
        }
        Err(e) => warn!("Cannot ask the agent for a pause slot ({e}); pausing now"),
    }
}

/// Longest the old VMM waits, after its handover, for its successor to resume the guest.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// Old VMM, after handing session `name` over (restart mode), on the update's connection
/// `agent`: returns once the agent holds the session no more (the successor resumed the guest,
/// or it was dropped), at most [`RELEASE_WAIT`] later, or at once if the agent cannot say.
pub fn wait_released(agent: &Mutex<AgentClient>, name: &str) {
    if let Err(e) = lock(agent).wait_released(name, RELEASE_WAIT) {
        log::debug!("Not waiting for session {name:?} to be released: {e}");
    }
}

/// Pages given to the state memfd before the pause: a blob of 4 vCPUs and a few devices is
/// about 32 KiB, and a larger one only has its rest allocated by the write.
const STATE_FILE_ROOM: u64 = 256 << 10;

/// Creates the empty memfd the state blob is written into, its first pages allocated already:
/// the write in the pause then only copies (allocating them there took 20-30 us).
pub fn state_memfd() -> std::io::Result<File> {
    let file = sys::memfd_create(c"liveupdate-state")?;
    if let Err(e) = sys::reserve_pages(&file, STATE_FILE_ROOM) {
        log::debug!("Cannot allocate the state file's pages ahead: {e}");
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn the_state_file_is_empty_with_its_pages_allocated_and_a_write_sets_its_size() {
        let mut file = state_memfd().unwrap();

        let before = file.metadata().unwrap();
        file.write_all(&[7; 5000]).unwrap();
        let after = file.metadata().unwrap();

        assert_eq!(before.len(), 0);
        assert!(
            before.blocks() * 512 >= STATE_FILE_ROOM,
            "{} blocks",
            before.blocks()
        );
        assert_eq!(after.len(), 5000);
        assert_eq!(after.blocks(), before.blocks());
    }
}
