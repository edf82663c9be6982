//! vCPU threads: each runs `KVM_RUN` in a loop and routes port and MMIO exits to the buses.
//!
//! A vCPU thread is in one of three requested states: run, pause or stop. Pausing is a
//! handshake: the controller sets the request, kicks every thread out of `KVM_RUN` with a
//! signal, and waits until each thread has parked. The kick is repeated until then, because a
//! signal that lands just before a thread enters `KVM_RUN` would otherwise be lost and leave it
//! in a halted guest forever. A thread that stops right after a port or MMIO exit first has
//! KVM finish that access (which it does only on the next `KVM_RUN`), so the state of a paused
//! vCPU is whole.
//!
//! A pause can give each thread work to do on its own vCPU as it parks ([`VcpuSet::pause_with`],
//! e.g. noting when it stopped), and a paused set can have work done on each parked vCPU side by
//! side ([`VcpuSet::run_parked`], e.g. saving its state once nothing else can change it): by its
//! own thread, or by the caller, who takes the vCPUs whose threads have not come for theirs yet.
//! A set can be started before its vCPUs exist: each thread then makes its own
//! vCPU ([`VcpuSet::spawn_building`]), so the vCPUs are built side by side; threads started well
//! ahead ([`VcpuSet::spawn_idle`]) make their vCPUs and wait only to load them, and whoever
//! waits for the set builds what their threads have not started yet. Built threads are held
//! until the first resume and go straight into the guest.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, Once, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::{Bus, lock};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, warn};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::sys;

/// What a vCPU thread reports to the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked for a reset (triple fault or a KVM reset event).
    Reset,
    /// The guest asked to power off.
    Shutdown,
    /// The guest released (ejected) PCI devices: the VMM takes them off the bus.
    DeviceEjected,
    /// `KVM_RUN` failed or the guest hit an exit we cannot handle; the vCPU has stopped.
    Failed {
        /// Index of the vCPU.
        vcpu: u8,
        /// What went wrong.
        reason: String,
    },
}

/// The buses a vCPU routes its exits to.
#[derive(Clone, Debug)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<RwLock<Bus>>,
    /// MMIO (changes when the guest moves a PCI BAR).
    pub mmio: Arc<RwLock<Bus>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// Work a vCPU thread does on its own vCPU as it parks for a pause (see [`VcpuSet::pause_with`])
/// or while it is parked (see [`VcpuSet::run_parked`]).
pub type ParkHook = Arc<dyn Fn(u8, &mut VcpuFd) + Send + Sync>;

/// Where a [`ParkedTask`]'s hook stands for one thread's vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HookRun {
    /// To run; nobody has taken it yet.
    Owed,
    /// Taken by the thread, or by the caller of `run_parked`.
    Claimed,
    /// Done.
    Ran,
    /// Not to run (the thread is not parked for the pause, or it left the pause).
    NoCall,
}

/// Work for the parked threads, given by [`VcpuSet::run_parked`].
struct ParkedTask {
    hook: ParkHook,
    /// Per thread.
    runs: Vec<HookRun>,
}

impl ParkedTask {
    /// Claims vCPU `index`'s run of the hook, if it is owed and nobody claimed it yet.
    fn claim(&mut self, index: usize) -> bool {
        match self.runs.get_mut(index) {
            Some(run) if *run == HookRun::Owed => {
                *run = HookRun::Claimed;
                true
            }
            _ => false,
        }
    }

    /// Thread `index` is through with the task, having run it or not.
    fn finish(&mut self, index: usize, ran: bool) {
        if let Some(run) = self.runs.get_mut(index) {
            if ran {
                *run = HookRun::Ran;
            } else if *run != HookRun::Ran {
                *run = HookRun::NoCall;
            }
        }
    }

    /// Whether a run is owed or under way still.
    fn pending(&self) -> bool {
        self.runs
            .iter()
            .any(|run| matches!(run, HookRun::Owed | HookRun::Claimed))
    }
}

/// The control of a set and its two wake-ups: one the threads wait on (the controller changed
/// the request or gave work), one the controller waits on (a thread parked or finished work).
/// Apart, so that each thread that is done wakes only the controller, not every other thread.
type ControlShared = (Mutex<Control>, Condvar, Condvar);

struct Control {
    request: Request,
    parked: usize,
    /// Per thread: out of the guest since the pause was asked (no kick needed any more), and
    /// parked for the pause (or about to park) until it ends.
    stopping: Vec<bool>,
    on_park: Option<ParkHook>,
    task: Option<ParkedTask>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("request", &self.request)
            .field("parked", &self.parked)
            .field("stopping", &self.stopping)
            .field("on_park", &self.on_park.is_some())
            .field("task", &self.task.as_ref().map(|t| &t.runs))
            .finish()
    }
}

/// Makes one vCPU, on the thread that will run it (or on the thread that waits for the set, if
/// that one comes for it first: see [`PendingVcpus::finish`]); given the vCPU made ahead, if
/// the thread made one ([`VcpuMaker`]), it loads that instead of making another.
pub type VcpuBuilder<E> = Box<dyn FnOnce(Option<VcpuFd>) -> Result<VcpuFd, E> + Send>;

/// Makes vCPU `index` (`KVM_CREATE_VCPU`) on a thread started ahead, while it waits for its
/// builder: a live update's pause then only loads the vCPU's state.
pub type VcpuMaker = Arc<dyn Fn(u8) -> Result<VcpuFd, kvm_ioctls::Error> + Send + Sync>;

/// Why [`PendingVcpus::finish`] failed.
#[derive(Debug)]
pub enum BuildError<E> {
    /// vCPU `index`'s builder failed.
    Failed(u8, E),
    /// vCPU `index`'s thread ended without a result (it panicked).
    Lost(u8),
}

/// One vCPU still to build: the vCPU its thread made ahead, and its builder once given.
struct Slot<E> {
    made: Option<VcpuFd>,
    builder: Option<VcpuBuilder<E>>,
    /// The kernel's id of its thread, once started.
    tid: Option<i32>,
    /// The CPUs its thread may run on, while it is kept off the builder's CPU
    /// ([`IdleVcpus::build`]): the thread takes them back once through with its builder.
    own_cpus: Option<sys::CpuSet>,
}

/// The slots of a set's vCPUs, by index: each builder is run once, by its own thread or by
/// whoever waits for the set ([`PendingVcpus::finish`]) when the thread has not started it.
type Slots<E> = Arc<Mutex<Vec<Slot<E>>>>;

/// Takes the builder of vCPU `index` (with the vCPU made ahead), if nobody has yet.
fn take_job<E>(slots: &Slots<E>, index: usize) -> Option<(VcpuBuilder<E>, Option<VcpuFd>)> {
    let mut slots = lock(slots);
    let slot = slots.get_mut(index)?;
    let builder = slot.builder.take()?;
    Some((builder, slot.made.take()))
}

/// Keeps the threads of `slots` off the calling thread's CPU until each is through with its
/// builder. The caller builds the devices meanwhile, and takes the builders the threads have
/// not started when it is done: the scheduler would otherwise often queue the woken threads
/// behind it, on its CPU, while another CPU idles (seen on a 2-CPU host: four vCPU loads one
/// after the other, 0.3 ms, instead of beside the devices). Threads that may run only here
/// stay as they are.
fn keep_off_this_cpu<E>(slots: &Slots<E>) {
    let Some(here) = sys::current_cpu() else {
        return;
    };
    for slot in lock(slots).iter_mut() {
        let Some(tid) = slot.tid else { continue };
        let Ok(own) = sys::thread_cpus(tid) else {
            continue;
        };
        let Some(elsewhere) = own.without(here) else {
            continue;
        };
        match sys::set_thread_cpus(tid, &elsewhere) {
            Ok(()) => slot.own_cpus = Some(own),
            Err(e) => debug!("vCPU thread {tid} stays on every CPU it had: {e}"),
        }
    }
}

/// Gives vCPU thread `index` (the caller) back the CPUs [`keep_off_this_cpu`] took from it.
fn take_back_own_cpus<E>(slots: &Slots<E>, index: u8) {
    let own = lock(slots)
        .get_mut(usize::from(index))
        .and_then(|slot| slot.own_cpus.take());
    if let Some(own) = own
        && let Err(e) = sys::set_thread_cpus(0, &own)
    {
        warn!("vcpu{index}: cannot take back its CPUs {own:?}: {e}");
    }
}

/// What a thread started ahead hears from its set: go and build, then its vCPU and buses.
type Start = (Buses, Arc<Mutex<VcpuFd>>);

/// vCPU threads started ahead by [`VcpuSet::spawn_idle`], waiting for their builders.
pub struct IdleVcpus<E> {
    // Field order is drop order: the channels go first, so waiting threads end before the set
    // joins them.
    go: Vec<Sender<()>>,
    /// Per thread: the result of its builder, or `None` when the builder was taken from it.
    ready: Vec<Receiver<Option<Result<VcpuFd, E>>>>,
    start: Vec<Sender<Start>>,
    slots: Slots<E>,
    set: Option<VcpuSet>,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    maker: Option<VcpuMaker>,
}

impl<E> std::fmt::Debug for IdleVcpus<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleVcpus")
            .field("threads", &self.go.len())
            .field("make_ahead", &self.maker.is_some())
            .finish()
    }
}

impl<E: Send + 'static> IdleVcpus<E> {
    /// How many threads wait.
    pub fn len(&self) -> usize {
        self.go.len()
    }

    /// Whether no thread waits.
    pub fn is_empty(&self) -> bool {
        self.go.is_empty()
    }

    /// The kernel's ids of the threads that have started.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.set
            .as_ref()
            .map(VcpuSet::thread_ids)
            .unwrap_or_default()
    }

    /// Whether the threads make their vCPUs ahead: then `build` must get a builder for every
    /// thread, because KVM cannot take back a vCPU a spare thread made.
    pub fn make_vcpus_ahead(&self) -> bool {
        self.maker.is_some()
    }

    /// Starts one more thread; it says on `prepared` once it is filtered and has made its vCPU
    /// (if the set makes them ahead).
    fn spawn_one(&mut self, prepared: Option<Sender<()>>) -> io::Result<()> {
        let Some(set) = self.set.as_mut() else {
            return Err(io::Error::other("vCPU threads handed on already"));
        };
        let index =
            u8::try_from(set.threads.len()).map_err(|_| io::Error::other("more than 256 vCPUs"))?;
        let (go_tx, go_rx) = channel::<()>();
        let (ready_tx, ready_rx) = channel();
        let (start_tx, start_rx) = channel::<Start>();
        let control = set.control.clone();
        let first_entry = set.first_entry.clone();
        let on_event = self.on_event.clone();
        let maker = self.maker.clone();
        let slots = self.slots.clone();
        lock(&slots).push(Slot {
            made: None,
            builder: None,
            tid: None,
            own_cpus: None,
        });
        let tids = set.tids.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let tid = sys::current_tid();
                lock(&tids).push(tid);
                if let Some(slot) = lock(&slots).get_mut(usize::from(index)) {
                    slot.tid = Some(tid);
                }
                // Filtered and its vCPU made now, ahead: neither costs the pause anything.
                confine::confine_thread_or_exit(confine::ThreadKind::Vcpu);
                if let Some(make) = maker {
                    match make(index) {
                        Ok(vcpu) => {
                            if let Some(slot) = lock(&slots).get_mut(usize::from(index)) {
                                slot.made = Some(vcpu);
                            }
                        }
                        Err(e) => warn!("vcpu{index}: cannot make it ahead: {e}"),
                    }
                }
                if let Some(prepared) = prepared {
                    let _ = prepared.send(());
                }
                if go_rx.recv().is_err() {
                    return; // not needed after all
                }
                let built = take_job(&slots, usize::from(index)).map(|(build, made)| build(made));
                take_back_own_cpus(&slots, index);
                drop(slots);
                if ready_tx.send(built).is_err() {
                    return;
                }
                let Ok((buses, vcpu)) = start_rx.recv() else {
                    return;
                };
                let runner = Runner {
                    index,
                    vcpu,
                    buses,
                    control,
                    on_event,
                    first_entry,
                };
                runner.run_loop();
            })?;
        set.threads.push(thread);
        self.go.push(go_tx);
        self.ready.push(ready_rx);
        self.start.push(start_tx);
        Ok(())
    }

    /// Starts `count` threads; with `wait`, returns once each is ready (filtered, its vCPU made).
    fn with_threads(mut self, count: usize, wait: bool) -> io::Result<Self> {
        let (prepared_tx, prepared_rx) = channel();
        for _ in 0..count {
            self.spawn_one(wait.then(|| prepared_tx.clone()))?;
        }
        drop(prepared_tx);
        // Each thread drops its sender once ready (or dead): then this ends.
        while prepared_rx.recv().is_ok() {}
        Ok(self)
    }

    /// Gives thread `i` builder `i` (starting more threads if fewer wait; ending those left
    /// over); they make their vCPUs side by side while the caller goes on.
    pub fn build(mut self, builders: Vec<VcpuBuilder<E>>) -> io::Result<PendingVcpus<E>> {
        while self.go.len() < builders.len() {
            self.spawn_one(None)?;
        }
        let spare = self.go.len() - builders.len();
        if spare > 0 && self.maker.is_some() {
            return Err(io::Error::other(format!(
                "{spare} vCPU threads made vCPUs ahead that the state does not have"
            )));
        }
        for _ in 0..spare {
            // Dropping its go sender ends the thread; joined with the set.
            self.go.pop();
            self.ready.pop();
            self.start.pop();
        }
        for (slot, builder) in lock(&self.slots).iter_mut().zip(builders) {
            slot.builder = Some(builder);
        }
        keep_off_this_cpu(&self.slots);
        for go in &self.go {
            if go.send(()).is_err() {
                return Err(io::Error::other(
                    "a vCPU thread ended before its builder came",
                ));
            }
        }
        let Some(mut set) = self.set.take() else {
            return Err(io::Error::other("vCPU threads handed on already"));
        };
        // The spare threads end on their own (their jobs are gone); join them now.
        for thread in set.threads.drain(self.ready.len()..) {
            if thread.join().is_err() {
                error!("A spare vCPU thread panicked");
            }
        }
        Ok(PendingVcpus {
            start: std::mem::take(&mut self.start),
            ready: std::mem::take(&mut self.ready),
            slots: self.slots.clone(),
            set: Some(set),
        })
    }
}

/// vCPU threads started by [`VcpuSet::spawn_building`] or [`IdleVcpus::build`], still making
/// their vCPUs.
pub struct PendingVcpus<E> {
    // Field order is drop order: the start senders go first, so threads waiting for their
    // vCPUs end before the set joins them.
    start: Vec<Sender<Start>>,
    ready: Vec<Receiver<Option<Result<VcpuFd, E>>>>,
    slots: Slots<E>,
    /// Taken by `finish`; dropped otherwise, which stops and joins the threads.
    set: Option<VcpuSet>,
}

impl<E> std::fmt::Debug for PendingVcpus<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingVcpus")
            .field("threads", &self.start.len())
            .finish()
    }
}

impl<E> PendingVcpus<E> {
    /// Waits until every vCPU is made, then lets the threads take their exits to `buses`. A
    /// builder whose thread has not started it yet (the host's CPUs are busy) is run here, so
    /// the caller's CPU builds rather than waits. The set is paused: [`VcpuSet::resume`] runs
    /// it. On failure every thread is stopped.
    pub fn finish(mut self, buses: &Buses) -> Result<VcpuSet, BuildError<E>> {
        let mut built_here: Vec<_> = (0..self.ready.len())
            .map(|index| take_job(&self.slots, index).map(|(build, made)| build(made)))
            .collect();
        let mut vcpus = Vec::with_capacity(self.ready.len());
        for ((index, ready), here) in (0u8..).zip(&self.ready).zip(&mut built_here) {
            let built = match ready.recv() {
                Ok(Some(built)) => built,
                Ok(None) => here.take().ok_or(BuildError::Lost(index))?,
                Err(_) => return Err(BuildError::Lost(index)),
            };
            // Dropping `self` drops the start senders: the other threads end, `set` joins them.
            let vcpu = built.map_err(|e| BuildError::Failed(index, e))?;
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        let Some(mut set) = self.set.take() else {
            return Err(BuildError::Lost(0));
        };
        let starts = vcpus.iter().map(|vcpu| (buses.clone(), vcpu.clone()));
        *lock(&set.held) = std::mem::take(&mut self.start)
            .into_iter()
            .zip(starts)
            .collect();
        set.vcpus = vcpus;
        Ok(set)
    }
}

/// Runs, pauses and stops a set of vCPU threads.
#[derive(Debug)]
pub struct VcpuSet {
    control: Arc<ControlShared>,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    /// Threads that built their vCPUs ([`PendingVcpus::finish`]) and wait for them before
    /// their loop: let go by the first resume straight into the guest (no park on the way,
    /// which would only contend for the control lock with the resume), or by whatever the set
    /// is asked first.
    held: Mutex<Vec<(Sender<Start>, Start)>>,
    /// When a vCPU of the set first went into the guest (host realtime, ns since the epoch; 0
    /// before): for a restored VM, the end of a live update's pause.
    first_entry: Arc<AtomicU64>,
    /// The kernel's ids of the threads, each added by its thread as it starts.
    tids: Arc<Mutex<Vec<i32>>>,
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(io::Error::from);
    });
    result
}

impl VcpuSet {
    /// Starts one thread per vCPU. They begin paused (they park on their own, nobody waits for
    /// them): call [`VcpuSet::resume`] to run them.
    pub fn start(
        vcpus: Vec<VcpuFd>,
        buses: &Buses,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    ) -> io::Result<Self> {
        let mut set = Self::empty()?;
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        set.vcpus = vcpus.clone();
        for (index, vcpu) in (0u8..).zip(vcpus) {
            let runner = Runner {
                index,
                vcpu,
                buses: buses.clone(),
                control: set.control.clone(),
                on_event: on_event.clone(),
                first_entry: set.first_entry.clone(),
            };
            let tids = set.tids.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    lock(&tids).push(crate::sys::current_tid());
                    confine::confine_thread_or_exit(confine::ThreadKind::Vcpu);
                    runner.run_loop();
                });
            match thread {
                Ok(t) => set.threads.push(t),
                Err(e) => {
                    set.stop();
                    return Err(e);
                }
            }
        }
        Ok(set)
    }

    /// A set with no threads yet, paused.
    fn empty() -> io::Result<Self> {
        install_kick_handler()?;
        let control = Arc::new((
            Mutex::new(Control {
                request: Request::Pause,
                parked: 0,
                stopping: Vec::new(),
                on_park: None,
                task: None,
            }),
            Condvar::new(),
            Condvar::new(),
        ));
        Ok(Self {
            control,
            threads: Vec::new(),
            vcpus: Vec::new(),
            held: Mutex::new(Vec::new()),
            first_entry: Arc::new(AtomicU64::new(0)),
            tids: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The kernel's ids of the set's threads that have started.
    pub fn thread_ids(&self) -> Vec<i32> {
        lock(&self.tids).clone()
    }

    /// Lets the held threads into their loop, where they do as the control says.
    fn let_go(&self) {
        for (thread, start) in lock(&self.held).drain(..) {
            // A thread that is gone shows up as a stopped vCPU, as after any failure.
            let _ = thread.send(start);
        }
    }

    /// Starts one thread per builder; thread `i` runs builder `i` to make vCPU `i`, so the vCPUs
    /// are made side by side while the caller goes on (e.g. building the devices). Then
    /// [`PendingVcpus::finish`] hands them their vCPUs and buses.
    pub fn spawn_building<E: Send + 'static>(
        builders: Vec<VcpuBuilder<E>>,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    ) -> io::Result<PendingVcpus<E>> {
        // No waiting for the threads to start: the builders go to them as they come.
        Self::no_threads(on_event, None)?
            .with_threads(builders.len(), false)?
            .build(builders)
    }

    /// Starts `count` vCPU threads that wait for their builders ([`IdleVcpus::build`]): started
    /// ahead, so that starting threads is not part of a live update's pause. With `maker`, each
    /// makes its vCPU meanwhile too. Returns once every thread is through with that work, so
    /// none of it runs beside the pause that may follow.
    pub fn spawn_idle<E: Send + 'static>(
        count: usize,
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        maker: Option<VcpuMaker>,
    ) -> io::Result<IdleVcpus<E>> {
        Self::no_threads(on_event, maker)?.with_threads(count, true)
    }

    fn no_threads<E: Send + 'static>(
        on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
        maker: Option<VcpuMaker>,
    ) -> io::Result<IdleVcpus<E>> {
        Ok(IdleVcpus {
            go: Vec::new(),
            ready: Vec::new(),
            start: Vec::new(),
            slots: Arc::new(Mutex::new(Vec::new())),
            set: Some(Self::empty()?),
            on_event,
            maker,
        })
    }

    /// The vCPU file descriptors, to read or write state while the set is paused.
    pub fn vcpus(&self) -> &[Arc<Mutex<VcpuFd>>] {
        &self.vcpus
    }

    /// When a vCPU of the set first went into the guest (host realtime, ns since the epoch),
    /// waiting up to `wait` for one to.
    pub fn first_entry_ns(&self, wait: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.first_entry.load(Ordering::SeqCst) {
                0 if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                0 => return None,
                at => return Some(at),
            }
        }
    }

    /// Whether the vCPUs were last told to run (not paused or stopped).
    pub fn is_running(&self) -> bool {
        let (m, _, _) = &*self.control;
        lock(m).request == Request::Run
    }

    /// Lets every vCPU run.
    pub fn resume(&self) {
        let (m, to_threads, _) = &*self.control;
        lock(m).request = Request::Run;
        to_threads.notify_all();
        self.let_go();
    }

    /// Stops every vCPU at its next exit and returns once all of them are parked.
    pub fn pause(&self) {
        self.let_go();
        let (m, to_threads, _) = &*self.control;
        lock(m).request = Request::Pause;
        // A thread parked after a failure waits for the request to change.
        to_threads.notify_all();
        self.wait_parked();
    }

    /// Like [`VcpuSet::pause`], and each thread that was running calls `hook` with its index
    /// and vCPU as it parks, on its own thread, before the pause returns. Threads parked
    /// already (a set that was paused, or stopped after a failure) do not call it.
    pub fn pause_with(&self, hook: ParkHook) {
        self.let_go();
        let (m, to_threads, _) = &*self.control;
        {
            let mut control = lock(m);
            control.on_park = Some(hook);
            control.request = Request::Pause;
        }
        to_threads.notify_all();
        self.wait_parked();
        lock(m).on_park = None;
    }

    /// Calls `hook` with the index and vCPU of each thread parked for a pause, once per vCPU,
    /// side by side, and returns once all calls are done: per thread, whether its vCPU's was.
    /// Each call runs on the vCPU's own thread, or on the caller's, which takes the vCPUs from
    /// the last down while their threads wake (on a host with fewer free CPUs than vCPUs the
    /// threads would otherwise take their turns one after the other). A thread that is not
    /// parked for a pause (the set is not paused, or the thread stopped after a failure or
    /// ended) has no call.
    pub fn run_parked(&self, hook: ParkHook) -> Vec<bool> {
        self.let_go();
        if lock(&self.control.0).request == Request::Pause {
            // Threads just let go park on their own: each must have parked to run the hook.
            self.wait_parked();
        }
        let (m, to_threads, to_main) = &*self.control;
        let mut control = lock(m);
        let mut runs = vec![HookRun::NoCall; self.threads.len()];
        if control.request == Request::Pause {
            for (run, stopping) in runs.iter_mut().zip(&control.stopping) {
                if *stopping {
                    *run = HookRun::Owed;
                }
            }
        }
        control.task = Some(ParkedTask {
            hook: hook.clone(),
            runs,
        });
        // Woken with the lock free: a thread that runs at once (on this CPU, on a host that
        // packs a VM's threads together) takes its vCPU's call, rather than sleeping again on
        // the lock and waking later, one after the other, in the way of what comes next.
        drop(control);
        to_threads.notify_all();
        let mut control = lock(m);
        while let Some(task) = control.task.as_mut() {
            let ours = (0..self.vcpus.len().min(task.runs.len()))
                .rev()
                .find(|&index| task.claim(index));
            if let Some(index) = ours {
                drop(control);
                if let (Some(vcpu), Ok(number)) = (self.vcpus.get(index), u8::try_from(index)) {
                    hook(number, &mut lock(vcpu));
                }
                control = lock(m);
                if let Some(task) = control.task.as_mut() {
                    task.finish(index, true);
                }
                continue;
            }
            if !task.pending() {
                break;
            }
            control = to_main
                .wait(control)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        control
            .task
            .take()
            .map(|task| task.runs.iter().map(|run| *run == HookRun::Ran).collect())
            .unwrap_or_default()
    }

    fn wait_parked(&self) {
        let (m, _, to_main) = &*self.control;
        let mut control = lock(m);
        while control.parked < self.threads.len() {
            drop(control);
            self.kick_all();
            control = lock(m);
            // The last threads may have parked during the kicks: their wake-up came before
            // this wait, which would otherwise sleep its whole timeout.
            if control.parked >= self.threads.len() {
                break;
            }
            // A kick that lands just before KVM_RUN is lost: kick again soon.
            control = match to_main.wait_timeout(control, Duration::from_micros(100)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn kick_all(&self) {
        let stopping = lock(&self.control.0).stopping.clone();
        for (index, thread) in self.threads.iter().enumerate() {
            // A thread out of the guest already needs no signal (it would only wake it up).
            if stopping.get(index).copied().unwrap_or(false) {
                continue;
            }
            if !thread.is_finished()
                && let Err(e) = thread.kill(kick_signal())
            {
                debug!("Cannot kick vCPU thread: {e}");
            }
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        let (m, to_threads, _) = &*self.control;
        lock(m).request = Request::Stop;
        to_threads.notify_all();
        // Held threads end when their start is dropped.
        lock(&self.held).clear();
        while self.threads.iter().any(|t| !t.is_finished()) {
            self.kick_all();
            std::thread::sleep(Duration::from_millis(1));
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("A vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Runner {
    index: u8,
    vcpu: Arc<Mutex<VcpuFd>>,
    buses: Buses,
    control: Arc<ControlShared>,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
    /// The set's [`VcpuSet::first_entry_ns`].
    first_entry: Arc<AtomicU64>,
}

impl Runner {
    fn run_loop(self) {
        // Whether the last exit was a port or MMIO access, which KVM finishes on the next
        // KVM_RUN only.
        let mut io_pending = false;
        // Whether this thread has gone into the guest yet (for the set's first entry stamp).
        let mut entered = false;
        loop {
            if !self.wait_for_run(&mut io_pending) {
                // Ending (a VM handed over to a successor that restores it on this host's
                // CPUs right now): the thread's own teardown can wait for them.
                if let Err(e) = crate::sys::lowest_thread_priority() {
                    debug!("vcpu{}: cannot lower its priority to end: {e}", self.index);
                }
                return;
            }
            if !entered {
                entered = true;
                let now = crate::live_update::participants::realtime_ns();
                // The first thread of the set to get here sets it.
                let _ =
                    self.first_entry
                        .compare_exchange(0, now, Ordering::SeqCst, Ordering::Relaxed);
            }
            let mut vcpu = lock(&self.vcpu);
            let mut triple_fault = false;
            let outcome = match vcpu.run() {
                Ok(exit) => {
                    triple_fault = matches!(exit, VcpuExit::Shutdown);
                    io_pending = matches!(
                        exit,
                        VcpuExit::IoIn(..)
                            | VcpuExit::IoOut(..)
                            | VcpuExit::MmioRead(..)
                            | VcpuExit::MmioWrite(..)
                    );
                    self.handle_exit(exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    io_pending = false;
                    vcpu.set_kvm_immediate_exit(0);
                    Ok(())
                }
                Err(e) => {
                    io_pending = false;
                    Err(VcpuEvent::Failed {
                        vcpu: self.index,
                        reason: format!("KVM_RUN failed: {e}"),
                    })
                }
            };
            if triple_fault {
                self.report_triple_fault(&vcpu);
            }
            drop(vcpu);
            if let Err(event) = outcome {
                self.park_after(event);
            }
        }
    }

    /// Parks while a pause is requested, after completing the port or MMIO access of the last
    /// exit if `io_pending`. Returns false when the thread must stop.
    fn wait_for_run(&self, io_pending: &mut bool) -> bool {
        let (m, cv, to_main) = &*self.control;
        let mut control = lock(m);
        if control.request == Request::Pause {
            let index = usize::from(self.index);
            if control.stopping.len() <= index {
                control.stopping.resize(index + 1, false);
            }
            control.stopping[index] = true;
            if std::mem::take(io_pending) {
                drop(control);
                self.complete_io();
                control = lock(m);
            }
            if let Some(hook) = control.on_park.clone() {
                // Outside the lock: the other threads run their hooks meanwhile.
                drop(control);
                hook(self.index, &mut lock(&self.vcpu));
                control = lock(m);
            }
            control.parked += 1;
            to_main.notify_all();
            while control.request == Request::Pause {
                let hook = control
                    .task
                    .as_mut()
                    .and_then(|task| task.claim(index).then(|| task.hook.clone()));
                if let Some(hook) = hook {
                    // Outside the lock: the other parked threads run it meanwhile.
                    drop(control);
                    hook(self.index, &mut lock(&self.vcpu));
                    control = lock(m);
                    if let Some(task) = control.task.as_mut() {
                        task.finish(index, true);
                    }
                    to_main.notify_all();
                    continue;
                }
                control = cv
                    .wait(control)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            control.parked -= 1;
            control.stopping[index] = false;
            // Leaving the pause (resumed or stopped) ends any work still asked of this thread.
            if let Some(task) = control.task.as_mut() {
                task.finish(index, false);
                to_main.notify_all();
            }
        }
        control.request == Request::Run
    }

    /// Completes the access of the last exit without entering the guest (KVM_RUN with
    /// `immediate_exit`): KVM stores a port or MMIO read's value and moves past the instruction
    /// only then, so a state read before would repeat the access, or lose what it read.
    fn complete_io(&self) {
        match crate::cpu::run_without_entering(&mut lock(&self.vcpu)) {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => warn!("vcpu{}: cannot complete its last I/O: {e}", self.index),
            Ok(()) => warn!("vcpu{}: an exit while completing its last I/O", self.index),
        }
    }

    /// Logs where the guest was when it triple-faulted (KVM resets it with no word of why): the
    /// registers that tell a guest bug from a state the VMM restored wrongly. KVM on AMD has
    /// put the vCPU through INIT already (its VMCB is undefined after a shutdown), so there the
    /// registers are the INIT state (rip 0xfff0, cs 0xf000) and say only that.
    fn report_triple_fault(&self, vcpu: &VcpuFd) {
        match (vcpu.get_regs(), vcpu.get_sregs()) {
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => warn!(
                "vcpu{}: triple fault, the guest resets (KVM re-initialised the vCPU: where \
                 it was is lost; apic_base {:#x})",
                self.index, s.apic_base
            ),
            (Ok(r), Ok(s)) => warn!(
                "vcpu{}: triple fault, the guest resets: rip {:#x} rsp {:#x} rflags {:#x} \
                 cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x} idt {:#x}/{:#x} \
                 apic_base {:#x} mp_state {:?}",
                self.index,
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.idt.base,
                s.idt.limit,
                s.apic_base,
                vcpu.get_mp_state().map(|m| m.mp_state)
            ),
            (Err(e), _) | (_, Err(e)) => {
                warn!(
                    "vcpu{}: triple fault, the guest resets (registers: {e})",
                    self.index
                );
            }
        }
    }

    /// Reports `event` and parks until the control loop decides (it pauses or stops the set).
    fn park_after(&self, event: VcpuEvent) {
        (self.on_event)(event);
        let (m, cv, to_main) = &*self.control;
        let mut control = lock(m);
        control.parked += 1;
        to_main.notify_all();
        while control.request == Request::Run {
            control = cv
                .wait(control)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        control.parked -= 1;
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Result<(), VcpuEvent> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                let bus = self
                    .buses
                    .pio
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !bus.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                let bus = self
                    .buses
                    .pio
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !bus.write(u64::from(port), data) && port != 0x80 {
                    debug!("vcpu{}: write to unhandled port {port:#x}", self.index);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                let bus = self
                    .buses
                    .mmio
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !bus.read(addr, data) {
                    debug!("vcpu{}: read from unhandled MMIO {addr:#x}", self.index);
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                let bus = self
                    .buses
                    .mmio
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if !bus.write(addr, data) {
                    debug!("vcpu{}: write to unhandled MMIO {addr:#x}", self.index);
                }
            }
            VcpuExit::Shutdown => return Err(VcpuEvent::Reset),
            VcpuExit::SystemEvent(kind, _) => {
                return Err(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuEvent::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuEvent::Shutdown,
                    other => VcpuEvent::Failed {
                        vcpu: self.index,
                        reason: format!("unexpected system event {other}"),
                    },
                });
            }
            VcpuExit::Hlt => warn!("vcpu{}: HLT exit with an in-kernel irqchip", self.index),
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(VcpuEvent::Failed {
                    vcpu: self.index,
                    reason: format!("VM entry failed: reason {reason:#x} on host CPU {cpu}"),
                });
            }
            VcpuExit::InternalError => {
                return Err(VcpuEvent::Failed {
                    vcpu: self.index,
                    reason: "KVM internal error (emulation failure)".to_string(),
                });
            }
            other => {
                return Err(VcpuEvent::Failed {
                    vcpu: self.index,
                    reason: format!("unhandled exit {other:?}"),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use devices::bus::BusDevice;
    use kvm_ioctls::Kvm;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::cpu::test_util::start_real_mode_at;
    use crate::memory::GuestRam;

    /// Counts writes to its port.
    struct PortCounter(Arc<AtomicU64>);

    impl BusDevice for PortCounter {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Answers each read of its port with the next number (1, 2, ...), counting them.
    struct PortSource(Arc<AtomicU64>);

    impl BusDevice for PortSource {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            let served = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            data.fill(served.to_le_bytes()[0]);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// A real-mode guest that reads port 0x10 forever: `in al, 0x10; jmp $-2`.
    const READ_LOOP_CODE: [u8; 4] = [0xe4, 0x10, 0xeb, 0xfc];

    /// A real-mode guest that writes to port 0x10 forever: `out 0x10, al; inc al; jmp $-4`.
    const LOOP_CODE: [u8; 5] = [0xe6, 0x10, 0xfe, 0xc0, 0xeb];

    /// A VM (with an in-kernel irqchip when asked) whose one vCPU runs `code` in real mode at
    /// 0x1000, with its vCPU thread started paused on `pio`.
    fn start_real_mode_guest(
        code: &[u8],
        irqchip: bool,
        pio: Bus,
    ) -> (VcpuSet, kvm_ioctls::VmFd, GuestRam) {
        let kvm = Kvm::new().expect("needs /dev/kvm (load kvm_intel or kvm_amd, run as root)");
        let vm = kvm.create_vm().unwrap();
        if irqchip {
            vm.create_irq_chip().unwrap();
        }
        let ram = GuestRam::new(64 << 20).unwrap();
        ram.memory()
            .write_slice(code, GuestAddress(0x1000))
            .unwrap();
        ram.register(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        start_real_mode_at(&vcpu, 0x1000).unwrap();
        let buses = Buses {
            pio: Arc::new(RwLock::new(pio)),
            mmio: Arc::new(RwLock::new(Bus::new())),
        };
        let set = VcpuSet::start(vec![vcpu], &buses, Arc::new(|_| {})).unwrap();
        (set, vm, ram)
    }

    fn start_looping_guest(count: Arc<AtomicU64>) -> (VcpuSet, kvm_ioctls::VmFd, GuestRam) {
        let mut code = LOOP_CODE.to_vec();
        code.push(0xfa); // jmp rel8 -6: back to the `out`
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PortCounter(count))), 0x10, 1)
            .unwrap();
        start_real_mode_guest(&code, false, pio)
    }

    /// Each call of a park hook: the vCPU index, the calling thread's name and the vCPU's RIP.
    type HookCalls = Arc<Mutex<Vec<(u8, Option<String>, u64)>>>;

    /// A hook that records each call in the returned list.
    fn recording_hook() -> (HookCalls, ParkHook) {
        let seen = HookCalls::default();
        let record = seen.clone();
        let hook: ParkHook = Arc::new(move |index, vcpu: &mut VcpuFd| {
            let thread = std::thread::current().name().map(String::from);
            lock(&record).push((index, thread, vcpu.get_regs().unwrap().rip));
        });
        (seen, hook)
    }

    /// The hook ran once, for vCPU 0 on its own thread, stopped inside the looping guest's code.
    fn assert_one_call_on_vcpu0_in_the_loop(seen: &HookCalls) {
        let seen = lock(seen).clone();
        assert_eq!(seen.len(), 1, "hook calls: {seen:?}");
        assert_eq!((seen[0].0, seen[0].1.as_deref()), (0, Some("vcpu0")));
        assert!(
            (0x1000..0x1006).contains(&seen[0].2),
            "rip {:#x}",
            seen[0].2
        );
    }

    fn wait_for_count_above(count: &AtomicU64, floor: u64) -> u64 {
        for _ in 0..5000 {
            let now = count.load(Ordering::SeqCst);
            if now > floor {
                return now;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the guest made no progress past {floor} port writes");
    }

    #[test]
    fn vcpus_start_paused_and_run_after_resume() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count.load(Ordering::SeqCst), 0);

        set.resume();

        wait_for_count_above(&count, 100);
    }

    #[test]
    fn paused_vcpus_make_no_progress_until_resumed() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        wait_for_count_above(&count, 100);

        set.pause();
        let at_pause = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let after_wait = count.load(Ordering::SeqCst);
        set.resume();

        assert_eq!(at_pause, after_wait);
        wait_for_count_above(&count, after_wait);
    }

    #[test]
    fn guest_registers_can_be_read_while_paused() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        wait_for_count_above(&count, 10);

        set.pause();
        let rip = lock(&set.vcpus()[0]).get_regs().unwrap().rip;

        assert!(
            (0x1000..0x1006).contains(&rip),
            "rip {rip:#x} outside the guest loop"
        );
    }

    /// A real-mode guest that halts forever: `hlt; jmp $-1`.
    const HALT_CODE: [u8; 3] = [0xf4, 0xeb, 0xfd];

    #[test]
    fn a_halted_guest_is_paused_and_its_vcpu_can_be_read() {
        // With an in-kernel LAPIC, HLT waits inside KVM_RUN: only a kick gets the thread out.
        let (set, _vm, _ram) = start_real_mode_guest(&HALT_CODE, true, Bus::new());
        let set = Arc::new(set);
        set.resume();
        std::thread::sleep(Duration::from_millis(50));

        let (done, paused) = std::sync::mpsc::channel();
        let pausing = set.clone();
        std::thread::spawn(move || {
            pausing.pause();
            let rip = lock(&pausing.vcpus()[0]).get_regs().unwrap().rip;
            done.send(rip).unwrap();
        });
        let rip = paused.recv_timeout(Duration::from_secs(10));

        let rip = rip.expect("pausing a halted vCPU did not return");
        assert!(
            (0x1000..0x1003).contains(&rip),
            "rip {rip:#x} outside the halt loop"
        );
    }

    #[test]
    fn pause_with_runs_the_hook_on_the_vcpu_thread_before_it_returns() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        wait_for_count_above(&count, 10);
        let (seen, hook) = recording_hook();

        set.pause_with(hook);

        assert_one_call_on_vcpu0_in_the_loop(&seen);
    }

    #[test]
    fn a_set_paused_already_does_not_call_the_park_hook() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.pause(); // the thread has parked
        let calls = Arc::new(AtomicU64::new(0));

        let counter = calls.clone();
        set.pause_with(Arc::new(move |_, _: &mut VcpuFd| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));

        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_port_read_the_vcpu_stopped_on_is_complete_in_its_paused_state() {
        let served = Arc::new(AtomicU64::new(0));
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PortSource(served.clone()))), 0x10, 1)
            .unwrap();
        let (set, _vm, _ram) = start_real_mode_guest(&READ_LOOP_CODE, false, pio);
        set.resume();
        let mut floor = wait_for_count_above(&served, 10);

        // Nearly every pause lands right after a port read exit, before KVM has stored the
        // value: the paused state must hold the last value the device gave.
        let mut states = Vec::new();
        for _ in 0..20 {
            set.pause();
            let rax = lock(&set.vcpus()[0]).get_regs().unwrap().rax;
            states.push((rax & 0xff, served.load(Ordering::SeqCst) & 0xff));
            set.resume();
            floor = wait_for_count_above(&served, floor + 10);
        }

        let lost: Vec<_> = states.iter().filter(|(al, last)| al != last).collect();
        assert!(
            lost.is_empty(),
            "(AL, last value read) when paused: {lost:?}"
        );
    }

    #[test]
    fn run_parked_runs_the_hook_once_on_each_parked_vcpu_on_its_thread_or_the_callers() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        wait_for_count_above(&count, 10);
        set.pause();
        let at_pause = count.load(Ordering::SeqCst);
        let (seen, hook) = recording_hook();
        let caller = std::thread::current().name().map(String::from);

        let ran = set.run_parked(hook);

        assert_eq!(ran, vec![true]);
        let seen = lock(&seen).clone();
        assert_eq!(seen.len(), 1, "hook calls: {seen:?}");
        let (index, thread, rip) = seen[0].clone();
        assert_eq!(index, 0);
        assert!(
            thread.as_deref() == Some("vcpu0") || thread == caller,
            "ran on {thread:?}"
        );
        assert!((0x1000..0x1006).contains(&rip), "rip {rip:#x}");
        assert_eq!(
            count.load(Ordering::SeqCst),
            at_pause,
            "the guest ran meanwhile"
        );
    }

    #[test]
    fn run_parked_runs_nothing_on_a_running_set_and_the_set_runs_on() {
        let count = Arc::new(AtomicU64::new(0));
        let (set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        let before = wait_for_count_above(&count, 10);
        let calls = Arc::new(AtomicU64::new(0));

        let counter = calls.clone();
        let ran = set.run_parked(Arc::new(move |_, _: &mut VcpuFd| {
            counter.fetch_add(1, Ordering::SeqCst);
        }));

        assert_eq!(ran, vec![false]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        wait_for_count_above(&count, before);
    }

    /// A builder that makes vCPU 0 of `vm` running the port loop (or loads the one made
    /// ahead), noting its thread's name and whether it was given a vCPU.
    fn loop_builder(
        vm: &Arc<kvm_ioctls::VmFd>,
        names: &Arc<Mutex<Vec<String>>>,
    ) -> VcpuBuilder<String> {
        let (vm, names) = (vm.clone(), names.clone());
        Box::new(move |made| {
            let name = std::thread::current().name().unwrap_or("").to_string();
            let given = if made.is_some() { " given" } else { "" };
            lock(&names).push(format!("{name}{given}"));
            let vcpu = match made {
                Some(vcpu) => vcpu,
                None => vm.create_vcpu(0).map_err(|e| e.to_string())?,
            };
            start_real_mode_at(&vcpu, 0x1000).map_err(|e| e.to_string())?;
            Ok(vcpu)
        })
    }

    fn looping_vm(count: Arc<AtomicU64>) -> (Arc<kvm_ioctls::VmFd>, GuestRam, Buses) {
        let kvm = Kvm::new().expect("needs /dev/kvm (load kvm_intel or kvm_amd, run as root)");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let ram = GuestRam::new(64 << 20).unwrap();
        let mut code = LOOP_CODE.to_vec();
        code.push(0xfa);
        ram.memory()
            .write_slice(&code, GuestAddress(0x1000))
            .unwrap();
        ram.register(&vm).unwrap();
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PortCounter(count))), 0x10, 1)
            .unwrap();
        let buses = Buses {
            pio: Arc::new(RwLock::new(pio)),
            mmio: Arc::new(RwLock::new(Bus::new())),
        };
        (vm, ram, buses)
    }

    #[test]
    fn vcpus_built_on_their_own_threads_run_after_finish_and_resume() {
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count.clone());
        let names = Arc::new(Mutex::new(Vec::new()));
        let pending =
            VcpuSet::spawn_building(vec![loop_builder(&vm, &names)], Arc::new(|_| {})).unwrap();
        wait_for_builders(&names, 1);

        let set = pending.finish(&buses).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let before_resume = count.load(Ordering::SeqCst);
        set.resume();

        assert_eq!(before_resume, 0);
        assert_eq!(*lock(&names), vec!["vcpu0".to_string()]);
        assert_eq!(set.vcpus().len(), 1);
        wait_for_count_above(&count, 100);
    }

    #[test]
    fn threads_started_ahead_make_their_vcpus_once_given_builders_and_spares_end() {
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count.clone());
        let names = Arc::new(Mutex::new(Vec::new()));
        let idle = VcpuSet::spawn_idle::<String>(3, Arc::new(|_| {}), None).unwrap();
        let waiting = idle.len();

        let pending = idle.build(vec![loop_builder(&vm, &names)]).unwrap();
        wait_for_builders(&names, 1);
        let set = pending.finish(&buses).unwrap();
        set.resume();

        assert_eq!(waiting, 3);
        assert_eq!(*lock(&names), vec!["vcpu0".to_string()]);
        assert_eq!((set.vcpus().len(), set.threads.len()), (1, 1));
        wait_for_count_above(&count, 100);
    }

    /// Waits until `count` builders have noted their threads in `names`.
    fn wait_for_builders(names: &Mutex<Vec<String>>, count: usize) {
        for _ in 0..5000 {
            if lock(names).len() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("fewer than {count} builders ran");
    }

    /// A maker of `vm`'s vCPUs that counts those it made in `made`.
    fn maker_of(vm: &Arc<kvm_ioctls::VmFd>, made: &Arc<AtomicU64>) -> VcpuMaker {
        let (vm, made) = (vm.clone(), made.clone());
        Arc::new(move |index| {
            let vcpu = vm.create_vcpu(u64::from(index))?;
            made.fetch_add(1, Ordering::SeqCst);
            Ok(vcpu)
        })
    }

    #[test]
    fn threads_with_a_maker_make_their_vcpus_ahead_and_hand_them_to_their_builders() {
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count.clone());
        let names = Arc::new(Mutex::new(Vec::new()));
        let made = Arc::new(AtomicU64::new(0));
        let idle =
            VcpuSet::spawn_idle::<String>(1, Arc::new(|_| {}), Some(maker_of(&vm, &made))).unwrap();
        wait_for_count_above(&made, 0);

        let pending = idle.build(vec![loop_builder(&vm, &names)]).unwrap();
        wait_for_builders(&names, 1);
        let set = pending.finish(&buses).unwrap();
        set.resume();

        assert_eq!(*lock(&names), vec!["vcpu0 given".to_string()]);
        wait_for_count_above(&count, 100);
    }

    #[test]
    fn threads_started_ahead_build_off_the_callers_cpu_then_take_back_their_own_cpus() {
        let own = sys::thread_cpus(0).unwrap();
        let cpu = sys::current_cpu().unwrap();
        assert!(
            own.without(cpu).is_some(),
            "needs a host with at least 2 CPUs"
        );
        let only_here = own
            .cpus()
            .filter(|&other| other != cpu)
            .fold(own, |set, other| set.without(other).unwrap());
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count.clone());
        // Per builder run: its thread, and the CPUs that thread may run on meanwhile.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let builders: Vec<VcpuBuilder<String>> = (0..2)
            .map(|id| {
                let (vm, seen) = (vm.clone(), seen.clone());
                Box::new(move |_made: Option<VcpuFd>| {
                    let cpus: Vec<usize> = sys::thread_cpus(0).unwrap().cpus().collect();
                    lock(&seen).push((sys::current_tid(), cpus));
                    let vcpu = vm.create_vcpu(id).map_err(|e| e.to_string())?;
                    start_real_mode_at(&vcpu, 0x1000).map_err(|e| e.to_string())?;
                    Ok(vcpu)
                }) as VcpuBuilder<String>
            })
            .collect();

        let idle = VcpuSet::spawn_idle::<String>(2, Arc::new(|_| {}), None).unwrap();

        // The caller builds from `cpu`, and waits for both threads to run their builders.
        let set = std::thread::spawn(move || {
            sys::set_thread_cpus(0, &only_here).unwrap();
            let pending = idle.build(builders).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while lock(&seen).len() < 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            let set = pending.finish(&buses).unwrap();
            (set, seen)
        });
        let (set, seen) = set.join().unwrap();
        set.resume();

        let seen = lock(&seen).clone();
        assert_eq!(seen.len(), 2);
        let tids = set.thread_ids();
        for (tid, cpus) in seen {
            assert!(tids.contains(&tid), "a builder ran on the caller's thread");
            assert!(
                !cpus.contains(&cpu),
                "thread {tid} could build on CPU {cpu}"
            );
        }
        for tid in tids {
            let now: Vec<usize> = sys::thread_cpus(tid).unwrap().cpus().collect();
            assert_eq!(now, own.cpus().collect::<Vec<_>>(), "thread {tid}");
        }
        wait_for_count_above(&count, 100);
    }

    #[test]
    fn a_builder_its_thread_has_not_started_is_run_by_finish_on_the_callers_thread() {
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count.clone());
        let names = Arc::new(Mutex::new(Vec::new()));
        let mut idle = VcpuSet::spawn_idle::<String>(1, Arc::new(|_| {}), None).unwrap();
        // The thread is busy elsewhere: its go comes only from the builder, run by `finish`.
        let go = idle.go.pop().unwrap();
        let builder = loop_builder(&vm, &names);
        let late_go: VcpuBuilder<String> = Box::new(move |made| {
            let built = builder(made);
            go.send(()).unwrap();
            built
        });
        lock(&idle.slots)[0].builder = Some(late_go);
        let pending = PendingVcpus {
            start: std::mem::take(&mut idle.start),
            ready: std::mem::take(&mut idle.ready),
            slots: idle.slots.clone(),
            set: idle.set.take(),
        };

        let set = pending.finish(&buses).unwrap();
        set.resume();

        let here = std::thread::current().name().unwrap_or("").to_string();
        assert_eq!(*lock(&names), vec![here]);
        wait_for_count_above(&count, 100);
    }

    #[test]
    fn threads_that_made_vcpus_ahead_refuse_fewer_builders() {
        let (vm, _ram, _buses) = looping_vm(Arc::new(AtomicU64::new(0)));
        let names = Arc::new(Mutex::new(Vec::new()));
        let made = Arc::new(AtomicU64::new(0));
        let idle =
            VcpuSet::spawn_idle::<String>(2, Arc::new(|_| {}), Some(maker_of(&vm, &made))).unwrap();

        let result = idle.build(vec![loop_builder(&vm, &names)]);

        let error = result.map(|_| ()).unwrap_err().to_string();
        assert!(error.contains("1 vCPU threads made vCPUs ahead"), "{error}");
        assert!(lock(&names).is_empty());
    }

    #[test]
    fn a_failing_builder_fails_finish_with_its_index_and_error() {
        let count = Arc::new(AtomicU64::new(0));
        let (vm, _ram, buses) = looping_vm(count);
        let names = Arc::new(Mutex::new(Vec::new()));
        let failing: VcpuBuilder<String> = Box::new(|_| Err("no state".to_string()));
        let pending =
            VcpuSet::spawn_building(vec![loop_builder(&vm, &names), failing], Arc::new(|_| {}))
                .unwrap();

        let result = pending.finish(&buses);

        match result {
            Err(BuildError::Failed(index, why)) => {
                assert_eq!((index, why.as_str()), (1, "no state"))
            }
            other => panic!("expected vCPU 1 to fail, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn stop_joins_a_running_set() {
        let count = Arc::new(AtomicU64::new(0));
        let (mut set, _vm, _ram) = start_looping_guest(count.clone());
        set.resume();
        wait_for_count_above(&count, 10);

        set.stop();
        let after_stop = count.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));

        assert_eq!(count.load(Ordering::SeqCst), after_stop);
    }
}
