//! A real cross-build live update: the previous release (the last line of `RELEASES`) is built
//! from git history, and a probe guest running in its VMM is live-updated (restart mode) into
//! this build's VMM and back, with errors=0 throughout. This build saves the PCI root's state
//! (`pci/root`) at version 2, with every device's placement, which the release does not read:
//! a way back in this build's format is refused by the release's VMM before the VM runs, the
//! session stays at the agent, and this build's VMM takes the VM over from it; the way back
//! with `--state-format <release>` writes version 1 and the release runs the VM. The agent
//! stays up across every update, as on a host whose VMM binaries change under it: once the
//! release's agent, once this build's, so the agent protocol is proved compatible both ways.
//!
//! The release is built once into `$CHV_CACHE/release-build/<commit>/` (default
//! `~/.cache/chv`), outside the work tree, and reused from there. A clone without that commit
//! (a shallow one) fails with what to fetch. Slow group: `cargo test --test slow_cross_build
//! -- --ignored`.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;
mod slow;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Agent, ProbeStatus, ProbeVm, VmmProcess, require_kvm, scratch_dir};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
const EXIT: Duration = Duration::from_secs(10);
const CMDLINE: &str = "fill=1 status_ms=100 virtio=1 blk_io=1";
const BINARIES: [&str; 3] = ["cloud-hypervisor", "ch-remote", "ch-luod"];

/// The last release in `RELEASES`: its version and commit.
fn previous_release() -> (String, String) {
    let text = std::fs::read_to_string(slow::repo_root().join("RELEASES")).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .expect("RELEASES lists no release");
    let mut fields = line.split_whitespace();
    let (Some(version), Some(commit), None) = (fields.next(), fields.next(), fields.next()) else {
        panic!("RELEASES line {line:?} is not `<version> <commit>`");
    };
    (version.to_string(), commit.to_string())
}

fn cache_dir() -> PathBuf {
    std::env::var_os("CHV_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/chv"),
        PathBuf::from,
    )
}

/// The release binaries of `commit`, built from git history unless the cache has them.
fn build_release(commit: &str) -> PathBuf {
    let dir = cache_dir().join("release-build").join(commit);
    let bins = dir.join("target/release");
    if BINARIES.iter().all(|name| bins.join(name).is_file()) {
        return bins;
    }
    let repo = slow::repo_root();
    let known = Command::new("git")
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .current_dir(&repo)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        known.success(),
        "The previous release's commit {commit} (RELEASES) is not in this clone's history (a \
         shallow clone?): fetch it with `git fetch --unshallow` (or `git fetch origin {commit}`) \
         and run again"
    );
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).unwrap();
    let extracted = Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            r#"git archive "$1" | tar -x -C "$2""#,
            "-",
        ])
        .arg(commit)
        .arg(&src)
        .current_dir(&repo)
        .status()
        .unwrap();
    assert!(
        extracted.success(),
        "cannot extract {commit} into {}",
        src.display()
    );
    let log = dir.join("build.log");
    let log_file = File::create(&log).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--release", "--bins", "--target-dir"])
        .arg(dir.join("target"))
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .current_dir(&src)
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .unwrap();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<_> = output.lines().rev().take(30).collect();
    assert!(
        built.success(),
        "building release {commit} failed ({}):\n{}",
        log.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    bins
}

/// A 1 MiB disk image for the probe's reads.
fn disk_image(dir: &Path) -> String {
    let path = dir.join("disk.img");
    let mut disk = b"CROSS-BUILD".to_vec();
    disk.resize(1 << 20, 0);
    std::fs::write(&path, disk).unwrap();
    format!("path={}", path.display())
}

/// Asserts that `vmm` runs the binary `program`: a leg that ran another build proves nothing.
fn assert_runs(vmm: &VmmProcess, program: &Path) {
    let exe = std::fs::read_link(format!("/proc/{}/exe", vmm.pid())).unwrap();
    assert_eq!(exe, program.canonicalize().unwrap());
}

/// The next `count` status lines of `vmm` from its first.
fn statuses(vmm: &VmmProcess, count: usize) -> Vec<ProbeStatus> {
    let mut next = 0;
    (0..count)
        .map(|_| {
            let (after, status) = vmm.next_status(next, LINE);
            next = after;
            status
        })
        .collect()
}

/// Asserts the guest carried on in `vmm` after status line `last_seq` of its predecessor: no
/// new boot, numbering continued, disk reads going on, no memory, disk or clock errors.
fn assert_carried_on(vmm: &VmmProcess, last_seq: u64, leg: &str) -> u64 {
    let after = statuses(vmm, 4);
    let context = format!(
        "{leg}: last seq {last_seq} before, then {after:?}\n{}",
        vmm.stderr()
    );
    assert!(
        !vmm.lines().iter().any(|l| l.contains("probe: start")),
        "the guest booted again: {context}"
    );
    assert!(after[0].get("seq") > last_seq, "{context}");
    assert!(after[3].get("blk_ok") > after[0].get("blk_ok"), "{context}");
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("blk_err"), 0, "{context}");
        assert_eq!(status.get("tsc_back"), 0, "{context}");
        assert_eq!(status.get("cpus"), 2, "{context}");
    }
    after[3].get("seq")
}

/// Hands the VM of `vmm` to a successor running `program` through session `session`, the
/// state written in release `state_format`'s format if given (else the old VMM's own).
fn update(
    vmm: VmmProcess,
    program: &Path,
    agent: &Agent,
    session: &str,
    dir: &Path,
    state_format: Option<&str>,
) -> VmmProcess {
    let mut old = vmm;
    let successor =
        VmmProcess::successor_program(program, agent, session, &dir.join(session), &[], &[]);
    match state_format {
        None => {
            old.live_update(session);
        }
        Some(release) => {
            let update = old.ch_remote(&[
                "live-update",
                "--session",
                session,
                "--state-format",
                release,
            ]);
            assert!(update.status.success(), "{update:?}\n{}", old.stderr());
        }
    }
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    assert_runs(&successor, program);
    successor
}

/// The state type whose version this build bumped since the release: the release refuses it.
const NEWER_THAN_RELEASE: &str = "pci/root";

/// Hands the VM of `vmm` to a successor running the release's `program`, which must refuse
/// the newer state before the VM runs; returns its stderr.
fn refused_back(
    vmm: VmmProcess,
    program: &Path,
    agent: &Agent,
    session: &str,
    dir: &Path,
) -> String {
    let mut old = vmm;
    let mut successor =
        VmmProcess::successor_program(program, agent, session, &dir.join(session), &[], &[]);
    old.live_update(session);
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let code = successor.wait_exit(EXIT);
    let stderr = successor.stderr();
    assert!(
        code.is_some_and(|c| c != 0),
        "exit {code:?}; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Boots the probe in the release's VMM with `agent_program` as the agent, updates it into this
/// build, then tries the way back in this build's format: the release refuses it, and this
/// build takes the VM again; then goes back in the release's format (`version`), errors=0.
fn forth_and_back(release: &Path, version: &str, agent_program: &Path, label: &str) {
    let current = slow::release_bins().join("cloud-hypervisor");
    let previous = release.join("cloud-hypervisor");
    let dir = scratch_dir(&format!("cross-build-{label}"));
    let agent = Agent::start_program(agent_program, &dir, &[]);
    let agent_arg = agent.arg();
    let gen0 = dir.join("gen0");
    std::fs::create_dir_all(&gen0).unwrap();
    let disk = disk_image(&dir);
    let vmm = VmmProcess::probe_with(
        &gen0,
        &ProbeVm {
            program: Some(&previous),
            cpus: 2,
            memory: "128M",
            cmdline: CMDLINE,
            extra: &["--disk", &disk, "--liveupdate", &agent_arg],
            ..ProbeVm::default()
        },
    );
    assert_runs(&vmm, &previous);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (_, before) = vmm.next_status(next, LINE);
    let last = before.get("seq");

    // Act: the release's VMM hands the VM to this build's.
    let vmm = update(vmm, &current, &agent, "forth", &dir, None);
    let last = assert_carried_on(&vmm, last, &format!("{label}: release -> this build"));

    // Act: and this build's back to the release's, which refuses the newer state; the
    // session stays at the agent, and this build's VMM takes the VM from it.
    let refusal = refused_back(vmm, &previous, &agent, "back", &dir);
    let vmm =
        VmmProcess::successor_program(&current, &agent, "back", &dir.join("back-again"), &[], &[]);
    assert_runs(&vmm, &current);

    assert!(
        refusal.contains(NEWER_THAN_RELEASE) && refusal.contains("newer"),
        "{label}: the release did not refuse {NEWER_THAN_RELEASE} as newer:\n{refusal}"
    );
    let last = assert_carried_on(
        &vmm,
        last,
        &format!("{label}: this build -> release (refused) -> this build"),
    );

    // Act: this build writes the state as the release reads it, and the release runs the VM.
    let vmm = update(
        vmm,
        &previous,
        &agent,
        "back-in-its-format",
        &dir,
        Some(version),
    );
    assert_carried_on(
        &vmm,
        last,
        &format!("{label}: this build -> release, state_format {version}"),
    );
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_cross_build -- --ignored"]
fn a_vm_moves_from_the_previous_release_into_this_build_and_back_in_the_releases_format() {
    require_kvm();
    let (version, commit) = previous_release();
    let release = build_release(&commit);
    eprintln!(
        "previous release {version} ({commit}) in {}",
        release.display()
    );

    forth_and_back(
        &release,
        &version,
        &release.join("ch-luod"),
        "release-agent",
    );
    forth_and_back(
        &release,
        &version,
        &slow::release_bins().join("ch-luod"),
        "current-agent",
    );
}
