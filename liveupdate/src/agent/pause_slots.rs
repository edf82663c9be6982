//! Pause slots (restart mode): how many guests the agent lets be paused for an update at once.
//!
//! A restart-mode update costs about two CPUs for its pause: the old VMM saving, then its
//! successor loading. When a host updates all its VMs together, every guest paused at once
//! waits for CPUs that the other pauses hold, and each pause grows with the number of VMs. So
//! an old VMM with a successor ready asks for a slot right before it pauses
//! ([`super::protocol::Request::WaitPauseSlot`]), its guest still running while it waits, and
//! the guests take their short pauses a few at a time. In kernel mode every session must freeze
//! for the one kexec: no slots there.
//!
//! A slot is free again once its update is over (the successor resumed the guest and finished,
//! or the update was cancelled, or its VMM died), or after its lease ([`DEFAULT_LEASE`]) in any
//! case, so that a stuck update holds up the others for a bounded time only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Longest a slot is held unless told otherwise: an update's pause takes a few ms; one that
/// takes far longer lets the next guest pause beside it.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(100);

/// The slots and the sessions holding them.
#[derive(Debug)]
pub struct PauseSlots {
    /// How many sessions may hold a slot at once (0: any number).
    limit: usize,
    /// Longest a session holds its slot.
    lease: Duration,
    /// Each holder's session name, and when it took its slot.
    held: BTreeMap<String, Instant>,
}

impl Default for PauseSlots {
    fn default() -> Self {
        Self::new(Self::default_limit(), DEFAULT_LEASE)
    }
}

impl PauseSlots {
    /// Slots for `limit` paused guests at once (0 lets every guest pause at once), each held
    /// for at most `lease`.
    pub fn new(limit: usize, lease: Duration) -> Self {
        Self {
            limit,
            lease,
            held: BTreeMap::new(),
        }
    }

    /// Half the host's CPUs, at least one: a pause keeps about two CPUs busy.
    pub fn default_limit() -> usize {
        std::thread::available_parallelism().map_or(1, |cpus| (cpus.get() / 2).max(1))
    }

    /// Whether session `name` would get a slot now: it holds one already, or fewer than the
    /// limit are in use, counting only holders that `still_held` by the agent and within their
    /// lease.
    pub fn is_free_for(&self, name: &str, now: Instant, still_held: impl Fn(&str) -> bool) -> bool {
        if self.limit == 0 || self.held.contains_key(name) {
            return true;
        }
        let in_use = self
            .held
            .iter()
            .filter(|(holder, since)| live(holder, **since, self.lease, now, &still_held))
            .count();
        in_use < self.limit
    }

    /// Takes a slot for session `name` if [`Self::is_free_for`]; returns whether it did. Frees
    /// the slots of holders gone or past their lease first.
    pub fn take(&mut self, name: &str, now: Instant, still_held: impl Fn(&str) -> bool) -> bool {
        let lease = self.lease;
        self.held
            .retain(|holder, since| live(holder, *since, lease, now, &still_held));
        if !self.is_free_for(name, now, &still_held) {
            return false;
        }
        if self.limit > 0 {
            self.held.entry(name.to_string()).or_insert(now);
        }
        true
    }

    /// How long until the first lease runs out (`None`: no slot is held).
    pub fn until_first_lease_ends(&self, now: Instant) -> Option<Duration> {
        self.held
            .values()
            .map(|since| (*since + self.lease).saturating_duration_since(now))
            .min()
    }
}

/// Whether `holder`'s slot, taken at `since`, still counts at `now`.
fn live(
    holder: &str,
    since: Instant,
    lease: Duration,
    now: Instant,
    still_held: &impl Fn(&str) -> bool,
) -> bool {
    now.saturating_duration_since(since) < lease && still_held(holder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everyone_held(_: &str) -> bool {
        true
    }

    #[test]
    fn a_limit_of_one_lets_one_session_pause_at_a_time() {
        let mut slots = PauseSlots::new(1, DEFAULT_LEASE);
        let now = Instant::now();

        let first = slots.take("a", now, everyone_held);
        let second = slots.take("b", now, everyone_held);

        assert!(first);
        assert!(!second);
    }

    #[test]
    fn a_holder_asking_again_keeps_its_slot() {
        let mut slots = PauseSlots::new(1, DEFAULT_LEASE);
        let now = Instant::now();
        slots.take("a", now, everyone_held);

        assert!(slots.take("a", now, everyone_held));
        assert!(slots.is_free_for("a", now, everyone_held));
    }

    #[test]
    fn a_slot_is_free_once_its_session_has_left_the_agent() {
        let mut slots = PauseSlots::new(1, DEFAULT_LEASE);
        let now = Instant::now();
        slots.take("a", now, everyone_held);
        let only_b_held = |name: &str| name == "b";

        assert!(slots.is_free_for("b", now, only_b_held));
        assert!(slots.take("b", now, only_b_held));
        assert!(!slots.take("c", now, everyone_held));
    }

    #[test]
    fn a_slot_is_free_once_its_lease_ran_out() {
        let mut slots = PauseSlots::new(1, DEFAULT_LEASE);
        let start = Instant::now();
        slots.take("a", start, everyone_held);

        let within = slots.take("b", start + DEFAULT_LEASE / 2, everyone_held);
        let after = slots.take("b", start + DEFAULT_LEASE, everyone_held);

        assert!(!within);
        assert!(after);
    }

    #[test]
    fn the_first_lease_to_end_says_when_to_look_again() {
        let mut slots = PauseSlots::new(2, DEFAULT_LEASE);
        let start = Instant::now();
        let none_yet = slots.until_first_lease_ends(start);
        slots.take("a", start, everyone_held);
        slots.take("b", start + DEFAULT_LEASE / 2, everyone_held);

        let then = slots.until_first_lease_ends(start + DEFAULT_LEASE / 4);

        assert_eq!(none_yet, None);
        assert_eq!(then, Some(DEFAULT_LEASE - DEFAULT_LEASE / 4));
    }

    #[test]
    fn a_limit_of_two_lets_two_pause_and_no_limit_lets_all() {
        let now = Instant::now();
        let mut two = PauseSlots::new(2, DEFAULT_LEASE);
        let mut unlimited = PauseSlots::new(0, DEFAULT_LEASE);

        let taken: Vec<bool> = ["a", "b", "c"]
            .iter()
            .map(|name| two.take(name, now, everyone_held))
            .collect();
        let all = ["a", "b", "c"]
            .iter()
            .all(|name| unlimited.take(name, now, everyone_held));

        assert_eq!(taken, vec![true, true, false]);
        assert!(all);
    }

    #[test]
    fn the_default_limit_is_half_the_cpus_and_at_least_one() {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

        let limit = PauseSlots::default_limit();

        assert_eq!(limit, (cpus / 2).max(1));
    }
}
