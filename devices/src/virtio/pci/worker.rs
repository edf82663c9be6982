//! A thread serving a device's queue eventfds (KVM ioeventfds).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::VirtioPciDevice;
use crate::bus::lock;
use crate::virtio::device::VirtioDevice;

/// A running queue worker. Stop it to quiesce the device (nothing is processed afterwards);
/// spawn a new one to resume.
#[derive(Debug)]
pub struct QueueWorker {
    stop: EventFd,
    /// Disconnected once the thread is out of its loop and holds nothing of the device.
    stopped: Option<Receiver<()>>,
}

impl QueueWorker {
    /// Stops the thread's work and waits for that: when this returns, no queue is being
    /// processed. The thread's own end (freeing its stack) is left to it: it would only
    /// lengthen a live update's pause.
    pub fn stop(mut self) {
        self.stop_and_wait();
    }

    fn stop_and_wait(&mut self) {
        let Some(stopped) = self.stopped.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::warn!("Failed to signal queue worker to stop: {e}");
        }
        // Only ever disconnected: by the thread leaving its loop, or ending in a panic.
        let _ = stopped.recv();
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop_and_wait();
    }
}

/// Starts a thread that processes queue `i` whenever its eventfd fires, or whenever one of the
/// device's ready fds for it becomes readable (a tap with frames to receive). On start it also
/// processes every queue once, so buffers the driver queued while no worker ran (paused, or
/// notified on the previous VMM's eventfds before a live update) are not forgotten, and input
/// that arrived meanwhile (frames waiting in a tap) is taken.
pub fn spawn_queue_worker<D: VirtioDevice + 'static>(
    dev: Arc<Mutex<VirtioPciDevice<D>>>,
) -> io::Result<QueueWorker> {
    let stop = EventFd::new(EFD_NONBLOCK)?;
    let (queue_evts, ready_fds) = {
        let dev = lock(&dev);
        let evts = dev
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        (evts, dev.device.ready_fds())
    };
    let epoll = Epoll::new()?;
    let stop_token = queue_evts.len() as u64;
    for (token, evt) in queue_evts.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token as u64),
        )?;
    }
    // The device owns these fds and outlives the worker (the worker holds the device). Their
    // tokens follow the stop token; each names its queue.
    for (i, (fd, _)) in ready_fds.iter().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            *fd,
            EpollEvent::new(
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                stop_token + 1 + i as u64,
            ),
        )?;
    }
    let ready_queues: Vec<u16> = ready_fds.iter().map(|(_, queue)| *queue).collect();
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, stop_token),
    )?;
    let worker_stop = stop.try_clone()?;
    let (stopped_tx, stopped_rx) = channel();
    thread::Builder::new()
        .name("virtio-queues".to_string())
        .spawn(move || {
            run(&dev, &epoll, &queue_evts, &ready_queues, &worker_stop);
            // Let go of the device before saying so: whoever stopped the worker may drop the
            // device next and expect it (and its files) gone.
            drop((dev, epoll, queue_evts, worker_stop));
            drop::<Sender<()>>(stopped_tx);
        })?;
    Ok(QueueWorker {
        stop,
        stopped: Some(stopped_rx),
    })
}

fn run<D: VirtioDevice>(
    dev: &Mutex<VirtioPciDevice<D>>,
    epoll: &Epoll,
    queue_evts: &[EventFd],
    ready_queues: &[u16],
    stop: &EventFd,
) {
    confine::confine_thread_or_exit(confine::ThreadKind::Worker);
    {
        let mut dev = lock(dev);
        for queue in 0..queue_evts.len() {
            dev.process_queue(queue as u16);
        }
    }
    let stop_token = queue_evts.len() as u64;
    let mut events = vec![EpollEvent::default(); queue_evts.len() + 1 + ready_queues.len()];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("Queue worker epoll failed: {e}");
                return;
            }
        };
        for event in &events[..count] {
            let token = event.data();
            if token == stop_token {
                // Consume the stop so a later worker on a clone would not see it.
                let _ = stop.read();
                return;
            }
            if token > stop_token {
                let ready = usize::try_from(token - stop_token - 1).ok();
                if let Some(&queue) = ready.and_then(|i| ready_queues.get(i)) {
                    lock(dev).process_queue(queue);
                }
                continue;
            }
            let Some(evt) = usize::try_from(token).ok().and_then(|t| queue_evts.get(t)) else {
                continue;
            };
            // Draining first: a notification arriving during processing fires again.
            let _ = evt.read();
            lock(dev).process_queue(token as u16);
        }
    }
}
