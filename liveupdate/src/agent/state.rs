//! What the agent holds and how it answers each request, apart from sockets (so the ownership
//! rules can be tested with any uid).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use log::{info, warn};

use super::attachments::Attachments;
use super::ended::{Creator, Ended, EndedSessions};
use super::fdstore::{Exported, Imported, Role, SessionRecord, Side};
use super::kexec::{KexecPhase, SharedKexecOps};
use super::manifest::{MANIFEST_SESSION, is_memfd};
use super::pause_slots::PauseSlots;
use super::protocol::{Direction, ErrorKind, Request, Response, SessionInfo, VERSION, WireError};
use crate::session::{AdoptAs, Session, SessionError, SessionProvider, Token};

/// Hands a session over in restart mode (e.g. `EmulatedProvider::handover`).
pub type HandoverFn = Box<dyn FnMut(&str) -> Result<(), SessionError> + Send>;

/// What `handover` means for this agent.
pub enum HandoverMode {
    /// Kernel mode: the session is frozen and held until the kexec (see [`super::kexec`]).
    Kexec(SharedKexecOps),
    /// Restart mode: the session moves to the incoming side at once.
    Restart(HandoverFn),
}

impl std::fmt::Debug for HandoverMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl HandoverMode {
    /// "kernel" or "restart".
    pub fn name(&self) -> &'static str {
        match self {
            HandoverMode::Kexec(_) => "kernel",
            HandoverMode::Restart(_) => "restart",
        }
    }
}

/// A session the agent holds for a VMM.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) session: Box<dyn Session>,
    pub(super) owner: Option<u32>,
    pub(super) tokens: Vec<Token>,
    /// Outgoing: the tokens of preserved memfds, which the next kernel's agent retrieves ahead
    /// (see [`super::manifest`]).
    pub(super) memfds: Vec<Token>,
    pub(super) frozen: bool,
    /// Incoming: files retrieved from the provider, kept until FINISH, so a VMM that refuses
    /// the session's state (a newer format, say) leaves it retrievable, with every file, for
    /// one that can read it. Outgoing, restart mode: copies of the preserved files, for `peek`.
    pub(super) files: BTreeMap<Token, OwnedFd>,
    /// Kernel mode: why the kexec this frozen session waited for failed (answers `handover`).
    pub(super) verdict: Option<WireError>,
    /// Restart mode: fds of any kind for the successor, never given to the provider.
    attachments: Attachments,
}

impl Held {
    /// `session`, owned by `owner`, holding nothing yet.
    pub(super) fn new(session: Box<dyn Session>, owner: Option<u32>) -> Self {
        Self {
            session,
            owner,
            tokens: Vec::new(),
            memfds: Vec::new(),
            frozen: false,
            files: BTreeMap::new(),
            verdict: None,
            attachments: Attachments::default(),
        }
    }

    /// Incoming: retrieves the file under `token` from the provider unless it is held
    /// already, and lists its token as retrieved.
    pub(super) fn retrieve(&mut self, token: Token) -> Result<(), SessionError> {
        if !self.files.contains_key(&token) {
            let fd = self.session.retrieve_fd(token)?;
            self.files.insert(token, fd);
        }
        if !self.tokens.contains(&token) {
            self.tokens.push(token);
        }
        Ok(())
    }
}

/// A session handed over (restart mode) and not retrieved yet.
#[derive(Debug)]
struct HandedOver {
    owner: u32,
    tokens: Vec<Token>,
    attachments: Attachments,
    /// The agent's copies of the files (the holder has the same files), for the fd store.
    files: BTreeMap<Token, OwnedFd>,
}

/// Everything the agent holds: the provider and the sessions, by side.
pub struct AgentState {
    pub(super) provider: Box<dyn SessionProvider>,
    pub(super) handover: HandoverMode,
    /// The agent's own uid: may retrieve incoming sessions whose owner is unknown.
    pub(super) agent_uid: u32,
    pub(super) outgoing: BTreeMap<String, Held>,
    /// Restart mode: handed over, not yet retrieved (owner and tokens remembered).
    handed_over: BTreeMap<String, HandedOver>,
    /// Successors started ahead, by session name: false once one peeked, true once it is ready.
    successors: BTreeMap<String, bool>,
    pub(super) incoming: BTreeMap<String, Held>,
    pub(super) kexec: KexecPhase,
    /// Kernel mode, from the kexec's reboot on: the manifest's session (see
    /// [`super::manifest`]), kept open until the machine is gone.
    pub(super) manifest: Option<Box<dyn Session>>,
    /// Sessions resumed by a successor or abandoned by a dead VMM: why, for later requests.
    ended: EndedSessions,
    /// The process that created each outgoing session (see [`Self::watch_creator`]).
    creators: BTreeMap<String, Creator>,
    /// Restart mode: how many guests may be paused for an update at once.
    pause_slots: PauseSlots,
    /// Sessions released by a successor's `resumed`, to close once it has its answer (its
    /// guest waits for that; closing a session's files took some 40 us).
    released: Vec<Held>,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("mode", &self.handover)
            .field("outgoing", &self.outgoing)
            .field("handed_over", &self.handed_over)
            .field("incoming", &self.incoming)
            .finish_non_exhaustive()
    }
}

/// Finishes and closes sessions a successor's `resumed` released (see
/// [`AgentState::take_released`]): after its answer, outside the state's lock, as the guest
/// waits for nothing of it. The guest runs on either way; closing an incoming session releases
/// it too (LUO's implicit finish).
pub(super) fn finish_released(released: Vec<Held>) {
    for mut held in released {
        if let Err(e) = held.session.finish() {
            let name = held.session.name().unwrap_or_default();
            warn!("session {name:?}: finish at resume failed ({e}); released by closing it");
        }
    }
}

fn denied(name: &str) -> WireError {
    WireError::new(
        ErrorKind::PermissionDenied,
        format!("Permission denied: session {name:?} belongs to another user"),
    )
}

fn session_error(error: &SessionError) -> WireError {
    WireError::from_session(error)
}

pub(super) fn no_session(name: &str, side: &str) -> WireError {
    WireError::new(
        ErrorKind::NoSuchSession,
        format!("No {side} session {name:?} held by the agent"),
    )
}

/// Finds `name` in `map` and checks that `uid` owns it.
fn owned<'a>(
    map: &'a mut BTreeMap<String, Held>,
    name: &str,
    uid: u32,
    side: &str,
) -> Result<&'a mut Held, WireError> {
    let held = map.get_mut(name).ok_or_else(|| no_session(name, side))?;
    if held.owner != Some(uid) {
        return Err(denied(name));
    }
    Ok(held)
}

/// A new descriptor for the file `held` keeps under `token`.
fn copy_of(held: &Held, token: Token) -> Result<Option<OwnedFd>, WireError> {
    let file = held.files.get(&token).ok_or_else(|| {
        WireError::new(
            ErrorKind::NoSuchToken,
            format!("No file under token {token:#x}"),
        )
    })?;
    let copy = file.try_clone().map_err(|e| {
        WireError::new(
            ErrorKind::Os,
            format!("Cannot duplicate the file of token {token:#x}: {e}"),
        )
    })?;
    Ok(Some(copy))
}

impl AgentState {
    /// Whether a successor has peeked session `name` but is not ready yet.
    pub fn successor_pending(&self, name: &str) -> bool {
        self.successors.get(name) == Some(&false)
    }

    /// Whether session `name` has been handed over (and maybe retrieved already).
    pub fn is_handed_over(&self, name: &str) -> bool {
        self.handed_over.contains_key(name) || self.incoming.contains_key(name)
    }

    /// An agent state over `provider`, running as `agent_uid`.
    pub fn new(provider: Box<dyn SessionProvider>, handover: HandoverMode, agent_uid: u32) -> Self {
        Self {
            provider,
            handover,
            agent_uid,
            outgoing: BTreeMap::new(),
            handed_over: BTreeMap::new(),
            successors: BTreeMap::new(),
            incoming: BTreeMap::new(),
            kexec: KexecPhase::Idle,
            manifest: None,
            ended: EndedSessions::default(),
            creators: BTreeMap::new(),
            pause_slots: PauseSlots::default(),
            released: Vec::new(),
        }
    }

    /// Lets at most `limit` guests be paused for a restart-mode update at once (0: any number;
    /// the default is [`PauseSlots::default_limit`]), each for at most `lease` (the default is
    /// [`DEFAULT_LEASE`]).
    pub fn with_pause_slots(mut self, limit: usize, lease: Duration) -> Self {
        self.pause_slots = PauseSlots::new(limit, lease);
        self
    }

    /// Whether session `name` would get a pause slot now (kernel mode: always).
    pub fn pause_slot_free(&self, name: &str) -> bool {
        !matches!(self.handover, HandoverMode::Restart(_))
            || self
                .pause_slots
                .is_free_for(name, std::time::Instant::now(), |n| self.in_update(n))
    }

    /// How long a `wait_pause_slot` may wait before it must look again: no request announces a
    /// lease running out, nor (at once) a session dropped with its dead VMM.
    pub fn pause_slot_recheck(&self) -> Duration {
        const DEAD_VMM_RECHECK: Duration = Duration::from_millis(50);
        self.pause_slots
            .until_first_lease_ends(std::time::Instant::now())
            .map_or(DEAD_VMM_RECHECK, |ends| {
                (ends + Duration::from_millis(1)).min(DEAD_VMM_RECHECK)
            })
    }

    /// Whether session `name`'s update still runs: the agent holds the session, or its
    /// successor has resumed the guest and not yet finished (it is still starting its device
    /// workers, on the CPUs the next guest's pause would use).
    fn in_update(&self, name: &str) -> bool {
        self.holds(name)
            || (!self.incoming.contains_key(name)
                && self.ended.get(name).is_some_and(|ended| ended.resumed))
    }

    /// Watches process `pid`, which created outgoing session `name`: if it exits before the
    /// handover, the session is dropped (see [`Self::drop_abandoned`]).
    pub fn watch_creator(&mut self, name: &str, pid: i32) {
        match Creator::watch(pid) {
            Ok(creator) => {
                self.creators.insert(name.to_string(), creator);
            }
            Err(e) => warn!("cannot watch pid {pid}, creator of session {name:?}: {e}"),
        }
    }

    /// Whether the agent holds session `name` (outgoing, handed over or retrieved).
    pub fn holds(&self, name: &str) -> bool {
        self.outgoing.contains_key(name) || self.is_handed_over(name)
    }

    /// Whether session `name` ended in a way a later request is told about.
    pub fn has_ended(&self, name: &str) -> bool {
        self.ended.get(name).is_some()
    }

    /// Whether outgoing session `name` holds a file under `token`.
    pub fn holds_file(&self, name: &str, token: Token) -> bool {
        self.outgoing
            .get(name)
            .is_some_and(|held| held.files.contains_key(&token))
    }

    /// Notes a successor started ahead for session `name` (see [`Request::WaitSuccessor`]).
    pub fn note_successor(&mut self, name: &str) {
        self.successors.entry(name.to_string()).or_insert(false);
    }

    /// Drops every outgoing session, not frozen, whose creator has exited: its guest died with
    /// that VMM, and the saved state (if any) is incomplete. A successor waiting for it is told
    /// (a `stale` error) instead of waiting on. Run before every request and when a creator's
    /// connection closes.
    pub(super) fn drop_abandoned(&mut self) {
        let outgoing = &self.outgoing;
        self.creators.retain(|name, _| outgoing.contains_key(name));
        // Frozen (kernel mode): the state is whole and may cross the kexec without its VMM.
        let gone: Vec<(String, i32)> = self
            .creators
            .iter()
            .filter(|(name, _)| outgoing.get(*name).is_some_and(|held| !held.frozen))
            .filter(|(_, creator)| creator.has_exited())
            .map(|(name, creator)| (name.clone(), creator.pid()))
            .collect();
        for (name, pid) in gone {
            self.creators.remove(&name);
            self.successors.remove(&name);
            if let Some(held) = self.outgoing.remove(&name) {
                let owner = held.owner.unwrap_or(self.agent_uid);
                warn!("session {name:?} dropped: its VMM (pid {pid}) exited before the handover");
                self.ended
                    .record(&name, Ended::abandoned(&name, owner, pid));
            }
        }
    }

    /// [`Self::drop_abandoned`] when session `name` is one to drop: one pidfd poll, not one per
    /// session being prepared.
    fn drop_if_abandoned(&mut self, name: &str) {
        let unfrozen = self.outgoing.get(name).is_some_and(|held| !held.frozen);
        if unfrozen && self.creators.get(name).is_some_and(|c| c.has_exited()) {
            self.drop_abandoned();
        }
    }

    /// The refusal for `uid` asking for `name` when no live session of that name answers it
    /// (see [`EndedSessions::refusal`]), else `otherwise`.
    fn gone(&self, name: &str, uid: u32, otherwise: WireError) -> WireError {
        self.ended.refusal(name, uid).unwrap_or(otherwise)
    }

    /// Answers `request` from a peer running as `uid`; `fd` is the descriptor that came with it.
    /// Returns the response and, for `retrieve_fd`, the descriptor to send back.
    pub fn handle(
        &mut self,
        request: Request,
        uid: u32,
        fd: Option<OwnedFd>,
    ) -> (Response, Option<OwnedFd>) {
        let result = match (request.takes_fd(), fd) {
            (true, None) => Err(WireError::new(
                ErrorKind::BadRequest,
                "This request needs exactly one file descriptor",
            )),
            (false, Some(_)) => Err(WireError::new(
                ErrorKind::BadRequest,
                "This request takes no file descriptor",
            )),
            (_, fd) => self.dispatch(request, uid, fd),
        };
        match result {
            Ok((response, fd)) => (response, fd),
            Err(error) => (Response::Error(error), None),
        }
    }

    fn dispatch(
        &mut self,
        request: Request,
        uid: u32,
        fd: Option<OwnedFd>,
    ) -> Result<(Response, Option<OwnedFd>), WireError> {
        let ok = Ok((Response::Ok, None));
        // The looks a waiting successor repeats check their own session only: a pidfd poll per
        // session being prepared would keep the state locked with many VMs updated at once.
        // So does its `resumed`, which its guest waits for.
        if let Request::Peek { name, .. }
        | Request::WaitPrepared { name, .. }
        | Request::RetrieveSession { name }
        | Request::TakeSession { name, .. }
        | Request::Resumed { name, .. } = &request
        {
            self.drop_if_abandoned(name);
        } else {
            self.drop_abandoned();
        }
        match request {
            Request::Ping => Ok((
                Response::Pong {
                    mode: self.handover.name().to_string(),
                    version: VERSION,
                },
                None,
            )),
            Request::KexecStatus => Ok((
                Response::KexecStatus {
                    phase: self.kexec_phase_name().to_string(),
                },
                None,
            )),
            Request::List => Ok((
                Response::Sessions {
                    sessions: self.list(),
                },
                None,
            )),
            Request::CreateSession { name } => self.create(name, uid).and(ok),
            Request::SuccessorReady { name } => {
                self.successors.insert(name, true);
                ok
            }
            Request::WaitSuccessor { name, .. } => {
                owned(&mut self.outgoing, &name, uid, "outgoing")?;
                let ready = self.successors.get(&name).copied();
                Ok((
                    Response::Successor {
                        waiting: ready.is_some(),
                        ready: ready == Some(true),
                    },
                    None,
                ))
            }
            Request::WaitPauseSlot { name, .. } => {
                // The server waited already (without holding the state) while none was free.
                owned(&mut self.outgoing, &name, uid, "outgoing")?;
                let granted = match self.handover {
                    HandoverMode::Restart(_) => {
                        let mut slots = std::mem::take(&mut self.pause_slots);
                        let taken =
                            slots.take(&name, std::time::Instant::now(), |n| self.in_update(n));
                        self.pause_slots = slots;
                        taken
                    }
                    // Every session freezes for the one kexec.
                    HandoverMode::Kexec(_) => true,
                };
                Ok((Response::PauseSlot { granted }, None))
            }
            Request::WaitPrepared { name, token, .. } => {
                // The server waited already (without holding the state).
                self.note_successor(&name);
                if !matches!(self.handover, HandoverMode::Restart(_)) {
                    return Err(WireError::new(
                        ErrorKind::NotSupported,
                        "wait_prepared exists in restart mode only",
                    ));
                }
                if !self.outgoing.contains_key(&name) {
                    return Err(self.gone(&name, uid, no_session(&name, "outgoing")));
                }
                let held = owned(&mut self.outgoing, &name, uid, "outgoing")?;
                if !held.files.contains_key(&token) {
                    return Err(WireError::new(
                        ErrorKind::NoSuchToken,
                        format!("No file under token {token:#x} yet"),
                    ));
                }
                ok
            }
            Request::Peek { name, token } => {
                // A successor asks: the old VMM will wait for it (see `WaitSuccessor`).
                self.successors.entry(name.clone()).or_insert(false);
                if !matches!(self.handover, HandoverMode::Restart(_)) {
                    return Err(WireError::new(
                        ErrorKind::NotSupported,
                        "peek exists in restart mode only: across a kexec, files exist after the handover",
                    ));
                }
                if !self.outgoing.contains_key(&name) {
                    return Err(self.gone(&name, uid, no_session(&name, "outgoing")));
                }
                let held = owned(&mut self.outgoing, &name, uid, "outgoing")?;
                Ok((Response::Ok, copy_of(held, token)?))
            }
            Request::Preserve { name, token } => match fd {
                Some(fd) => self.preserve(&name, token, uid, fd).and(ok),
                None => Err(WireError::new(ErrorKind::BadRequest, "Missing fd")),
            },
            Request::Handover { name } => self.handover(&name, uid).and(ok),
            Request::PreserveAndHandover { name, token } => match fd {
                Some(fd) => {
                    self.preserve(&name, token, uid, fd)?;
                    self.handover(&name, uid).and(ok)
                }
                None => Err(WireError::new(ErrorKind::BadRequest, "Missing fd")),
            },
            Request::Kexec { .. } => Err(WireError::new(
                ErrorKind::BadRequest,
                "kexec is served by the agent's socket server only",
            )),
            Request::Upgrade { .. } | Request::UpgradeDone => Err(WireError::new(
                ErrorKind::BadRequest,
                "upgrade is served by the agent's socket server only",
            )),
            Request::Cancel { name } => self.cancel(&name, uid).and(ok),
            Request::RetrieveSession { name } => self.retrieve_session(name, uid).and(ok),
            // The server waits on its own (without holding the state) before asking here.
            Request::WaitReleased { name, .. } if self.holds(&name) => Err(WireError::new(
                ErrorKind::Busy,
                format!("Session {name:?} is still held"),
            )),
            Request::WaitReleased { .. } => ok,
            Request::WaitHandover { name, .. } if self.is_handed_over(&name) => ok,
            Request::WaitHandover { name, .. } => Err(self.gone(
                &name,
                uid,
                WireError::new(
                    ErrorKind::NoSuchSession,
                    format!("Session {name:?} has not been handed over"),
                ),
            )),
            Request::Attach { name, token } => match fd {
                Some(fd) => self.attach(&name, token, uid, fd).and(ok),
                None => Err(WireError::new(ErrorKind::BadRequest, "Missing fd")),
            },
            Request::RetrieveAttachment { name, .. } if !self.incoming.contains_key(&name) => {
                Err(self.gone(&name, uid, no_session(&name, "retrieved")))
            }
            Request::RetrieveAttachment { name, token } => {
                let held = owned(&mut self.incoming, &name, uid, "retrieved")?;
                Ok((Response::Ok, Some(held.attachments.copy(token)?)))
            }
            Request::RetrieveFd { name, token } => {
                Ok((Response::Ok, self.retrieve_fd(&name, token, uid)?))
            }
            Request::TakeSession {
                name, state_token, ..
            } => {
                // The server waited already (without holding the state) for the handover.
                self.retrieve_session(name.clone(), uid)?;
                let fd = self.retrieve_fd(&name, state_token, uid).ok().flatten();
                let attachments = self
                    .incoming
                    .get(&name)
                    .map(|held| held.attachments.tokens())
                    .unwrap_or_default();
                Ok((
                    Response::Taken {
                        state: fd.is_some(),
                        attachments,
                    },
                    fd,
                ))
            }
            Request::Resumed { name, pid } => self.resumed(&name, uid, pid).and(ok),
            // Released at `resumed` already: the successor's finish has nothing left to do.
            Request::Finish { name }
                if !self.incoming.contains_key(&name)
                    && self
                        .ended
                        .get(&name)
                        .is_some_and(|ended| ended.resumed && ended.owned_by(uid)) =>
            {
                self.ended.forget(&name);
                info!("session {name:?} finished by uid {uid} (released when resumed)");
                ok
            }
            Request::Finish { name } => {
                let held = owned(&mut self.incoming, &name, uid, "retrieved")?;
                held.session.finish().map_err(|e| session_error(&e))?;
                self.incoming.remove(&name);
                info!("session {name:?} finished by uid {uid}");
                ok
            }
        }
    }

    /// A copy of the file under `token` of retrieved session `name`, taken from the session
    /// the first time.
    fn retrieve_fd(
        &mut self,
        name: &str,
        token: Token,
        uid: u32,
    ) -> Result<Option<OwnedFd>, WireError> {
        if !self.incoming.contains_key(name) {
            return Err(self.gone(name, uid, no_session(name, "retrieved")));
        }
        let held = owned(&mut self.incoming, name, uid, "retrieved")?;
        held.retrieve(token).map_err(|e| session_error(&e))?;
        copy_of(held, token)
    }

    fn create(&mut self, name: String, uid: u32) -> Result<(), WireError> {
        if name == MANIFEST_SESSION {
            return Err(WireError::new(
                ErrorKind::InvalidName,
                format!("Session name {name:?} is the agent's own"),
            ));
        }
        // The provider checks the name and refuses duplicates among its outgoing sessions.
        let session = self
            .provider
            .create_session(&name)
            .map_err(|e| session_error(&e))?;
        info!("session {name:?} created for uid {uid}");
        self.ended.forget(&name);
        self.outgoing.insert(name, Held::new(session, Some(uid)));
        Ok(())
    }

    fn attach(&mut self, name: &str, token: Token, uid: u32, fd: OwnedFd) -> Result<(), WireError> {
        if !matches!(self.handover, HandoverMode::Restart(_)) {
            return Err(WireError::new(
                ErrorKind::NotSupported,
                "fd attachments exist only in restart mode: across a kexec only what the kernel \
                 preserves (memfds) survives",
            ));
        }
        let held = owned(&mut self.outgoing, name, uid, "outgoing")?;
        held.attachments.attach(token, fd)?;
        info!("session {name:?}: fd attached under token {token:#x}");
        Ok(())
    }

    fn preserve(
        &mut self,
        name: &str,
        token: Token,
        uid: u32,
        fd: OwnedFd,
    ) -> Result<(), WireError> {
        let held = owned(&mut self.outgoing, name, uid, "outgoing")?;
        if held.frozen {
            return Err(WireError::new(
                ErrorKind::Frozen,
                format!("Session {name:?} is frozen: nothing more can be preserved"),
            ));
        }
        held.session
            .preserve_fd(fd.as_fd(), token)
            .map_err(|e| session_error(&e))?;
        held.tokens.push(token);
        if is_memfd(fd.as_fd()) {
            held.memfds.push(token);
        }
        info!("session {name:?}: token {token:#x} preserved");
        if matches!(self.handover, HandoverMode::Restart(_)) {
            held.files.insert(token, fd);
        }
        Ok(())
    }

    fn handover(&mut self, name: &str, uid: u32) -> Result<(), WireError> {
        let held = owned(&mut self.outgoing, name, uid, "outgoing")?;
        match &mut self.handover {
            HandoverMode::Kexec(_) => {
                // The server holds the reply until the kexec's outcome is known.
                held.frozen = true;
                held.verdict = None;
                info!("session {name:?} frozen, held for the kexec");
                Ok(())
            }
            HandoverMode::Restart(hand_over) => {
                hand_over(name).map_err(|e| session_error(&e))?;
                // The holder replaced any incoming session of this name never finished.
                if self.incoming.remove(name).is_some() {
                    warn!("handover of {name:?} replaced a retrieved session never finished");
                }
                // The holder moved the session; our outgoing handle is no longer needed.
                if let Some(held) = self.outgoing.remove(name) {
                    let handed_over = HandedOver {
                        owner: uid,
                        tokens: held.tokens,
                        attachments: held.attachments,
                        files: held.files,
                    };
                    self.handed_over.insert(name.to_string(), handed_over);
                }
                info!("session {name:?} handed over");
                Ok(())
            }
        }
    }

    fn cancel(&mut self, name: &str, uid: u32) -> Result<(), WireError> {
        owned(&mut self.outgoing, name, uid, "outgoing")?;
        // Dropping the last handle discards the session and unpreserves its files.
        self.outgoing.remove(name);
        info!("session {name:?} cancelled by uid {uid}");
        Ok(())
    }

    /// A successor is about to run the guest of retrieved session `name`: release the session
    /// and remember that it was resumed, so its stale state is never given out again.
    fn resumed(&mut self, name: &str, uid: u32, pid: u32) -> Result<(), WireError> {
        if !self.incoming.contains_key(name) {
            return Err(self.gone(name, uid, no_session(name, "retrieved")));
        }
        owned(&mut self.incoming, name, uid, "retrieved")?;
        // Finished (which closes the files the successor did not retrieve) once it has its
        // answer, see `finish_released`.
        if let Some(held) = self.incoming.remove(name) {
            self.released.push(held);
        }
        self.ended.record(name, Ended::resumed(name, uid, pid));
        info!("session {name:?} resumed by pid {pid} (uid {uid}) and released");
        Ok(())
    }

    /// The sessions released since the last call, for the caller to close (see `released`)
    /// with [`finish_released`].
    pub(super) fn take_released(&mut self) -> Vec<Held> {
        std::mem::take(&mut self.released)
    }

    fn retrieve_session(&mut self, name: String, uid: u32) -> Result<(), WireError> {
        if !self.handed_over.contains_key(&name)
            && !self.incoming.contains_key(&name)
            && let Some(refusal) = self.ended.refusal(&name, uid)
        {
            return Err(refusal);
        }
        // The creator, if this agent saw the handover or the last kernel's agent named it (see
        // `super::manifest`); otherwise (a session from before a kexec) only root or the
        // agent's own user.
        let allowed = match (
            self.handed_over.get(&name),
            self.incoming.get(&name).and_then(|held| held.owner),
        ) {
            (Some(handed), _) => handed.owner == uid,
            (None, Some(owner)) => owner == uid || uid == 0,
            (None, None) => uid == 0 || uid == self.agent_uid,
        };
        if !allowed {
            return Err(denied(&name));
        }
        if let Some(held) = self.incoming.get_mut(&name) {
            // Retrieved but not finished: its owner may take it again (e.g. a newer VMM after
            // an older one refused its state). One retrieved ahead for no known owner is the
            // first allowed caller's.
            let again = held.owner.is_some();
            held.owner.get_or_insert(uid);
            info!(
                "session {name:?} {} by uid {uid}",
                if again { "retrieved again" } else { "taken" }
            );
            return Ok(());
        }
        let session = self
            .provider
            .retrieve_session(&name)
            .map_err(|e| session_error(&e))?;
        let attachments = self
            .handed_over
            .remove(&name)
            .map(|handed| handed.attachments)
            .unwrap_or_default();
        self.successors.remove(&name);
        info!("session {name:?} retrieved for uid {uid}");
        let mut held = Held::new(session, Some(uid));
        held.attachments = attachments;
        self.incoming.insert(name, held);
        Ok(())
    }

    /// Every session the agent holds, sorted by side then name.
    pub fn list(&self) -> Vec<SessionInfo> {
        let held = |side: Direction| {
            move |(name, held): (&String, &Held)| SessionInfo {
                name: name.clone(),
                direction: if held.frozen { Direction::Frozen } else { side },
                owner_uid: held.owner,
                tokens: held.tokens.clone(),
                attachments: held.attachments.tokens(),
            }
        };
        let mut sessions: Vec<_> = self
            .outgoing
            .iter()
            .map(held(Direction::Outgoing))
            .collect();
        sessions.extend(self.handed_over.iter().map(|(name, handed)| SessionInfo {
            name: name.clone(),
            direction: Direction::HandedOver,
            owner_uid: Some(handed.owner),
            tokens: handed.tokens.clone(),
            attachments: handed.attachments.tokens(),
        }));
        sessions.extend(self.incoming.iter().map(held(Direction::Incoming)));
        sessions
    }
}

/// Duplicates `(key, fd)` pairs into roles (for [`AgentState::export`]).
fn roles<K>(
    fds: impl IntoIterator<Item = (K, OwnedFd)>,
    role: impl Fn(K) -> Role,
) -> Vec<(Role, OwnedFd)> {
    fds.into_iter().map(|(key, fd)| (role(key), fd)).collect()
}

fn dups<'a>(
    files: impl IntoIterator<Item = (&'a Token, &'a OwnedFd)>,
) -> std::io::Result<Vec<(Token, OwnedFd)>> {
    files
        .into_iter()
        .map(|(token, fd)| Ok((*token, fd.try_clone()?)))
        .collect()
}

// The fd store and the upgrade in place (see `super::fdstore`).
impl AgentState {
    /// What the provider itself holds (`/dev/liveupdate` in kernel mode), as new descriptors.
    pub(super) fn export_provider(&self) -> Result<Vec<(String, OwnedFd)>, SessionError> {
        self.provider.export_fds()
    }

    /// Every session: its record (without entry names) and new descriptors of every fd that
    /// keeps it, by role.
    pub(super) fn export(&self) -> Result<Vec<Exported>, SessionError> {
        let os = |source| SessionError::Os {
            operation: "export",
            source,
        };
        let mut sessions = Vec::new();
        let sides = [
            (&self.outgoing, Side::Outgoing),
            (&self.incoming, Side::Incoming),
        ];
        for (map, side) in sides {
            for (name, held) in map {
                let mut record = SessionRecord::new(name, side);
                record.owner = held.owner;
                record.frozen = held.frozen;
                record.tokens.clone_from(&held.tokens);
                record.memfds.clone_from(&held.memfds);
                let mut fds = roles(held.session.export_fds()?, Role::Provider);
                fds.extend(roles(dups(&held.files).map_err(os)?, Role::File));
                fds.extend(roles(
                    held.attachments.export().map_err(os)?,
                    Role::Attachment,
                ));
                sessions.push((record, fds));
            }
        }
        for (name, handed) in &self.handed_over {
            let mut record = SessionRecord::new(name, Side::HandedOver);
            record.owner = Some(handed.owner);
            record.tokens.clone_from(&handed.tokens);
            // The holder's files are these same files, named by token as it names them.
            let files = dups(&handed.files).map_err(os)?;
            let mut fds: Vec<(Role, OwnedFd)> = files
                .iter()
                .map(|(token, fd)| Ok((Role::Provider(format!("{token:x}")), fd.try_clone()?)))
                .collect::<std::io::Result<_>>()
                .map_err(os)?;
            fds.extend(roles(files, Role::File));
            fds.extend(roles(
                handed.attachments.export().map_err(os)?,
                Role::Attachment,
            ));
            sessions.push((record, fds));
        }
        Ok(sessions)
    }

    /// Takes back sessions an earlier agent held (from its fd store or an upgrade).
    pub fn import(&mut self, sessions: Vec<Imported>) -> Result<(), SessionError> {
        for imported in sessions {
            let record = imported.record;
            let name = record.name;
            let side = match record.side {
                Side::Outgoing => AdoptAs::Outgoing,
                Side::HandedOver => AdoptAs::HandedOver,
                Side::Incoming => AdoptAs::Retrieved,
            };
            let session = self.provider.adopt(&name, side, imported.provider)?;
            let attachments = Attachments::from_fds(imported.attachments);
            let files = imported.files;
            match (record.side, session) {
                (Side::HandedOver, None) => {
                    let handed = HandedOver {
                        owner: record.owner.unwrap_or(self.agent_uid),
                        tokens: record.tokens.clone(),
                        attachments,
                        files,
                    };
                    self.handed_over.insert(name.clone(), handed);
                }
                (Side::Outgoing | Side::Incoming, Some(session)) => {
                    let held = Held {
                        session,
                        owner: record.owner,
                        tokens: record.tokens.clone(),
                        memfds: record.memfds.clone(),
                        frozen: record.frozen,
                        files,
                        verdict: None,
                        attachments,
                    };
                    let map = if record.side == Side::Outgoing {
                        &mut self.outgoing
                    } else {
                        &mut self.incoming
                    };
                    map.insert(name.clone(), held);
                }
                _ => {
                    return Err(SessionError::Os {
                        operation: "adopt",
                        source: std::io::Error::other(format!(
                            "the provider gave no handle fitting session {name:?}"
                        )),
                    });
                }
            }
            info!("session {name:?} taken back ({:?})", record.side);
        }
        Ok(())
    }
}

impl Drop for AgentState {
    fn drop(&mut self) {
        if !self.outgoing.is_empty() {
            warn!(
                "agent exiting with {} outgoing session(s): their files are unpreserved",
                self.outgoing.len()
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::fs::File;

    use super::*;
    use crate::agent::kexec::{KexecImage, KexecOps};
    use crate::emulated::EmulatedProvider;

    pub(crate) const OWNER: u32 = 1000;
    pub(crate) const OTHER: u32 = 2000;

    pub(crate) fn restart_state() -> (AgentState, EmulatedProvider) {
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = HandoverMode::Restart(Box::new(move |name: &str| holder.handover(name)));
        (
            AgentState::new(Box::new(provider.clone()), handover, 0),
            provider,
        )
    }

    fn memfd() -> OwnedFd {
        let fd = crate::sys::memfd_create("agent-state-test", 0).unwrap();
        File::from(fd.try_clone().unwrap()).set_len(4096).unwrap();
        fd
    }

    pub(crate) fn name(name: &str) -> String {
        name.to_string()
    }

    /// `CreateSession` of `name`.
    pub(crate) fn create(name: &str) -> Request {
        Request::CreateSession { name: name.into() }
    }

    /// `Handover` of `name`.
    pub(crate) fn handover(name: &str) -> Request {
        Request::Handover { name: name.into() }
    }

    /// `RetrieveSession` of `name`.
    pub(crate) fn retrieve(name: &str) -> Request {
        Request::RetrieveSession { name: name.into() }
    }

    pub(crate) fn ok(state: &mut AgentState, request: Request, uid: u32, fd: Option<OwnedFd>) {
        let (response, _) = state.handle(request, uid, fd);
        assert_eq!(response, Response::Ok);
    }

    pub(crate) fn error_kind(
        state: &mut AgentState,
        request: Request,
        uid: u32,
        fd: Option<OwnedFd>,
    ) -> ErrorKind {
        match state.handle(request, uid, fd) {
            (Response::Error(error), None) => error.kind,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn only_the_creating_uid_may_use_an_outgoing_session() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);

        let preserve = Request::Preserve {
            name: name("vm"),
            token: 1,
        };
        let preserve_kind = error_kind(&mut state, preserve, OTHER, Some(memfd()));
        let handover_kind = error_kind(&mut state, handover("vm"), OTHER, None);
        let cancel_kind = error_kind(
            &mut state,
            Request::Cancel { name: name("vm") },
            OTHER,
            None,
        );

        assert_eq!(preserve_kind, ErrorKind::PermissionDenied);
        assert_eq!(handover_kind, ErrorKind::PermissionDenied);
        assert_eq!(cancel_kind, ErrorKind::PermissionDenied);
        assert_eq!(state.list()[0].direction, Direction::Outgoing);
    }

    #[test]
    fn only_the_creating_uid_may_retrieve_and_finish_after_handover() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        let preserve = Request::Preserve {
            name: name("vm"),
            token: 1,
        };
        ok(&mut state, preserve, OWNER, Some(memfd()));
        ok(&mut state, handover("vm"), OWNER, None);

        let retrieve_kind = error_kind(&mut state, retrieve("vm"), OTHER, None);
        ok(&mut state, retrieve("vm"), OWNER, None);
        let fd_kind = error_kind(
            &mut state,
            Request::RetrieveFd {
                name: name("vm"),
                token: 1,
            },
            OTHER,
            None,
        );
        let finish_kind = error_kind(
            &mut state,
            Request::Finish { name: name("vm") },
            OTHER,
            None,
        );

        assert_eq!(retrieve_kind, ErrorKind::PermissionDenied);
        assert_eq!(fd_kind, ErrorKind::PermissionDenied);
        assert_eq!(finish_kind, ErrorKind::PermissionDenied);
        ok(
            &mut state,
            Request::Finish { name: name("vm") },
            OWNER,
            None,
        );
        assert!(state.list().is_empty());
    }

    #[test]
    fn incoming_session_of_unknown_owner_is_for_root_only() {
        let (mut state, mut provider) = restart_state();
        // Handed over behind the agent's back: the agent never saw its creator.
        let session = provider.create_session("old").unwrap();
        provider.handover("old").unwrap();
        drop(session);

        let kind = error_kind(&mut state, retrieve("old"), OWNER, None);

        assert_eq!(kind, ErrorKind::PermissionDenied);
        ok(&mut state, retrieve("old"), 0, None);
    }

    #[test]
    fn preserve_needs_exactly_one_fd_and_other_requests_none() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);

        let missing = error_kind(
            &mut state,
            Request::Preserve {
                name: name("vm"),
                token: 1,
            },
            OWNER,
            None,
        );
        let unexpected = error_kind(&mut state, Request::Ping, OWNER, Some(memfd()));

        assert_eq!(missing, ErrorKind::BadRequest);
        assert_eq!(unexpected, ErrorKind::BadRequest);
    }

    #[test]
    fn session_errors_keep_their_kind() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        let null = OwnedFd::from(File::open("/dev/null").unwrap());

        let exists = error_kind(&mut state, create("vm"), OWNER, None);
        let invalid = error_kind(
            &mut state,
            Request::CreateSession {
                name: "x".repeat(64),
            },
            OWNER,
            None,
        );
        let unpreservable = error_kind(
            &mut state,
            Request::Preserve {
                name: name("vm"),
                token: 1,
            },
            OWNER,
            Some(null),
        );
        let no_session = error_kind(
            &mut state,
            Request::Finish { name: name("nope") },
            OWNER,
            None,
        );

        assert_eq!(exists, ErrorKind::SessionExists);
        assert_eq!(invalid, ErrorKind::InvalidName);
        assert_eq!(unpreservable, ErrorKind::Unpreservable);
        assert_eq!(no_session, ErrorKind::NoSuchSession);
    }

    #[test]
    fn cancel_drops_the_session_and_unpreserves_its_files() {
        let (mut state, provider) = restart_state();
        let file = memfd();
        ok(&mut state, create("vm"), OWNER, None);
        let preserve = Request::Preserve {
            name: name("vm"),
            token: 1,
        };
        ok(
            &mut state,
            preserve.clone(),
            OWNER,
            Some(file.try_clone().unwrap()),
        );

        ok(
            &mut state,
            Request::Cancel { name: name("vm") },
            OWNER,
            None,
        );

        assert!(state.list().is_empty());
        assert!(provider.sessions().is_empty());
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, preserve, OWNER, Some(file));
    }

    /// What the fake kexec was asked to do, in order.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FakeKexec {
        pub(crate) calls: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
        pub(crate) fail_load: bool,
    }

    impl KexecOps for FakeKexec {
        fn load(&self, _image: &KexecImage) -> std::io::Result<()> {
            self.calls.lock().unwrap().push("load");
            if self.fail_load {
                return Err(std::io::Error::from_raw_os_error(libc::ENOEXEC));
            }
            Ok(())
        }

        fn unload(&self) -> std::io::Result<()> {
            self.calls.lock().unwrap().push("unload");
            Ok(())
        }

        fn reboot(&self) -> std::io::Error {
            self.calls.lock().unwrap().push("reboot");
            std::io::Error::from_raw_os_error(libc::EBUSY)
        }
    }

    pub(crate) fn image() -> KexecImage {
        KexecImage {
            kernel: "/boot/next".into(),
            initrd: None,
            cmdline: "liveupdate=on".into(),
        }
    }

    pub(crate) fn kernel_state(fake: &FakeKexec) -> AgentState {
        let provider = EmulatedProvider::new();
        AgentState::new(
            Box::new(provider),
            HandoverMode::Kexec(std::sync::Arc::new(fake.clone())),
            0,
        )
    }

    #[test]
    fn kernel_mode_handover_freezes_and_waits_for_a_verdict() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        ok(&mut state, create("vm"), OWNER, None);

        ok(&mut state, handover("vm"), OWNER, None);
        let preserve = error_kind(
            &mut state,
            Request::Preserve {
                name: name("vm"),
                token: 1,
            },
            OWNER,
            Some(memfd()),
        );

        assert_eq!(preserve, ErrorKind::Frozen);
        assert_eq!(state.list()[0].direction, Direction::Frozen);
        assert_eq!(state.handover_verdict("vm"), None);
        ok(
            &mut state,
            Request::Cancel { name: name("vm") },
            OWNER,
            None,
        );
        assert!(state.list().is_empty());
        assert!(matches!(
            state.handover_verdict("vm"),
            Some(Response::Error(WireError {
                kind: ErrorKind::NoSuchSession,
                ..
            }))
        ));
    }

    #[test]
    fn failed_reboot_unfreezes_sessions_and_fails_their_handover() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        for vm in ["a", "b"] {
            ok(&mut state, create(vm), OWNER, None);
            ok(&mut state, handover(vm), OWNER, None);
        }
        state.start_kexec(0, &image()).unwrap();

        let error = state.reboot();

        assert_eq!(error.kind, ErrorKind::KexecFailed);
        assert_eq!(*fake.calls.lock().unwrap(), ["load", "reboot", "unload"]);
        assert!(state.kexec_idle());
        assert_eq!(state.unfrozen_sessions(&[]), ["a", "b"]);
        for vm in ["a", "b"] {
            let verdict = state.handover_verdict(vm);
            assert!(
                matches!(&verdict, Some(Response::Error(e)) if e.kind == ErrorKind::KexecFailed),
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn failed_load_fails_frozen_sessions_and_leaves_the_agent_idle() {
        let fake = FakeKexec {
            fail_load: true,
            ..FakeKexec::default()
        };
        let mut state = kernel_state(&fake);
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, handover("vm"), OWNER, None);

        let error = state.start_kexec(0, &image()).unwrap_err();

        assert_eq!(error.kind, ErrorKind::KexecFailed);
        assert!(error.message.contains("/boot/next"), "{}", error.message);
        assert!(state.kexec_idle());
        assert!(state.handover_verdict("vm").is_some());
        assert_eq!(state.unfrozen_sessions(&[]), ["vm"]);
    }

    #[test]
    fn kexec_is_for_root_and_kernel_mode_and_new_sessions_join_the_barrier() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        let (mut restart, _) = restart_state();

        let denied = state.start_kexec(OWNER, &image()).unwrap_err();
        let restart_mode = restart.start_kexec(0, &image()).unwrap_err();
        state.start_kexec(0, &image()).unwrap();
        ok(&mut state, create("late"), OWNER, None);
        let again = state.start_kexec(0, &image()).unwrap_err();

        assert_eq!(denied.kind, ErrorKind::PermissionDenied);
        assert_eq!(restart_mode.kind, ErrorKind::NotSupported);
        assert_eq!(state.unfrozen_sessions(&[]), ["late"]);
        assert_eq!(again.kind, ErrorKind::Busy);
        assert_eq!(*fake.calls.lock().unwrap(), ["load"]);
    }

    #[test]
    fn a_target_whose_command_line_would_drop_the_sessions_is_refused_before_loading() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        let with = |cmdline: &str| KexecImage {
            cmdline: cmdline.into(),
            ..image()
        };

        let refused: Vec<_> = [
            "console=ttyS0",
            "liveupdate=off",
            "liveupdate=0",
            "liveupdate=on liveupdate=n",
            "liveupdate=maybe",
            "liveupdate=on kho=off",
        ]
        .into_iter()
        .map(|cmdline| (cmdline, state.start_kexec(0, &with(cmdline)).unwrap_err()))
        .collect();

        for (cmdline, error) in &refused {
            assert_eq!(error.kind, ErrorKind::KexecFailed, "{cmdline}");
            assert!(
                error.message.contains("drop every session"),
                "{cmdline}: {}",
                error.message
            );
        }
        assert!(refused[0].1.message.contains("lacks liveupdate=on"));
        assert!(refused[5].1.message.contains("kho=off"));
        assert!(
            fake.calls.lock().unwrap().is_empty(),
            "nothing may be loaded"
        );
        assert!(state.kexec_idle());
        state
            .start_kexec(0, &with("console=ttyS0 liveupdate=1 kho=on"))
            .unwrap();
    }

    #[test]
    fn kexec_status_says_whether_a_next_kernel_is_loaded() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        let status = |state: &mut AgentState| match state.handle(Request::KexecStatus, OWNER, None)
        {
            (Response::KexecStatus { phase }, None) => phase,
            other => panic!("{other:?}"),
        };

        let before = status(&mut state);
        state.start_kexec(0, &image()).unwrap();
        let loaded = status(&mut state);
        state.reboot();
        let after_failure = status(&mut state);

        assert_eq!(before, "idle");
        assert_eq!(loaded, "loaded");
        assert_eq!(after_failure, "idle");
    }

    #[test]
    fn list_shows_direction_owner_and_tokens() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("a"), OWNER, None);
        ok(
            &mut state,
            Request::Preserve {
                name: name("a"),
                token: 7,
            },
            OWNER,
            Some(memfd()),
        );
        ok(&mut state, create("b"), OTHER, None);
        ok(&mut state, handover("b"), OTHER, None);

        let (response, _) = state.handle(Request::List, OWNER, None);

        let expected = vec![
            SessionInfo {
                name: name("a"),
                direction: Direction::Outgoing,
                owner_uid: Some(OWNER),
                tokens: vec![7],
                attachments: vec![],
            },
            SessionInfo {
                name: name("b"),
                direction: Direction::HandedOver,
                owner_uid: Some(OTHER),
                tokens: vec![],
                attachments: vec![],
            },
        ];
        assert_eq!(response, Response::Sessions { sessions: expected });
    }

    #[test]
    fn handover_over_an_unfinished_retrieved_session_of_the_same_name_replaces_it() {
        let (mut state, _) = restart_state();
        for _ in 0..2 {
            ok(&mut state, create("vm"), OWNER, None);
            ok(&mut state, handover("vm"), OWNER, None);
            ok(&mut state, retrieve("vm"), OWNER, None);
        }

        let sessions = state.list();

        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].direction, Direction::Incoming);
        ok(
            &mut state,
            Request::Finish { name: name("vm") },
            OWNER,
            None,
        );
    }

    #[test]
    fn ping_reports_the_mode() {
        let (mut state, _) = restart_state();

        let (response, fd) = state.handle(Request::Ping, OWNER, None);

        assert_eq!(
            response,
            Response::Pong {
                mode: name("restart"),
                version: VERSION
            }
        );
        assert!(fd.is_none());
    }
}

#[cfg(test)]
mod preserve_and_handover_tests {
    use super::tests::{OWNER, create, error_kind, ok, restart_state};
    use super::*;

    fn state_blob() -> OwnedFd {
        crate::sys::memfd_create("agent-state-blob", 0).unwrap()
    }

    fn preserve_and_handover(token: Token) -> Request {
        Request::PreserveAndHandover {
            name: "vm".into(),
            token,
        }
    }

    #[test]
    fn the_file_is_preserved_and_the_session_handed_over_in_one_request() {
        let (mut state, _provider) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);

        ok(
            &mut state,
            preserve_and_handover(0),
            OWNER,
            Some(state_blob()),
        );

        assert!(state.is_handed_over("vm"));
        assert_eq!(state.list()[0].tokens, vec![0]);
    }

    #[test]
    fn a_preserve_that_fails_hands_nothing_over() {
        let (mut state, _provider) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        ok(
            &mut state,
            Request::Preserve {
                name: "vm".into(),
                token: 0,
            },
            OWNER,
            Some(state_blob()),
        );

        let taken = error_kind(
            &mut state,
            preserve_and_handover(0),
            OWNER,
            Some(state_blob()),
        );
        let no_fd = error_kind(&mut state, preserve_and_handover(1), OWNER, None);

        assert_eq!(taken, ErrorKind::TokenExists);
        assert_eq!(no_fd, ErrorKind::BadRequest);
        assert!(!state.is_handed_over("vm"));
        assert_eq!(state.list()[0].direction, Direction::Outgoing);
    }
}

#[cfg(test)]
mod pause_slot_tests {
    use super::tests::{FakeKexec, OTHER, OWNER, create, error_kind, handover, kernel_state, ok};
    use super::tests::{restart_state, retrieve};
    use super::*;
    use crate::agent::pause_slots::DEFAULT_LEASE;

    fn wait_pause_slot(name: &str) -> Request {
        Request::WaitPauseSlot {
            name: name.into(),
            timeout_ms: 0,
        }
    }

    fn granted(state: &mut AgentState, name: &str) -> bool {
        match state.handle(wait_pause_slot(name), OWNER, None) {
            (Response::PauseSlot { granted }, None) => granted,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// A restart-mode agent with one pause slot and outgoing sessions `a` and `b`.
    fn one_slot_and_two_sessions() -> AgentState {
        let (state, _provider) = restart_state();
        let mut state = state.with_pause_slots(1, DEFAULT_LEASE);
        ok(&mut state, create("a"), OWNER, None);
        ok(&mut state, create("b"), OWNER, None);
        state
    }

    #[test]
    fn the_second_guest_gets_the_slot_once_the_first_ones_successor_resumed_and_finished() {
        let mut state = one_slot_and_two_sessions();
        assert!(granted(&mut state, "a"));

        let while_a_is_paused = (granted(&mut state, "b"), state.pause_slot_free("b"));
        ok(&mut state, handover("a"), OWNER, None);
        let while_a_is_handed_over = state.pause_slot_free("b");
        ok(&mut state, retrieve("a"), OWNER, None);
        ok(
            &mut state,
            Request::Resumed {
                name: "a".into(),
                pid: 1,
            },
            OWNER,
            None,
        );
        let while_a_starts_its_workers = state.pause_slot_free("b");
        ok(
            &mut state,
            Request::Finish { name: "a".into() },
            OWNER,
            None,
        );

        assert_eq!(while_a_is_paused, (false, false));
        assert!(!while_a_is_handed_over);
        assert!(!while_a_starts_its_workers);
        assert!(state.pause_slot_free("b"));
        assert!(granted(&mut state, "b"));
    }

    #[test]
    fn a_cancelled_update_frees_its_slot() {
        let mut state = one_slot_and_two_sessions();
        assert!(granted(&mut state, "a"));

        ok(
            &mut state,
            Request::Cancel { name: "a".into() },
            OWNER,
            None,
        );

        assert!(granted(&mut state, "b"));
    }

    #[test]
    fn with_no_limit_every_guest_gets_a_slot_at_once() {
        let (state, _provider) = restart_state();
        let mut state = state.with_pause_slots(0, DEFAULT_LEASE);
        ok(&mut state, create("a"), OWNER, None);
        ok(&mut state, create("b"), OWNER, None);

        assert!(granted(&mut state, "a"));
        assert!(granted(&mut state, "b"));
    }

    #[test]
    fn in_kernel_mode_every_session_gets_a_slot_for_the_one_kexec() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake).with_pause_slots(1, DEFAULT_LEASE);
        ok(&mut state, create("a"), OWNER, None);
        ok(&mut state, create("b"), OWNER, None);

        assert!(granted(&mut state, "a"));
        assert!(granted(&mut state, "b"));
    }

    #[test]
    fn only_the_owner_of_an_outgoing_session_asks_for_its_slot() {
        let mut state = one_slot_and_two_sessions();

        let other = error_kind(&mut state, wait_pause_slot("a"), OTHER, None);
        let unknown = error_kind(&mut state, wait_pause_slot("nope"), OWNER, None);

        assert_eq!(other, ErrorKind::PermissionDenied);
        assert_eq!(unknown, ErrorKind::NoSuchSession);
        assert!(granted(&mut state, "a"), "refused asks took no slot");
    }
}
