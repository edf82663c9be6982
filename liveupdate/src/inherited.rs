//! A LUO session fd inherited the systemd way: systemd's `LUOSession=` (v262) creates, or after a
//! kexec retrieves, a named session for a service and passes its fd through `$LISTEN_FDS`
//! (`sd_listen_fds(3)`): `LISTEN_PID` is the receiving process, `LISTEN_FDS` counts fds from 3
//! upwards, `LISTEN_FDNAMES` names them, colon-separated.
//!
//! [`take_session`] picks the fd named as asked (or the only one), owns it with FD_CLOEXEC set,
//! unsets the three variables so children do not take the fds for theirs, and checks with
//! `LIVEUPDATE_SESSION_GET_NAME` that it really is a LUO session. The choice itself
//! ([`select`]) is a pure function of the variables, for tests.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use thiserror::Error;

use crate::kernel::KernelSession;
use crate::sys;

/// The first passed fd (after stdin, stdout and stderr).
pub const FIRST_LISTEN_FD: RawFd = 3;
/// More passed fds than this is a broken environment, not a service's fd store.
pub const MAX_LISTEN_FDS: usize = 1024;
/// The name systemd gives an fd that has none.
const UNNAMED: &str = "unknown";

/// Why no inherited session could be taken.
#[derive(Debug, Error)]
pub enum InheritedError {
    /// No fds were passed at all.
    #[error(
        "LISTEN_FDS is not set: no fds were passed (start the VMM from a unit with LUOSession=)"
    )]
    NoFds,
    /// `LISTEN_FDS` without `LISTEN_PID`: nobody said whom the fds are for.
    #[error("LISTEN_FDS is set but LISTEN_PID is not")]
    NoPid,
    /// The fds were passed to another process (e.g. a wrapper that did not exec).
    #[error("LISTEN_PID is {listen_pid}, not this process ({our_pid}): the fds are not ours")]
    WrongPid {
        /// `LISTEN_PID`.
        listen_pid: u32,
        /// This process.
        our_pid: u32,
    },
    /// A variable that must be a number is not one.
    #[error("{var}={value:?} is not a number")]
    NotANumber {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// `LISTEN_FDS=0`, or a count no service gets.
    #[error("LISTEN_FDS={count}: expected 1 to {MAX_LISTEN_FDS} fds")]
    BadCount {
        /// The count.
        count: usize,
    },
    /// `LISTEN_FDNAMES` does not name every fd.
    #[error("LISTEN_FDNAMES has {names} names for {fds} fds")]
    NamesMismatch {
        /// How many names.
        names: usize,
        /// How many fds.
        fds: usize,
    },
    /// No passed fd has the name asked for.
    #[error("No inherited fd is named {wanted:?} (LISTEN_FDNAMES={names:?})")]
    UnknownName {
        /// The name asked for.
        wanted: String,
        /// `LISTEN_FDNAMES`, or empty when unset.
        names: String,
    },
    /// Several fds and no name to choose by.
    #[error("{count} fds were passed: name the session's fd")]
    Ambiguous {
        /// How many.
        count: usize,
    },
    /// The chosen fd cannot be owned (not open, or owned already).
    #[error("Cannot take fd {fd} (name {name})")]
    Fd {
        /// The fd.
        fd: RawFd,
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The chosen fd is open but is no LUO session.
    #[error("fd {fd} (name {name}) is not a LUO session fd")]
    NotASession {
        /// The fd.
        fd: RawFd,
        /// Its name.
        name: String,
        /// What GET_NAME said.
        #[source]
        source: io::Error,
    },
}

/// The protocol's three variables, as found (the process's, or a test's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenEnv {
    /// `LISTEN_PID`.
    pub pid: Option<String>,
    /// `LISTEN_FDS`.
    pub fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub names: Option<String>,
}

impl ListenEnv {
    /// The variables of this process (non-UTF-8 values are kept lossily and then refused).
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        Self {
            pid: var("LISTEN_PID"),
            fds: var("LISTEN_FDS"),
            names: var("LISTEN_FDNAMES"),
        }
    }
}

/// The passed fd [`select`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Its number.
    pub fd: RawFd,
    /// Its name (`unknown` when `LISTEN_FDNAMES` is unset).
    pub name: String,
    /// How many fds were passed (3 to 3 + count - 1).
    pub count: usize,
}

fn number<T: std::str::FromStr>(var: &'static str, value: &str) -> Result<T, InheritedError> {
    // Plain decimal digits only (no sign, no spaces), as systemd writes them.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InheritedError::NotANumber {
            var,
            value: value.to_string(),
        });
    }
    value.parse().map_err(|_| InheritedError::NotANumber {
        var,
        value: value.to_string(),
    })
}

/// Chooses the passed fd named `wanted` (or, with no name asked, the only one) for process
/// `our_pid`, by the rules of `sd_listen_fds(3)`.
pub fn select(
    env: &ListenEnv,
    our_pid: u32,
    wanted: Option<&str>,
) -> Result<Selected, InheritedError> {
    if env.fds.is_none() {
        return Err(InheritedError::NoFds);
    }
    let passed = listed(env, our_pid)?;
    let count = passed.len();
    let index = match wanted {
        // Unnamed fds: the only one is taken; GET_NAME will say what it is.
        Some(_) if env.names.is_none() && count == 1 => 0,
        Some(wanted) => passed
            .iter()
            .position(|(_, name)| name == wanted)
            .ok_or_else(|| InheritedError::UnknownName {
                wanted: wanted.to_string(),
                names: env.names.clone().unwrap_or_default(),
            })?,
        None if count == 1 => 0,
        None => return Err(InheritedError::Ambiguous { count }),
    };
    let (fd, name) = passed
        .into_iter()
        .nth(index)
        .ok_or(InheritedError::BadCount { count })?;
    Ok(Selected { fd, name, count })
}

/// Every passed fd with its name, for process `our_pid`: none when `LISTEN_FDS` is unset (a
/// first start); an error when the variables are malformed or name another process.
pub fn listed(env: &ListenEnv, our_pid: u32) -> Result<Vec<(RawFd, String)>, InheritedError> {
    let Some(fds) = env.fds.as_deref() else {
        return Ok(Vec::new());
    };
    let listen_pid: u32 = number(
        "LISTEN_PID",
        env.pid.as_deref().ok_or(InheritedError::NoPid)?,
    )?;
    if listen_pid != our_pid {
        return Err(InheritedError::WrongPid {
            listen_pid,
            our_pid,
        });
    }
    let count: usize = number("LISTEN_FDS", fds)?;
    if count == 0 || count > MAX_LISTEN_FDS {
        return Err(InheritedError::BadCount { count });
    }
    let names: Vec<String> = match env.names.as_deref() {
        Some(names) => names.split(':').map(str::to_string).collect(),
        None => vec![UNNAMED.to_string(); count],
    };
    if names.len() != count {
        return Err(InheritedError::NamesMismatch {
            names: names.len(),
            fds: count,
        });
    }
    Ok((FIRST_LISTEN_FD..).zip(names).collect())
}

/// The session name the `/proc/self/fd` link of a LUO session fd shows
/// (`anon_inode:[luo_session] NAME`), for kernels without GET_NAME (before 7.2).
pub fn name_from_fd_link(link: &str) -> Option<&str> {
    let name = link
        .strip_prefix("anon_inode:")
        .unwrap_or(link)
        .strip_prefix("[luo_session] ")?;
    (!name.is_empty()).then_some(name)
}

/// The kernel's name of session `fd`: GET_NAME (Linux 7.2+), else the fd's `/proc` link; the
/// error of GET_NAME when `fd` is no LUO session.
pub fn luo_session_name(fd: BorrowedFd<'_>) -> io::Result<String> {
    match sys::get_name(fd) {
        Ok(name) => Ok(name),
        Err(error) => {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            match name_from_fd_link(&link) {
                Some(name) => Ok(name.to_string()),
                None => Err(error),
            }
        }
    }
}

/// A session fd passed by the service manager.
#[derive(Debug)]
pub struct InheritedSession {
    fd_name: String,
    kernel_name: String,
    session: KernelSession,
}

impl InheritedSession {
    /// Wraps `session` (checked with [`luo_session_name`]) passed under `fd_name`.
    pub fn new(fd_name: &str, kernel_name: &str, session: KernelSession) -> Self {
        Self {
            fd_name: fd_name.to_string(),
            kernel_name: kernel_name.to_string(),
            session,
        }
    }

    /// The name it was passed under (`LISTEN_FDNAMES`).
    pub fn fd_name(&self) -> &str {
        &self.fd_name
    }

    /// The kernel's name of the session (systemd derives it from the unit's name).
    pub fn kernel_name(&self) -> &str {
        &self.kernel_name
    }

    /// True if `name` names this session: its fd name or its kernel name.
    pub fn is_named(&self, name: &str) -> bool {
        name == self.fd_name || name == self.kernel_name
    }

    /// The session.
    pub fn session(&self) -> &KernelSession {
        &self.session
    }

    /// Another handle on the same session (a dup of its fd).
    pub fn try_clone_session(&self) -> io::Result<KernelSession> {
        Ok(KernelSession::from_fd(
            self.session.as_fd().try_clone_to_owned()?,
        ))
    }
}

/// Takes the session fd named `wanted` (or the only fd) that this process inherited, unsets
/// `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, and checks that the fd is a LUO session.
/// Call it from `main` before any thread starts (it changes the environment).
pub fn take_session(wanted: Option<&str>) -> Result<InheritedSession, InheritedError> {
    let env = ListenEnv::from_process();
    let selected = select(&env, std::process::id(), wanted)?;
    // The fds are ours from here on, whatever we make of them: children must see none.
    sys::listen::unset_listen_env();
    for offset in 0..selected.count {
        if let Ok(offset) = RawFd::try_from(offset)
            && let Err(e) = sys::listen::set_cloexec(FIRST_LISTEN_FD + offset)
        {
            log::debug!("Passed fd {}: {e}", FIRST_LISTEN_FD + offset);
        }
    }
    let fd = sys::listen::claim_inherited_fd(selected.fd).map_err(|source| InheritedError::Fd {
        fd: selected.fd,
        name: selected.name.clone(),
        source,
    })?;
    check_session(fd, selected.fd, &selected.name)
}

/// Checks that `fd` is a LUO session and wraps it; `fd_number` and `name` are for the error.
pub fn check_session(
    fd: std::os::fd::OwnedFd,
    fd_number: RawFd,
    name: &str,
) -> Result<InheritedSession, InheritedError> {
    let kernel_name =
        luo_session_name(fd.as_fd()).map_err(|source| InheritedError::NotASession {
            fd: fd_number,
            name: name.to_string(),
            source,
        })?;
    Ok(InheritedSession::new(
        name,
        &kernel_name,
        KernelSession::from_fd(fd),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PID: u32 = 4242;

    fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ListenEnv {
        ListenEnv {
            pid: pid.map(str::to_string),
            fds: fds.map(str::to_string),
            names: names.map(str::to_string),
        }
    }

    #[test]
    fn listed_gives_every_fd_with_its_name_and_nothing_on_a_first_start() {
        let passed = env(
            Some("4242"),
            Some("3"),
            Some("luod.listener:luod.fd.0:luod.meta.2"),
        );

        let fds = listed(&passed, PID).unwrap();
        let first_start = listed(&ListenEnv::default(), PID).unwrap();

        assert_eq!(
            fds,
            [
                (3, "luod.listener".to_string()),
                (4, "luod.fd.0".to_string()),
                (5, "luod.meta.2".to_string())
            ]
        );
        assert!(first_start.is_empty());
    }

    #[test]
    fn listed_refuses_a_bad_environment_saying_why() {
        let cases = [
            (
                env(None, Some("2"), None),
                "LISTEN_FDS is set but LISTEN_PID is not",
            ),
            (
                env(Some("1"), Some("2"), None),
                "LISTEN_PID is 1, not this process (4242): the fds are not ours",
            ),
            (
                env(Some("4242"), Some("two"), None),
                "LISTEN_FDS=\"two\" is not a number",
            ),
            (
                env(Some("4242"), Some("0"), None),
                "LISTEN_FDS=0: expected 1 to 1024 fds",
            ),
            (
                env(Some("4242"), Some("2"), Some("a:b:c")),
                "LISTEN_FDNAMES has 3 names for 2 fds",
            ),
        ];

        for (passed, message) in cases {
            let error = listed(&passed, PID).unwrap_err();
            assert_eq!(error.to_string(), message, "{passed:?}");
        }
    }

    #[test]
    fn named_fd_is_chosen_among_several() {
        let env = env(Some("4242"), Some("3"), Some("store:vm:other"));

        let selected = select(&env, PID, Some("vm")).unwrap();

        assert_eq!(
            selected,
            Selected {
                fd: 4,
                name: "vm".into(),
                count: 3
            }
        );
    }

    #[test]
    fn only_fd_is_chosen_without_a_name() {
        let env = env(Some("4242"), Some("1"), Some("vm"));

        let selected = select(&env, PID, None).unwrap();

        assert_eq!(selected.fd, 3);
        assert_eq!(selected.name, "vm");
    }

    #[test]
    fn only_unnamed_fd_is_chosen_for_any_name() {
        let env = env(Some("4242"), Some("1"), None);

        let selected = select(&env, PID, Some("vm")).unwrap();

        assert_eq!(selected.fd, 3);
        assert_eq!(selected.name, "unknown");
    }

    #[test]
    fn missing_listen_fds_is_no_fds() {
        let env = env(Some("4242"), None, Some("vm"));

        let err = select(&env, PID, Some("vm")).unwrap_err();

        assert!(matches!(err, InheritedError::NoFds));
        assert!(err.to_string().contains("LUOSession="), "{err}");
    }

    #[test]
    fn missing_listen_pid_is_refused() {
        let err = select(&env(None, Some("1"), None), PID, None).unwrap_err();

        assert!(matches!(err, InheritedError::NoPid));
    }

    #[test]
    fn another_process_pid_is_refused_naming_both() {
        let err = select(&env(Some("17"), Some("1"), None), PID, None).unwrap_err();

        assert!(matches!(
            err,
            InheritedError::WrongPid {
                listen_pid: 17,
                our_pid: PID
            }
        ));
        assert_eq!(
            err.to_string(),
            "LISTEN_PID is 17, not this process (4242): the fds are not ours"
        );
    }

    #[test]
    fn non_numeric_values_are_refused_naming_the_variable() {
        let bad_pid = select(&env(Some("12x"), Some("1"), None), PID, None).unwrap_err();
        let bad_fds = select(&env(Some("4242"), Some("one"), None), PID, None).unwrap_err();
        let signed = select(&env(Some("4242"), Some("+1"), None), PID, None).unwrap_err();
        let empty = select(&env(Some(""), Some("1"), None), PID, None).unwrap_err();
        let huge = select(&env(Some("99999999999"), Some("1"), None), PID, None).unwrap_err();

        assert!(
            matches!(bad_pid, InheritedError::NotANumber { var: "LISTEN_PID", ref value } if value == "12x")
        );
        assert!(matches!(
            bad_fds,
            InheritedError::NotANumber {
                var: "LISTEN_FDS",
                ..
            }
        ));
        assert!(matches!(signed, InheritedError::NotANumber { .. }));
        assert!(matches!(empty, InheritedError::NotANumber { .. }));
        assert!(matches!(huge, InheritedError::NotANumber { .. }));
        assert_eq!(bad_fds.to_string(), "LISTEN_FDS=\"one\" is not a number");
    }

    #[test]
    fn zero_or_absurd_fd_counts_are_refused() {
        let zero = select(&env(Some("4242"), Some("0"), None), PID, None).unwrap_err();
        let absurd = select(&env(Some("4242"), Some("100000"), None), PID, None).unwrap_err();

        assert!(matches!(zero, InheritedError::BadCount { count: 0 }));
        assert!(matches!(
            absurd,
            InheritedError::BadCount { count: 100_000 }
        ));
    }

    #[test]
    fn unknown_name_is_refused_listing_the_names() {
        let env = env(Some("4242"), Some("2"), Some("a:b"));

        let err = select(&env, PID, Some("vm")).unwrap_err();

        assert!(matches!(err, InheritedError::UnknownName { .. }));
        assert_eq!(
            err.to_string(),
            "No inherited fd is named \"vm\" (LISTEN_FDNAMES=\"a:b\")"
        );
    }

    #[test]
    fn single_fd_with_another_name_is_not_taken_for_the_asked_one() {
        let env = env(Some("4242"), Some("1"), Some("other"));

        let err = select(&env, PID, Some("vm")).unwrap_err();

        assert!(matches!(err, InheritedError::UnknownName { .. }));
    }

    #[test]
    fn names_must_match_the_fd_count() {
        let env = env(Some("4242"), Some("2"), Some("vm"));

        let err = select(&env, PID, Some("vm")).unwrap_err();

        assert!(matches!(
            err,
            InheritedError::NamesMismatch { names: 1, fds: 2 }
        ));
    }

    #[test]
    fn several_fds_without_a_name_are_ambiguous() {
        let env = env(Some("4242"), Some("2"), Some("a:b"));

        let err = select(&env, PID, None).unwrap_err();

        assert!(matches!(err, InheritedError::Ambiguous { count: 2 }));
    }

    #[test]
    fn proc_link_of_a_session_gives_its_name() {
        assert_eq!(
            name_from_fd_link("anon_inode:[luo_session] vm-1a2b"),
            Some("vm-1a2b")
        );
        assert_eq!(name_from_fd_link("[luo_session] vm"), Some("vm"));
        assert_eq!(name_from_fd_link("anon_inode:[eventfd]"), None);
        assert_eq!(name_from_fd_link("/memfd:x (deleted)"), None);
        assert_eq!(name_from_fd_link("anon_inode:[luo_session] "), None);
    }

    #[test]
    fn memfd_is_not_a_luo_session_fd() {
        let memfd = sys::memfd_create("not-a-session", 0).unwrap();

        let err = check_session(memfd, 3, "vm").unwrap_err();

        assert!(matches!(err, InheritedError::NotASession { fd: 3, .. }));
        assert_eq!(err.to_string(), "fd 3 (name vm) is not a LUO session fd");
    }

    #[test]
    fn session_is_named_by_its_fd_name_or_kernel_name() {
        let memfd = sys::memfd_create("stand-in", 0).unwrap();
        let session = InheritedSession::new("vm", "unit-hash-vm", KernelSession::from_fd(memfd));

        assert!(session.is_named("vm"));
        assert!(session.is_named("unit-hash-vm"));
        assert!(!session.is_named("other"));
    }
}
