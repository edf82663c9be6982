//! One host end: a pty (its master, with a slave kept open so the master never sees a hang-up
//! while nobody has the terminal open) or a listening UNIX socket with its current client.

use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

use super::input::InputThread;
use super::{InputSink, Port};
use crate::config::{ConsoleConfig, ConsoleMode};
use crate::sys::pty;

/// Errors from opening or adopting an end.
#[derive(Debug, Error)]
pub enum HostEndError {
    /// No pseudo-terminal could be opened.
    #[error("Cannot open a pseudo-terminal for the {0}")]
    OpenPty(&'static str, #[source] io::Error),
    /// A handed-over pty master is not usable.
    #[error("Cannot use the pseudo-terminal handed over for the {0}")]
    AdoptPty(&'static str, #[source] io::Error),
    /// The socket could not be bound (e.g. its path exists).
    #[error("Cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Mode `Socket` without a path.
    #[error("The {0} mode Socket needs a socket path")]
    NoSocketPath(&'static str),
}

/// The current client of a socket end, shared by the output writer and the input thread.
pub(super) type Client = Arc<Mutex<Option<UnixStream>>>;

pub(super) enum Kind {
    Pty {
        master: Arc<File>,
        /// Kept open: without any slave open, reads on the master fail and output is lost.
        _slave: File,
        path: PathBuf,
    },
    Socket {
        listener: Arc<UnixListener>,
        client: Client,
        path: PathBuf,
    },
}

/// The host end of the serial port or the console.
pub struct HostEnd {
    port: Port,
    kind: Kind,
    input: Mutex<Option<InputThread>>,
    /// The socket path belongs to a successor (or one binding it again after a kexec): the
    /// file stays when this end closes.
    keep_path: AtomicBool,
    /// Opened by a VMM restoring after a kexec, in place of the one that was lost.
    recreated: bool,
}

impl std::fmt::Debug for HostEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEnd")
            .field("port", &self.port)
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

impl HostEnd {
    /// A new pty in raw mode.
    pub fn new_pty(port: Port) -> Result<Self, HostEndError> {
        let (master, _) = pty::open_pty().map_err(|e| HostEndError::OpenPty(port.name(), e))?;
        Self::pty_from_master(port, master).map_err(|e| HostEndError::OpenPty(port.name(), e))
    }

    /// The pty whose master the previous VMM handed over (restart mode).
    pub fn adopt_pty(port: Port, master: OwnedFd) -> Result<Self, HostEndError> {
        Self::pty_from_master(port, master).map_err(|e| HostEndError::AdoptPty(port.name(), e))
    }

    /// A new pty in place of one a kexec lost.
    pub fn recreate_pty(port: Port) -> Result<Self, HostEndError> {
        let mut end = Self::new_pty(port)?;
        end.recreated = true;
        Ok(end)
    }

    fn pty_from_master(port: Port, master: OwnedFd) -> io::Result<Self> {
        let path = pty::slave_path(master.as_fd())?;
        let slave = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        pty::set_raw(&slave)?;
        let master = File::from(master);
        crate::sys::set_nonblocking(master.as_fd())?;
        Ok(Self::with_kind(
            port,
            Kind::Pty {
                master: Arc::new(master),
                _slave: slave,
                path,
            },
            false,
        ))
    }

    /// Listens on `path`; `replace_stale` (a VMM restoring after a kexec, so the end counts as
    /// recreated) first removes a socket file left there by the VMM that ran the VM before.
    /// Anything else at the path is refused.
    pub fn bind(port: Port, path: &Path, replace_stale: bool) -> Result<Self, HostEndError> {
        if replace_stale
            && let Ok(meta) = path.symlink_metadata()
            && meta.file_type().is_socket()
        {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| HostEndError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::with_kind(
            port,
            Kind::Socket {
                listener: Arc::new(listener),
                client: Arc::new(Mutex::new(None)),
                path: path.to_path_buf(),
            },
            replace_stale,
        ))
    }

    /// The listening socket (and its client) the previous VMM handed over (restart mode).
    pub fn adopt_socket(
        port: Port,
        path: &Path,
        listener: OwnedFd,
        client: Option<OwnedFd>,
    ) -> Result<Self, HostEndError> {
        let client = client
            .map(|fd| {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(true).map(|()| stream)
            })
            .transpose()
            .map_err(|source| HostEndError::Listen {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self::with_kind(
            port,
            Kind::Socket {
                listener: Arc::new(UnixListener::from(listener)),
                client: Arc::new(Mutex::new(client)),
                path: path.to_path_buf(),
            },
            false,
        ))
    }

    fn with_kind(port: Port, kind: Kind, recreated: bool) -> Self {
        Self {
            port,
            kind,
            input: Mutex::new(None),
            keep_path: AtomicBool::new(false),
            recreated,
        }
    }

    /// The device this end belongs to.
    pub fn port(&self) -> Port {
        self.port
    }

    /// The pty's slave path (what a host user opens), or the socket's path.
    pub fn path(&self) -> &Path {
        match &self.kind {
            Kind::Pty { path, .. } | Kind::Socket { path, .. } => path,
        }
    }

    /// Whether this is a pty (else a socket).
    pub fn is_pty(&self) -> bool {
        matches!(self.kind, Kind::Pty { .. })
    }

    /// Opened again after a kexec (the host must look for it anew).
    pub fn recreated(&self) -> bool {
        self.recreated
    }

    /// Whether this end serves `config` (same mode, same socket path).
    pub(super) fn fits(&self, config: &ConsoleConfig) -> bool {
        match (&self.kind, config.mode) {
            (Kind::Pty { .. }, ConsoleMode::Pty) => true,
            (Kind::Socket { path, .. }, ConsoleMode::Socket) => {
                config.socket.as_deref() == Some(path.as_path())
            }
            _ => false,
        }
    }

    /// Where the device writes the guest's output.
    pub fn writer(&self) -> Box<dyn Write + Send> {
        match &self.kind {
            Kind::Pty { master, .. } => Box::new(PtyWriter(master.clone())),
            Kind::Socket { client, .. } => Box::new(ClientWriter(client.clone())),
        }
    }

    /// Copies of what a successor takes over: the pty master, or the listening socket and
    /// its client if one is connected. Only while input is stopped, so the client is settled.
    pub fn fds_to_hand_over(&self) -> io::Result<(OwnedFd, Option<OwnedFd>)> {
        match &self.kind {
            Kind::Pty { master, .. } => Ok((master.as_fd().try_clone_to_owned()?, None)),
            Kind::Socket {
                listener, client, ..
            } => {
                let client = client
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|c| c.as_fd().try_clone_to_owned())
                    .transpose()?;
                Ok((listener.as_fd().try_clone_to_owned()?, client))
            }
        }
    }

    /// From now on (true) the socket path belongs to whoever restores the VM.
    pub fn keep_path(&self, keep: bool) {
        self.keep_path.store(keep, Ordering::Release);
    }

    /// Starts the input thread, unless it runs.
    pub fn start_input(&self, sink: InputSink) {
        let mut input = self.input.lock().unwrap_or_else(PoisonError::into_inner);
        if input.is_some() {
            return;
        }
        match InputThread::start(self.port, &self.kind, sink) {
            Ok(thread) => *input = Some(thread),
            Err(e) => log::warn!("Cannot read input for the {}: {e}", self.port.name()),
        }
    }

    /// Stops the input thread; returns once it reads no more.
    pub fn stop_input(&self) {
        let thread = self
            .input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            thread.stop();
        }
    }
}

impl Drop for HostEnd {
    fn drop(&mut self) {
        self.stop_input();
        if let Kind::Socket { path, .. } = &self.kind
            && !self.keep_path.load(Ordering::Acquire)
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Output into the pty master; dropped when nobody reads the terminal and its buffer is full.
struct PtyWriter(Arc<File>);

impl Write for PtyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match (&*self.0).write(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Output to the socket's client; dropped without one, or when it does not keep up. A client
/// that fails a write is let go.
struct ClientWriter(Client);

impl Write for ClientWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stream) = client.as_mut() else {
            return Ok(buf.len());
        };
        match stream.write(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(buf.len()),
            Err(e) => {
                log::info!("Serial socket client went away: {e}");
                *client = None;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
