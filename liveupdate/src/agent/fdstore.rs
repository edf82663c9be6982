//! What the agent holds, as named fds plus one record: kept in systemd's file descriptor store
//! (so a restarted agent takes every session back) and passed to a new agent binary in an
//! upgrade in place.
//!
//! # Entries
//! Every fd that keeps a session alive (a kernel session fd, a memfd of the userspace holder,
//! an attachment) is one entry named `luod.fd.N`; a file held under several roles (the holder's
//! copy and the agent's copy of the same memfd) is one entry, as systemd would keep it only once
//! anyway. The listening socket is `luod.listener`, the kernel mode's `/dev/liveupdate` is
//! `luod.device`. The record, a JSON [`StoreRecord`] in a sealed memfd named `luod.meta.G`,
//! says which session is which: name, side, owner, frozen, tokens, and which entry holds each of
//! its provider's fds, files and attachments. Its fields have defaults, so a record written by an
//! older agent is read by a newer one and the reverse (unknown fields are ignored).
//!
//! # Keeping it current
//! After every change the agent calls [`FdStore::sync`]: new entries are stored first, then the
//! new record under the next generation `G`, and only then the old record and the entries no
//! longer used are removed. A crash at any point leaves a record whose entries are all stored;
//! the successor takes the highest generation and drops the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::state::AgentState;
use crate::session::Token;
use crate::sys;

/// The entry of the agent's listening socket.
pub const LISTENER_NAME: &str = "luod.listener";
/// The entry of `/dev/liveupdate` (kernel mode).
pub const DEVICE_NAME: &str = "luod.device";
/// Prefix of the record entries (`luod.meta.G`).
const META_PREFIX: &str = "luod.meta.";
/// Prefix of the session fd entries (`luod.fd.N`).
const FD_PREFIX: &str = "luod.fd.";
/// The record's format; a newer agent reads every older one.
pub const RECORD_VERSION: u32 = 1;
/// Longest record read back (a record holds names and numbers only).
const MAX_RECORD_LEN: u64 = 16 << 20;

/// The side of a held session, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Created, files being preserved (frozen in kernel mode once handed over).
    Outgoing,
    /// Restart mode: handed over, not retrieved yet.
    HandedOver,
    /// Retrieved, not finished.
    Incoming,
}

/// One session in the record; the maps name entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session's name.
    pub name: String,
    /// Its side.
    pub side: Side,
    /// The uid that owns it (none: came across a kexec).
    #[serde(default)]
    pub owner: Option<u32>,
    /// Kernel mode: frozen for the kexec.
    #[serde(default)]
    pub frozen: bool,
    /// The tokens `list` shows.
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Outgoing, kernel mode: the tokens of its memfds (see `super::manifest`).
    #[serde(default)]
    pub memfds: Vec<Token>,
    /// The provider's fds of the session (by the provider's names) -> entry.
    #[serde(default)]
    pub provider: BTreeMap<String, String>,
    /// Files the agent keeps for the session, by token -> entry.
    #[serde(default)]
    pub files: BTreeMap<Token, String>,
    /// Attachments, by token -> entry.
    #[serde(default)]
    pub attachments: BTreeMap<Token, String>,
}

impl SessionRecord {
    /// A record of `name` on `side` with no entries yet.
    pub fn new(name: &str, side: Side) -> Self {
        Self {
            name: name.to_string(),
            side,
            owner: None,
            frozen: false,
            tokens: Vec::new(),
            memfds: Vec::new(),
            provider: BTreeMap::new(),
            files: BTreeMap::new(),
            attachments: BTreeMap::new(),
        }
    }
}

/// Everything the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    /// [`RECORD_VERSION`] of the agent that wrote it.
    pub version: u32,
    /// "kernel" or "restart": an agent refuses sessions of the other mode.
    pub mode: String,
    /// The sessions.
    #[serde(default)]
    pub sessions: Vec<SessionRecord>,
}

/// The role an fd plays for a session (see [`SessionRecord`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// One of the provider's fds, by the provider's name.
    Provider(String),
    /// A file the agent keeps, by token.
    File(Token),
    /// An attachment, by token.
    Attachment(Token),
}

/// A session as exported: its record (without entry names) and its fds by role.
pub type Exported = (SessionRecord, Vec<(Role, OwnedFd)>);

/// A session taken back: its record and its fds by role.
#[derive(Debug)]
pub struct Imported {
    /// What the session was.
    pub record: SessionRecord,
    /// For the provider's `adopt`.
    pub provider: Vec<(String, OwnedFd)>,
    /// The files the agent kept.
    pub files: BTreeMap<Token, OwnedFd>,
    /// The attachments.
    pub attachments: BTreeMap<Token, OwnedFd>,
}

/// Why stored entries cannot be taken back.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Session fds without any record.
    #[error("The fd store holds {count} session fd(s) but no record of what they are")]
    NoRecord {
        /// How many.
        count: usize,
    },
    /// The record cannot be read or decoded.
    #[error("Cannot read the fd store's record {name}")]
    BadRecord {
        /// Its entry name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The record names an entry that is not there.
    #[error("Session {session:?}: entry {entry} is missing from the fd store")]
    MissingEntry {
        /// The session.
        session: String,
        /// The entry.
        entry: String,
    },
    /// The record was written by an agent of the other mode.
    #[error("The fd store holds {stored}-mode sessions; this agent runs in {ours} mode")]
    WrongMode {
        /// The record's mode.
        stored: String,
        /// Ours.
        ours: String,
    },
    /// Duplicating a stored fd failed.
    #[error("Cannot duplicate a stored fd")]
    Dup(#[source] io::Error),
}

/// Where entries go.
pub trait Sink: Send {
    /// Stores `fd` under `name`.
    fn store(&mut self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()>;
    /// Removes the entry `name`.
    fn remove(&mut self, name: &str) -> io::Result<()>;
}

/// systemd's notification socket (`$NOTIFY_SOCKET`, `sd_notify(3)`), written directly.
#[derive(Debug)]
pub struct Systemd {
    socket: UnixDatagram,
}

impl Systemd {
    /// The service manager's socket, when this process runs under one (`$NOTIFY_SOCKET`).
    /// A path or an abstract name (`@name`).
    pub fn from_env() -> io::Result<Option<Self>> {
        let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        let socket = UnixDatagram::unbound()?;
        let bytes = address.as_encoded_bytes();
        if let Some(abstract_name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            socket.connect_addr(&addr)?;
        } else {
            socket.connect(&address)?;
        }
        Ok(Some(Self { socket }))
    }

    /// Sends one notification, with `fd` if any.
    pub fn notify(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        self.socket
            .send_with_fds(&[text.as_bytes()], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(())
    }
}

impl Sink for Systemd {
    fn store(&mut self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        // FDPOLL=0: systemd would drop a stored socket whose peer hangs up (an attachment).
        self.notify(&format!("FDSTORE=1\nFDPOLL=0\nFDNAME={name}"), Some(fd))
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)
    }
}

/// Collects entries (for an upgrade, and tests); clones share them.
#[derive(Debug, Default, Clone)]
pub struct Collect {
    entries: Arc<Mutex<Vec<(String, OwnedFd)>>>,
}

impl Collect {
    fn entries(&self) -> MutexGuard<'_, Vec<(String, OwnedFd)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the entries stored (and not removed) so far, in the order stored.
    pub fn take(&self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut *self.entries())
    }

    /// The names stored (and not removed), in order.
    pub fn names(&self) -> Vec<String> {
        self.entries()
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl Sink for Collect {
    fn store(&mut self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let fd = fd.try_clone_to_owned()?;
        self.entries().push((name.to_string(), fd));
        Ok(())
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.entries().retain(|(stored, _)| stored != name);
        Ok(())
    }
}

/// Identifies an open file as systemd's fd store does: same inode, same status flags (the two
/// ends of a pipe share an inode, not their flags).
type FileKey = (u64, u64, i32);

fn file_key(fd: BorrowedFd<'_>) -> io::Result<FileKey> {
    let meta = File::from(fd.try_clone_to_owned()?).metadata()?;
    Ok((meta.dev(), meta.ino(), sys::file_status_flags(fd)?))
}

/// The agent's side of a store: what it holds there and under which names.
pub struct FdStore {
    sink: Box<dyn Sink>,
    /// Session entries in the store, by name.
    entries: BTreeMap<String, FileKey>,
    next_fd: u64,
    /// The record in the store: its name and bytes.
    record: Option<(String, Vec<u8>)>,
    next_meta: u64,
    /// Entries found at start that nothing uses: removed at the first sync.
    stale: Vec<String>,
}

impl std::fmt::Debug for FdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdStore")
            .field("entries", &self.entries.len())
            .field("record", &self.record.as_ref().map(|(name, _)| name))
            .finish_non_exhaustive()
    }
}

impl FdStore {
    /// An empty store behind `sink`; `fixed` entries (listener, device) are stored now and
    /// stay.
    pub fn new(mut sink: Box<dyn Sink>, fixed: &[(&str, BorrowedFd<'_>)]) -> io::Result<Self> {
        for (name, fd) in fixed {
            sink.store(name, *fd)?;
        }
        Ok(Self {
            sink,
            entries: BTreeMap::new(),
            next_fd: 0,
            record: None,
            next_meta: 0,
            stale: Vec::new(),
        })
    }

    /// A store whose entries were passed to this agent (`rebuilt`). The `fixed` entries are
    /// stored again (systemd keeps a file it holds already only once).
    pub fn resume(
        sink: Box<dyn Sink>,
        rebuilt: &Rebuilt,
        fixed: &[(&str, BorrowedFd<'_>)],
    ) -> io::Result<Self> {
        let mut store = Self::new(sink, fixed)?;
        for (name, fd) in &rebuilt.session_fds {
            store.entries.insert(name.clone(), file_key(fd.as_fd())?);
            if let Some(n) = entry_number(name, FD_PREFIX) {
                store.next_fd = store.next_fd.max(n + 1);
            }
        }
        store.next_meta = rebuilt.next_meta;
        store.record = rebuilt.record_entry.clone();
        store.stale = rebuilt.stale.clone();
        Ok(store)
    }

    /// Brings the store in line with `state` (see the module docs for the order).
    pub fn sync(&mut self, state: &AgentState) -> io::Result<()> {
        let exported = state
            .export()
            .map_err(|e| io::Error::other(format!("cannot export the sessions: {e}")))?;
        let mut by_key: BTreeMap<FileKey, String> = self
            .entries
            .iter()
            .map(|(name, key)| (*key, name.clone()))
            .collect();
        let mut used = BTreeSet::new();
        let mut sessions = Vec::new();
        for (mut record, fds) in exported {
            for (role, fd) in fds {
                let key = file_key(fd.as_fd())?;
                let name = match by_key.get(&key) {
                    Some(name) => name.clone(),
                    None => {
                        let name = format!("{FD_PREFIX}{}", self.next_fd);
                        self.sink.store(&name, fd.as_fd())?;
                        self.next_fd += 1;
                        self.entries.insert(name.clone(), key);
                        by_key.insert(key, name.clone());
                        name
                    }
                };
                used.insert(name.clone());
                match role {
                    Role::Provider(fd_name) => record.provider.insert(fd_name, name),
                    Role::File(token) => record.files.insert(token, name),
                    Role::Attachment(token) => record.attachments.insert(token, name),
                };
            }
            sessions.push(record);
        }
        let record = StoreRecord {
            version: RECORD_VERSION,
            mode: state.handover.name().to_string(),
            sessions,
        };
        let bytes = serde_json::to_vec(&record).map_err(io::Error::other)?;
        if self.record.as_ref().map(|(_, old)| old) != Some(&bytes) {
            let name = format!("{META_PREFIX}{}", self.next_meta);
            self.next_meta += 1;
            self.sink.store(&name, sealed_memfd(&bytes)?.as_fd())?;
            if let Some((old, _)) = self.record.replace((name, bytes)) {
                self.sink.remove(&old)?;
            }
        }
        for name in std::mem::take(&mut self.stale) {
            self.sink.remove(&name)?;
        }
        let unused: Vec<String> = self
            .entries
            .keys()
            .filter(|name| !used.contains(*name))
            .cloned()
            .collect();
        for name in unused {
            self.sink.remove(&name)?;
            self.entries.remove(&name);
        }
        debug!(
            "fd store: {} session fd(s), record {:?}",
            self.entries.len(),
            self.record.as_ref().map(|(name, _)| name)
        );
        Ok(())
    }
}

/// Writes `bytes` into a new memfd and seals it.
fn sealed_memfd(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = sys::memfd_create("ch-luod-record", libc::MFD_ALLOW_SEALING)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    let fd = OwnedFd::from(file);
    sys::seal_memfd(fd.as_fd())?;
    Ok(fd)
}

fn entry_number(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Stored entries taken back: the fixed ones, the sessions, and what the store holds.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The listening socket.
    pub listener: Option<OwnedFd>,
    /// `/dev/liveupdate` (kernel mode).
    pub device: Option<OwnedFd>,
    /// The record's mode, if there was a record.
    pub mode: Option<String>,
    /// The sessions.
    pub sessions: Vec<Imported>,
    /// The session entries, as stored.
    session_fds: BTreeMap<String, OwnedFd>,
    /// The record in use: name and bytes.
    record_entry: Option<(String, Vec<u8>)>,
    next_meta: u64,
    /// Entries nothing uses (older records, unknown names).
    stale: Vec<String>,
}

impl Rebuilt {
    /// How many sessions came back.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

/// Sorts stored `entries` (from `LISTEN_FDS` or an upgrade) into what they were.
pub fn rebuild(entries: Vec<(String, OwnedFd)>) -> Result<Rebuilt, StoreError> {
    let mut rebuilt = Rebuilt::default();
    let mut records: BTreeMap<u64, (String, OwnedFd)> = BTreeMap::new();
    for (name, fd) in entries {
        if name == LISTENER_NAME {
            rebuilt.listener = Some(fd);
        } else if name == DEVICE_NAME {
            rebuilt.device = Some(fd);
        } else if let Some(generation) = entry_number(&name, META_PREFIX) {
            records.insert(generation, (name, fd));
        } else if entry_number(&name, FD_PREFIX).is_some() {
            rebuilt.session_fds.insert(name, fd);
        } else {
            warn!("fd store: ignoring an fd named {name:?}");
            rebuilt.stale.push(name);
        }
    }
    let Some((generation, (name, fd))) = records.pop_last() else {
        if rebuilt.session_fds.is_empty() {
            return Ok(rebuilt);
        }
        return Err(StoreError::NoRecord {
            count: rebuilt.session_fds.len(),
        });
    };
    rebuilt
        .stale
        .extend(records.into_values().map(|(name, _)| name));
    rebuilt.next_meta = generation + 1;
    let bytes = read_record(&File::from(fd)).map_err(|source| StoreError::BadRecord {
        name: name.clone(),
        source,
    })?;
    let record: StoreRecord =
        serde_json::from_slice(&bytes).map_err(|e| StoreError::BadRecord {
            name: name.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
    rebuilt.mode = Some(record.mode.clone());
    for session in record.sessions {
        let imported = import(&rebuilt.session_fds, session)?;
        rebuilt.sessions.push(imported);
    }
    rebuilt.record_entry = Some((name, bytes));
    Ok(rebuilt)
}

fn read_record(file: &File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    if len > MAX_RECORD_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes: larger than any record"),
        ));
    }
    let mut bytes = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

fn import(
    entries: &BTreeMap<String, OwnedFd>,
    record: SessionRecord,
) -> Result<Imported, StoreError> {
    let copy = |entry: &String| -> Result<OwnedFd, StoreError> {
        let fd = entries.get(entry).ok_or_else(|| StoreError::MissingEntry {
            session: record.name.clone(),
            entry: entry.clone(),
        })?;
        fd.try_clone().map_err(StoreError::Dup)
    };
    let provider = record
        .provider
        .iter()
        .map(|(name, entry)| Ok((name.clone(), copy(entry)?)))
        .collect::<Result<_, StoreError>>()?;
    let files = record
        .files
        .iter()
        .map(|(token, entry)| Ok((*token, copy(entry)?)))
        .collect::<Result<_, StoreError>>()?;
    let attachments = record
        .attachments
        .iter()
        .map(|(token, entry)| Ok((*token, copy(entry)?)))
        .collect::<Result<_, StoreError>>()?;
    Ok(Imported {
        record,
        provider,
        files,
        attachments,
    })
}

/// Checks that `rebuilt` holds sessions of `mode` ("kernel" or "restart"), or none.
pub fn check_mode(rebuilt: &Rebuilt, mode: &str) -> Result<(), StoreError> {
    match &rebuilt.mode {
        Some(stored) if stored != mode && !rebuilt.sessions.is_empty() => {
            Err(StoreError::WrongMode {
                stored: stored.clone(),
                ours: mode.to_string(),
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::agent::protocol::{Direction, Request};
    use crate::agent::state::tests::{OWNER, create, handover, name, ok, restart_state, retrieve};
    use crate::emulated::EmulatedProvider;

    fn memfd_with(bytes: &[u8]) -> OwnedFd {
        let fd = sys::memfd_create("fdstore-test", 0).unwrap();
        let mut file = File::from(fd.try_clone().unwrap());
        file.write_all(bytes).unwrap();
        fd
    }

    fn preserve(state: &mut AgentState, session: &str, token: Token, bytes: &[u8]) {
        let request = Request::Preserve {
            name: name(session),
            token,
        };
        ok(state, request, OWNER, Some(memfd_with(bytes)));
    }

    /// A restart-mode state with one session on each side, each holding one file.
    fn three_sides() -> AgentState {
        let (mut state, _) = restart_state();
        for session in ["out", "handed", "retrieved"] {
            ok(&mut state, create(session), OWNER, None);
            preserve(&mut state, session, 1, session.as_bytes());
        }
        for session in ["handed", "retrieved"] {
            ok(&mut state, handover(session), OWNER, None);
        }
        ok(&mut state, retrieve("retrieved"), OWNER, None);
        state
    }

    fn fresh_restart_state() -> AgentState {
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = crate::agent::state::HandoverMode::Restart(Box::new(move |name: &str| {
            holder.handover(name)
        }));
        AgentState::new(Box::new(provider), handover, 0)
    }

    /// The file's bytes, from offset 0 (the offset is shared with every copy).
    fn read_all(fd: OwnedFd) -> Vec<u8> {
        let file = File::from(fd);
        let mut bytes = vec![0u8; usize::try_from(file.metadata().unwrap().len()).unwrap()];
        file.read_exact_at(&mut bytes, 0).unwrap();
        bytes
    }

    #[test]
    fn a_record_from_an_older_agent_reads_with_defaults_and_unknown_fields_are_ignored() {
        let older =
            r#"{"version":1,"mode":"restart","sessions":[{"name":"vm","side":"handed_over"}]}"#;
        let newer = r#"{"version":9,"mode":"kernel","sessions":[{"name":"vm","side":"outgoing",
            "owner":7,"phase":"saved","files":{"1":"luod.fd.0"}}],"later":true}"#;

        let older: StoreRecord = serde_json::from_str(older).unwrap();
        let newer: StoreRecord = serde_json::from_str(newer).unwrap();

        assert_eq!(
            older.sessions[0],
            SessionRecord::new("vm", Side::HandedOver)
        );
        assert_eq!(newer.sessions[0].owner, Some(7));
        assert_eq!(newer.sessions[0].files[&1], "luod.fd.0");
    }

    #[test]
    fn a_record_round_trips_through_json() {
        let mut session = SessionRecord::new("vm", Side::Incoming);
        session.owner = Some(1000);
        session.tokens = vec![0, 1];
        session.provider.insert("1".into(), "luod.fd.3".into());
        session.attachments.insert(20, "luod.fd.4".into());
        let record = StoreRecord {
            version: RECORD_VERSION,
            mode: "restart".into(),
            sessions: vec![session],
        };

        let bytes = serde_json::to_vec(&record).unwrap();

        assert_eq!(
            serde_json::from_slice::<StoreRecord>(&bytes).unwrap(),
            record
        );
    }

    #[test]
    fn every_side_comes_back_in_a_new_agent_with_its_files() {
        let state = three_sides();
        let sink = Collect::default();
        let mut store = FdStore::new(Box::new(sink.clone()), &[]).unwrap();
        store.sync(&state).unwrap();
        let listed_before = state.list();
        drop(state);

        let rebuilt = rebuild(sink.take()).unwrap();
        let mut successor = fresh_restart_state();
        successor.import(rebuilt.sessions).unwrap();

        assert_eq!(successor.list(), listed_before);
        ok(&mut successor, retrieve("handed"), OWNER, None);
        for session in ["handed", "retrieved"] {
            let request = Request::RetrieveFd {
                name: name(session),
                token: 1,
            };
            let (_, fd) = successor.handle(request, OWNER, None);
            assert_eq!(read_all(fd.unwrap()), session.as_bytes());
        }
        ok(&mut successor, handover("out"), OWNER, None);
        assert!(
            successor
                .list()
                .iter()
                .all(|s| s.direction != Direction::Outgoing)
        );
    }

    #[test]
    fn a_file_under_two_roles_is_stored_once_and_a_change_replaces_the_record() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        preserve(&mut state, "vm", 1, b"ram");
        let sink = Collect::default();
        let mut store = FdStore::new(Box::new(sink.clone()), &[]).unwrap();
        store.sync(&state).unwrap();
        let first = sink.names();

        ok(
            &mut state,
            Request::Cancel { name: name("vm") },
            OWNER,
            None,
        );
        store.sync(&state).unwrap();

        // The holder's copy and the agent's copy are the same open file.
        assert_eq!(first, ["luod.fd.0", "luod.meta.0"]);
        assert_eq!(sink.names(), ["luod.meta.1"]);
    }

    #[test]
    fn the_newest_record_wins_and_older_ones_are_dropped_at_the_first_sync() {
        let state = three_sides();
        let sink = Collect::default();
        let mut store = FdStore::new(Box::new(sink.clone()), &[]).unwrap();
        store.sync(&state).unwrap();
        let mut entries = sink.take();
        // A crash between storing a record and removing the one before.
        entries.push(("luod.meta.7".into(), sealed_memfd(b"{not json").unwrap()));
        entries.insert(0, ("luod.meta.0".into(), sealed_memfd(b"{}").unwrap()));

        let error = rebuild(entries).unwrap_err();

        assert!(matches!(error, StoreError::BadRecord { ref name, .. } if name == "luod.meta.7"));
    }

    #[test]
    fn session_fds_without_a_record_are_refused() {
        let entries = vec![("luod.fd.0".to_string(), memfd_with(b"x"))];

        let error = rebuild(entries).unwrap_err();

        assert!(
            matches!(error, StoreError::NoRecord { count: 1 }),
            "{error}"
        );
    }

    #[test]
    fn a_missing_entry_names_the_session() {
        let state = three_sides();
        let sink = Collect::default();
        let mut store = FdStore::new(Box::new(sink.clone()), &[]).unwrap();
        store.sync(&state).unwrap();
        let entries: Vec<_> = sink
            .take()
            .into_iter()
            .filter(|(name, _)| name != "luod.fd.0")
            .collect();

        let error = rebuild(entries).unwrap_err();

        assert!(
            matches!(error, StoreError::MissingEntry { ref entry, .. } if entry == "luod.fd.0"),
            "{error}"
        );
    }

    #[test]
    fn sessions_of_the_other_mode_are_refused() {
        let state = three_sides();
        let sink = Collect::default();
        let mut store = FdStore::new(Box::new(sink.clone()), &[]).unwrap();
        store.sync(&state).unwrap();
        let rebuilt = rebuild(sink.take()).unwrap();

        let error = check_mode(&rebuilt, "kernel").unwrap_err();

        assert_eq!(
            error.to_string(),
            "The fd store holds restart-mode sessions; this agent runs in kernel mode"
        );
        check_mode(&rebuilt, "restart").unwrap();
    }

    #[test]
    fn notifications_reach_the_socket_named_by_notify_socket_with_their_fd() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ch-luod-notify-").unwrap();
        let path = dir.as_path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let socket = UnixDatagram::unbound().unwrap();
        socket.connect(&path).unwrap();
        let mut systemd = Systemd { socket };

        systemd
            .store("luod.fd.0", memfd_with(b"x").as_fd())
            .unwrap();
        systemd.remove("luod.fd.0").unwrap();

        let mut buf = [0u8; 256];
        let (len, fd) = receiver.recv_with_fd(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDPOLL=0\nFDNAME=luod.fd.0");
        assert!(fd.is_some());
        let len = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"FDSTOREREMOVE=1\nFDNAME=luod.fd.0");
    }
}
