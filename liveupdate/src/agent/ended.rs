//! What the agent remembers of sessions that are gone for a reason a later successor must hear:
//! resumed by a successor (the saved state is stale from then on) or abandoned by a VMM that
//! died before its handover. A request for such a session gets a `stale` error naming what
//! happened, instead of a wait that cannot end or a restore of state the guest has moved past.
//!
//! Also the watch on the process that created each outgoing session: a pidfd, so that a
//! session whose VMM died before handing it over is dropped (its guest died with the VMM) rather
//! than left pinning guest RAM.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::time::{SystemTime, UNIX_EPOCH};

use super::protocol::{ErrorKind, WireError};
use super::sys;

/// Most remembered ends; the oldest is forgotten first.
const MAX_ENDED: usize = 256;

/// Why a session of some name is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Ended {
    /// Whose it was (only they, and root, are told).
    owner: u32,
    /// Resumed by a successor that has not finished it yet (its `finish` is still accepted).
    pub(super) resumed: bool,
    /// What happened, for the refusal.
    message: String,
}

impl Ended {
    /// Session `name` was resumed by process `pid` of `owner` just now.
    pub(super) fn resumed(name: &str, owner: u32, pid: u32) -> Self {
        Self {
            owner,
            resumed: true,
            message: format!(
                "Session {name:?} was already restored and resumed by pid {pid} at {}; its saved \
                 state is stale and is never restored again (the guest's RAM and state are with \
                 that VMM: if it still runs, save them there, e.g. with vm.snapshot)",
                utc_now()
            ),
        }
    }

    /// Session `name` of `owner` was dropped because its creator `pid` exited before the
    /// handover.
    pub(super) fn abandoned(name: &str, owner: u32, pid: i32) -> Self {
        Self {
            owner,
            resumed: false,
            message: format!(
                "Session {name:?} was abandoned: the VMM that created it (pid {pid}) exited before \
                 handing it over (noticed at {}), so its guest was lost with it; the agent \
                 dropped the session",
                utc_now()
            ),
        }
    }

    /// Whether `uid` owns it.
    pub(super) fn owned_by(&self, uid: u32) -> bool {
        self.owner == uid
    }
}

/// The remembered ends, by session name.
#[derive(Debug, Default)]
pub(super) struct EndedSessions {
    by_name: BTreeMap<String, Ended>,
    order: VecDeque<String>,
}

impl EndedSessions {
    /// Remembers why `name` ended (replacing an older record).
    pub(super) fn record(&mut self, name: &str, ended: Ended) {
        self.forget(name);
        if self.order.len() >= MAX_ENDED
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_name.remove(&oldest);
        }
        self.order.push_back(name.to_string());
        self.by_name.insert(name.to_string(), ended);
    }

    /// Forgets `name` (a new session of that name, or a finish).
    pub(super) fn forget(&mut self, name: &str) {
        if self.by_name.remove(name).is_some() {
            self.order.retain(|n| n != name);
        }
    }

    /// Why `name` ended, if it did.
    pub(super) fn get(&self, name: &str) -> Option<&Ended> {
        self.by_name.get(name)
    }

    /// The refusal for a request by `uid` about `name`, if it ended: `stale` with what
    /// happened to its owner and root, `permission_denied` to anyone else.
    pub(super) fn refusal(&self, name: &str, uid: u32) -> Option<WireError> {
        let ended = self.by_name.get(name)?;
        Some(if ended.owner == uid || uid == 0 {
            WireError::new(ErrorKind::Stale, ended.message.clone())
        } else {
            WireError::new(
                ErrorKind::PermissionDenied,
                format!("Permission denied: session {name:?} belongs to another user"),
            )
        })
    }
}

/// The process that created an outgoing session, watched through a pidfd.
#[derive(Debug)]
pub(super) struct Creator {
    pid: i32,
    pidfd: OwnedFd,
}

impl Creator {
    /// Watches process `pid`.
    pub(super) fn watch(pid: i32) -> io::Result<Self> {
        Ok(Self {
            pid,
            pidfd: sys::pidfd_open(pid)?,
        })
    }

    /// Its pid.
    pub(super) fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it has exited.
    pub(super) fn has_exited(&self) -> bool {
        sys::has_exited(&self.pidfd, 0)
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc(secs)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, days to civil date
/// by the usual era arithmetic).
fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Shift the epoch to 0000-03-01, so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::protocol::{Request, Response};
    use crate::agent::state::tests::{
        OWNER, create, error_kind, handover, name, ok, restart_state, retrieve,
    };

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_576_730), "2026-12-06T17:05:30Z");
    }

    #[test]
    fn the_oldest_end_is_forgotten_first_and_a_refusal_names_what_happened() {
        let mut ended = EndedSessions::default();
        for index in 0..=MAX_ENDED {
            ended.record(&format!("vm{index}"), Ended::abandoned("x", 1000, 42));
        }
        ended.record("r", Ended::resumed("r", 1000, 7));

        assert!(ended.get("vm0").is_none() && ended.get("vm1").is_none());
        assert!(ended.get("vm2").is_some());
        let refusal = ended.refusal("r", 1000).unwrap();
        assert_eq!(refusal.kind, ErrorKind::Stale);
        assert!(
            refusal.message.contains("resumed by pid 7") && refusal.message.contains("stale"),
            "{}",
            refusal.message
        );
        assert_eq!(
            ended.refusal("r", 2000).unwrap().kind,
            ErrorKind::PermissionDenied
        );
        assert!(ended.refusal("gone", 1000).is_none());
    }

    #[test]
    fn a_resumed_sessions_files_are_left_for_the_server_to_close_after_its_answer() {
        let (mut state, _provider) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, handover("vm"), OWNER, None);
        ok(&mut state, retrieve("vm"), OWNER, None);
        let before = state.take_released().len();

        ok(
            &mut state,
            Request::Resumed {
                name: name("vm"),
                pid: 77,
            },
            OWNER,
            None,
        );

        assert_eq!(before, 0);
        assert!(!state.holds("vm"));
        assert_eq!(state.take_released().len(), 1);
        assert!(state.take_released().is_empty());
    }

    #[test]
    fn a_resumed_session_is_released_refused_as_stale_and_its_finish_still_accepted() {
        let (mut state, provider) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, handover("vm"), OWNER, None);
        ok(&mut state, retrieve("vm"), OWNER, None);
        let resumed = Request::Resumed {
            name: name("vm"),
            pid: 77,
        };

        ok(&mut state, resumed, OWNER, None);
        // As the server does once the successor has its answer.
        crate::agent::state::finish_released(state.take_released());
        let again = state.handle(retrieve("vm"), OWNER, None);
        let fd = error_kind(
            &mut state,
            Request::RetrieveFd {
                name: name("vm"),
                token: 0,
            },
            OWNER,
            None,
        );
        let held = state.list();
        ok(
            &mut state,
            Request::Finish { name: name("vm") },
            OWNER,
            None,
        );
        let after_finish = error_kind(&mut state, retrieve("vm"), OWNER, None);

        let (Response::Error(refusal), None) = again else {
            panic!("{again:?}");
        };
        assert_eq!(refusal.kind, ErrorKind::Stale);
        assert!(
            refusal.message.contains("resumed by pid 77"),
            "{}",
            refusal.message
        );
        assert_eq!(fd, ErrorKind::Stale);
        assert!(held.is_empty(), "{held:?}");
        assert!(provider.sessions().is_empty());
        assert_ne!(after_finish, ErrorKind::Stale, "the finish forgot it");
    }

    #[test]
    fn a_session_whose_creator_exited_before_the_handover_is_dropped_and_refused() {
        let (mut state, provider) = restart_state();
        let mut creator = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        ok(&mut state, create("vm"), OWNER, None);
        state.watch_creator("vm", i32::try_from(creator.id()).unwrap());
        let while_alive = state.list().len();

        creator.kill().unwrap();
        creator.wait().unwrap();
        let refused = state.handle(retrieve("vm"), OWNER, None);
        ok(&mut state, create("vm"), OWNER, None);

        assert_eq!(while_alive, 1);
        let (Response::Error(refusal), None) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(refusal.kind, ErrorKind::Stale);
        assert!(
            refusal.message.contains(&format!("pid {}", creator.id())),
            "{}",
            refusal.message
        );
        assert_eq!(provider.sessions().len(), 1, "only the new session");
    }

    #[test]
    fn a_creator_that_exits_is_noticed() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let creator = Creator::watch(i32::try_from(child.id()).unwrap()).unwrap();
        let before = creator.has_exited();

        child.kill().unwrap();
        child.wait().unwrap();

        assert!(!before);
        assert!(creator.has_exited());
    }
}
