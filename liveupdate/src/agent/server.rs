//! The agent's socket: created without a permission window, one instance per path, one thread
//! per connection.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::fdstore::{Collect, DEVICE_NAME, FdStore, LISTENER_NAME, Rebuilt, Sink};
use super::kexec::{HANDOVER_WAIT, KexecImage};
use super::protocol::{self, ErrorKind, MAX_WAIT_MS, ProtocolError, Request, Response, WireError};
use super::state::AgentState;
use super::{AgentError, sys};
use crate::session::Token;

/// Most simultaneous connections; more are answered with a `busy` error and closed. A host
/// updating all its VMs at once has two per VM (the old VMM's and its successor's).
pub const MAX_CONNECTIONS: usize = 256;
/// Once a message has started, the rest must arrive within this time.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closed connection's peer is given to be seen exited (see
/// `Shared::creator_disconnected`), in milliseconds.
const EXIT_GRACE_MS: libc::c_int = 500;

/// How often waits in the kexec barrier look at the state again (they are also woken by
/// every change).
const BARRIER_POLL: Duration = Duration::from_millis(100);

/// Longest a successor's `resumed` holds back the release it makes (waking the old VMM,
/// closing the session's files) while its guest starts; its next request ends the wait sooner.
const RELEASE_DELAY: Duration = Duration::from_millis(20);

/// Makes private directory names unique within the process.
static PRIVATE_DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// What the accept loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Accepts connections.
    Serving,
    /// Accepts none for now (an upgrade is being handed over); new connections wait in the
    /// socket's backlog.
    Parked,
    /// Returns from [`AgentServer::run`].
    Exit,
}

/// A bound agent socket, ready to serve.
#[derive(Debug)]
pub struct AgentServer {
    listener: UnixListener,
    path: PathBuf,
    state: Arc<Shared>,
    /// Held (flock) for the server's lifetime: a second agent on the same path is refused.
    _lock: File,
}

/// Stops a running [`AgentServer`] from another thread and removes its socket.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    state: Arc<Shared>,
}

impl ShutdownHandle {
    /// Makes [`AgentServer::run`] return (dropping the server then removes the socket file).
    pub fn shutdown(&self) {
        self.state.set_gate(Gate::Exit);
    }
}

impl Drop for AgentServer {
    fn drop(&mut self) {
        // Handed to a new agent, or kept in systemd's fd store for the next one: the path
        // stays with the listening socket.
        if self.handed_off() || self.in_store() {
            return;
        }
        // Only a bound server exists, and the lock says the socket at `path` is ours.
        if let Err(e) = fs::remove_file(&self.path) {
            debug!("removing {}: {e}", self.path.display());
        }
    }
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::Setup {
        operation,
        path,
        source,
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    PathBuf::from(lock_path)
}

/// Opens `<path>.lock` and takes its lock, trying again until `wait` has passed.
fn take_lock(path: &Path, wait: Duration) -> Result<File, AgentError> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error("open lock file", &lock_path))?;
    let deadline = Instant::now() + wait;
    while lock.try_lock().is_err() {
        if Instant::now() >= deadline {
            return Err(AgentError::AlreadyRunning {
                path: path.to_path_buf(),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(lock)
}

impl AgentServer {
    /// Binds the agent socket at `path` with permission bits `mode` (e.g. 0o600 or 0o660).
    ///
    /// The socket is bound in a private (0700) directory beside `path`, given `mode`, then
    /// renamed over `path`, so it is never reachable with wider permissions; a stale socket is
    /// replaced. A lock on `<path>.lock` refuses a second agent on the same path.
    pub fn bind(path: &Path, mode: u32, state: AgentState) -> Result<Self, AgentError> {
        let lock = take_lock(path, Duration::ZERO)?;
        let parent = path.parent().unwrap_or(Path::new("."));
        let file_name = path.file_name().ok_or_else(|| AgentError::BadSocketPath {
            path: path.to_path_buf(),
        })?;
        let unique = PRIVATE_DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
        let private_dir = parent.join(format!(".ch-luod.{}.{unique}.tmp", std::process::id()));
        let _ = fs::remove_dir_all(&private_dir);
        DirBuilder::new()
            .mode(0o700)
            .create(&private_dir)
            .map_err(io_error("create private directory", &private_dir))?;
        let temp_path = private_dir.join(file_name);
        let bound = UnixListener::bind(&temp_path)
            .map_err(io_error("bind", &temp_path))
            .and_then(|listener| {
                fs::set_permissions(&temp_path, fs::Permissions::from_mode(mode))
                    .map_err(io_error("set permissions of", &temp_path))?;
                fs::rename(&temp_path, path).map_err(io_error("rename socket to", path))?;
                Ok(listener)
            });
        let _ = fs::remove_dir_all(&private_dir);
        let listener = bound?;
        info!("listening on {} (mode {mode:o})", path.display());
        Self::serve_on(listener, path, lock, state)
    }

    /// Serves on `listener`, a socket already listening at `path` that an earlier agent
    /// passed on (systemd's fd store, or an upgrade); waits up to `lock_wait` for the earlier
    /// agent to release the path's lock. No connection is refused meanwhile: they wait in the
    /// socket's backlog.
    pub fn adopt(
        path: &Path,
        listener: OwnedFd,
        state: AgentState,
        lock_wait: Duration,
    ) -> Result<Self, AgentError> {
        // Its address cannot be checked against `path`: it was bound under a private name
        // and renamed (see `bind`).
        let listener = UnixListener::from(listener);
        let lock = take_lock(path, lock_wait)?;
        info!("listening on {} (socket passed on)", path.display());
        Self::serve_on(listener, path, lock, state)
    }

    fn serve_on(
        listener: UnixListener,
        path: &Path,
        lock: File,
        state: AgentState,
    ) -> Result<Self, AgentError> {
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(io_error("create a pipe for", path))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_error("create a pipe for", path))?;
        let listener_copy = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(io_error("duplicate the socket", path))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            state: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Condvar::new(),
                store: Mutex::new(None),
                gate: Mutex::new(Gate::Serving),
                gate_changed: Condvar::new(),
                wake: (wake_rx, wake_tx),
                connections: AtomicUsize::new(0),
                handed_off: AtomicBool::new(false),
                listener: listener_copy,
                release_delay_ms: AtomicU64::new(
                    u64::try_from(RELEASE_DELAY.as_millis()).unwrap_or(u64::MAX),
                ),
            }),
            _lock: lock,
        })
    }

    /// Has a successor's `resumed` hold back its release for up to `delay` (a test's).
    #[cfg(test)]
    fn hold_releases_for(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.release_delay_ms.store(ms, Ordering::Relaxed);
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that stops [`Self::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            state: Arc::clone(&self.state),
        }
    }

    /// Whether [`Self::run`] returned because a new agent took every session over.
    pub fn handed_off(&self) -> bool {
        self.state.handed_off.load(Ordering::SeqCst)
    }

    /// Whether the sessions are kept in a store (see [`Self::keep_in_store`]).
    pub fn in_store(&self) -> bool {
        self.state
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Keeps every session, and the listening socket, in `sink` (systemd's fd store) from now
    /// on; `resumed` is what this agent took back from it at start.
    pub fn keep_in_store(
        &self,
        sink: Box<dyn Sink>,
        resumed: Option<&Rebuilt>,
    ) -> Result<(), AgentError> {
        let state = self
            .state
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let fixed = self.state.fixed_entries(&state);
        let setup = |source| AgentError::Setup {
            operation: "keep the sessions in the fd store of",
            path: self.path.clone(),
            source,
        };
        let fixed = fixed.map_err(setup)?;
        let borrowed: Vec<(&str, BorrowedFd<'_>)> =
            fixed.iter().map(|(name, fd)| (*name, fd.as_fd())).collect();
        let mut store = match resumed {
            Some(rebuilt) => FdStore::resume(sink, rebuilt, &borrowed),
            None => FdStore::new(sink, &borrowed),
        }
        .map_err(setup)?;
        store.sync(&state).map_err(setup)?;
        *self
            .state
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(store);
        Ok(())
    }

    /// Retrieves `files` (session name, token) on a thread of its own, one after the other
    /// with the state held, as a VMM's own retrieve would hold it (see [`super::manifest`]).
    pub fn retrieve_ahead(&self, files: Vec<(String, Token)>) {
        if files.is_empty() {
            return;
        }
        let shared = Arc::clone(&self.state);
        let spawned = thread::Builder::new()
            .name("ch-luod-ahead".into())
            .spawn(move || {
                let start = Instant::now();
                for (name, token) in &files {
                    let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.retrieve_ahead(name, *token);
                    shared.after_change(&state);
                }
                info!(
                    "{} file(s) of the last kernel's sessions retrieved ahead in {:.1} ms",
                    files.len(),
                    start.elapsed().as_secs_f64() * 1000.0
                );
            });
        if let Err(e) = spawned {
            warn!("No retrieval ahead (cannot start its thread: {e}); VMMs retrieve their own");
        }
    }

    /// Accepts connections until [`ShutdownHandle::shutdown`] or a completed upgrade; each
    /// gets its own thread.
    pub fn run(&self) -> Result<(), AgentError> {
        let shared = &self.state;
        loop {
            let ready = sys::wait_readable(&[self.listener.as_fd(), shared.wake.0.as_fd()], None)
                .map_err(io_error("wait for connections on", &self.path))?;
            if ready[1] {
                let mut drain = [0u8; 64];
                while matches!((&shared.wake.0).read(&mut drain), Ok(n) if n > 0) {}
            }
            // Held through the accept: an upgrade parks the loop only between connections.
            let mut gate = shared.gate.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                match *gate {
                    Gate::Serving => break,
                    Gate::Exit => return Ok(()),
                    Gate::Parked => {
                        gate = shared
                            .gate_changed
                            .wait(gate)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
            if !ready[0] {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            };
            if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                shared.connections.fetch_sub(1, Ordering::SeqCst);
                refuse_busy(&stream);
                continue;
            }
            let state = Arc::clone(shared);
            let spawned = thread::Builder::new()
                .name("ch-luod-conn".into())
                .spawn(move || {
                    serve_connection(&stream, &state);
                    state.connections.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
                shared.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

fn refuse_busy(stream: &UnixStream) {
    let error = WireError::new(ErrorKind::Busy, "The agent has too many connections");
    let _ = protocol::send(stream, &Response::Error(error), None);
}

/// What a waiting request waits for, checked each time the state changes.
type WaitCondition<'a> = dyn Fn(&AgentState) -> bool + 'a;

/// The agent's state and a signal for every change to it (for `wait_handover`), its fd store,
/// and the accept loop's gate.
#[derive(Debug)]
struct Shared {
    state: Mutex<AgentState>,
    changed: Condvar,
    /// Under systemd: its fd store, kept in line with `state` after every change.
    store: Mutex<Option<FdStore>>,
    gate: Mutex<Gate>,
    gate_changed: Condvar,
    /// Wakes the accept loop (read end, write end).
    wake: (UnixStream, UnixStream),
    connections: AtomicUsize,
    handed_off: AtomicBool,
    /// The listening socket, to hand over in an upgrade.
    listener: OwnedFd,
    /// How long, at most, a `resumed` holds back its release (see [`RELEASE_DELAY`]), in
    /// milliseconds.
    release_delay_ms: AtomicU64,
}

impl Shared {
    fn watch_creator(&self, name: &str, pid: i32) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.watch_creator(name, pid);
    }

    /// The connection of process `pid`, which created `created`, closed: if that VMM died with a
    /// session not handed over, drop the session now (not at the next request) and wake whoever
    /// waits for it.
    fn creator_disconnected(&self, created: &[String], pid: i32) {
        let pending = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            created
                .iter()
                .any(|name| state.outgoing.get(name).is_some_and(|held| !held.frozen))
        };
        // Its socket closes a moment before its exit can be seen; waited for without the state.
        let exited = pending
            && sys::pidfd_open(pid).map_or(true, |pidfd| sys::has_exited(&pidfd, EXIT_GRACE_MS));
        if exited {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.drop_abandoned();
            self.after_change(&state);
        }
    }

    /// Wakes waiters and brings the fd store in line with `state`.
    fn after_change(&self, state: &AgentState) {
        self.changed.notify_all();
        self.sync_store(state);
    }

    /// Brings the fd store (if any) in line with `state`; nothing is sent when nothing changed.
    fn sync_store(&self, state: &AgentState) {
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = store.as_mut()
            && let Err(e) = store.sync(state)
        {
            warn!("cannot update the fd store: {e}");
        }
    }

    fn set_gate(&self, gate: Gate) {
        *self.gate.lock().unwrap_or_else(PoisonError::into_inner) = gate;
        self.gate_changed.notify_all();
        // A full pipe wakes the loop as well.
        let _ = (&self.wake.1).write(&[1]);
    }

    /// The entries every store and handoff has: the listener and the provider's own fds.
    fn fixed_entries(&self, state: &AgentState) -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
        let mut fixed = vec![(LISTENER_NAME, self.listener.try_clone()?)];
        let provider = state
            .export_provider()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        for (name, fd) in provider {
            if name == crate::kernel::DEVICE_FD_NAME {
                fixed.push((DEVICE_NAME, fd));
            }
        }
        Ok(fixed)
    }

    /// Serves `upgrade` from a new agent (see [`super::upgrade`]); true once it took over.
    fn upgrade(&self, stream: &UnixStream, uid: u32, mode: &str) -> Result<bool, ProtocolError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let refuse = |kind, message: String| {
            warn!("upgrade refused: {message}");
            let error = Response::Error(WireError::new(kind, message));
            protocol::send(stream, &error, None).map(|()| false)
        };
        if uid != 0 && uid != state.agent_uid {
            return refuse(
                ErrorKind::PermissionDenied,
                format!(
                    "Permission denied: only root or the agent's uid may upgrade it (uid {uid})"
                ),
            );
        }
        if mode != state.handover.name() {
            return refuse(
                ErrorKind::BadRequest,
                format!(
                    "This agent runs in {} mode; a {mode}-mode agent cannot take its sessions",
                    state.handover.name()
                ),
            );
        }
        if self
            .store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return refuse(
                ErrorKind::NotSupported,
                "This agent runs under systemd, whose fd store carries its sessions: \
                 upgrade it with `systemctl restart`"
                    .to_string(),
            );
        }
        if !state.kexec_idle() {
            return refuse(ErrorKind::Busy, "A kexec is under way".to_string());
        }
        // Taking the gate waits for an accept in progress: every accepted connection is counted.
        self.set_gate(Gate::Parked);
        let others = self.connections.load(Ordering::SeqCst).saturating_sub(1);
        if others > 0 {
            self.set_gate(Gate::Serving);
            return refuse(
                ErrorKind::Busy,
                format!(
                    "{others} other connection(s) to the agent are open (an update in flight?): \
                     upgrade once they are closed"
                ),
            );
        }
        let handed = self.hand_off(stream, &state);
        match handed {
            Ok(true) => {
                info!("every session is with the new agent: exiting");
                self.handed_off.store(true, Ordering::SeqCst);
                self.set_gate(Gate::Exit);
                Ok(true)
            }
            Ok(false) | Err(_) => {
                warn!("upgrade abandoned: serving on");
                self.set_gate(Gate::Serving);
                handed
            }
        }
    }

    /// Sends every entry, then waits for the new agent's `upgrade_done`.
    fn hand_off(&self, stream: &UnixStream, state: &AgentState) -> Result<bool, ProtocolError> {
        let collected = Collect::default();
        let entries = self.fixed_entries(state).and_then(|fixed| {
            let borrowed: Vec<(&str, BorrowedFd<'_>)> =
                fixed.iter().map(|(name, fd)| (*name, fd.as_fd())).collect();
            let mut store = FdStore::new(Box::new(collected.clone()), &borrowed)?;
            store.sync(state)?;
            Ok(collected.take())
        });
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                let error = WireError::new(ErrorKind::Os, format!("Cannot hand over: {e}"));
                protocol::send(stream, &Response::Error(error), None)?;
                return Ok(false);
            }
        };
        let names = entries.iter().map(|(name, _)| name.clone()).collect();
        protocol::send(stream, &Response::Handoff { names }, None)?;
        for (name, fd) in &entries {
            let part = Response::HandoffFd { name: name.clone() };
            protocol::send(stream, &part, Some(fd.as_fd()))?;
        }
        let Some(received) = protocol::recv(stream, MESSAGE_TIMEOUT)? else {
            return Ok(false);
        };
        if !matches!(
            protocol::decode_body::<Request>(&received.body),
            Ok(Request::UpgradeDone)
        ) {
            return Ok(false);
        }
        protocol::send(stream, &Response::Ok, None)?;
        Ok(true)
    }

    /// Handles one request; `wait_handover` and `wait_successor` first wait, without holding
    /// the state, until what they wait for happens or the wait times out. With `Later::Wake`
    /// the caller calls [`Shared::after_reply`] once the answer is sent.
    fn handle(
        &self,
        request: Request,
        uid: u32,
        fd: Option<OwnedFd>,
    ) -> (Response, Option<OwnedFd>, Later) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        super::faults::before(&request, &state);
        if let Request::Kexec {
            kernel,
            initrd,
            cmdline,
            timeout_ms,
            sessions,
        } = request
        {
            let image = KexecImage {
                kernel,
                initrd,
                cmdline,
            };
            return (
                self.kexec(state, uid, &image, &sessions, timeout_ms),
                None,
                Later::Nothing,
            );
        }
        let kernel_handover = match &request {
            Request::Handover { name } | Request::PreserveAndHandover { name, .. }
                if state.is_kernel_mode() =>
            {
                Some(name.clone())
            }
            _ => None,
        };
        let wait: Option<(u64, &WaitCondition<'_>)> = match &request {
            Request::WaitHandover { name, timeout_ms }
            | Request::TakeSession {
                name, timeout_ms, ..
            } => Some((*timeout_ms, &move |state: &AgentState| {
                state.is_handed_over(name) || state.has_ended(name)
            })),
            Request::WaitSuccessor { name, timeout_ms } => {
                Some((*timeout_ms, &move |state: &AgentState| {
                    !state.successor_pending(name)
                }))
            }
            Request::WaitReleased { name, timeout_ms } => {
                Some((*timeout_ms, &move |state: &AgentState| !state.holds(name)))
            }
            Request::WaitPauseSlot { name, timeout_ms } => {
                Some((*timeout_ms, &move |state: &AgentState| {
                    state.pause_slot_free(name)
                }))
            }
            Request::WaitPrepared {
                name,
                token,
                timeout_ms,
            } => {
                // Noted before the wait: the old VMM then waits for this successor.
                state.note_successor(name);
                Some((*timeout_ms, &move |state: &AgentState| {
                    state.is_kernel_mode()
                        || state.holds_file(name, *token)
                        || state.is_handed_over(name)
                        || state.has_ended(name)
                }))
            }
            _ => None,
        };
        if let Some((timeout_ms, done)) = wait {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms.min(MAX_WAIT_MS));
            let slot_wait = matches!(request, Request::WaitPauseSlot { .. });
            while !done(&state) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                let recheck = if slot_wait {
                    state.pause_slot_recheck()
                } else {
                    Duration::MAX
                };
                state = self
                    .changed
                    .wait_timeout(state, (deadline - now).min(recheck))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            // What the request does after its wait may be a step of its own (`take_session`
            // retrieves what was handed over meanwhile).
            super::faults::before(&request, &state);
        }
        // Waiters wait for something to become true that only a changing request makes true:
        // read-only ones wake nobody (with many VMs at once, every waiting VMM's connection
        // thread would wake up for each successor's look at its session). The fd store follows
        // every request all the same: a retrieve records the file it took from the session, and
        // any request may drop sessions whose creator died.
        let wakes = may_wake_waiters(&request);
        // A successor's guest waits for the answer to its `resumed`: the waiters wake, and the
        // session's files close, after it. The fd store follows first, as for every request.
        let later = if matches!(request, Request::Resumed { .. }) {
            Later::Wake
        } else {
            Later::Nothing
        };
        let answer = state.handle(request, uid, fd);
        self.sync_store(&state);
        let wake = wakes && later == Later::Nothing;
        match (kernel_handover, answer) {
            (Some(name), (Response::Ok, None)) => {
                if wake {
                    self.changed.notify_all();
                }
                (self.hold_handover(state, &name), None, Later::Nothing)
            }
            (_, (response, fd)) => {
                // Woken with the state free: a waiter woken on this CPU (a successor waiting
                // for the handover) would otherwise preempt this thread only to sleep again on
                // the lock, and wake once more as it is released.
                drop(state);
                if wake {
                    self.changed.notify_all();
                }
                (response, fd, later)
            }
        }
    }

    /// What a `resumed` left for after its answer: wakes the waiters and closes the released
    /// sessions' files (outside the state's lock).
    fn after_reply(&self) {
        let released = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            self.changed.notify_all();
            state.take_released()
        };
        super::state::finish_released(released);
    }

    /// Kernel mode: holds the reply to the frozen session `name`'s `handover` until the kexec
    /// fails (an error reply) or happens (no reply ever), or no kexec starts in time.
    fn hold_handover(&self, mut state: MutexGuard<'_, AgentState>, name: &str) -> Response {
        let deadline = Instant::now() + HANDOVER_WAIT;
        loop {
            if let Some(verdict) = state.handover_verdict(name) {
                return verdict;
            }
            let now = Instant::now();
            if now >= deadline && state.kexec_idle() {
                let response = state.abandon_handover(name);
                self.after_change(&state);
                return response;
            }
            state = self
                .changed
                .wait_timeout(
                    state,
                    deadline.saturating_duration_since(now).max(BARRIER_POLL),
                )
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs a kexec: load, barrier (every outgoing session and every `expected` one frozen, at
    /// most `timeout_ms`), reboot. Returns only on failure.
    fn kexec(
        &self,
        mut state: MutexGuard<'_, AgentState>,
        uid: u32,
        image: &KexecImage,
        expected: &[String],
        timeout_ms: u64,
    ) -> Response {
        let ops = match state.begin_kexec(uid, image) {
            Ok(ops) => ops,
            Err(error) => return Response::Error(error),
        };
        // Loading takes a while: VMMs may go on preparing and freezing meanwhile.
        drop(state);
        let loaded = ops.load(image);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let result = state.kexec_loaded(image, loaded);
        self.after_change(&state);
        if let Err(error) = result {
            return Response::Error(error);
        }
        let timeout = Duration::from_millis(timeout_ms);
        let deadline = Instant::now() + timeout;
        loop {
            let pending = state.unfrozen_sessions(expected);
            if pending.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                let error = state.fail_kexec(format!(
                    "Barrier timeout after {timeout:?}: not frozen: {}",
                    pending.join(", ")
                ));
                self.after_change(&state);
                return Response::Error(error);
            }
            state = self
                .changed
                .wait_timeout(state, (deadline - now).min(BARRIER_POLL))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        // The state stays locked through the reboot: nothing may change a session meanwhile.
        let error = state.reboot();
        self.after_change(&state);
        Response::Error(error)
    }
}

/// Whether `request` can make true what a `wait_handover`, `wait_successor` or `wait_prepared`
/// waits for (a session handed over or gone, a successor ready, a file preserved). Looks (a
/// peek only marks a successor as waiting, which no waiter waits for), reads and waits cannot;
/// a session a dead creator left is dropped with its own wake-up
/// (`Shared::creator_disconnected`).
fn may_wake_waiters(request: &Request) -> bool {
    !matches!(
        request,
        Request::Ping
            | Request::KexecStatus
            | Request::List
            | Request::Peek { .. }
            | Request::WaitHandover { .. }
            | Request::WaitSuccessor { .. }
            | Request::WaitPauseSlot { .. }
            | Request::WaitPrepared { .. }
            | Request::WaitReleased { .. }
            | Request::RetrieveFd { .. }
            | Request::RetrieveAttachment { .. }
    )
}

/// What [`Shared::handle`] leaves for after the answer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Later {
    Nothing,
    /// Call [`Shared::after_reply`].
    Wake,
}

fn serve_connection(stream: &UnixStream, state: &Shared) {
    let uid = match sys::peer_uid(stream) {
        Ok(uid) => uid,
        Err(e) => {
            warn!("cannot read peer credentials: {e}");
            return;
        }
    };
    if let Err(e) = stream.set_write_timeout(Some(MESSAGE_TIMEOUT)) {
        warn!("cannot set write timeout: {e}");
        return;
    }
    // Watched for the sessions this peer creates (see `AgentState::watch_creator`).
    let pid = sys::peer_pid(stream)
        .inspect_err(|e| warn!("cannot read the peer's pid: {e}"))
        .ok();
    debug!("connection from uid {uid}");
    let mut created = Vec::new();
    loop {
        let received = match protocol::recv(stream, MESSAGE_TIMEOUT) {
            Ok(Some(received)) => received,
            Ok(None) => break,
            Err(error) => {
                // The byte stream cannot be trusted to be in step any more: answer and close.
                warn!("bad message from uid {uid}: {error}");
                reply_bad_request(stream, &error);
                break;
            }
        };
        let (response, fd, later) = match protocol::decode_body::<Request>(&received.body) {
            Ok(Request::Upgrade { mode }) => match state.upgrade(stream, uid, &mode) {
                // Every session is with the new agent; this one exits.
                Ok(true) => return,
                Ok(false) => continue,
                Err(e) => {
                    warn!("upgrade connection from uid {uid}: {e}");
                    break;
                }
            },
            Ok(request) => {
                debug!("uid {uid}: {request:?}");
                let new_session = match &request {
                    Request::CreateSession { name } => Some(name.clone()),
                    _ => None,
                };
                let answer = state.handle(request, uid, received.fd);
                if let (Some(name), Some(pid), Response::Ok) = (new_session, pid, &answer.0) {
                    state.watch_creator(&name, pid);
                    created.push(name);
                }
                answer
            }
            Err(error) => {
                warn!("bad request from uid {uid}: {error}");
                let message = protocol::error_chain(&error);
                (
                    Response::Error(WireError::new(ErrorKind::BadRequest, message)),
                    None,
                    Later::Nothing,
                )
            }
        };
        let sent = protocol::send(stream, &response, fd.as_ref().map(std::os::fd::AsFd::as_fd));
        if later == Later::Wake {
            // The successor lets its guest run as it reads this answer: what this wakes (the
            // old VMM, which then tears its VM down) and the closing of the released files wait
            // until its guest runs, i.e. for its next request (`finish`), its hang-up, or at
            // most `release_delay_ms`, so as not to take a CPU from its vCPUs as they start.
            let delay = Duration::from_millis(state.release_delay_ms.load(Ordering::Relaxed));
            if sent.is_ok()
                && let Err(e) = sys::wait_readable(&[stream.as_fd()], Some(delay))
            {
                warn!("cannot wait for uid {uid}'s next request: {e}");
            }
            state.after_reply();
        }
        if let Err(e) = sent {
            warn!("cannot reply to uid {uid}: {e}");
            break;
        }
    }
    if let (false, Some(pid)) = (created.is_empty(), pid) {
        state.creator_disconnected(&created, pid);
    }
    debug!("connection from uid {uid} closed");
}

fn reply_bad_request(stream: &UnixStream, error: &ProtocolError) {
    if matches!(error, ProtocolError::Truncated | ProtocolError::Io { .. }) {
        return;
    }
    let error = WireError::new(ErrorKind::BadRequest, protocol::error_chain(error));
    let _ = protocol::send(stream, &Response::Error(error), None);
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::agent::client::{AgentClient, AgentProvider, AgentSession};
    use crate::agent::protocol::{Direction, HEADER_LEN};
    use crate::agent::state::HandoverMode;
    use crate::emulated::EmulatedProvider;
    use crate::session::{Session, SessionError, SessionProvider};

    struct Agent {
        _dir: TempDir,
        path: PathBuf,
        shutdown: ShutdownHandle,
        thread: Option<JoinHandle<()>>,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            self.shutdown.shutdown();
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    fn restart_state() -> AgentState {
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = HandoverMode::Restart(Box::new(move |name: &str| holder.handover(name)));
        AgentState::new(Box::new(provider), handover, 0)
    }

    fn start_agent() -> Agent {
        start_agent_with(restart_state())
    }

    fn start_agent_with(state: AgentState) -> Agent {
        start_agent_set_up(state, |_| {})
    }

    /// An agent that keeps its sessions in `sink`, as under systemd's fd store.
    fn start_agent_in_store(sink: Collect) -> Agent {
        start_agent_set_up(restart_state(), |server| {
            server.keep_in_store(Box::new(sink), None).unwrap();
        })
    }

    /// An agent serving `state`, `set_up` before it runs.
    fn start_agent_set_up(state: AgentState, set_up: impl FnOnce(&AgentServer)) -> Agent {
        let dir = TempDir::new_with_prefix("/tmp/ch-luod-test-").unwrap();
        let path = dir.as_path().join("luod.sock");
        let server = AgentServer::bind(&path, 0o600, state).unwrap();
        set_up(&server);
        let shutdown = server.shutdown_handle();
        let thread = thread::spawn(move || server.run().unwrap());
        Agent {
            _dir: dir,
            path,
            shutdown,
            thread: Some(thread),
        }
    }

    fn memfd_with(bytes: &[u8]) -> File {
        let mut file = File::from(crate::sys::memfd_create("agent-e2e", 0).unwrap());
        file.set_len(4096).unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn read_at(file: &mut File, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.read_exact(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn memfd_crosses_handover_through_the_agent() {
        let agent = start_agent();
        let mut old_vmm = AgentClient::connect(&agent.path).unwrap();
        let mut original = memfd_with(b"guest ram");
        old_vmm.create_session("vm0").unwrap();
        old_vmm.preserve("vm0", original.as_fd(), 42).unwrap();
        old_vmm.handover("vm0").unwrap();
        drop(old_vmm);

        let mut new_vmm = AgentClient::connect(&agent.path).unwrap();
        new_vmm.retrieve_session("vm0").unwrap();
        let mut retrieved = File::from(new_vmm.retrieve_fd("vm0", 42).unwrap());

        assert_eq!(read_at(&mut retrieved, 0, 9), b"guest ram");
        retrieved.seek(SeekFrom::Start(100)).unwrap();
        retrieved.write_all(b"new vmm").unwrap();
        assert_eq!(read_at(&mut original, 100, 7), b"new vmm");
        new_vmm.finish("vm0").unwrap();
        assert!(new_vmm.list().unwrap().is_empty());
    }

    #[test]
    fn sessions_survive_the_creating_connection() {
        let agent = start_agent();
        let mut vmm = AgentClient::connect(&agent.path).unwrap();
        vmm.create_session("vm0").unwrap();
        drop(vmm);

        let sessions = AgentClient::connect(&agent.path).unwrap().list().unwrap();

        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].direction, Direction::Outgoing);
    }

    #[test]
    fn cancel_over_the_socket_discards_the_session() {
        let agent = start_agent();
        let mut vmm = AgentClient::connect(&agent.path).unwrap();
        let file = memfd_with(b"x");
        vmm.create_session("vm0").unwrap();
        vmm.preserve("vm0", file.as_fd(), 1).unwrap();

        vmm.cancel("vm0").unwrap();

        assert!(vmm.list().unwrap().is_empty());
        let error = vmm.handover("vm0").unwrap_err();
        assert_eq!(error.kind(), Some(ErrorKind::NoSuchSession));
    }

    #[test]
    fn remote_errors_keep_kind_and_message() {
        let agent = start_agent();
        let mut vmm = AgentClient::connect(&agent.path).unwrap();
        vmm.create_session("vm0").unwrap();

        let error = vmm.create_session("vm0").unwrap_err();

        assert_eq!(error.kind(), Some(ErrorKind::SessionExists));
        assert_eq!(error.to_string(), r#"Session "vm0" exists already"#);
    }

    #[test]
    fn agent_provider_works_as_a_session_provider() {
        let agent = start_agent();
        let mut provider: Box<dyn SessionProvider> =
            Box::new(AgentProvider::connect(&agent.path).unwrap());
        let file = memfd_with(b"state");
        let mut session = provider.create_session("vm0").unwrap();
        session.preserve_fd(file.as_fd(), 1).unwrap();

        let duplicate = session.preserve_fd(file.as_fd(), 1).unwrap_err();
        let missing = provider.retrieve_session("nope").unwrap_err();

        assert!(
            matches!(duplicate, SessionError::TokenExists { token: 1 }),
            "{duplicate:?}"
        );
        assert!(
            matches!(missing, SessionError::NoSuchSession { .. }),
            "{missing:?}"
        );
        assert_eq!(session.name().unwrap(), "vm0");
    }

    #[test]
    fn connect_without_agent_names_the_path() {
        let dir = TempDir::new_with_prefix("/tmp/ch-luod-test-").unwrap();
        let path = dir.as_path().join("nobody.sock");

        let error = AgentClient::connect(&path).unwrap_err();

        let message = error.to_string();
        assert!(message.contains(&*path.to_string_lossy()), "{message}");
        assert!(message.contains("is ch-luod running?"), "{message}");
    }

    #[test]
    fn socket_is_private_and_a_second_agent_is_refused() {
        let agent = start_agent();

        let meta = fs::metadata(&agent.path).unwrap();
        let second = AgentServer::bind(&agent.path, 0o600, restart_state());

        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(
            matches!(second, Err(AgentError::AlreadyRunning { .. })),
            "{second:?}"
        );
        AgentClient::connect(&agent.path).unwrap().ping().unwrap();
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = TempDir::new_with_prefix("/tmp/ch-luod-test-").unwrap();
        let path = dir.as_path().join("luod.sock");
        drop(UnixListener::bind(&path).unwrap());

        let server = AgentServer::bind(&path, 0o660, restart_state()).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert_eq!(server.path(), path);
    }

    #[test]
    fn stopped_server_removes_its_socket_when_dropped() {
        let mut agent = start_agent();

        agent.shutdown.shutdown();
        agent.thread.take().unwrap().join().unwrap();

        assert!(!agent.path.exists());
    }

    fn raw_reply(stream: &UnixStream) -> Option<Response> {
        let received = protocol::recv(stream, Duration::from_secs(5)).unwrap()?;
        Some(protocol::decode_body(&received.body).unwrap())
    }

    fn bad_request(response: Option<Response>) -> bool {
        matches!(
            response,
            Some(Response::Error(WireError {
                kind: ErrorKind::BadRequest,
                ..
            }))
        )
    }

    #[test]
    fn bad_json_gets_an_error_reply_and_the_connection_goes_on() {
        let agent = start_agent();
        let stream = UnixStream::connect(&agent.path).unwrap();
        let mut frame = protocol::encode(&Request::Ping).unwrap();
        frame.truncate(HEADER_LEN);
        frame[8..12].copy_from_slice(&10u32.to_le_bytes());
        frame.extend_from_slice(b"{not json}");
        (&stream).write_all(&frame).unwrap();

        let reply = raw_reply(&stream);
        protocol::send(&stream, &Request::Ping, None).unwrap();
        let pong = raw_reply(&stream);

        assert!(bad_request(reply));
        assert!(matches!(pong, Some(Response::Pong { .. })), "{pong:?}");
    }

    #[test]
    fn garbage_and_oversized_frames_get_an_error_and_the_agent_lives_on() {
        let agent = start_agent();
        let mut oversized = protocol::encode(&Request::Ping).unwrap();
        oversized[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        for bytes in [&b"GET / HTTP/1.1\r\n\r\n"[..], &oversized] {
            let stream = UnixStream::connect(&agent.path).unwrap();
            (&stream).write_all(bytes).unwrap();

            let reply = raw_reply(&stream);
            let after = protocol::recv(&stream, Duration::from_secs(5));

            assert!(bad_request(reply));
            assert!(
                !matches!(after, Ok(Some(_))),
                "connection should be closed: {after:?}"
            );
        }
        AgentClient::connect(&agent.path).unwrap().ping().unwrap();
    }

    #[test]
    fn too_many_fds_get_an_error_reply() {
        let agent = start_agent();
        let stream = UnixStream::connect(&agent.path).unwrap();
        let (a, b) = (memfd_with(b"a"), memfd_with(b"b"));
        let frame = protocol::encode(&Request::Ping).unwrap();
        use std::os::fd::AsRawFd;
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(
            &stream,
            &[frame.as_slice()],
            &[a.as_raw_fd(), b.as_raw_fd()],
        )
        .unwrap();

        assert!(bad_request(raw_reply(&stream)));
    }

    #[test]
    fn a_file_is_retrieved_again_as_the_same_file_until_the_session_is_finished() {
        use std::os::unix::fs::FileExt;
        let agent = start_agent();
        let mut vmm = AgentClient::connect(&agent.path).unwrap();
        let file = memfd_with(b"x");
        vmm.create_session("s").unwrap();
        vmm.preserve("s", file.as_fd(), 3).unwrap();
        vmm.handover("s").unwrap();
        vmm.retrieve_session("s").unwrap();

        let first = File::from(vmm.retrieve_fd("s", 3).unwrap());
        vmm.retrieve_session("s").unwrap();
        let second = File::from(vmm.retrieve_fd("s", 3).unwrap());
        first.write_all_at(b"y", 0).unwrap();
        let mut byte = [0u8; 1];
        second.read_exact_at(&mut byte, 0).unwrap();
        vmm.finish("s").unwrap();
        let after_finish = vmm.retrieve_fd("s", 3).unwrap_err();

        assert_eq!(first.metadata().unwrap().len(), 4096);
        assert_eq!(&byte, b"y");
        assert_eq!(after_finish.kind(), Some(ErrorKind::NoSuchSession));
    }

    #[test]
    fn a_retrieved_file_is_in_the_fd_store_when_its_retrieve_is_answered() {
        let sink = Collect::default();
        let agent = start_agent_in_store(sink.clone());
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let ram = memfd_with(b"ram");
        old.create_session("vm").unwrap();
        old.preserve("vm", ram.as_fd(), 1).unwrap();
        old.handover("vm").unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        successor.retrieve_session("vm").unwrap();

        let retrieved = successor.retrieve_fd("vm", 1);

        retrieved.unwrap();
        let rebuilt = crate::agent::fdstore::rebuild(sink.take()).unwrap();
        let session = rebuilt
            .sessions
            .iter()
            .find(|s| s.record.name == "vm")
            .expect("the session is in the store");
        assert_eq!(session.record.tokens, vec![1]);
        assert!(session.files.contains_key(&1), "{:?}", session.record);
    }

    #[test]
    fn wait_handover_returns_when_another_client_hands_the_session_over() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        old.create_session("w").unwrap();
        let start = std::time::Instant::now();
        let waiter = thread::spawn(move || successor.wait_handover("w", Duration::from_secs(10)));

        thread::sleep(Duration::from_millis(50));
        old.handover("w").unwrap();
        let waited = waiter.join().unwrap();

        waited.unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn wait_prepared_marks_the_successor_and_returns_once_the_file_is_preserved() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        let waiter =
            thread::spawn(move || successor.wait_prepared("p", 1, Duration::from_secs(30)));
        // The successor waits before the session exists: the old VMM is told to wait for it.
        let mut seen = (false, false);
        for _ in 0..200 {
            old.create_session("p").ok();
            seen = old.wait_successor("p", Duration::from_millis(10)).unwrap();
            if seen.0 {
                break;
            }
        }

        let ram = memfd_with(b"ram");
        old.preserve("p", ram.as_fd(), 1).unwrap();
        let waited = waiter.join().unwrap();

        assert_eq!(seen, (true, false), "a waiting successor, not ready yet");
        waited.unwrap();
    }

    #[test]
    fn wait_prepared_times_out_with_no_such_session() {
        let agent = start_agent();
        let mut successor = AgentClient::connect(&agent.path).unwrap();

        let error = successor
            .wait_prepared("never", 1, Duration::from_millis(20))
            .unwrap_err();

        assert_eq!(error.kind(), Some(ErrorKind::NoSuchSession));
    }

    #[test]
    fn wait_released_returns_once_the_successor_resumed_the_session() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let ram = memfd_with(b"ram");
        old.create_session("r").unwrap();
        old.preserve("r", ram.as_fd(), 1).unwrap();
        old.handover("r").unwrap();
        let waiter = thread::spawn(move || old.wait_released("r", Duration::from_secs(10)));
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        successor.retrieve_session("r").unwrap();
        thread::sleep(Duration::from_millis(50));
        let still_waiting = !waiter.is_finished();

        successor.resumed("r").unwrap();
        let waited = waiter.join().unwrap();

        assert!(
            still_waiting,
            "answered while the successor held the session"
        );
        waited.unwrap();
    }

    #[test]
    fn a_guest_waiting_for_the_pause_slot_gets_it_once_the_one_before_resumed_and_finished() {
        let agent = start_agent_with(
            restart_state().with_pause_slots(1, crate::agent::pause_slots::DEFAULT_LEASE),
        );
        let mut first = AgentClient::connect(&agent.path).unwrap();
        let mut second = AgentClient::connect(&agent.path).unwrap();
        first.create_session("first").unwrap();
        second.create_session("second").unwrap();
        assert!(first.wait_pause_slot("first", Duration::ZERO).unwrap());
        let waiter =
            thread::spawn(move || second.wait_pause_slot("second", Duration::from_secs(10)));
        thread::sleep(Duration::from_millis(50));
        let still_waiting = !waiter.is_finished();

        first.handover("first").unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        successor.retrieve_session("first").unwrap();
        successor.resumed("first").unwrap();
        successor.finish("first").unwrap();
        let granted = waiter.join().unwrap();

        assert!(still_waiting, "answered while the first guest was paused");
        assert!(granted.unwrap());
    }

    #[test]
    fn no_pause_slot_within_the_wait_is_answered_not_granted() {
        let agent = start_agent_with(
            restart_state().with_pause_slots(1, crate::agent::pause_slots::DEFAULT_LEASE),
        );
        let mut first = AgentClient::connect(&agent.path).unwrap();
        first.create_session("first").unwrap();
        first.create_session("second").unwrap();
        assert!(first.wait_pause_slot("first", Duration::ZERO).unwrap());

        let granted = first.wait_pause_slot("second", Duration::from_millis(20));

        assert!(!granted.unwrap());
    }

    #[test]
    fn a_state_blob_held_back_goes_to_the_agent_with_the_handover() {
        let agent = start_agent();
        let client = Arc::new(Mutex::new(AgentClient::connect(&agent.path).unwrap()));
        client.lock().unwrap().create_session("h").unwrap();
        let held_back = crate::agent::HeldBack::default();
        let mut session = crate::agent::AgentSession::new(Arc::clone(&client), "h")
            .holding_back(0, Arc::clone(&held_back));
        let blob = memfd_with(b"state blob");

        session.preserve_fd(blob.as_fd(), 0).unwrap();
        let tokens_before_handover = client.lock().unwrap().list().unwrap()[0].tokens.clone();
        let state = held_back.lock().unwrap().take().map(|fd| (fd, 0));
        client.lock().unwrap().hand_over("h", state).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        successor.retrieve_session("h").unwrap();
        let mut retrieved = File::from(successor.retrieve_fd("h", 0).unwrap());

        assert!(
            tokens_before_handover.is_empty(),
            "{tokens_before_handover:?}"
        );
        assert_eq!(read_at(&mut retrieved, 0, 10), b"state blob");
    }

    #[test]
    fn wait_released_of_a_session_still_held_times_out_busy() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        old.create_session("h").unwrap();
        old.handover("h").unwrap();

        let error = old
            .wait_released("h", Duration::from_millis(20))
            .unwrap_err();

        assert_eq!(error.kind(), Some(ErrorKind::Busy));
    }

    #[test]
    fn take_session_retrieves_the_session_its_state_file_and_attachment_tokens_at_once() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let (ram, state, socket) = (
            memfd_with(b"ram"),
            memfd_with(b"state"),
            memfd_with(b"sock"),
        );
        old.create_session("t").unwrap();
        old.preserve("t", ram.as_fd(), 1).unwrap();
        old.attach("t", socket.as_fd(), 7).unwrap();
        old.preserve("t", state.as_fd(), 0).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        let before = successor
            .take_session("t", 0, Some(Duration::from_millis(20)))
            .unwrap();
        old.handover("t").unwrap();

        let taken = successor
            .take_session("t", 0, Some(Duration::from_secs(10)))
            .unwrap()
            .unwrap();

        assert_eq!(
            before.unwrap_err().kind(),
            Some(ErrorKind::NoSuchSession),
            "not handed over yet"
        );
        let mut session = AgentSession::taken(Arc::new(Mutex::new(successor)), "t", taken);
        let mut state_file = File::from(session.retrieve_fd(0).unwrap());
        assert_eq!(read_at(&mut state_file, 0, 5), b"state");
        let attachments = session.retrieve_attachments().unwrap();
        assert_eq!(attachments.keys().copied().collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn take_session_waits_for_a_handover_another_client_makes_and_answers_in_one_message() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let state = memfd_with(b"state");
        old.create_session("w").unwrap();
        old.preserve("w", state.as_fd(), 0).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        let take = Request::TakeSession {
            name: "w".into(),
            state_token: 0,
            timeout_ms: 10_000,
        };
        let taker = thread::spawn(move || successor.request(&take, None));

        thread::sleep(Duration::from_millis(50));
        old.handover("w").unwrap();
        let (answer, fd) = taker.join().unwrap().unwrap();

        assert_eq!(
            answer,
            Response::Taken {
                state: true,
                attachments: vec![]
            }
        );
        let mut state_file = File::from(fd.expect("the state file"));
        assert_eq!(read_at(&mut state_file, 0, 5), b"state");
    }

    #[test]
    fn an_agent_without_take_session_is_asked_piece_by_piece_with_the_same_outcome() {
        let agent = start_agent();
        let mut old = AgentClient::connect(&agent.path).unwrap();
        let (state, socket) = (memfd_with(b"state"), memfd_with(b"sock"));
        old.create_session("p").unwrap();
        old.attach("p", socket.as_fd(), 7).unwrap();
        old.preserve("p", state.as_fd(), 0).unwrap();
        old.handover("p").unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();

        let taken = successor
            .take_session_piecewise("p", 0, Some(Duration::from_secs(10)))
            .unwrap()
            .unwrap();

        let mut session = AgentSession::taken(Arc::new(Mutex::new(successor)), "p", taken);
        let mut state_file = File::from(session.retrieve_fd(0).unwrap());
        assert_eq!(read_at(&mut state_file, 0, 5), b"state");
        let attachments = session.retrieve_attachments().unwrap();
        assert_eq!(attachments.keys().copied().collect::<Vec<_>>(), vec![7]);
    }

    /// An agent whose successors' `resumed` hold their release back for up to `delay`.
    fn agent_holding_releases_for(delay: Duration) -> Agent {
        start_agent_set_up(restart_state(), |server| server.hold_releases_for(delay))
    }

    /// An old VMM hands session `name` over and a successor takes it and marks it `resumed`;
    /// the old VMM's `wait_released`, sent before that, reports on the returned channel.
    fn resumed_with_a_release_waiter(
        agent: &Agent,
        name: &str,
    ) -> (AgentClient, mpsc::Receiver<Result<(), AgentError>>) {
        let mut old = AgentClient::connect(&agent.path).unwrap();
        old.create_session(name).unwrap();
        old.handover(name).unwrap();
        let mut successor = AgentClient::connect(&agent.path).unwrap();
        successor.retrieve_session(name).unwrap();
        let (released, answers) = mpsc::channel();
        let waited = name.to_string();
        thread::spawn(move || {
            let _ = released.send(old.wait_released(&waited, Duration::from_secs(60)));
        });
        // Time for the waiter to be in its wait (the session is held: it cannot return yet).
        let early = answers.recv_timeout(Duration::from_millis(200));
        assert!(early.is_err(), "released while held: {early:?}");
        successor.resumed(name).unwrap();
        (successor, answers)
    }

    #[test]
    fn a_resumed_release_waits_for_the_successors_next_request() {
        let agent = agent_holding_releases_for(Duration::from_secs(60));
        let (mut successor, released) = resumed_with_a_release_waiter(&agent, "n");

        let before_next = released.recv_timeout(Duration::from_millis(300));
        successor.finish("n").unwrap();
        let after_next = released.recv_timeout(Duration::from_secs(10));

        assert!(
            before_next.is_err(),
            "released before the successor's next request"
        );
        after_next.unwrap().unwrap();
    }

    #[test]
    fn a_resumed_release_comes_when_the_successor_hangs_up() {
        let agent = agent_holding_releases_for(Duration::from_secs(60));
        let (successor, released) = resumed_with_a_release_waiter(&agent, "h");

        drop(successor);
        let answer = released.recv_timeout(Duration::from_secs(10));

        answer.unwrap().unwrap();
    }

    #[test]
    fn a_resumed_release_comes_after_the_delay_without_another_request() {
        let agent = agent_holding_releases_for(Duration::from_millis(100));
        let (_successor, released) = resumed_with_a_release_waiter(&agent, "d");

        let answer = released.recv_timeout(Duration::from_secs(10));

        answer.unwrap().unwrap();
    }

    #[test]
    fn wait_handover_times_out_with_no_such_session() {
        let agent = start_agent();
        let mut successor = AgentClient::connect(&agent.path).unwrap();

        let error = successor
            .wait_handover("never", Duration::from_millis(20))
            .unwrap_err();

        assert_eq!(error.kind(), Some(ErrorKind::NoSuchSession));
    }

    fn kernel_agent(fake: &crate::agent::state::tests::FakeKexec) -> Agent {
        let state = AgentState::new(
            Box::new(EmulatedProvider::new()),
            HandoverMode::Kexec(Arc::new(fake.clone())),
            crate::agent::effective_uid(),
        );
        start_agent_with(state)
    }

    /// Hands `name` over from another thread (the reply is held) and returns its outcome.
    fn handover_in_thread(path: &Path, name: &'static str) -> JoinHandle<Option<ErrorKind>> {
        let mut vmm = AgentClient::connect(path).unwrap();
        vmm.create_session(name).unwrap();
        thread::spawn(move || vmm.handover(name).err().and_then(|e| e.kind()))
    }

    fn wait_frozen(path: &Path, count: usize) {
        let mut client = AgentClient::connect(path).unwrap();
        for _ in 0..500 {
            let frozen = client
                .list()
                .unwrap()
                .iter()
                .filter(|s| s.direction == Direction::Frozen)
                .count();
            if frozen == count {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("sessions never froze");
    }

    #[test]
    fn kexec_reboots_only_after_every_session_froze_and_a_failed_reboot_fails_each_handover() {
        let fake = crate::agent::state::tests::FakeKexec::default();
        let agent = kernel_agent(&fake);
        let first = handover_in_thread(&agent.path, "vm0");
        let mut second_vmm = AgentClient::connect(&agent.path).unwrap();
        second_vmm.create_session("vm1").unwrap();
        wait_frozen(&agent.path, 1);

        let path = agent.path.clone();
        let kexec = thread::spawn(move || {
            let mut operator = AgentClient::connect(&path).unwrap();
            operator
                .kexec(
                    &crate::agent::state::tests::image(),
                    &[],
                    Duration::from_secs(20),
                )
                .kind()
        });
        thread::sleep(Duration::from_millis(300));
        let calls_before_barrier = fake.calls.lock().unwrap().clone();
        let second = thread::spawn(move || second_vmm.handover("vm1").err().and_then(|e| e.kind()));

        assert_eq!(calls_before_barrier, ["load"]);
        assert_eq!(kexec.join().unwrap(), Some(ErrorKind::KexecFailed));
        assert_eq!(first.join().unwrap(), Some(ErrorKind::KexecFailed));
        assert_eq!(second.join().unwrap(), Some(ErrorKind::KexecFailed));
        assert_eq!(*fake.calls.lock().unwrap(), ["load", "reboot", "unload"]);
    }

    #[test]
    fn barrier_timeout_names_the_unfrozen_session_and_resumes_the_frozen_one() {
        let fake = crate::agent::state::tests::FakeKexec::default();
        let agent = kernel_agent(&fake);
        let frozen = handover_in_thread(&agent.path, "vm0");
        let mut idle_vmm = AgentClient::connect(&agent.path).unwrap();
        idle_vmm.create_session("stuck").unwrap();
        wait_frozen(&agent.path, 1);
        let mut operator = AgentClient::connect(&agent.path).unwrap();

        let error = operator.kexec(
            &crate::agent::state::tests::image(),
            &["vm0".to_string(), "absent".to_string()],
            Duration::from_millis(200),
        );

        assert_eq!(error.kind(), Some(ErrorKind::KexecFailed));
        assert!(error.to_string().contains("absent, stuck"), "{error}");
        assert_eq!(frozen.join().unwrap(), Some(ErrorKind::KexecFailed));
        assert_eq!(*fake.calls.lock().unwrap(), ["load", "unload"]);
        let sessions = operator.list().unwrap();
        assert!(sessions.iter().all(|s| s.direction == Direction::Outgoing));
    }

    #[test]
    fn socket_and_pipe_attachments_cross_the_handover_and_the_peer_sees_no_hangup() {
        let agent = start_agent();
        let (server_end, vmm_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let (signals, mut signal) = std::io::pipe().unwrap();
        let mut old_provider = AgentProvider::connect(&agent.path).unwrap();
        let mut outgoing = old_provider.create_session("vm0").unwrap();
        outgoing.attach_fd(vmm_end.as_fd(), 20).unwrap();
        outgoing.attach_fd(signals.as_fd(), 21).unwrap();
        AgentClient::connect(&agent.path)
            .unwrap()
            .handover("vm0")
            .unwrap();
        // The old VMM exits: its copies close; a signal sent meanwhile waits.
        drop((outgoing, old_provider, vmm_end, signals));
        signal.write_all(b"!").unwrap();

        let mut provider = AgentProvider::connect(&agent.path).unwrap();
        let mut incoming = provider.retrieve_session("vm0").unwrap();
        let mut fds = incoming.retrieve_attachments().unwrap();
        let stream = std::os::unix::net::UnixStream::from(fds.remove(&20).unwrap());
        let waiting = File::from(fds.remove(&21).unwrap());
        (&stream).write_all(b"hi").unwrap();
        let mut greeting = [0u8; 2];
        (&server_end).read_exact(&mut greeting).unwrap();
        let mut pending = [0u8];
        (&waiting).read_exact(&mut pending).unwrap();

        assert_eq!(&greeting, b"hi");
        assert_eq!(&pending, b"!", "the signal waited for the successor");
        assert!(fds.is_empty());
        incoming.finish().unwrap();
        drop(stream);
        server_end.set_nonblocking(true).unwrap();
        let mut byte = [0u8];
        assert_eq!(
            (&server_end).read(&mut byte).unwrap(),
            0,
            "hang-up after the last copy"
        );
    }

    #[test]
    fn kernel_agent_refuses_attachments_as_restart_only() {
        let fake = crate::agent::state::tests::FakeKexec::default();
        let agent = kernel_agent(&fake);
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut provider = AgentProvider::connect(&agent.path).unwrap();
        let mut session = provider.create_session("vm0").unwrap();

        let error = session.attach_fd(socket.as_fd(), 1).unwrap_err();

        assert!(
            matches!(error, SessionError::AttachmentsUnsupported),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("only in restart mode"),
            "{error}"
        );
    }
}
