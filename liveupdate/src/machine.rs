//! The live-update state machine.
//!
//! ```text
//!   old VMM:  Normal --prepare--> Prepared --freeze--> Frozen --handover--> HandedOver
//!                ^                   |                   |
//!                +------cancel-------+-------cancel------+
//!   new VMM:  Normal --restore--> Restored --finish--> Finished
//!   snapshot: Normal --prepare--> Prepared --freeze--> Frozen --snapshot--> Snapshotted
//! ```
//!
//! - **prepare** (guest running): every participant does its slow work, above all preserving guest
//!   RAM, which pins every page in the kernel.
//! - **freeze** (the pause starts): every participant pauses, then every participant saves; the
//!   states go into one blob in a memfd preserved under [`STATE_TOKEN`].
//! - **handover**: the session goes to whoever carries it across (the agent for a kexec, or for
//!   a successor process in restart mode).
//! - **cancel**: participants that paused resume in reverse order and the session is dropped,
//!   which unpreserves its files: the guest runs on in the old VMM as if nothing happened.
//! - **snapshot** (instead of handover): the session is written out where it outlives this
//!   process (a directory), then every participant resumes in reverse order, as after a cancel:
//!   the guest runs on here, and the session can be restored later, maybe more than once.
//! - **restore** and **finish** run in the successor: read and check the blob, let the VMM rebuild
//!   every component from its state, then release the session.
//!
//! Every step is timed; a failed prepare or freeze cancels by itself.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::participant::{
    AnyParticipant, FIRST_FREE_TOKEN, FileSink, ParticipantError, STATE_TOKEN,
};
use crate::session::{Session, SessionError, Token};
use crate::state::{self, MAX_BLOB_SIZE, StateError, StateSet};

/// Where a live update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// No update in progress (the old VMM before, or after a cancel; the new VMM before restore).
    Normal,
    /// Long-lived resources are in the session; the guest still runs.
    Prepared,
    /// The guest is paused and its state is in the session.
    Frozen,
    /// The session has gone to its carrier; this VMM is done with the guest.
    HandedOver,
    /// The successor has read the state and rebuilt the VM.
    Restored,
    /// The successor has released the session.
    Finished,
    /// The session was written out and the guest resumed in this VMM (a snapshot).
    Snapshotted,
}

/// What the caller asks the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Preserve long-lived resources.
    Prepare,
    /// Pause and capture.
    Freeze,
    /// Give the session away.
    Handover,
    /// Go back to running in the old VMM.
    Cancel,
    /// Read the state in the successor.
    Restore,
    /// Release the session in the successor.
    Finish,
    /// Write the session out and resume in place.
    Snapshot,
}

/// The one table of legal moves. Every (phase, step) pair is listed, so adding a phase or a step
/// does not compile until its moves are decided.
pub fn next_phase(from: Phase, step: Step) -> Result<Phase, MachineError> {
    use Phase::{Finished, Frozen, HandedOver, Normal, Prepared, Restored, Snapshotted};
    use Step::{Cancel, Finish, Freeze, Handover, Prepare, Restore, Snapshot};
    let illegal = Err(MachineError::InvalidTransition { from, step });
    match (from, step) {
        (Normal, Prepare) => Ok(Prepared),
        (Prepared, Freeze) => Ok(Frozen),
        (Frozen, Handover) => Ok(HandedOver),
        (Frozen, Snapshot) => Ok(Snapshotted),
        (Prepared | Frozen, Cancel) => Ok(Normal),
        (Normal, Restore) => Ok(Restored),
        (Restored, Finish) => Ok(Finished),
        (Prepared | Frozen | HandedOver | Restored | Finished | Snapshotted, Prepare) => illegal,
        (Normal | Frozen | HandedOver | Restored | Finished | Snapshotted, Freeze) => illegal,
        (Normal | Prepared | HandedOver | Restored | Finished | Snapshotted, Handover) => illegal,
        (Normal | Prepared | HandedOver | Restored | Finished | Snapshotted, Snapshot) => illegal,
        (Normal | HandedOver | Restored | Finished | Snapshotted, Cancel) => illegal,
        (Prepared | Frozen | HandedOver | Restored | Finished | Snapshotted, Restore) => illegal,
        (Normal | Prepared | Frozen | HandedOver | Finished | Snapshotted, Finish) => illegal,
    }
}

/// Why a live update failed.
#[derive(Debug, Error)]
pub enum MachineError {
    /// A step asked for in the wrong phase.
    #[error("Cannot {step:?} a live update that is {from:?}")]
    InvalidTransition {
        /// The phase it was in.
        from: Phase,
        /// The refused step.
        step: Step,
    },
    /// A participant failed; the update was cancelled and the guest runs on.
    #[error("{step:?} failed in {id}; the update was cancelled")]
    Participant {
        /// The step.
        step: Step,
        /// The participant.
        id: String,
        /// Why.
        #[source]
        source: ParticipantError,
    },
    /// Cancelling itself failed in a participant: the guest may not be running.
    #[error("Resuming {id} after a failed update failed")]
    Resume {
        /// The participant.
        id: String,
        /// Why.
        #[source]
        source: ParticipantError,
    },
    /// The state blob could not be written or read.
    #[error("Live-update state is unusable")]
    State(#[source] StateError),
    /// The state memfd could not be written or read.
    #[error("Cannot access the state memfd")]
    StateFile(#[source] std::io::Error),
    /// A session operation failed.
    #[error("Session operation failed")]
    Session(#[source] SessionError),
    /// A preserved file could not be taken back (after a kexec: the new kernel's file handler
    /// for it could not restore it, or has none).
    #[error("Cannot retrieve {what} (token {token:#x}) from the session")]
    Retrieve {
        /// Its token.
        token: Token,
        /// What it is and which LUO file handler carries it.
        what: &'static str,
        /// Why.
        #[source]
        source: SessionError,
    },
    /// The handover itself failed (the caller's carrier refused the session).
    #[error("Handover failed: {0}")]
    Handover(String),
    /// The session could not be written out; the guest runs on.
    #[error("Writing the snapshot failed: {0}")]
    Snapshot(String),
}

/// How long each step took, in order, for the API response and the event monitor.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    /// `(step name, microseconds)` in the order they ran.
    pub steps: Vec<(String, u64)>,
}

impl Timings {
    /// Records `name` as having taken `took`.
    pub fn record(&mut self, name: &str, took: Duration) {
        self.steps.push((
            name.to_string(),
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        ));
    }

    /// The time of `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.steps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, us)| *us)
    }
}

/// The outgoing side of a live update, in the old VMM.
pub struct Outgoing<'a> {
    phase: Phase,
    session: Option<Box<dyn Session>>,
    participants: Vec<&'a mut dyn AnyParticipant>,
    next_token: Token,
    paused: usize,
    /// When the first participant paused (the guest-visible pause starts there).
    paused_since: Option<Instant>,
    timings: Timings,
}

impl fmt::Debug for Outgoing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<_> = self.participants.iter().map(|p| p.id()).collect();
        f.debug_struct("Outgoing")
            .field("phase", &self.phase)
            .field("participants", &ids)
            .finish_non_exhaustive()
    }
}

impl<'a> Outgoing<'a> {
    /// An update of `participants` (in the order they must pause and save) into `session`.
    pub fn new(session: Box<dyn Session>, participants: Vec<&'a mut dyn AnyParticipant>) -> Self {
        Self {
            phase: Phase::Normal,
            session: Some(session),
            participants,
            next_token: FIRST_FREE_TOKEN,
            paused: 0,
            paused_since: None,
            timings: Timings::default(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The step timings so far.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Records a step the caller ran between the machine's steps (e.g. waiting for a
    /// successor after prepare).
    pub fn record(&mut self, name: &str, took: Duration) {
        self.timings.record(name, took);
    }

    /// Guest running: every participant prepares. On failure the update is cancelled.
    pub fn prepare(&mut self) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Prepare)?;
        let start = Instant::now();
        let Some(session) = self.session.as_deref_mut() else {
            return Err(MachineError::InvalidTransition {
                from: self.phase,
                step: Step::Prepare,
            });
        };
        let mut files = FileSink::starting_at(session, self.next_token);
        let mut failure = None;
        for participant in &mut self.participants {
            if let Err(source) = participant.prepare(&mut files) {
                failure = Some(MachineError::Participant {
                    step: Step::Prepare,
                    id: participant.id(),
                    source,
                });
                break;
            }
        }
        self.next_token = files.next_token();
        self.timings.record("prepare", start.elapsed());
        self.phase = target;
        match failure {
            Some(error) => self.fail(error),
            None => Ok(()),
        }
    }

    /// Pauses every participant, saves every state into `state_file` (an empty memfd) and
    /// preserves it. On failure the update is cancelled and the guest resumes.
    pub fn freeze(&mut self, state_file: File) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Freeze)?;
        let start = Instant::now();
        self.paused_since = Some(start);
        for index in 0..self.participants.len() {
            if let Err(source) = self.participants[index].pause() {
                let id = self.participants[index].id();
                self.paused = index;
                return self.fail(MachineError::Participant {
                    step: Step::Freeze,
                    id,
                    source,
                });
            }
        }
        self.paused = self.participants.len();
        self.timings.record("pause", start.elapsed());
        let saved = Instant::now();
        let result = self.save_into(state_file);
        self.timings.record("save", saved.elapsed());
        if let Err(error) = result {
            return self.fail(error);
        }
        self.timings.record("freeze", start.elapsed());
        self.phase = target;
        Ok(())
    }

    fn save_into(&mut self, mut state_file: File) -> Result<(), MachineError> {
        let Some(session) = self.session.as_deref_mut() else {
            return Err(MachineError::InvalidTransition {
                from: self.phase,
                step: Step::Freeze,
            });
        };
        let mut files = FileSink::starting_at(session, self.next_token);
        let mut envelopes = Vec::with_capacity(self.participants.len());
        for participant in &mut self.participants {
            let envelope =
                participant
                    .save(&mut files)
                    .map_err(|source| MachineError::Participant {
                        step: Step::Freeze,
                        id: participant.id(),
                        source,
                    })?;
            envelopes.push(envelope);
        }
        let blob = state::encode(envelopes).map_err(MachineError::State)?;
        state_file
            .write_all(&blob)
            .map_err(MachineError::StateFile)?;
        files
            .preserve_state(state_file.as_fd())
            .map_err(|source| MachineError::Participant {
                step: Step::Freeze,
                id: "state".into(),
                source,
            })?;
        self.next_token = files.next_token();
        Ok(())
    }

    /// The session, given away once by a handover or a snapshot.
    fn take_session(&mut self, step: Step) -> Result<Box<dyn Session>, MachineError> {
        self.session.take().ok_or(MachineError::InvalidTransition {
            from: self.phase,
            step,
        })
    }

    /// Gives the session to `carrier` (the agent's handover, or a successor). On failure the
    /// update is cancelled and the guest resumes.
    pub fn handover(
        &mut self,
        carrier: impl FnOnce(Box<dyn Session>) -> Result<(), String>,
    ) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Handover)?;
        let start = Instant::now();
        let session = self.take_session(Step::Handover)?;
        if let Err(reason) = carrier(session) {
            return self.fail(MachineError::Handover(reason));
        }
        self.timings.record("handover", start.elapsed());
        self.phase = target;
        Ok(())
    }

    /// Gives the session to `writer`, which writes it out where it outlives this process (a
    /// snapshot), then resumes every participant in reverse order: the guest runs on here.
    /// Records `guest_paused`, the whole guest-visible pause. On failure the update is cancelled (the
    /// guest resumes all the same) and the error returned.
    pub fn snapshot(
        &mut self,
        writer: impl FnOnce(Box<dyn Session>) -> Result<(), String>,
    ) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Snapshot)?;
        let start = Instant::now();
        let session = self.take_session(Step::Snapshot)?;
        if let Err(reason) = writer(session) {
            return self.fail(MachineError::Snapshot(reason));
        }
        self.timings.record("write", start.elapsed());
        let resumed = Instant::now();
        let result = self.resume_paused();
        self.timings.record("resume", resumed.elapsed());
        if let Some(since) = self.paused_since {
            self.timings.record("guest_paused", since.elapsed());
        }
        self.phase = target;
        result
    }

    /// Gives up: resumes paused participants in reverse order and drops the session, which
    /// unpreserves everything in it.
    pub fn cancel(&mut self) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Cancel)?;
        let start = Instant::now();
        self.session = None;
        let result = self.resume_paused();
        self.timings.record("cancel", start.elapsed());
        self.phase = target;
        result
    }

    /// Resumes the paused participants in reverse order; returns the first failure.
    fn resume_paused(&mut self) -> Result<(), MachineError> {
        let mut first_error = None;
        while self.paused > 0 {
            self.paused -= 1;
            let participant = &mut self.participants[self.paused];
            if let Err(source) = participant.resume() {
                first_error.get_or_insert(MachineError::Resume {
                    id: participant.id(),
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Cancels after `error` and returns it (or the resume failure, which is worse).
    fn fail(&mut self, error: MachineError) -> Result<(), MachineError> {
        if self.phase == Phase::Normal {
            // Failed before the phase moved: mark it so cancel is legal.
            self.phase = Phase::Prepared;
        }
        self.cancel()?;
        Err(error)
    }
}

/// The incoming side of a live update, in the successor VMM.
#[derive(Debug)]
pub struct Incoming {
    phase: Phase,
    session: Box<dyn Session>,
    states: Option<StateSet>,
    timings: Timings,
}

impl Incoming {
    /// Reads and checks the state blob of `session`. On error the session is left as it was
    /// (not finished), so a build that can read it may retrieve it again.
    pub fn restore(
        mut session: Box<dyn Session>,
    ) -> Result<Self, (Box<dyn Session>, MachineError)> {
        let start = Instant::now();
        let states = match read_state(session.as_mut()) {
            Ok(states) => states,
            Err(error) => return Err((session, error)),
        };
        let mut timings = Timings::default();
        timings.record("read_state", start.elapsed());
        let phase = match next_phase(Phase::Normal, Step::Restore) {
            Ok(phase) => phase,
            Err(error) => return Err((session, error)),
        };
        Ok(Self {
            phase,
            session,
            states: Some(states),
            timings,
        })
    }

    /// The saved states, for the VMM to take by id.
    pub fn states(&mut self) -> Option<&mut StateSet> {
        self.states.as_mut()
    }

    /// A file the old VMM preserved under `token`; `what` names it (and its LUO file handler)
    /// in the error.
    pub fn take_file(&mut self, token: Token, what: &'static str) -> Result<OwnedFd, MachineError> {
        self.session
            .retrieve_fd(token)
            .map_err(|source| MachineError::Retrieve {
                token,
                what,
                source,
            })
    }

    /// Every fd the old VMM attached (restart mode, see [`FileSink::attach`]), by token.
    pub fn take_attachments(&mut self) -> Result<BTreeMap<Token, OwnedFd>, MachineError> {
        self.session
            .retrieve_attachments()
            .map_err(MachineError::Session)
    }

    /// The step timings so far.
    pub fn timings_mut(&mut self) -> &mut Timings {
        &mut self.timings
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Marks the session resumed, right before the guest runs on (see
    /// [`Session::mark_resumed`]); on failure the guest must not run here.
    pub fn mark_resumed(&mut self) -> Result<(), MachineError> {
        self.session.mark_resumed().map_err(MachineError::Session)
    }

    /// Checks that every state was used, then releases the session.
    pub fn finish(&mut self) -> Result<(), MachineError> {
        let target = next_phase(self.phase, Step::Finish)?;
        let start = Instant::now();
        if let Some(states) = self.states.take() {
            states.finish().map_err(MachineError::State)?;
        }
        self.session.finish().map_err(MachineError::Session)?;
        self.timings.record("finish", start.elapsed());
        self.phase = target;
        Ok(())
    }
}

/// The state blob as errors name it: a memfd, carried across a kexec by LUO's memfd handler.
const STATE_FILE: &str = "the state blob (a memfd: LUO's memfd file handler)";

fn read_state(session: &mut dyn Session) -> Result<StateSet, MachineError> {
    let fd = session
        .retrieve_fd(STATE_TOKEN)
        .map_err(|source| MachineError::Retrieve {
            token: STATE_TOKEN,
            what: STATE_FILE,
            source,
        })?;
    let mut file = File::from(fd);
    let len = file.metadata().map_err(MachineError::StateFile)?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_BLOB_SIZE {
        return Err(MachineError::State(StateError::TooLarge { len }));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(MachineError::StateFile)?;
    let mut blob = Vec::with_capacity(len);
    file.read_to_end(&mut blob)
        .map_err(MachineError::StateFile)?;
    state::decode(&blob).map_err(MachineError::State)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::fd::BorrowedFd;
    use std::sync::{Arc, Mutex};

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::participant::Participant;

    /// A session that keeps dups of preserved files in memory.
    #[derive(Debug, Default, Clone)]
    struct MemorySession {
        files: Arc<Mutex<BTreeMap<Token, OwnedFd>>>,
        finished: Arc<Mutex<bool>>,
    }

    impl Session for MemorySession {
        fn name(&self) -> Result<String, SessionError> {
            Ok("test".into())
        }
        fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
            let fd = fd.try_clone_to_owned().map_err(|source| SessionError::Os {
                operation: "dup",
                source,
            })?;
            let mut files = self.files.lock().unwrap();
            if files.contains_key(&token) {
                return Err(SessionError::TokenExists { token });
            }
            files.insert(token, fd);
            Ok(())
        }
        fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
            self.files
                .lock()
                .unwrap()
                .remove(&token)
                .ok_or(SessionError::NoSuchToken { token })
        }
        fn finish(&mut self) -> Result<(), SessionError> {
            *self.finished.lock().unwrap() = true;
            Ok(())
        }
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct FakeState {
        value: u32,
        token: Option<Token>,
    }

    impl crate::state::Versioned for FakeState {
        const VERSION: u16 = 1;
    }

    /// Records every call into a shared log; fails where told to.
    struct Recorder {
        id: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail_in: Option<&'static str>,
        preserve: bool,
    }

    impl Recorder {
        fn call(&self, what: &str) -> Result<(), ParticipantError> {
            self.log.lock().unwrap().push(format!("{what} {}", self.id));
            if self.fail_in == Some(what) {
                return Err(ParticipantError::Failed {
                    id: self.id.into(),
                    reason: "injected".into(),
                });
            }
            Ok(())
        }
    }

    impl Participant for Recorder {
        type State = FakeState;
        fn id(&self) -> String {
            self.id.to_string()
        }
        fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
            self.call("prepare")?;
            if self.preserve {
                let file = scratch_file();
                files.preserve(file.as_fd())?;
            }
            Ok(())
        }
        fn pause(&mut self) -> Result<(), ParticipantError> {
            self.call("pause")
        }
        fn save(&mut self, _files: &mut FileSink<'_>) -> Result<FakeState, ParticipantError> {
            self.call("save")?;
            Ok(FakeState {
                value: 42,
                token: self.preserve.then_some(FIRST_FREE_TOKEN),
            })
        }
        fn resume(&mut self) -> Result<(), ParticipantError> {
            self.call("resume")
        }
    }

    fn scratch_file() -> File {
        let path = std::env::temp_dir().join(format!(
            "lu-machine-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn recorders(
        log: &Arc<Mutex<Vec<String>>>,
        fail: Option<(&'static str, &'static str)>,
    ) -> Vec<Recorder> {
        ["memory", "vcpu/0", "serial"]
            .into_iter()
            .map(|id| Recorder {
                id,
                log: log.clone(),
                fail_in: fail.filter(|(who, _)| *who == id).map(|(_, what)| what),
                preserve: id == "memory",
            })
            .collect()
    }

    fn as_any(list: &mut [Recorder]) -> Vec<&mut dyn AnyParticipant> {
        list.iter_mut()
            .map(|p| p as &mut dyn AnyParticipant)
            .collect()
    }

    #[test]
    fn a_full_update_prepares_pauses_saves_and_hands_over_in_order() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, None);
        let session = MemorySession::default();
        let files = session.files.clone();
        let mut update = Outgoing::new(Box::new(session), as_any(&mut parts));

        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();
        update.handover(|_session| Ok(())).unwrap();

        assert_eq!(update.phase(), Phase::HandedOver);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "prepare memory",
                "prepare vcpu/0",
                "prepare serial",
                "pause memory",
                "pause vcpu/0",
                "pause serial",
                "save memory",
                "save vcpu/0",
                "save serial"
            ]
        );
        let tokens: Vec<_> = files.lock().unwrap().keys().copied().collect();
        assert_eq!(tokens, [STATE_TOKEN, FIRST_FREE_TOKEN]);
        for step in ["prepare", "pause", "save", "freeze", "handover"] {
            assert!(update.timings().get(step).is_some(), "{step} not timed");
        }
    }

    #[test]
    fn a_failure_during_freeze_resumes_the_paused_participants_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, Some(("serial", "pause")));
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));
        update.prepare().unwrap();

        let error = update.freeze(scratch_file()).unwrap_err();

        assert!(
            matches!(error, MachineError::Participant { step: Step::Freeze, ref id, .. } if id == "serial")
        );
        assert_eq!(update.phase(), Phase::Normal);
        let log = log.lock().unwrap();
        assert_eq!(log[log.len() - 2..], ["resume vcpu/0", "resume memory"]);
    }

    #[test]
    fn a_failure_while_saving_resumes_everyone() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, Some(("vcpu/0", "save")));
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));
        update.prepare().unwrap();

        update.freeze(scratch_file()).unwrap_err();

        let log = log.lock().unwrap();
        assert_eq!(
            log[log.len() - 3..],
            ["resume serial", "resume vcpu/0", "resume memory"]
        );
    }

    #[test]
    fn a_failed_prepare_cancels_without_resuming_anyone() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, Some(("vcpu/0", "prepare")));
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));

        update.prepare().unwrap_err();

        assert_eq!(update.phase(), Phase::Normal);
        assert!(!log.lock().unwrap().iter().any(|l| l.starts_with("resume")));
    }

    #[test]
    fn a_refused_handover_cancels_and_resumes() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, None);
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));
        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();

        let error = update
            .handover(|_| Err("agent went away".into()))
            .unwrap_err();

        assert!(matches!(error, MachineError::Handover(_)));
        assert_eq!(update.phase(), Phase::Normal);
        assert_eq!(log.lock().unwrap().last().unwrap(), "resume memory");
    }

    #[test]
    fn a_snapshot_writes_the_session_then_resumes_everyone_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, None);
        let session = MemorySession::default();
        let files = session.files.clone();
        let mut update = Outgoing::new(Box::new(session), as_any(&mut parts));
        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();
        let written = log.clone();

        update
            .snapshot(|session| {
                written
                    .lock()
                    .unwrap()
                    .push(format!("write {}", session.name().unwrap()));
                Ok(())
            })
            .unwrap();

        assert_eq!(update.phase(), Phase::Snapshotted);
        let log = log.lock().unwrap();
        assert_eq!(
            log[log.len() - 4..],
            [
                "write test",
                "resume serial",
                "resume vcpu/0",
                "resume memory"
            ]
        );
        let tokens: Vec<_> = files.lock().unwrap().keys().copied().collect();
        assert_eq!(tokens, [STATE_TOKEN, FIRST_FREE_TOKEN]);
        for step in ["write", "resume", "guest_paused"] {
            assert!(update.timings().get(step).is_some(), "{step} not timed");
        }
    }

    #[test]
    fn a_failed_snapshot_write_resumes_everyone_and_says_why() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, None);
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));
        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();

        let error = update.snapshot(|_| Err("disk full".into())).unwrap_err();

        assert!(matches!(error, MachineError::Snapshot(ref why) if why == "disk full"));
        assert_eq!(update.phase(), Phase::Normal);
        assert_eq!(log.lock().unwrap().last().unwrap(), "resume memory");
    }

    #[test]
    fn freeze_before_prepare_is_an_invalid_transition() {
        let mut parts = recorders(&Arc::new(Mutex::new(Vec::new())), None);
        let mut update = Outgoing::new(Box::new(MemorySession::default()), as_any(&mut parts));

        let error = update.freeze(scratch_file()).unwrap_err();

        assert!(matches!(
            error,
            MachineError::InvalidTransition {
                from: Phase::Normal,
                step: Step::Freeze
            }
        ));
    }

    #[test]
    fn the_successor_restores_the_saved_states_and_finishes() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut parts = recorders(&log, None);
        let session = MemorySession::default();
        let finished = session.finished.clone();
        let mut update = Outgoing::new(Box::new(session.clone()), as_any(&mut parts));
        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();
        update.handover(|_| Ok(())).unwrap();

        let mut incoming = Incoming::restore(Box::new(session))
            .map_err(|(_, e)| e)
            .unwrap();
        let states = incoming.states().unwrap();
        let memory: FakeState = states.take("memory").unwrap();
        for id in ["vcpu/0", "serial"] {
            let _: FakeState = states.take(id).unwrap();
        }
        let memfd = incoming.take_file(memory.token.unwrap(), "guest RAM");
        incoming.finish().unwrap();

        assert_eq!(
            memory,
            FakeState {
                value: 42,
                token: Some(FIRST_FREE_TOKEN)
            }
        );
        memfd.unwrap();
        assert!(*finished.lock().unwrap());
        assert_eq!(incoming.phase(), Phase::Finished);
    }

    #[test]
    fn finish_with_unrestored_states_is_refused_and_the_session_kept() {
        let mut parts = recorders(&Arc::new(Mutex::new(Vec::new())), None);
        let session = MemorySession::default();
        let finished = session.finished.clone();
        let mut update = Outgoing::new(Box::new(session.clone()), as_any(&mut parts));
        update.prepare().unwrap();
        update.freeze(scratch_file()).unwrap();
        update.handover(|_| Ok(())).unwrap();
        let mut incoming = Incoming::restore(Box::new(session))
            .map_err(|(_, e)| e)
            .unwrap();

        let error = incoming.finish().unwrap_err();

        assert!(matches!(
            error,
            MachineError::State(StateError::Orphans { .. })
        ));
        assert!(!*finished.lock().unwrap());
    }

    #[test]
    fn a_file_the_session_cannot_give_back_is_named_with_its_handler() {
        // A session with no state blob: as a new kernel whose memfd handler failed it.
        let session = MemorySession::default();

        let (_, error) = Incoming::restore(Box::new(session)).unwrap_err();

        let MachineError::Retrieve { token, what, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(*token, STATE_TOKEN);
        assert!(
            what.contains("state blob") && what.contains("memfd"),
            "{what}"
        );
        assert!(error.to_string().contains("token 0x0"), "{error}");
    }

    #[test]
    fn a_corrupt_state_blob_is_refused_and_the_session_handed_back_unfinished() {
        let mut session = MemorySession::default();
        let mut blob = scratch_file();
        blob.write_all(b"CHLUSTAT but then garbage that is long enough")
            .unwrap();
        session.preserve_fd(blob.as_fd(), STATE_TOKEN).unwrap();
        let finished = session.finished.clone();

        let (returned, error) = Incoming::restore(Box::new(session)).unwrap_err();

        assert!(matches!(
            error,
            MachineError::State(StateError::Checksum { .. })
        ));
        assert!(!*finished.lock().unwrap());
        assert_eq!(returned.name().unwrap(), "test");
    }

    /// Every (phase, step) pair: the legal ones move, the rest are refused.
    #[test]
    fn only_the_documented_transitions_are_legal() {
        use Phase::*;
        use Step::*;
        let legal = [
            (Normal, Prepare, Prepared),
            (Prepared, Freeze, Frozen),
            (Frozen, Handover, HandedOver),
            (Frozen, Snapshot, Snapshotted),
            (Prepared, Cancel, Normal),
            (Frozen, Cancel, Normal),
            (Normal, Restore, Restored),
            (Restored, Finish, Finished),
        ];
        for from in [
            Normal,
            Prepared,
            Frozen,
            HandedOver,
            Restored,
            Finished,
            Snapshotted,
        ] {
            for step in [Prepare, Freeze, Handover, Snapshot, Cancel, Restore, Finish] {
                let expected = legal
                    .iter()
                    .find(|(f, s, _)| *f == from && *s == step)
                    .map(|(_, _, to)| *to);
                match (next_phase(from, step), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from:?} {step:?}"),
                    (Err(MachineError::InvalidTransition { .. }), None) => {}
                    (got, want) => panic!("{from:?} {step:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }
}
