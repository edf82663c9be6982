//! The VMM control loop: one thread that owns the VM and serves API requests, vCPU events and
//! terminal input in arrival order, so no two requests ever act on the VM at once. What each
//! API request does is in `dispatch`.

mod dispatch;
mod given_fds;
mod inherited;
mod migration;
mod snapshot;
mod unplug;

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use log::{error, info, warn};
use serde::Serialize;
use thiserror::Error;

use crate::api::{
    ApiError, ApiHandler, ApiRequest, ApiResponse, HttpServer, start_http_server,
    start_http_server_on,
};
use crate::config::{ConsoleMode, PathOrFd, RestoreConfig, RestoreSource, VmConfig};
use crate::event_monitor::{EventMonitor, EventMonitorError};
use crate::host_console::{self, Port};
use crate::live_update::{
    self, AgentConnection, IncomingFrom, Inherited, LiveUpdateError, Restored,
};
use crate::vcpu_thread::VcpuEvent;
use crate::vm::{Vm, VmError};

/// Process-level options of the VMM (not part of the VM configuration).
#[derive(Debug, Default)]
pub struct VmmOptions {
    /// Where to serve the REST API (`--api-socket path=|fd=`).
    pub api_socket: Option<PathOrFd>,
    /// Where to write JSON events (`--event-monitor path=|fd=`).
    pub event_monitor: Option<PathOrFd>,
    /// Where the live-update session agent listens (`--liveupdate agent=`).
    pub liveupdate_agent: PathBuf,
    /// The session passed by the service manager (`--liveupdate inherit=`), used instead of
    /// the agent.
    pub liveupdate_inherited: Option<Inherited>,
    /// Take over a live-updated VM (`--restore source_url=luo://NAME`), or restore a snapshot
    /// (`--restore source_url=file:///dir`).
    pub restore: Option<RestoreSource>,
}

/// Errors that end the VMM process.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The event monitor file could not be opened.
    #[error("Cannot start the event monitor")]
    EventMonitor(#[source] EventMonitorError),
    /// The API socket could not be served.
    #[error("Cannot start the API server")]
    ApiServer(#[source] crate::api::ApiServerError),
    /// The VM given on the command line could not be booted.
    #[error("Cannot boot the VM")]
    Boot(#[source] VmError),
    /// The VM could not be taken over from its live-update session (the session is kept).
    #[error("Cannot restore the VM from live-update session {session}")]
    Restore {
        /// The session.
        session: String,
        /// Why.
        #[source]
        source: LiveUpdateError,
    },
    /// The snapshot given with `--restore` could not be restored.
    #[error("Cannot restore the VM from snapshot {path}")]
    RestoreSnapshot {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::snapshot::SnapshotError,
    },
    /// The configuration given on the command line is invalid.
    #[error("Invalid VM configuration")]
    Config(#[source] crate::config::ConfigError),
    /// A vCPU failed and there is no API to inspect or recover the VM.
    #[error("vCPU {vcpu} failed: {reason}")]
    VcpuFailed {
        /// Index of the vCPU.
        vcpu: u8,
        /// What went wrong.
        reason: String,
    },
}

/// The VM's lifecycle state, named as in cloud-hypervisor's `VmInfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    /// Configured, not booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Booted once, then shut down; may be booted again.
    Shutdown,
}

enum VmmEvent {
    Api(ApiRequest, Sender<Result<ApiResponse, ApiError>>),
    Vcpu(VcpuEvent),
    /// From the VMM's terminal, for whichever device uses it.
    TerminalInput(Vec<u8>),
    /// From the pty or socket of a device.
    Input(Port, Vec<u8>),
    /// The restore thread is done (it may have waited long for the handover).
    Restored(RestoreConfig, Box<Result<Restored, LiveUpdateError>>),
}

/// Forwards API requests from the HTTP threads into the control loop and waits for the answer.
struct ChannelHandler {
    events: Sender<VmmEvent>,
}

impl ApiHandler for ChannelHandler {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (reply, answer) = mpsc::channel();
        let gone = || ApiError::new(503, "The VMM is shutting down");
        self.events
            .send(VmmEvent::Api(request, reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

/// Runs the VMM until it is shut down. With `vm`, the VM is created and booted at once.
pub fn run(mut options: VmmOptions, vm: Option<VmConfig>) -> Result<(), VmmError> {
    // Ahead of any live update's pause, before any other thread runs: this thread saves the
    // VM. A successor maps the code in once it knows it is ahead of its update (across a
    // kexec, its restore runs at once).
    if !matches!(options.restore, Some(RestoreSource::Session(_))) {
        live_update::map_code_in();
    }
    crate::sys::warm_heap(live_update::WARM_HEAP);
    let monitor = match &options.event_monitor {
        None => None,
        Some(PathOrFd::Path(path)) => Some(EventMonitor::new(path)),
        Some(PathOrFd::Fd(fd)) => Some(given_fds::event_file(*fd).map(EventMonitor::to_file)),
    }
    .transpose()
    .map_err(VmmError::EventMonitor)?
    .map(Arc::new);
    let (events, receiver) = mpsc::channel();
    let mut vmm = Vmm::new(events.clone(), monitor, options.api_socket.is_some());
    vmm.agent = options.liveupdate_agent.clone();
    vmm.inherited = options.liveupdate_inherited.take();
    vmm.emit("vmm", "starting");
    let handler = Arc::new(ChannelHandler { events });
    let _server: Option<HttpServer> = match &options.api_socket {
        None => None,
        Some(PathOrFd::Path(path)) => Some(start_http_server(path, handler)),
        Some(PathOrFd::Fd(fd)) => {
            Some(given_fds::api_listener(*fd).and_then(|l| start_http_server_on(l, handler)))
        }
    }
    .transpose()
    .map_err(VmmError::ApiServer)?;
    match &options.restore {
        Some(RestoreSource::Session(restore)) => {
            // In its own thread: a successor started ahead waits for the handover, and its
            // API must answer meanwhile.
            let from = IncomingFrom::new(&vmm.agent, vmm.inherited.as_mut(), restore);
            vmm.start_restore(restore.clone(), from);
        }
        Some(RestoreSource::Snapshot(restore)) => {
            vmm.restore_from_directory(restore)
                .map_err(|source| VmmError::RestoreSnapshot {
                    path: restore.directory.clone(),
                    source,
                })?;
        }
        None => {}
    }
    if let Some(config) = vm {
        config.validate().map_err(VmmError::Config)?;
        vmm.config = Some(config);
        vmm.state = VmState::Created;
        vmm.boot().map_err(VmmError::Boot)?;
    }
    let result = vmm.serve(&receiver);
    // Socket files go, unless a successor owns them now.
    host_console::close_all();
    vmm.emit("vmm", "shutdown");
    result
}

struct Vmm {
    events: Sender<VmmEvent>,
    monitor: Option<Arc<EventMonitor>>,
    has_api: bool,
    config: Option<VmConfig>,
    vm: Option<Vm>,
    state: VmState,
    stdin_reader_started: bool,
    /// Input the guest's device had no room for yet, by device.
    pending_input: BTreeMap<Port, VecDeque<u8>>,
    agent: PathBuf,
    /// The session being restored from, until the VM is taken over.
    restoring: Option<String>,
    /// `--liveupdate inherit=`: the session passed by the service manager.
    inherited: Option<Inherited>,
    /// A `vm.receive-migration` waiting for its VM.
    receiving: Option<migration::Receiving>,
    /// The thread tearing down a VM handed over, joined before the process exits.
    retiring: Option<std::thread::JoinHandle<()>>,
}

/// What the loop does after an event.
enum Next {
    Continue,
    Exit,
}

impl Vmm {
    fn new(events: Sender<VmmEvent>, monitor: Option<Arc<EventMonitor>>, has_api: bool) -> Self {
        Self {
            events,
            monitor,
            has_api,
            config: None,
            vm: None,
            state: VmState::Created,
            stdin_reader_started: false,
            pending_input: BTreeMap::new(),
            agent: PathBuf::new(),
            restoring: None,
            inherited: None,
            receiving: None,
            retiring: None,
        }
    }

    /// Drops the VM, handed over to a successor, on a thread of the lowest priority; with
    /// `until_released` (the update's agent connection and the session), only once the agent
    /// says the successor resumed the guest: tearing down the vCPUs, KVM VM and RAM mapping
    /// takes a millisecond of CPU (some of it in the kernel, where priority does not help),
    /// which the successor needs more while it restores the guest on this host's CPUs.
    fn retire_vm(&mut self, until_released: Option<(AgentConnection, &str)>) {
        let Some(vm) = self.vm.take() else {
            return;
        };
        let until_released = until_released.map(|(agent, name)| (agent, name.to_string()));
        let teardown = move || {
            if let Err(e) = crate::sys::lowest_thread_priority() {
                log::debug!("Cannot lower the priority of the VM's teardown: {e}");
            }
            if let Some((agent, session)) = until_released {
                live_update::wait_released(&agent, &session);
            }
            drop(vm);
        };
        match std::thread::Builder::new()
            .name("vm-retire".into())
            .spawn(teardown)
        {
            Ok(thread) => self.retiring = Some(thread),
            Err(e) => {
                warn!("Cannot tear down the VM handed over aside ({e}); it was torn down here")
            }
        }
    }

    fn emit(&self, source: &str, event: &str) {
        self.emit_with(source, event, None);
    }

    fn emit_with(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        if let Some(monitor) = &self.monitor {
            monitor.emit(source, event, properties);
        }
    }

    fn serve(&mut self, receiver: &Receiver<VmmEvent>) -> Result<(), VmmError> {
        loop {
            // While terminal input waits for room in the guest's FIFO, poll for it.
            let event = if self.pending_input.values().all(VecDeque::is_empty) {
                match receiver.recv() {
                    Ok(event) => event,
                    Err(_) => return Ok(()),
                }
            } else {
                match receiver.recv_timeout(Duration::from_millis(5)) {
                    Ok(event) => event,
                    Err(RecvTimeoutError::Timeout) => {
                        self.flush_input();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            };
            let next = match event {
                // Answered once the VM has arrived.
                VmmEvent::Api(ApiRequest::VmReceiveMigration(request), reply) => {
                    self.start_receive(&request, reply);
                    Next::Continue
                }
                VmmEvent::Api(request, reply) => {
                    let (answer, next) = match self.inherited_api(request) {
                        Ok(handled) => handled,
                        Err(request) => self.handle_api(*request),
                    };
                    if reply.send(answer).is_err() {
                        warn!("API client went away before its answer");
                    }
                    next
                }
                VmmEvent::Vcpu(event) => self.handle_vcpu_event(event)?,
                VmmEvent::TerminalInput(bytes) => {
                    if let Some(port) = self.terminal_port() {
                        self.pending_input.entry(port).or_default().extend(bytes);
                        self.flush_input();
                    }
                    Next::Continue
                }
                VmmEvent::Input(port, bytes) => {
                    self.pending_input.entry(port).or_default().extend(bytes);
                    self.flush_input();
                    Next::Continue
                }
                VmmEvent::Restored(restore, result) => match self.end_receive(&restore, *result) {
                    None => Next::Continue,
                    Some(Ok(restored)) => {
                        self.finish_restore(restore.resume, restored);
                        Next::Continue
                    }
                    Some(Err(source)) => {
                        return Err(VmmError::Restore {
                            session: restore.session,
                            source,
                        });
                    }
                },
            };
            if let Next::Exit = next {
                self.vm = None;
                if let Some(thread) = self.retiring.take()
                    && thread.join().is_err()
                {
                    error!("Tearing down the VM handed over panicked");
                }
                return Ok(());
            }
        }
    }

    fn flush_input(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            self.pending_input.clear();
            return;
        };
        for (port, pending) in &mut self.pending_input {
            let (front, _) = pending.as_slices();
            let accepted = vm.push_input(*port, front);
            pending.drain(..accepted);
        }
    }

    /// The device that uses the VMM's terminal, if one does (the serial port first).
    fn terminal_port(&self) -> Option<Port> {
        let config = self.config.as_ref()?;
        if config.serial.mode == ConsoleMode::Tty {
            Some(Port::Serial)
        } else if config.console.mode == ConsoleMode::Tty {
            Some(Port::Console)
        } else {
            None
        }
    }

    /// Once the devices are built: records the paths of their ptys in the configuration (as
    /// cloud-hypervisor, `vm.info` shows them in `file`) and starts reading their input.
    fn attach_host_ends(&mut self) {
        if let Some(config) = self.config.as_mut() {
            for (port, device) in [
                (Port::Serial, &mut config.serial),
                (Port::Console, &mut config.console),
            ] {
                if device.mode == ConsoleMode::Pty
                    && let Some(end) = host_console::get(port)
                {
                    device.file = Some(end.path().to_path_buf());
                }
            }
        }
        let events = self.events.clone();
        host_console::start_input(Arc::new(move |port, bytes| {
            let _ = events.send(VmmEvent::Input(port, bytes));
        }));
    }

    /// Starts taking over the VM of a live-update session from `from`; the result arrives as
    /// an event.
    fn start_restore(&mut self, restore: RestoreConfig, from: IncomingFrom) {
        self.emit("vm", "restoring");
        self.restoring = Some(restore.session.clone());
        let events = self.events.clone();
        let vcpu_events = self.events.clone();
        let on_vcpu_event = Arc::new(move |event| {
            let _ = vcpu_events.send(VmmEvent::Vcpu(event));
        });
        let spawned = std::thread::Builder::new()
            .name("restore".into())
            .spawn(move || {
                let result = live_update::run_incoming_from(from, &restore, on_vcpu_event);
                let _ = events.send(VmmEvent::Restored(restore, Box::new(result)));
            });
        if let Err(e) = spawned {
            let _ = self.events.send(VmmEvent::Restored(
                RestoreConfig {
                    session: String::new(),
                    resume: false,
                    net_fds: Vec::new(),
                    timeout: None,
                },
                Box::new(Err(LiveUpdateError::Thread(e))),
            ));
        }
    }

    /// Installs the VM the restore thread took over (or a snapshot restored), running if
    /// `resume`.
    fn finish_restore(&mut self, resume: bool, restored: Restored) {
        self.restoring = None;
        self.start_stdin_reader(&restored.config);
        self.config = Some(restored.config);
        self.attach_host_ends();
        let recreated_taps = restored.vm.recreated_taps();
        self.vm = Some(restored.vm);
        self.state = if resume {
            VmState::Running
        } else {
            VmState::Paused
        };
        let properties = live_update::timings_properties(&restored.timings);
        self.emit_with("vm", "restored", Some(&properties));
        // The host's network stack attaches these again (bridge, routes).
        for tap in recreated_taps {
            let properties = BTreeMap::from([("tap".to_string(), tap)]);
            self.emit_with("vm", "net-recreated", Some(&properties));
        }
        // Whoever used the old pty must open the new one.
        for port in [Port::Serial, Port::Console] {
            if let Some(end) = host_console::get(port).filter(|e| e.is_pty() && e.recreated()) {
                let properties = BTreeMap::from([
                    ("device".to_string(), port.name().to_string()),
                    ("path".to_string(), end.path().display().to_string()),
                ]);
                self.emit_with("vm", "pty-recreated", Some(&properties));
            }
        }
        // An eject the old VMM had not acted on yet, then the devices it detached.
        self.take_ejected_devices();
        self.reattach_after_update();
    }

    fn create(&mut self, config: VmConfig) -> Result<ApiResponse, ApiError> {
        if self.config.is_some() {
            return Err(ApiError::conflict("VM is already created"));
        }
        config
            .validate()
            .map_err(|e| ApiError::from_error(400, &e))?;
        self.config = Some(config);
        self.state = VmState::Created;
        Ok(ApiResponse::Empty)
    }

    fn boot(&mut self) -> Result<(), VmError> {
        let Some(config) = self.config.as_mut() else {
            return Ok(());
        };
        // Slots and MSI vectors are handed out afresh: removed devices need no place now.
        config.drop_removed_devices();
        let config = config.clone();
        self.emit("vm", "booting");
        self.start_stdin_reader(&config);
        let events = self.events.clone();
        let on_vcpu_event = Arc::new(move |event| {
            // The loop may already be gone at process exit; nothing is left to tell then.
            let _ = events.send(VmmEvent::Vcpu(event));
        });
        self.vm = Some(Vm::boot(&config, on_vcpu_event)?);
        self.attach_host_ends();
        self.state = VmState::Running;
        self.emit("vm", "booted");
        Ok(())
    }

    fn shutdown_vm(&mut self) {
        if self.vm.take().is_some() {
            self.state = VmState::Shutdown;
            self.emit("vm", "shutdown");
        }
    }

    fn reboot(&mut self) -> Result<(), VmError> {
        self.emit("vm", "rebooting");
        self.vm = None;
        self.boot()?;
        self.emit("vm", "rebooted");
        Ok(())
    }

    fn handle_vcpu_event(&mut self, event: VcpuEvent) -> Result<Next, VmmError> {
        if self.vm.is_none() {
            // A late event from a VM that is already gone (e.g. two vCPUs asked for a reset).
            return Ok(Next::Continue);
        }
        match event {
            VcpuEvent::Reset => {
                info!("Guest requested a reset: rebooting the VM");
                if let Err(e) = self.reboot() {
                    error!("Reboot failed: {e}");
                    self.state = VmState::Shutdown;
                    if !self.has_api {
                        return Err(VmmError::Boot(e));
                    }
                }
                Ok(Next::Continue)
            }
            VcpuEvent::DeviceEjected => {
                self.take_ejected_devices();
                Ok(Next::Continue)
            }
            VcpuEvent::Shutdown => {
                info!("Guest powered off");
                self.shutdown_vm();
                Ok(Next::Exit)
            }
            VcpuEvent::Failed { vcpu, reason } => {
                error!("vCPU {vcpu} failed: {reason}; the VM is paused");
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause();
                }
                self.state = VmState::Paused;
                let mut properties = BTreeMap::new();
                properties.insert("vcpu".to_string(), vcpu.to_string());
                properties.insert("reason".to_string(), reason.clone());
                if let Some(monitor) = &self.monitor {
                    monitor.emit("vm", "vcpu-failed", Some(&properties));
                }
                if self.has_api {
                    Ok(Next::Continue)
                } else {
                    Err(VmmError::VcpuFailed { vcpu, reason })
                }
            }
        }
    }

    /// Terminal input goes to whichever device uses the terminal; one reader serves every boot.
    fn start_stdin_reader(&mut self, config: &VmConfig) {
        let uses_tty =
            config.serial.mode == ConsoleMode::Tty || config.console.mode == ConsoleMode::Tty;
        if !uses_tty || self.stdin_reader_started {
            return;
        }
        let events = self.events.clone();
        let spawned = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                confine::confine_thread_or_exit(confine::ThreadKind::Worker);
                let mut stdin = std::io::stdin();
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = stdin.read(&mut buf) {
                    if events
                        .send(VmmEvent::TerminalInput(buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        match spawned {
            Ok(_) => self.stdin_reader_started = true,
            Err(e) => warn!("Cannot read terminal input: {e}"),
        }
    }
}
