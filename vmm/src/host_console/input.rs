//! The input thread of an end: waits (epoll) on the pty master, or on the listening socket and
//! its client, and on a stop eventfd, so stopping it takes no polling delay (a live update
//! stops it while the guest is paused).

use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::end::{Client, Kind};
use super::{InputSink, Port};

const STOP: u64 = 0;
const SOURCE: u64 = 1;
const LISTENER: u64 = 2;
const CLIENT: u64 = 3;

/// A running input thread.
pub(super) struct InputThread {
    stop: EventFd,
    thread: JoinHandle<()>,
}

/// What the thread reads from.
enum Source {
    Pty(Arc<std::fs::File>),
    Socket {
        listener: Arc<UnixListener>,
        client: Client,
    },
}

impl InputThread {
    pub(super) fn start(port: Port, kind: &Kind, sink: InputSink) -> io::Result<Self> {
        let source = match kind {
            Kind::Pty { master, .. } => Source::Pty(master.clone()),
            Kind::Socket {
                listener, client, ..
            } => Source::Socket {
                listener: listener.clone(),
                client: client.clone(),
            },
        };
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        add(&epoll, stop.as_raw_fd(), STOP)?;
        match &source {
            Source::Pty(master) => add(&epoll, master.as_raw_fd(), SOURCE)?,
            Source::Socket { listener, client } => {
                add(&epoll, listener.as_raw_fd(), LISTENER)?;
                // A client handed over by the previous VMM.
                if let Some(stream) = client
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                {
                    add(&epoll, stream.as_raw_fd(), CLIENT)?;
                }
            }
        }
        let thread = std::thread::Builder::new()
            .name(format!("{}-input", port.name()))
            .spawn(move || run(port, &epoll, &source, &sink))?;
        Ok(Self { stop, thread })
    }

    /// Wakes the thread and waits until it is gone.
    pub(super) fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("Cannot stop an input thread: {e}");
            return;
        }
        if self.thread.join().is_err() {
            log::warn!("An input thread panicked");
        }
    }
}

fn add(epoll: &Epoll, fd: RawFd, data: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, data),
    )
}

fn run(port: Port, epoll: &Epoll, source: &Source, sink: &InputSink) {
    confine::confine_thread_or_exit(confine::ThreadKind::Worker);
    let mut events = [EpollEvent::default(); 4];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(count) => count,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("{} input: epoll failed: {e}", port.name());
                return;
            }
        };
        for event in &events[..count] {
            match (event.data(), source) {
                (STOP, _) => return,
                // The VMM keeps the slave open, so an end is rare (a hang-up): do not spin.
                (SOURCE, Source::Pty(master)) if !forward(port, &mut &**master, sink) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                (LISTENER, Source::Socket { listener, client }) => {
                    accept(port, epoll, listener, client);
                }
                (CLIENT, Source::Socket { client, .. }) => read_client(port, epoll, client, sink),
                _ => {}
            }
        }
    }
}

/// Reads what is there (the fd is non-blocking) and hands it on; false at end of input.
fn forward(port: Port, reader: &mut impl Read, sink: &InputSink) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => sink(port, buf[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("{} input: {e}", port.name());
                return false;
            }
        }
    }
}

/// A new client replaces the one before (which is shut down), as cloud-hypervisor does.
fn accept(port: Port, epoll: &Epoll, listener: &UnixListener, client: &Client) {
    let stream = match listener.accept() {
        Ok((stream, _)) => stream,
        Err(e) => {
            log::warn!("{} socket: accept failed: {e}", port.name());
            return;
        }
    };
    if let Err(e) = stream.set_nonblocking(true) {
        log::warn!("{} socket: {e}", port.name());
        return;
    }
    let mut current = client.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(old) = current.take() {
        drop_client(epoll, &old);
    }
    if let Err(e) = add(epoll, stream.as_raw_fd(), CLIENT) {
        log::warn!("{} socket: {e}", port.name());
        return;
    }
    *current = Some(stream);
}

fn read_client(port: Port, epoll: &Epoll, client: &Client, sink: &InputSink) {
    let reader = client
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(UnixStream::try_clone);
    let Some(Ok(mut reader)) = reader else {
        return;
    };
    if !forward(port, &mut reader, sink) {
        let mut current = client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = current.take() {
            drop_client(epoll, &old);
        }
    }
}

fn drop_client(epoll: &Epoll, stream: &UnixStream) {
    let _ = epoll.ctl(
        ControlOperation::Delete,
        stream.as_raw_fd(),
        EpollEvent::default(),
    );
    let _ = stream.shutdown(Shutdown::Both);
}
