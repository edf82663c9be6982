//! Upgrade in place: a new `ch-luod` binary takes every session over from the agent running on
//! the same socket, so the agent can be updated without losing a VM (the idea of the VMM's
//! restart mode, applied to the agent).
//!
//! 1. The new agent connects and sends `upgrade{mode}` (root or the agent's uid; same mode).
//! 2. The old agent stops accepting (new connections wait in the socket's backlog) and refuses
//!    with `busy` while any other connection is open: a VMM in the middle of an update, a
//!    successor waiting for its handover. The new agent tries again for [`UPGRADE_WAIT`].
//! 3. The old agent sends `handoff{names}` and one `handoff_fd{name}` per entry: the listening
//!    socket, `/dev/liveupdate` in kernel mode, every fd holding a session and the record of
//!    what they are (the entries of systemd's fd store, see [`super::fdstore`]).
//! 4. The new agent takes every session back; only then it sends `upgrade_done`. The old agent
//!    answers `ok` and exits without removing the socket; the new one takes the path's lock
//!    and accepts on the same listening socket. No connection is refused at any point.
//!
//! If the new agent fails before `upgrade_done` (a record it cannot read, a crash), the old
//! agent sees the connection close and serves on with everything it held. (One that stalls
//! without closing keeps the old agent from accepting until it is killed.)
//!
//! An agent under systemd refuses: `systemctl restart` does the same through the fd store.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use log::info;

use super::AgentError;
use super::client::AgentClient;
use super::protocol::{ErrorKind, Request, Response};

/// How long a new agent tries again while the running one is busy.
pub const UPGRADE_WAIT: Duration = Duration::from_secs(10);
/// How long a new agent waits for the old one to exit and release the socket's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_millis(100);

/// What the running agent handed over, before the new agent confirms.
#[derive(Debug)]
pub struct Handoff {
    client: AgentClient,
    /// The entries, in the order sent.
    pub entries: Vec<(String, OwnedFd)>,
}

impl Handoff {
    /// Asks the agent at `path` for everything it holds, as a `mode` agent ("kernel" or
    /// "restart"), trying again for up to `wait` while it is busy.
    pub fn request(path: &Path, mode: &str, wait: Duration) -> Result<Self, AgentError> {
        let deadline = Instant::now() + wait;
        let request = Request::Upgrade {
            mode: mode.to_string(),
        };
        let (mut client, names) = loop {
            let mut client = AgentClient::connect(path)?;
            match client.request(&request, None) {
                Ok((Response::Handoff { names }, None)) => break (client, names),
                Ok((other, _)) => return Err(AgentError::UnexpectedReply(format!("{other:?}"))),
                Err(e) if e.kind() == Some(ErrorKind::Busy) && Instant::now() < deadline => {
                    drop(client);
                    thread::sleep(RETRY);
                }
                Err(e) => return Err(e),
            }
        };
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            match client.receive()? {
                (Response::HandoffFd { name: got }, Some(fd)) if got == name => {
                    entries.push((name, fd));
                }
                (other, _) => return Err(AgentError::UnexpectedReply(format!("{other:?}"))),
            }
        }
        info!("{} fd(s) handed over by the running agent", entries.len());
        Ok(Self { client, entries })
    }

    /// Takes the entries out (the confirmation is still to be sent).
    pub fn take_entries(&mut self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut self.entries)
    }

    /// Tells the old agent this one holds everything: it exits.
    pub fn confirm(mut self) -> Result<(), AgentError> {
        match self.client.request(&Request::UpgradeDone, None)? {
            (Response::Ok, None) => Ok(()),
            (other, _) => Err(AgentError::UnexpectedReply(format!("{other:?}"))),
        }
    }
}
