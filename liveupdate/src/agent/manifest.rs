//! Kernel mode: what the agent tells the agent of the next kernel.
//!
//! Right before the kexec the agent preserves one session of its own, [`MANIFEST_SESSION`],
//! holding a small JSON [`Manifest`]: every frozen session's name, its owner, and the tokens of
//! its memfds (guest RAM, the saved state). The agent of the new kernel reads it as it starts,
//! before it serves anyone: it retrieves those sessions for their owners (so owners outlive the
//! kexec), and then, on a thread of its own while it already serves, their memfds.
//!
//! Why: LUO gives back a memfd by rebuilding its page cache folio by folio, in the
//! `RETRIEVE_FD` call: the one step of a restore after a kexec that grows with guest RAM
//! (measured in the QEMU test bed, 7-9 ms per GiB with 2 MiB folios under TCG). Done as the
//! agent starts, it overlaps the rest of the host's boot and the VMM's own start instead of
//! lying in the restoring VMM's path; a VMM that asks first simply retrieves it itself.
//!
//! The manifest is only a hint: without one (an older agent, or none, before the kexec) every
//! session waits to be retrieved as before, and a failure to write or read it costs nothing
//! but the head start.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::state::{AgentState, Held};
use crate::session::{Session, SessionError, SessionProvider, Token};

/// The agent's own session; no VMM may create a session of this name.
pub const MANIFEST_SESSION: &str = "ch-luod.manifest";
/// The manifest's file in [`MANIFEST_SESSION`].
const MANIFEST_TOKEN: Token = 1;
/// The longest manifest read back (a few hundred bytes per session).
const MAX_MANIFEST_LEN: u64 = 1 << 20;
const VERSION: u32 = 1;

/// What the next kernel's agent learns of the sessions handed over to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (unknown fields are ignored; a newer version is read as far as it fits).
    pub version: u32,
    /// The frozen sessions.
    pub sessions: Vec<Entry>,
}

/// One frozen session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The session's name.
    pub name: String,
    /// The uid that created it.
    #[serde(default)]
    pub owner: Option<u32>,
    /// Tokens of its memfds, for the new agent to retrieve ahead.
    #[serde(default)]
    pub memfds: Vec<Token>,
}

impl Manifest {
    /// A manifest of `sessions`.
    pub fn new(sessions: Vec<Entry>) -> Self {
        Self {
            version: VERSION,
            sessions,
        }
    }

    /// Preserves this manifest in a new outgoing session of `provider`, which must stay open
    /// until the kexec (dropping it discards the manifest).
    pub fn preserve(&self, provider: &mut dyn SessionProvider) -> Result<Box<dyn Session>, String> {
        let json = serde_json::to_vec(self).map_err(|e| format!("cannot encode it: {e}"))?;
        let memfd = crate::sys::memfd_create("ch-luod-manifest", 0)
            .map_err(|e| format!("cannot create its memfd: {e}"))?;
        File::from(
            memfd
                .try_clone()
                .map_err(|e| format!("cannot dup its memfd: {e}"))?,
        )
        .write_all(&json)
        .map_err(|e| format!("cannot write it: {e}"))?;
        let mut session = provider
            .create_session(MANIFEST_SESSION)
            .map_err(|e| format!("cannot create session {MANIFEST_SESSION:?}: {e}"))?;
        session
            .preserve_fd(memfd.as_fd(), MANIFEST_TOKEN)
            .map_err(|e| format!("cannot preserve it: {e}"))?;
        Ok(session)
    }

    /// The manifest the previous kernel's agent left, read and its session finished; `None`
    /// when there is none.
    pub fn take(provider: &mut dyn SessionProvider) -> Result<Option<Self>, String> {
        let mut session = match provider.retrieve_session(MANIFEST_SESSION) {
            Ok(session) => session,
            Err(SessionError::NoSuchSession { .. }) => return Ok(None),
            Err(e) => return Err(format!("cannot retrieve session {MANIFEST_SESSION:?}: {e}")),
        };
        let read = session
            .retrieve_fd(MANIFEST_TOKEN)
            .map_err(|e| format!("cannot retrieve its file: {e}"))
            .and_then(read_manifest);
        if let Err(e) = session.finish() {
            warn!("Cannot finish session {MANIFEST_SESSION:?}: {e}");
        }
        read.map(Some)
    }
}

fn read_manifest(fd: OwnedFd) -> Result<Manifest, String> {
    let file = File::from(fd);
    let len = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    if len > MAX_MANIFEST_LEN {
        return Err(format!("it is longer than {MAX_MANIFEST_LEN} bytes"));
    }
    // From the start, whatever the file's offset.
    let mut json = vec![0; usize::try_from(len).map_err(|e| e.to_string())?];
    file.read_exact_at(&mut json, 0)
        .map_err(|e| format!("cannot read it: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("it is not a manifest: {e}"))
}

/// Kernel mode's manifest, on both sides of the kexec.
impl AgentState {
    /// Right before the reboot: preserves the manifest of every frozen session. A failure
    /// is only logged: the sessions themselves cross the kexec all the same.
    pub(super) fn preserve_manifest(&mut self) {
        let entries = self
            .outgoing
            .iter()
            .filter(|(_, held)| held.frozen)
            .map(|(name, held)| Entry {
                name: name.clone(),
                owner: held.owner,
                memfds: held.memfds.clone(),
            })
            .collect();
        // A failed reboot dropped the last one; nothing else may hold the name.
        self.manifest = None;
        match Manifest::new(entries).preserve(self.provider.as_mut()) {
            Ok(session) => self.manifest = Some(session),
            Err(e) => warn!("kexec: no manifest for the next kernel's agent ({e})"),
        }
    }

    /// As the agent starts after a kexec, before it serves: retrieves the sessions the last
    /// kernel's agent named, for their owners. Returns the memfds to retrieve ahead
    /// ([`Self::retrieve_ahead`]), by session name and token.
    pub fn take_manifest(&mut self) -> Vec<(String, Token)> {
        let manifest = match Manifest::take(self.provider.as_mut()) {
            Ok(Some(manifest)) => manifest,
            Ok(None) => return Vec::new(),
            Err(e) => {
                warn!("The last kernel's agent left a manifest that cannot be read: {e}");
                return Vec::new();
            }
        };
        let mut ahead = Vec::new();
        for entry in manifest.sessions {
            let name = entry.name;
            if self.incoming.contains_key(&name) {
                continue;
            }
            let session = match self.provider.retrieve_session(&name) {
                Ok(session) => session,
                Err(e) => {
                    warn!("session {name:?} of the manifest cannot be retrieved: {e}");
                    continue;
                }
            };
            info!(
                "session {name:?} retrieved for uid {} (the last kernel's agent named it)",
                entry
                    .owner
                    .map_or_else(|| "unknown".into(), |uid| uid.to_string())
            );
            ahead.extend(entry.memfds.iter().map(|&token| (name.clone(), token)));
            self.incoming.insert(name, Held::new(session, entry.owner));
        }
        ahead
    }

    /// Retrieves the file under `token` of incoming session `name` unless it is held already
    /// (or the session is gone). A failure is left for the session's VMM to meet: LUO answers
    /// its own retrieve with the same error.
    pub fn retrieve_ahead(&mut self, name: &str, token: Token) {
        let Some(held) = self.incoming.get_mut(name) else {
            return;
        };
        if let Err(e) = held.retrieve(token) {
            warn!("session {name:?}: token {token:#x} not retrieved ahead: {e}");
        }
    }
}

/// Whether `fd` is a file LUO's memfd handler preserves: an unlinked shmem file (a memfd, or
/// one a retrieve after an earlier kexec gave back, whose name is no longer `memfd:`).
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    fd.try_clone_to_owned()
        .map(File::from)
        .is_ok_and(|file| crate::emulated::check_preservable_file(&file).is_ok())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    use std::sync::Arc;

    use super::*;
    use crate::agent::fdstore::{Collect, FdStore, rebuild};
    use crate::agent::protocol::{Direction, ErrorKind, Request, Response};
    use crate::agent::state::HandoverMode;
    use crate::agent::state::tests::{
        FakeKexec, OTHER, OWNER, create, error_kind, handover, image, ok, retrieve,
    };
    use crate::emulated::EmulatedProvider;

    fn kernel_agent(provider: &EmulatedProvider) -> AgentState {
        let kexec = Arc::new(FakeKexec::default());
        AgentState::new(Box::new(provider.clone()), HandoverMode::Kexec(kexec), 0)
    }

    fn preserve(name: &str, token: Token) -> Request {
        Request::Preserve {
            name: name.into(),
            token,
        }
    }

    fn inode(fd: BorrowedFd<'_>) -> u64 {
        File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    #[test]
    fn the_next_kernels_agent_takes_the_named_sessions_for_their_owners_and_their_memfds_ahead() {
        let provider = EmulatedProvider::new();
        let mut old = kernel_agent(&provider);
        let ram = crate::sys::memfd_create("guest-ram", 0).unwrap();
        let state = crate::sys::memfd_create("state", 0).unwrap();
        ok(&mut old, create("vm"), OWNER, None);
        ok(
            &mut old,
            preserve("vm", 1),
            OWNER,
            Some(ram.try_clone().unwrap()),
        );
        ok(&mut old, create("other"), OTHER, None);
        ok(&mut old, preserve("other", 2), OTHER, Some(state));
        ok(&mut old, handover("vm"), OWNER, None);
        ok(&mut old, handover("other"), OTHER, None);
        old.preserve_manifest();
        // The kexec: every outgoing session comes back incoming, to a new agent.
        provider.handover_all();
        drop(old);
        let mut new = kernel_agent(&provider);

        let ahead = new.take_manifest();
        assert_eq!(ahead, vec![("other".to_string(), 2), ("vm".to_string(), 1)]);
        let listed: Vec<_> = new
            .list()
            .into_iter()
            .map(|s| (s.name, s.direction, s.owner_uid))
            .collect();
        assert_eq!(
            listed,
            [
                ("other".into(), Direction::Incoming, Some(OTHER)),
                ("vm".into(), Direction::Incoming, Some(OWNER))
            ]
        );
        for (name, token) in &ahead {
            new.retrieve_ahead(name, *token);
        }
        assert!(new.incoming["vm"].files.contains_key(&1));

        assert_eq!(
            error_kind(&mut new, retrieve("vm"), OTHER, None),
            ErrorKind::PermissionDenied
        );
        ok(&mut new, retrieve("vm"), OWNER, None);
        let request = Request::RetrieveFd {
            name: "vm".into(),
            token: 1,
        };
        let (response, fd) = new.handle(request, OWNER, None);
        assert_eq!(response, Response::Ok);
        assert_eq!(inode(fd.unwrap().as_fd()), inode(ram.as_fd()));
        // The manifest's own session is finished and gone.
        assert!(
            provider
                .sessions()
                .iter()
                .all(|s| s.name != MANIFEST_SESSION)
        );
    }

    #[test]
    fn an_agent_taken_back_from_its_fd_store_before_the_kexec_still_names_the_memfds() {
        let first_provider = EmulatedProvider::new();
        let mut first = kernel_agent(&first_provider);
        let ram = crate::sys::memfd_create("guest-ram", 0).unwrap();
        ok(&mut first, create("vm"), OWNER, None);
        ok(&mut first, preserve("vm", 7), OWNER, Some(ram));
        let sink = Collect::default();
        FdStore::new(Box::new(sink.clone()), &[])
            .unwrap()
            .sync(&first)
            .unwrap();
        let provider = EmulatedProvider::new();
        let mut again = kernel_agent(&provider);
        again
            .import(rebuild(sink.take()).unwrap().sessions)
            .unwrap();
        drop(first);

        ok(&mut again, handover("vm"), OWNER, None);
        again.preserve_manifest();
        provider.handover_all();
        drop(again);

        assert_eq!(
            kernel_agent(&provider).take_manifest(),
            vec![("vm".to_string(), 7)]
        );
    }

    #[test]
    fn without_a_manifest_a_session_from_before_the_kexec_stays_for_root_to_retrieve() {
        let provider = EmulatedProvider::new();
        let mut old = kernel_agent(&provider);
        ok(&mut old, create("vm"), OWNER, None);
        ok(&mut old, handover("vm"), OWNER, None);
        provider.handover_all();
        drop(old);
        let mut new = kernel_agent(&provider);

        assert!(new.take_manifest().is_empty());
        assert!(new.list().is_empty());
        assert_eq!(
            error_kind(&mut new, retrieve("vm"), OWNER, None),
            ErrorKind::PermissionDenied
        );
        ok(&mut new, retrieve("vm"), 0, None);
    }

    #[test]
    fn a_failed_reboot_drops_the_manifest_and_the_next_one_writes_it_again() {
        let provider = EmulatedProvider::new();
        let mut agent = kernel_agent(&provider);
        ok(&mut agent, create("vm"), OWNER, None);
        ok(&mut agent, handover("vm"), OWNER, None);
        agent.start_kexec(0, &image()).unwrap();

        agent.reboot();

        assert!(agent.manifest.is_none());
        assert!(
            provider
                .sessions()
                .iter()
                .all(|s| s.name != MANIFEST_SESSION)
        );
        agent.preserve_manifest();
        assert!(agent.manifest.is_some());
    }

    #[test]
    fn no_vmm_may_take_the_manifests_name() {
        let provider = EmulatedProvider::new();
        let mut agent = kernel_agent(&provider);
        assert_eq!(
            error_kind(&mut agent, create(MANIFEST_SESSION), OWNER, None),
            ErrorKind::InvalidName
        );
    }

    fn manifest() -> Manifest {
        Manifest::new(vec![
            Entry {
                name: "vm1".into(),
                owner: Some(1000),
                memfds: vec![1, 5],
            },
            Entry {
                name: "vm2".into(),
                owner: None,
                memfds: vec![],
            },
        ])
    }

    #[test]
    fn a_preserved_manifest_is_read_back_once_across_the_handover() {
        let mut provider = EmulatedProvider::new();
        let session = manifest().preserve(&mut provider).unwrap();
        provider.handover(MANIFEST_SESSION).unwrap();
        drop(session);

        assert_eq!(Manifest::take(&mut provider).unwrap(), Some(manifest()));
        assert_eq!(Manifest::take(&mut provider).unwrap(), None);
    }

    #[test]
    fn no_manifest_is_none_and_a_bad_one_an_error() {
        let mut provider = EmulatedProvider::new();
        assert_eq!(Manifest::take(&mut provider).unwrap(), None);

        let memfd = crate::sys::memfd_create("not-a-manifest", 0).unwrap();
        File::from(memfd.try_clone().unwrap())
            .write_all(b"{\"sessions\": 3}")
            .unwrap();
        let mut session = provider.create_session(MANIFEST_SESSION).unwrap();
        session.preserve_fd(memfd.as_fd(), MANIFEST_TOKEN).unwrap();
        provider.handover(MANIFEST_SESSION).unwrap();

        let error = Manifest::take(&mut provider).unwrap_err();
        assert!(error.contains("not a manifest"), "{error}");
    }

    #[test]
    fn unlinked_shmem_files_are_told_from_other_files() {
        let memfd = crate::sys::memfd_create("guest-ram", 0).unwrap();
        // As a memfd retrieved after a kexec: shmem, unlinked, not named `memfd:`.
        let unnamed = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open("/dev/shm")
            .unwrap();
        let proc_file = File::open("/proc/self/stat").unwrap();
        assert!(is_memfd(memfd.as_fd()));
        assert!(is_memfd(unnamed.as_fd()));
        assert!(!is_memfd(proc_file.as_fd()));
    }
}
