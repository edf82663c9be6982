//! A userspace session holder with LUO's semantics, for restart mode (the host kernel stays,
//! only the VMM binary is replaced). The session agent owns one [`EmulatedProvider`] and calls
//! [`EmulatedProvider::handover`] where the kernel would kexec.
//!
//! Rules kept from the kernel (`../shared/reference/luo.md` §1.4, §1.5, §2.3, §2.4, §3):
//! - names are unique among outgoing sessions; incoming ones are a separate list;
//! - only unlinked shmem files (memfds without `MFD_HUGETLB`) are preservable;
//! - a file is managed by at most one session at a time, compared by `(st_dev, st_ino)`, until
//!   the incoming session holding it is finished;
//! - dropping the last handle of an outgoing session before its handover discards it; dropping a
//!   retrieved incoming session finishes it; a finish drops every file never retrieved.
//!
//! **Retrieving a file twice differs from the kernel, on purpose.** The project asks for "a file
//! retrieved at most once", so a second `retrieve_fd` of a token here fails with
//! [`SessionError::AlreadyRetrieved`]. luo.md §1.5 (RETRIEVE_FD row, [R6]) says the kernel's
//! RETRIEVE_FD of an already-retrieved token succeeds and returns another fd for the same file.
//! Code that works here therefore works on the kernel, not necessarily the reverse; the lead
//! decides whether to keep this stricter rule.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::session::{AdoptAs, Session, SessionError, SessionProvider, Token, check_name};
use crate::sys;

/// `f_type` of tmpfs/shmem (memfds without `MFD_HUGETLB`).
pub const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `f_type` of hugetlbfs (memfds with `MFD_HUGETLB`); LUO cannot preserve these.
pub const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Which side of the handover a session is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Created here, files being preserved, not yet handed over.
    Outgoing,
    /// Handed over, waiting to be retrieved, or retrieved and not yet finished.
    Incoming,
}

impl Direction {
    /// "outgoing" or "incoming".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outgoing => "outgoing",
            Self::Incoming => "incoming",
        }
    }
}

/// One line of [`EmulatedProvider::sessions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session's name.
    pub name: String,
    /// Outgoing or incoming.
    pub direction: Direction,
    /// Tokens of the files the holder still has (for incoming: not yet retrieved), ascending.
    pub tokens: Vec<Token>,
}

/// Whether a file with these properties is preservable, as the kernel's memfd handler decides
/// (`shmem_file(file) && i_nlink == 0`, luo.md §3). A hugetlbfs file (`HUGETLBFS_MAGIC`), a
/// linked file or a device is not.
pub fn check_preservable(
    fs_magic: i64,
    is_regular_file: bool,
    nlink: u64,
) -> Result<(), SessionError> {
    if fs_magic == TMPFS_MAGIC && is_regular_file && nlink == 0 {
        Ok(())
    } else {
        Err(SessionError::Unpreservable)
    }
}

/// [`check_preservable`] of an open file; returns its metadata.
pub fn check_preservable_file(file: &File) -> Result<std::fs::Metadata, SessionError> {
    let os = |source| SessionError::Os {
        operation: "preserve_fd",
        source,
    };
    let meta = file.metadata().map_err(os)?;
    let magic = sys::fs_magic(file).map_err(os)?;
    check_preservable(magic, meta.file_type().is_file(), meta.nlink())?;
    Ok(meta)
}

/// Identifies a file: `(st_dev, st_ino)`; for memfds, the memfd itself.
type FileKey = (u64, u64);

#[derive(Debug)]
struct PreservedFile {
    /// The holder's own reference (a dup), like the kernel's `fget()`.
    fd: OwnedFd,
    key: FileKey,
}

#[derive(Debug)]
struct HeldSession {
    /// Unique per created session; tells a live session from a later one of the same name.
    id: u64,
    files: BTreeMap<Token, PreservedFile>,
    /// Incoming: tokens retrieved already; their files stay managed until finish.
    retrieved: BTreeMap<Token, FileKey>,
    /// Incoming: handed out by `retrieve_session`.
    taken: bool,
}

impl HeldSession {
    fn manages(&self, key: FileKey) -> bool {
        self.files.values().any(|f| f.key == key) || self.retrieved.values().any(|&k| k == key)
    }
}

#[derive(Debug, Default)]
struct Holder {
    next_id: u64,
    outgoing: BTreeMap<String, HeldSession>,
    incoming: BTreeMap<String, HeldSession>,
}

impl Holder {
    fn manages(&self, key: FileKey) -> bool {
        self.outgoing
            .values()
            .chain(self.incoming.values())
            .any(|s| s.manages(key))
    }

    fn list(&self) -> Vec<SessionInfo> {
        let info = |direction: Direction| {
            move |(name, held): (&String, &HeldSession)| SessionInfo {
                name: name.clone(),
                direction,
                tokens: held.files.keys().copied().collect(),
            }
        };
        let outgoing = self.outgoing.iter().map(info(Direction::Outgoing));
        outgoing
            .chain(self.incoming.iter().map(info(Direction::Incoming)))
            .collect()
    }
}

/// Locks the holder. No code panics while holding the lock, so a poisoned lock (a panic in a
/// caller's thread elsewhere) still guards consistent data.
fn lock(holder: &Mutex<Holder>) -> MutexGuard<'_, Holder> {
    holder.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The userspace session provider. Cheap to clone; clones share the same sessions.
#[derive(Debug, Clone, Default)]
pub struct EmulatedProvider {
    holder: Arc<Mutex<Holder>>,
}

impl EmulatedProvider {
    /// An empty holder (no outgoing, no incoming sessions).
    pub fn new() -> Self {
        Self::default()
    }

    /// The stand-in for the kexec of one session: moves outgoing session `name` to the incoming
    /// list, where it can be retrieved once. Handles created before stay valid but see an
    /// incoming session now (dropping them no longer discards it). An incoming session of the
    /// same name left from an earlier handover is replaced (a kexec drops those too).
    pub fn handover(&self, name: &str) -> Result<(), SessionError> {
        let mut holder = lock(&self.holder);
        let held = holder
            .outgoing
            .remove(name)
            .ok_or_else(|| SessionError::Os {
                operation: "handover",
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no outgoing session {name:?}"),
                ),
            })?;
        Self::make_incoming(&mut holder, name.to_string(), held);
        Ok(())
    }

    /// Hands over every outgoing session; returns their names.
    pub fn handover_all(&self) -> Vec<String> {
        let mut holder = lock(&self.holder);
        let outgoing = std::mem::take(&mut holder.outgoing);
        let names: Vec<String> = outgoing.keys().cloned().collect();
        for (name, held) in outgoing {
            Self::make_incoming(&mut holder, name, held);
        }
        names
    }

    fn make_incoming(holder: &mut Holder, name: String, mut held: HeldSession) {
        held.taken = false;
        held.retrieved.clear();
        if let Some(old) = holder.incoming.insert(name.clone(), held) {
            log::warn!(
                "handover of {name:?} replaces an incoming session never finished ({} files dropped)",
                old.files.len()
            );
        }
    }

    /// Every session the holder has, outgoing first, each list by name.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        lock(&self.holder).list()
    }

    fn handle(&self, name: &str, id: u64, direction: Direction) -> Box<dyn Session> {
        Box::new(EmulatedSession {
            holder: Arc::clone(&self.holder),
            name: name.to_string(),
            id,
            direction,
        })
    }
}

impl SessionProvider for EmulatedProvider {
    fn create_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        check_name(name)?;
        let mut holder = lock(&self.holder);
        if holder.outgoing.contains_key(name) {
            return Err(SessionError::SessionExists {
                name: name.to_string(),
            });
        }
        let id = holder.next_id;
        holder.next_id += 1;
        let held = HeldSession {
            id,
            files: BTreeMap::new(),
            retrieved: BTreeMap::new(),
            taken: false,
        };
        holder.outgoing.insert(name.to_string(), held);
        drop(holder);
        Ok(self.handle(name, id, Direction::Outgoing))
    }

    fn retrieve_session(&mut self, name: &str) -> Result<Box<dyn Session>, SessionError> {
        check_name(name)?;
        let mut holder = lock(&self.holder);
        let held = holder.incoming.get_mut(name).filter(|held| !held.taken);
        let Some(held) = held else {
            return Err(SessionError::NoSuchSession {
                name: name.to_string(),
            });
        };
        held.taken = true;
        let id = held.id;
        drop(holder);
        Ok(self.handle(name, id, Direction::Incoming))
    }

    /// Takes back a session from files named by their token in hex ([`Session::export_fds`]).
    fn adopt(
        &mut self,
        name: &str,
        side: AdoptAs,
        fds: Vec<(String, OwnedFd)>,
    ) -> Result<Option<Box<dyn Session>>, SessionError> {
        check_name(name)?;
        let mut files = BTreeMap::new();
        for (token_name, fd) in fds {
            let token = Token::from_str_radix(&token_name, 16).map_err(|_| SessionError::Os {
                operation: "adopt",
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{token_name:?} names no token"),
                ),
            })?;
            files.insert(token, EmulatedSession::take_reference(fd.as_fd())?);
        }
        let mut holder = lock(&self.holder);
        let id = holder.next_id;
        holder.next_id += 1;
        let (list, direction) = match side {
            AdoptAs::Outgoing => (&mut holder.outgoing, Direction::Outgoing),
            AdoptAs::HandedOver | AdoptAs::Retrieved => (&mut holder.incoming, Direction::Incoming),
        };
        if list.contains_key(name) {
            return Err(SessionError::SessionExists {
                name: name.to_string(),
            });
        }
        let held = HeldSession {
            id,
            files,
            retrieved: BTreeMap::new(),
            taken: side == AdoptAs::Retrieved,
        };
        list.insert(name.to_string(), held);
        drop(holder);
        Ok((side != AdoptAs::HandedOver).then(|| self.handle(name, id, direction)))
    }
}

/// A handle to one session of an [`EmulatedProvider`] (what a session fd is for the kernel).
#[derive(Debug)]
pub struct EmulatedSession {
    holder: Arc<Mutex<Holder>>,
    name: String,
    id: u64,
    direction: Direction,
}

impl EmulatedSession {
    fn wrong_direction(operation: &'static str, direction: Direction) -> SessionError {
        SessionError::WrongDirection {
            operation,
            direction: direction.as_str(),
        }
    }

    fn gone(&self) -> SessionError {
        SessionError::NoSuchSession {
            name: self.name.clone(),
        }
    }

    /// Reads the file's identity and checks it is preservable; returns the holder's dup.
    fn take_reference(fd: BorrowedFd<'_>) -> Result<PreservedFile, SessionError> {
        let os = |source| SessionError::Os {
            operation: "preserve_fd",
            source,
        };
        let file = File::from(fd.try_clone_to_owned().map_err(os)?);
        let meta = check_preservable_file(&file)?;
        Ok(PreservedFile {
            fd: OwnedFd::from(file),
            key: (meta.dev(), meta.ino()),
        })
    }
}

impl Session for EmulatedSession {
    fn name(&self) -> Result<String, SessionError> {
        Ok(self.name.clone())
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        const OP: &str = "preserve_fd";
        if self.direction == Direction::Incoming {
            return Err(Self::wrong_direction(OP, Direction::Incoming));
        }
        let mut holder = lock(&self.holder);
        let Some(held) = holder.outgoing.get(&self.name).filter(|h| h.id == self.id) else {
            // Only a handover removes an outgoing session while a handle lives.
            return Err(Self::wrong_direction(OP, Direction::Incoming));
        };
        if held.files.contains_key(&token) {
            return Err(SessionError::TokenExists { token });
        }
        let file = Self::take_reference(fd)?;
        if holder.manages(file.key) {
            return Err(SessionError::AlreadyPreserved);
        }
        let held = holder
            .outgoing
            .get_mut(&self.name)
            .ok_or_else(|| self.gone())?;
        held.files.insert(token, file);
        Ok(())
    }

    /// Gives the file under `token` out once; a second call fails with
    /// [`SessionError::AlreadyRetrieved`] (the kernel would return another fd: module docs).
    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        if self.direction == Direction::Outgoing {
            return Err(Self::wrong_direction("retrieve_fd", Direction::Outgoing));
        }
        let mut holder = lock(&self.holder);
        let held = holder
            .incoming
            .get_mut(&self.name)
            .filter(|h| h.id == self.id);
        let held = held.ok_or_else(|| self.gone())?;
        if let Some(file) = held.files.remove(&token) {
            held.retrieved.insert(token, file.key);
            return Ok(file.fd);
        }
        if held.retrieved.contains_key(&token) {
            return Err(SessionError::AlreadyRetrieved { token });
        }
        Err(SessionError::NoSuchToken { token })
    }

    /// The files the holder has for this session (incoming: those not retrieved yet), each
    /// named by its token in hex.
    fn export_fds(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        let holder = lock(&self.holder);
        let list = match self.direction {
            Direction::Outgoing => &holder.outgoing,
            Direction::Incoming => &holder.incoming,
        };
        let held = list
            .get(&self.name)
            .filter(|h| h.id == self.id)
            .ok_or_else(|| self.gone())?;
        held.files
            .iter()
            .map(|(token, file)| {
                let copy = file.fd.try_clone().map_err(|source| SessionError::Os {
                    operation: "export_fds",
                    source,
                })?;
                Ok((format!("{token:x}"), copy))
            })
            .collect()
    }

    fn finish(&mut self) -> Result<(), SessionError> {
        if self.direction == Direction::Outgoing {
            return Err(Self::wrong_direction("finish", Direction::Outgoing));
        }
        let mut holder = lock(&self.holder);
        match holder.incoming.get(&self.name) {
            Some(held) if held.id == self.id => {
                // Dropping the entry closes the holder's copies of unretrieved files.
                holder.incoming.remove(&self.name);
                Ok(())
            }
            _ => Err(self.gone()),
        }
    }
}

impl Drop for EmulatedSession {
    fn drop(&mut self) {
        let mut holder = lock(&self.holder);
        let list = match self.direction {
            Direction::Outgoing => &mut holder.outgoing,
            Direction::Incoming => &mut holder.incoming,
        };
        if list.get(&self.name).is_some_and(|held| held.id == self.id) {
            // Outgoing: discarded as when the last session fd closes before kexec.
            // Incoming: the implicit finish of a close.
            list.remove(&self.name);
            log::debug!(
                "{} session {:?} released on drop",
                self.direction.as_str(),
                self.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    use super::*;
    use crate::sys::mapping::SharedMapping;

    const PAGE: usize = 4096;

    fn memfd() -> OwnedFd {
        let fd = sys::memfd_create("emulated-test", 0).unwrap();
        File::from(fd.try_clone().unwrap())
            .set_len(PAGE as u64)
            .unwrap();
        fd
    }

    fn provider_with_incoming(name: &str, files: &[(Token, &OwnedFd)]) -> EmulatedProvider {
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session(name).unwrap();
        for (token, fd) in files {
            session.preserve_fd(fd.as_fd(), *token).unwrap();
        }
        provider.handover(name).unwrap();
        drop(session);
        provider
    }

    #[test]
    fn duplicate_outgoing_name_gives_session_exists() {
        let mut provider = EmulatedProvider::new();
        let _first = provider.create_session("vm").unwrap();

        let err = provider.create_session("vm").unwrap_err();

        assert!(matches!(err, SessionError::SessionExists { name } if name == "vm"));
    }

    #[test]
    fn invalid_name_is_refused() {
        let mut provider = EmulatedProvider::new();

        let err = provider.create_session(&"x".repeat(64)).unwrap_err();

        assert!(matches!(err, SessionError::InvalidName { .. }));
    }

    #[test]
    fn same_name_may_be_outgoing_and_incoming() {
        let mut provider = provider_with_incoming("vm", &[]);

        let _outgoing = provider.create_session("vm").unwrap();

        let directions: Vec<Direction> = provider.sessions().iter().map(|s| s.direction).collect();
        assert_eq!(directions, [Direction::Outgoing, Direction::Incoming]);
    }

    #[test]
    fn duplicate_token_gives_token_exists() {
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let (a, b) = (memfd(), memfd());
        session.preserve_fd(a.as_fd(), 7).unwrap();

        let err = session.preserve_fd(b.as_fd(), 7).unwrap_err();

        assert!(matches!(err, SessionError::TokenExists { token: 7 }));
    }

    #[test]
    fn same_memfd_in_another_session_gives_already_preserved() {
        let mut provider = EmulatedProvider::new();
        let mut first = provider.create_session("a").unwrap();
        let mut second = provider.create_session("b").unwrap();
        let file = memfd();
        first.preserve_fd(file.as_fd(), 1).unwrap();
        let dup = file.try_clone().unwrap();

        let err = second.preserve_fd(dup.as_fd(), 2).unwrap_err();

        assert!(matches!(err, SessionError::AlreadyPreserved));
    }

    #[test]
    fn same_memfd_under_another_token_gives_already_preserved() {
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("a").unwrap();
        let file = memfd();
        session.preserve_fd(file.as_fd(), 1).unwrap();

        let err = session.preserve_fd(file.as_fd(), 2).unwrap_err();

        assert!(matches!(err, SessionError::AlreadyPreserved));
    }

    #[test]
    fn hugetlb_memfd_is_unpreservable() {
        let huge = sys::memfd_create("huge", libc::MFD_HUGETLB)
            .expect("memfd_create(MFD_HUGETLB) failed: the host kernel needs CONFIG_HUGETLBFS");
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();

        let err = session.preserve_fd(huge.as_fd(), 1).unwrap_err();

        assert!(matches!(err, SessionError::Unpreservable));
    }

    #[test]
    fn hugetlbfs_magic_is_classified_unpreservable() {
        assert!(matches!(
            check_preservable(HUGETLBFS_MAGIC, true, 0),
            Err(SessionError::Unpreservable)
        ));
        check_preservable(TMPFS_MAGIC, true, 0).unwrap();
    }

    #[test]
    fn linked_tmpfs_file_and_non_regular_file_are_classified_unpreservable() {
        assert!(matches!(
            check_preservable(TMPFS_MAGIC, true, 1),
            Err(SessionError::Unpreservable)
        ));
        assert!(matches!(
            check_preservable(TMPFS_MAGIC, false, 0),
            Err(SessionError::Unpreservable)
        ));
    }

    #[test]
    fn regular_file_is_unpreservable() {
        let path = std::env::temp_dir().join(format!("luo-emulated-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();

        let result = session.preserve_fd(file.as_fd(), 1);

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(result, Err(SessionError::Unpreservable)));
    }

    #[test]
    fn dev_null_is_unpreservable() {
        let null = File::open("/dev/null").unwrap();
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();

        let err = session.preserve_fd(null.as_fd(), 1).unwrap_err();

        assert!(matches!(err, SessionError::Unpreservable));
    }

    #[test]
    fn attaching_an_fd_is_refused_as_restart_agent_only() {
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();

        let result = session.attach_fd(socket.as_fd(), 1);

        assert!(
            matches!(result, Err(SessionError::AttachmentsUnsupported)),
            "{result:?}"
        );
    }

    #[test]
    fn dropped_outgoing_session_is_discarded_with_its_files() {
        let mut provider = EmulatedProvider::new();
        let file = memfd();
        let mut session = provider.create_session("vm").unwrap();
        session.preserve_fd(file.as_fd(), 1).unwrap();

        drop(session);

        assert!(provider.sessions().is_empty());
        assert!(provider.handover("vm").is_err());
        let mut again = provider.create_session("other").unwrap();
        again.preserve_fd(file.as_fd(), 1).unwrap(); // no longer managed
    }

    #[test]
    fn handover_keeps_the_session_after_its_old_handle_drops() {
        let mut provider = EmulatedProvider::new();
        let session = provider.create_session("vm").unwrap();

        provider.handover("vm").unwrap();
        drop(session);

        assert_eq!(provider.sessions()[0].direction, Direction::Incoming);
        provider.retrieve_session("vm").unwrap();
    }

    #[test]
    fn handover_of_unknown_session_fails() {
        let provider = EmulatedProvider::new();

        let err = provider.handover("nobody").unwrap_err();

        assert!(matches!(
            err,
            SessionError::Os {
                operation: "handover",
                ..
            }
        ));
    }

    #[test]
    fn handover_replaces_an_unfinished_incoming_session_of_the_same_name() {
        let (old_file, new_file) = (memfd(), memfd());
        let mut provider = provider_with_incoming("vm", &[(1, &old_file)]);
        let mut stale = provider.retrieve_session("vm").unwrap();
        let mut next = provider.create_session("vm").unwrap();
        next.preserve_fd(new_file.as_fd(), 2).unwrap();

        provider.handover("vm").unwrap();

        assert!(matches!(
            stale.retrieve_fd(1),
            Err(SessionError::NoSuchSession { .. })
        ));
        drop(stale);
        let mut fresh = provider.retrieve_session("vm").unwrap();
        fresh.retrieve_fd(2).unwrap();
    }

    #[test]
    fn handover_all_moves_every_outgoing_session() {
        let mut provider = EmulatedProvider::new();
        let _a = provider.create_session("a").unwrap();
        let _b = provider.create_session("b").unwrap();

        let names = provider.handover_all();

        assert_eq!(names, ["a", "b"]);
        assert!(
            provider
                .sessions()
                .iter()
                .all(|s| s.direction == Direction::Incoming)
        );
    }

    #[test]
    fn retrieved_file_is_the_same_memfd_in_content_and_mapping() {
        let original = memfd();
        let mut writer = File::from(original.try_clone().unwrap());
        writer.write_all(b"written before preserve").unwrap();
        let mut provider = provider_with_incoming("vm", &[(5, &original)]);
        let mut session = provider.retrieve_session("vm").unwrap();

        let retrieved = session.retrieve_fd(5).unwrap();

        let mut reader = File::from(retrieved.try_clone().unwrap());
        let mut text = [0u8; 23];
        reader.seek(SeekFrom::Start(0)).unwrap();
        reader.read_exact(&mut text).unwrap();
        assert_eq!(&text, b"written before preserve");
        let old_map = SharedMapping::new(&original, PAGE).unwrap();
        let new_map = SharedMapping::new(&retrieved, PAGE).unwrap();
        old_map.write(100, b"through the old mapping");
        assert_eq!(new_map.read(100, 23), b"through the old mapping");
    }

    #[test]
    fn second_retrieve_session_gives_no_such_session() {
        let mut provider = provider_with_incoming("vm", &[]);
        let _session = provider.retrieve_session("vm").unwrap();

        let err = provider.retrieve_session("vm").unwrap_err();

        assert!(matches!(err, SessionError::NoSuchSession { name } if name == "vm"));
    }

    #[test]
    fn second_retrieve_of_the_same_token_gives_already_retrieved() {
        let file = memfd();
        let mut provider = provider_with_incoming("vm", &[(9, &file)]);
        let mut session = provider.retrieve_session("vm").unwrap();
        let _first = session.retrieve_fd(9).unwrap();

        let err = session.retrieve_fd(9).unwrap_err();

        assert!(matches!(err, SessionError::AlreadyRetrieved { token: 9 }));
    }

    #[test]
    fn unknown_token_gives_no_such_token() {
        let mut provider = provider_with_incoming("vm", &[]);
        let mut session = provider.retrieve_session("vm").unwrap();

        let err = session.retrieve_fd(3).unwrap_err();

        assert!(matches!(err, SessionError::NoSuchToken { token: 3 }));
    }

    #[test]
    fn finish_releases_the_session_and_drops_unretrieved_files() {
        let (kept, dropped) = (memfd(), memfd());
        let mut provider = provider_with_incoming("vm", &[(1, &kept), (2, &dropped)]);
        let mut session = provider.retrieve_session("vm").unwrap();
        let _kept = session.retrieve_fd(1).unwrap();

        session.finish().unwrap();

        assert!(provider.sessions().is_empty());
        assert!(matches!(
            session.retrieve_fd(2),
            Err(SessionError::NoSuchSession { .. })
        ));
        let mut next = provider.create_session("vm").unwrap();
        next.preserve_fd(kept.as_fd(), 1).unwrap();
        next.preserve_fd(dropped.as_fd(), 2).unwrap();
    }

    #[test]
    fn preserved_file_stays_busy_until_the_incoming_session_finishes() {
        let file = memfd();
        let mut provider = provider_with_incoming("vm", &[(1, &file)]);
        let mut incoming = provider.retrieve_session("vm").unwrap();
        let retrieved = incoming.retrieve_fd(1).unwrap();
        let mut next = provider.create_session("vm").unwrap();

        let err = next.preserve_fd(retrieved.as_fd(), 1).unwrap_err();

        assert!(matches!(err, SessionError::AlreadyPreserved));
        incoming.finish().unwrap();
        next.preserve_fd(retrieved.as_fd(), 1).unwrap();
    }

    #[test]
    fn dropping_a_retrieved_session_finishes_it() {
        let mut provider = provider_with_incoming("vm", &[]);
        let session = provider.retrieve_session("vm").unwrap();

        drop(session);

        assert!(provider.sessions().is_empty());
    }

    #[test]
    fn preserve_on_incoming_gives_wrong_direction() {
        let file = memfd();
        let mut provider = provider_with_incoming("vm", &[]);
        let mut session = provider.retrieve_session("vm").unwrap();

        let err = session.preserve_fd(file.as_fd(), 1).unwrap_err();

        assert!(matches!(
            err,
            SessionError::WrongDirection {
                operation: "preserve_fd",
                direction: "incoming"
            }
        ));
    }

    #[test]
    fn retrieve_fd_and_finish_on_outgoing_give_wrong_direction() {
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();

        let retrieve = session.retrieve_fd(1).unwrap_err();
        let finish = session.finish().unwrap_err();

        assert!(matches!(
            retrieve,
            SessionError::WrongDirection {
                operation: "retrieve_fd",
                direction: "outgoing"
            }
        ));
        assert!(matches!(
            finish,
            SessionError::WrongDirection {
                operation: "finish",
                direction: "outgoing"
            }
        ));
    }

    #[test]
    fn preserve_through_a_handle_after_handover_gives_wrong_direction() {
        let file = memfd();
        let mut provider = EmulatedProvider::new();
        let mut session = provider.create_session("vm").unwrap();
        provider.handover("vm").unwrap();

        let err = session.preserve_fd(file.as_fd(), 1).unwrap_err();

        assert!(matches!(
            err,
            SessionError::WrongDirection {
                direction: "incoming",
                ..
            }
        ));
    }

    #[test]
    fn sessions_lists_names_directions_and_tokens() {
        let (a, b) = (memfd(), memfd());
        let mut provider = provider_with_incoming("in", &[(4, &a)]);
        let mut out = provider.create_session("out").unwrap();
        out.preserve_fd(b.as_fd(), 2).unwrap();

        let list = provider.sessions();

        let expected = [
            SessionInfo {
                name: "out".into(),
                direction: Direction::Outgoing,
                tokens: vec![2],
            },
            SessionInfo {
                name: "in".into(),
                direction: Direction::Incoming,
                tokens: vec![4],
            },
        ];
        assert_eq!(list, expected);
    }

    #[test]
    fn clones_share_sessions_across_threads() {
        let provider = EmulatedProvider::new();
        let mut clone = provider.clone();

        let session = std::thread::spawn(move || clone.create_session("vm").unwrap())
            .join()
            .unwrap();

        assert_eq!(provider.sessions().len(), 1);
        assert_eq!(session.name().unwrap(), "vm");
    }
}
