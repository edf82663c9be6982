//! Checks against a real `/dev/liveupdate`, for the QEMU test bed (this CI host has no LUO).
//!
//! [`self_test_kernel`] runs the single-boot rules (exclusive open, names, tokens, which files
//! are preservable, session types, discard on close). [`kexec_stage1`] and [`kexec_stage2`] run
//! either side of a kexec: stage 1 preserves a memfd with a known pattern and returns the
//! session, which the caller must keep open until `reboot(LINUX_REBOOT_CMD_KEXEC)`; stage 2, in
//! the new kernel, checks the pattern and finishes. A test-bed binary calls these and fails on
//! `Err`; each needs root and a kernel booted with `liveupdate=on` (Linux 7.2+ for GET_NAME).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use thiserror::Error;

use super::{KernelProvider, KernelSession};
use crate::session::{Session, SessionError};
use crate::sys;

/// Session name used by [`kexec_stage1`] and [`kexec_stage2`].
pub const KEXEC_TEST_SESSION: &str = "ch-luo-selftest-kexec";
/// Token of the pattern memfd in [`KEXEC_TEST_SESSION`].
pub const KEXEC_TEST_TOKEN: u64 = 0x5e1f_7e57;
const PATTERN: &[u8] = b"LUO self-test pattern survives kexec";

/// Errors of the kernel self-test.
#[derive(Debug, Error)]
pub enum KernelSelfTestError {
    /// A step that should succeed failed.
    #[error("Self-test step {step:?} failed")]
    Step {
        /// The step.
        step: &'static str,
        /// What the kernel said.
        #[source]
        source: SessionError,
    },
    /// A step gave another outcome than LUO documents.
    #[error("Self-test step {step:?}: expected {expected}, got {got}")]
    Unexpected {
        /// The step.
        step: &'static str,
        /// The documented outcome.
        expected: &'static str,
        /// What happened.
        got: String,
    },
}

fn step<T>(step: &'static str, result: Result<T, SessionError>) -> Result<T, KernelSelfTestError> {
    result.map_err(|source| KernelSelfTestError::Step { step, source })
}

/// Checks that `result` failed with the error `matches` accepts.
fn expect_err<T: std::fmt::Debug>(
    step: &'static str,
    expected: &'static str,
    result: Result<T, SessionError>,
    matches: fn(&SessionError) -> bool,
) -> Result<(), KernelSelfTestError> {
    match result {
        Err(ref e) if matches(e) => Ok(()),
        other => Err(KernelSelfTestError::Unexpected {
            step,
            expected,
            got: format!("{other:?}"),
        }),
    }
}

fn io_step<T>(
    step_name: &'static str,
    result: std::io::Result<T>,
) -> Result<T, KernelSelfTestError> {
    let operation = step_name;
    step(
        step_name,
        result.map_err(|source| SessionError::Os { operation, source }),
    )
}

/// A one-page memfd holding `content`.
fn memfd_with(content: &[u8]) -> Result<OwnedFd, KernelSelfTestError> {
    let fd = io_step("memfd_create", sys::memfd_create("luo-selftest", 0))?;
    let mut file = File::from(io_step("dup memfd", fd.try_clone())?);
    io_step("size memfd", file.set_len(4096))?;
    io_step("write memfd", file.write_all(content))?;
    Ok(fd)
}

/// Runs the single-boot checks; returns the names of the checks that ran (all passed).
pub fn self_test_kernel() -> Result<Vec<&'static str>, KernelSelfTestError> {
    let mut passed = Vec::new();
    let mut provider = step("open", KernelProvider::open())?;
    expect_err("second open", "Busy", KernelProvider::open(), |e| {
        matches!(e, SessionError::Busy)
    })?;
    passed.push("device is exclusive");

    let name = format!("ch-luo-selftest-{}", std::process::id());
    let mut session = step("create", provider.create(&name))?;
    let got = step("get_name", session.name())?;
    if got != name {
        return Err(KernelSelfTestError::Unexpected {
            step: "get_name",
            expected: "the created name",
            got,
        });
    }
    passed.push("GET_NAME returns the name");
    expect_err(
        "duplicate name",
        "SessionExists",
        provider.create(&name),
        |e| matches!(e, SessionError::SessionExists { .. }),
    )?;
    passed.push("duplicate name refused");
    expect_err(
        "retrieve unknown",
        "NoSuchSession",
        provider.retrieve("ch-luo-selftest-none"),
        |e| matches!(e, SessionError::NoSuchSession { .. }),
    )?;
    passed.push("unknown incoming session refused");

    let first = memfd_with(b"first")?;
    step("preserve", session.preserve_fd(first.as_fd(), 1))?;
    let second = memfd_with(b"second")?;
    expect_err(
        "duplicate token",
        "TokenExists",
        session.preserve_fd(second.as_fd(), 1),
        |e| matches!(e, SessionError::TokenExists { token: 1 }),
    )?;
    passed.push("duplicate token refused");
    expect_err(
        "same file twice",
        "AlreadyPreserved",
        session.preserve_fd(first.as_fd(), 2),
        |e| matches!(e, SessionError::AlreadyPreserved),
    )?;
    passed.push("file preserved twice refused");
    let null = io_step("open /dev/null", File::open("/dev/null"))?;
    expect_err(
        "preserve /dev/null",
        "Unpreservable",
        session.preserve_fd(null.as_fd(), 3),
        |e| matches!(e, SessionError::Unpreservable),
    )?;
    passed.push("/dev/null refused");
    if let Ok(huge) = sys::memfd_create("luo-selftest-huge", libc::MFD_HUGETLB) {
        expect_err(
            "preserve hugetlb",
            "Unpreservable",
            session.preserve_fd(huge.as_fd(), 4),
            |e| matches!(e, SessionError::Unpreservable),
        )?;
        passed.push("hugetlb memfd refused");
    }
    expect_err(
        "retrieve on outgoing",
        "WrongDirection",
        session.retrieve_fd(1),
        |e| matches!(e, SessionError::WrongDirection { .. }),
    )?;
    expect_err(
        "finish on outgoing",
        "WrongDirection",
        session.finish(),
        |e| matches!(e, SessionError::WrongDirection { .. }),
    )?;
    passed.push("incoming-only calls refused on outgoing");

    drop(provider);
    step(
        "preserve after device close",
        session.preserve_fd(second.as_fd(), 5),
    )?;
    passed.push("session outlives the device fd");

    let mut provider = step("reopen", KernelProvider::open())?;
    drop(session);
    let mut session = step("recreate after close", provider.create(&name))?;
    step(
        "preserve after discard",
        session.preserve_fd(first.as_fd(), 1),
    )?;
    passed.push("closed outgoing session discarded with its files");
    Ok(passed)
}

/// Before the kexec: preserves a memfd holding a pattern in [`KEXEC_TEST_SESSION`]. Keep the
/// returned session open until `reboot(LINUX_REBOOT_CMD_KEXEC)`; closing it cancels.
pub fn kexec_stage1(provider: &mut KernelProvider) -> Result<KernelSession, KernelSelfTestError> {
    let mut session = step("create", provider.create(KEXEC_TEST_SESSION))?;
    let memfd = memfd_with(PATTERN)?;
    step(
        "preserve",
        session.preserve_fd(memfd.as_fd(), KEXEC_TEST_TOKEN),
    )?;
    Ok(session)
}

/// After the kexec: retrieves the memfd, checks the pattern and finishes the session.
pub fn kexec_stage2(provider: &mut KernelProvider) -> Result<(), KernelSelfTestError> {
    let mut session = step("retrieve session", provider.retrieve(KEXEC_TEST_SESSION))?;
    let mut file = File::from(step("retrieve fd", session.retrieve_fd(KEXEC_TEST_TOKEN))?);
    let mut content = vec![0u8; PATTERN.len()];
    io_step("seek", file.seek(SeekFrom::Start(0)))?;
    io_step("read", file.read_exact(&mut content))?;
    if content != PATTERN {
        let got = String::from_utf8_lossy(&content).into_owned();
        return Err(KernelSelfTestError::Unexpected {
            step: "pattern",
            expected: "the pattern",
            got,
        });
    }
    expect_err(
        "second retrieve session",
        "NoSuchSession",
        provider.retrieve(KEXEC_TEST_SESSION),
        |e| matches!(e, SessionError::NoSuchSession { .. }),
    )?;
    step("finish", session.finish())
}
