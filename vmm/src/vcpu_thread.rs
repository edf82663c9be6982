//! vCPU threads: each runs `KVM_RUN` in a loop and routes port and MMIO exits to the buses.
//!
//! A vCPU thread is in one of three requested states: run, pause or stop. Pausing is a
//! handshake: the controller sets the request, kicks every thread out of `KVM_RUN` with a
//! signal, and waits until each thread has parked. The kick is repeated until then, because a
//! signal that lands just before a thread enters `KVM_RUN` would otherwise be lost and leave it
//! in a halted guest forever.

use std::io;
use std::sync::{Arc, Condvar, Mutex, Once, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::{Bus, lock};
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, warn};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

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

#[derive(Debug)]
struct Control {
    request: Request,
    parked: usize,
}

/// Runs, pauses and stops a set of vCPU threads.
#[derive(Debug)]
pub struct VcpuSet {
    control: Arc<(Mutex<Control>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
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
        install_kick_handler()?;
        let control = Arc::new((
            Mutex::new(Control {
                request: Request::Pause,
                parked: 0,
            }),
            Condvar::new(),
        ));
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut set = Self {
            control,
            threads: Vec::new(),
            vcpus: vcpus.clone(),
        };
        for (index, vcpu) in (0u8..).zip(vcpus) {
            let runner = Runner {
                index,
                vcpu,
                buses: buses.clone(),
                control: set.control.clone(),
                on_event: on_event.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || runner.run_loop());
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

    /// The vCPU file descriptors, to read or write state while the set is paused.
    pub fn vcpus(&self) -> &[Arc<Mutex<VcpuFd>>] {
        &self.vcpus
    }

    /// Whether the vCPUs were last told to run (not paused or stopped).
    pub fn is_running(&self) -> bool {
        let (m, _) = &*self.control;
        lock(m).request == Request::Run
    }

    /// Lets every vCPU run.
    pub fn resume(&self) {
        let (m, cv) = &*self.control;
        lock(m).request = Request::Run;
        cv.notify_all();
    }

    /// Stops every vCPU at its next exit and returns once all of them are parked.
    pub fn pause(&self) {
        let (m, _) = &*self.control;
        lock(m).request = Request::Pause;
        self.wait_parked();
    }

    fn wait_parked(&self) {
        let (m, cv) = &*self.control;
        let mut control = lock(m);
        while control.parked < self.threads.len() {
            drop(control);
            self.kick_all();
            control = lock(m);
            // A kick that lands just before KVM_RUN is lost: kick again soon.
            control = match cv.wait_timeout(control, Duration::from_micros(100)) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn kick_all(&self) {
        for thread in &self.threads {
            if !thread.is_finished()
                && let Err(e) = thread.kill(kick_signal())
            {
                debug!("Cannot kick vCPU thread: {e}");
            }
        }
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        let (m, cv) = &*self.control;
        lock(m).request = Request::Stop;
        cv.notify_all();
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
    control: Arc<(Mutex<Control>, Condvar)>,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
}

impl Runner {
    fn run_loop(self) {
        confine::confine_thread_or_exit(confine::ThreadKind::Vcpu);
        loop {
            if !self.wait_for_run() {
                return;
            }
            let mut vcpu = lock(&self.vcpu);
            let outcome = match vcpu.run() {
                Ok(exit) => self.handle_exit(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    vcpu.set_kvm_immediate_exit(0);
                    Ok(())
                }
                Err(e) => Err(VcpuEvent::Failed {
                    vcpu: self.index,
                    reason: format!("KVM_RUN failed: {e}"),
                }),
            };
            drop(vcpu);
            if let Err(event) = outcome {
                self.park_after(event);
            }
        }
    }

    /// Parks while a pause is requested. Returns false when the thread must stop.
    fn wait_for_run(&self) -> bool {
        let (m, cv) = &*self.control;
        let mut control = lock(m);
        if control.request == Request::Pause {
            control.parked += 1;
            cv.notify_all();
            while control.request == Request::Pause {
                control = cv
                    .wait(control)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            control.parked -= 1;
        }
        control.request == Request::Run
    }

    /// Reports `event` and parks until the control loop decides (it pauses or stops the set).
    fn park_after(&self, event: VcpuEvent) {
        (self.on_event)(event);
        let (m, cv) = &*self.control;
        let mut control = lock(m);
        control.parked += 1;
        cv.notify_all();
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
    use std::sync::atomic::{AtomicU64, Ordering};

    use devices::bus::BusDevice;
    use kvm_ioctls::Kvm;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
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
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
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
