//! The host side of the serial port and the virtio console in cloud-hypervisor's modes `Pty`
//! (`--serial pty`, `--console pty`: a new pseudo-terminal whose path `vm.info` reports in the
//! device's `file`) and `Socket` (`--serial socket=PATH`: a UNIX socket the VMM listens on; one
//! client at a time, a new one replaces the one before).
//!
//! - **Output**: the device writes into its end, never blocking a vCPU: what the host side does
//!   not take at once (nobody reads the pty, no client, a slow client) is dropped.
//! - **Input**: a thread per end reads what the host side sends and hands it to the control
//!   loop, which feeds the guest's device (the 16550's FIFO, the console's receive queue).
//! - **Lifetime**: an end is opened at the first boot and kept for the VM's lifetime, so a
//!   reboot keeps the pty's path and the socket; the VMM runs one VM, so the ends live in a
//!   process-wide registry (like the tap fds a card was given).
//! - **Live update**: the device manager's participant hands the pty master, or the listening
//!   socket and its client, to the successor (restart mode), which adopts them; across a kexec
//!   the restoring VMM opens a new pty, or binds the socket again at its path.

mod end;
mod input;

pub use end::{HostEnd, HostEndError};

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::config::{ConsoleConfig, ConsoleMode};

/// The guest device an end belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Port {
    /// The 16550 serial port (COM1).
    Serial,
    /// The virtio console.
    Console,
}

impl Port {
    /// "serial" or "console", as in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::Console => "console",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Serial => 0,
            Self::Console => 1,
        }
    }
}

/// Where input from the host side goes (the control loop).
pub type InputSink = Arc<dyn Fn(Port, Vec<u8>) + Send + Sync>;

#[derive(Default)]
struct Registry {
    ends: [Option<Arc<HostEnd>>; 2],
    sink: Option<InputSink>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    ends: [None, None],
    sink: None,
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `config` needs an end of ours (modes `Pty` and `Socket`).
pub fn has_host_end(config: &ConsoleConfig) -> bool {
    matches!(config.mode, ConsoleMode::Pty | ConsoleMode::Socket)
}

/// The end of `port` for `config`: the one already open when it fits (a reboot), else a new
/// pty or socket (a socket path in use is refused).
pub fn open(port: Port, config: &ConsoleConfig) -> Result<Arc<HostEnd>, HostEndError> {
    if let Some(end) = get(port).filter(|end| end.fits(config)) {
        return Ok(end);
    }
    let end = match (config.mode, &config.socket) {
        (ConsoleMode::Socket, Some(path)) => HostEnd::bind(port, path, false)?,
        (ConsoleMode::Socket, None) => return Err(HostEndError::NoSocketPath(port.name())),
        _ => HostEnd::new_pty(port)?,
    };
    Ok(register(end))
}

/// Makes `end` the end of its port (replacing, and closing, the one before).
pub fn register(end: HostEnd) -> Arc<HostEnd> {
    let end = Arc::new(end);
    let old = registry().ends[end.port().index()].replace(end.clone());
    if let Some(old) = old {
        old.stop_input();
    }
    end
}

/// The end of `port`, if it has one.
pub fn get(port: Port) -> Option<Arc<HostEnd>> {
    registry().ends[port.index()].clone()
}

/// Starts reading input on every end that is not read yet, into `sink` (kept for ends that
/// start again later, e.g. after a cancelled live update).
pub fn start_input(sink: InputSink) {
    let ends: Vec<_> = {
        let mut registry = registry();
        registry.sink = Some(sink.clone());
        registry.ends.iter().flatten().cloned().collect()
    };
    for end in ends {
        end.start_input(sink.clone());
    }
}

/// Starts reading input on `end` again, into the sink given last.
pub fn restart_input(end: &HostEnd) {
    let sink = registry().sink.clone();
    if let Some(sink) = sink {
        end.start_input(sink);
    }
}

/// Closes every end (the VM is deleted, or the VMM exits): input threads stop, socket files
/// go unless a successor owns them now.
pub fn close_all() {
    let ends = std::mem::take(&mut registry().ends);
    for end in ends.into_iter().flatten() {
        end.stop_input();
    }
}
