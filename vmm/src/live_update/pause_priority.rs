//! A live update's pause at a raised CPU priority.
//!
//! On a busy host (many guests, or many updated at once) every step of the pause waits for a
//! CPU: the kick that stops a vCPU, the save on its thread, the handover, the successor's
//! restore. The threads that work in the pause run at nice [`PAUSE_NICE`] from just before it
//! until the guest runs again, then go back to the nice value each had: the old VMM's from the
//! moment it pauses, the successor's from when it is ready (they sleep until the handover).
//! Threads they start meanwhile begin at nice 0 (`SCHED_RESET_ON_FORK`), so no device thread
//! keeps the raised priority. Raising needs `CAP_SYS_NICE`; without it nothing changes.

use log::debug;

use crate::sys;

/// The nice value of a pause's threads.
pub const PAUSE_NICE: i32 = -10;

/// Threads raised to [`PAUSE_NICE`]; dropping this puts each back.
#[derive(Debug, Default)]
pub struct PausePriority {
    /// Per raised thread: its id and the nice value it had.
    raised: Vec<(i32, i32)>,
}

impl PausePriority {
    /// Raises each of `tids` that runs at a lower priority than [`PAUSE_NICE`]. Stops at the
    /// first refusal (no `CAP_SYS_NICE`), keeping what it raised.
    pub fn raise(tids: impl IntoIterator<Item = i32>) -> Self {
        let mut priority = Self::default();
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
