//! A live update's pause at a raised CPU priority, on CPUs that wake at once.
//!
//! On a busy host (many guests, or many updated at once) every step of the pause waits for a
//! CPU: the kick that stops a vCPU, the save on its thread, the handover, the successor's
//! restore. The threads that work in the pause run at nice [`PAUSE_NICE`] from just before it
//! until the guest runs again, then go back to the nice value each had: the old VMM's from the
//! moment it pauses, the successor's from when it is ready (they sleep until the handover).
//! Threads they start meanwhile begin at nice 0 (`SCHED_RESET_ON_FORK`), so no device thread
//! keeps the raised priority. Raising needs `CAP_SYS_NICE`; without it nothing changes.
//!
//! On an idle host the pause is a chain of wake-ups instead (a parked vCPU thread wakes the
//! saving thread, the agent the successor, the successor its vCPU threads), and a thread woken
//! on an idle CPU first waits for that CPU to leave its idle state: 20-50 us on the virtualised
//! test hosts (a halt that exits to the hypervisor), as much or more from a deep C-state of a
//! bare-metal CPU. For the same span the VMM holds a CPU latency request of 0 (the kernel's PM
//! QoS, `/dev/cpu_dma_latency`): idle CPUs poll rather than halt. Needs write access to that
//! device (root); without it nothing changes.

use std::fs::{File, OpenOptions};
use std::io::Write;

use log::debug;

use crate::sys;

/// The nice value of a pause's threads.
pub const PAUSE_NICE: i32 = -10;

/// The kernel's CPU latency request device (PM QoS): while a process holds it open, the CPU
/// idle states it allows are those that wake within the microseconds last written to it.
const CPU_LATENCY_DEVICE: &str = "/dev/cpu_dma_latency";

/// Threads raised to [`PAUSE_NICE`] and a CPU latency request of 0; dropping this puts each
/// thread back and withdraws the request.
#[derive(Debug, Default)]
pub struct PausePriority {
    /// Per raised thread: its id and the nice value it had.
    raised: Vec<(i32, i32)>,
    /// The open request (closing it withdraws it).
    wake_latency: Option<File>,
}

impl PausePriority {
    /// Raises each of `tids` that runs at a lower priority than [`PAUSE_NICE`]. Stops at the
    /// first refusal (no `CAP_SYS_NICE`), keeping what it raised. Also holds a CPU latency
    /// request of 0.
    pub fn raise(tids: impl IntoIterator<Item = i32>) -> Self {
        let mut priority = Self {
            raised: Vec::new(),
            wake_latency: zero_wake_latency(),
        };
        for tid in tids {
            let nice = match sys::thread_nice(tid) {
                Ok(nice) => nice,
                // Ended meanwhile: nothing to raise.
                Err(e) => {
                    debug!("Thread {tid}: no nice value ({e})");
                    continue;
                }
            };
            if nice <= PAUSE_NICE {
                continue;
            }
            if let Err(e) = sys::set_thread_nice(tid, PAUSE_NICE, true) {
                debug!("The pause runs at the threads' own priority: thread {tid}: {e}");
                // Whatever part of it went through.
                let _ = sys::set_thread_nice(tid, nice, false);
                break;
            }
            priority.raised.push((tid, nice));
        }
        if !priority.raised.is_empty() {
            log::info!(
                "{} threads raised to nice {PAUSE_NICE} for the pause",
                priority.raised.len()
            );
        }
        priority
    }

    /// Withdraws the CPU latency request early (the threads stay raised): the pause it was
    /// taken for is not coming soon.
    pub fn let_cpus_idle(&mut self) {
        self.wake_latency = None;
    }

    /// Whether a CPU latency request is held.
    #[cfg(test)]
    fn holds_wake_latency(&self) -> bool {
        self.wake_latency.is_some()
    }
}

/// A CPU latency request of 0, if this process may make one.
fn zero_wake_latency() -> Option<File> {
    let request = OpenOptions::new()
        .write(true)
        .open(CPU_LATENCY_DEVICE)
        .and_then(|mut file| {
            // A 32-bit value in microseconds, in native byte order.
            file.write_all(&0i32.to_ne_bytes())?;
            Ok(file)
        });
    request
        .map_err(|e| debug!("The pause's CPUs idle as they would ({CPU_LATENCY_DEVICE}: {e})"))
        .ok()
}

impl Drop for PausePriority {
    fn drop(&mut self) {
        for (tid, nice) in self.raised.drain(..) {
            if let Err(e) = sys::set_thread_nice(tid, nice, false) {
                debug!("Thread {tid}: cannot go back to nice {nice}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    /// Runs `body` on a thread of its own (which a raise may change for good), at nice 0.
    fn on_a_thread(body: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            sys::set_thread_nice(sys::current_tid(), 0, false).unwrap();
            body();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn raised_threads_run_at_the_pause_nice_and_go_back_to_their_own() {
        on_a_thread(|| {
            let me = sys::current_tid();
            sys::set_thread_nice(me, 3, false).unwrap();
            let priority = PausePriority::raise([me]);
            assert_eq!(
                sys::thread_nice(me).unwrap(),
                PAUSE_NICE,
                "needs CAP_SYS_NICE (run the tests as root)"
            );
            assert_eq!(priority.raised, [(me, 3)]);
            drop(priority);
            assert_eq!(sys::thread_nice(me).unwrap(), 3);
        });
    }

    #[test]
    fn a_thread_started_by_a_raised_thread_starts_at_nice_0() {
        on_a_thread(|| {
            let _priority = PausePriority::raise([sys::current_tid()]);
            let (tx, rx) = channel();
            std::thread::spawn(move || tx.send(sys::thread_nice(sys::current_tid())).unwrap())
                .join()
                .unwrap();
            assert_eq!(rx.recv().unwrap().unwrap(), 0);
        });
    }

    /// The CPU latency the kernel keeps to now, over every request (`/dev/cpu_dma_latency`
    /// reads it), in microseconds.
    fn cpu_latency_target() -> i32 {
        let bytes = std::fs::read(CPU_LATENCY_DEVICE).unwrap();
        i32::from_ne_bytes(bytes[..4].try_into().unwrap())
    }

    #[test]
    fn a_raised_pause_holds_a_cpu_latency_of_zero_until_the_cpus_may_idle() {
        let mut priority = PausePriority::raise([]);

        let held = priority.holds_wake_latency();
        let target = cpu_latency_target();
        priority.let_cpus_idle();

        assert!(
            held,
            "no request made: needs {CPU_LATENCY_DEVICE} writable (run as root)"
        );
        assert_eq!(target, 0);
        assert!(!priority.holds_wake_latency());
        assert!(!PausePriority::default().holds_wake_latency());
    }

    #[test]
    fn a_thread_already_above_the_pause_priority_is_left_alone() {
        on_a_thread(|| {
            let me = sys::current_tid();
            sys::set_thread_nice(me, PAUSE_NICE - 5, false).unwrap();
            let priority = PausePriority::raise([me]);
            assert!(priority.raised.is_empty());
            drop(priority);
            assert_eq!(sys::thread_nice(me).unwrap(), PAUSE_NICE - 5);
        });
    }
}
