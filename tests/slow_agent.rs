//! The slow group, the agent under a real systemd: this Debian's own systemd runs as PID 1 of a
//! container (`scripts/lib/systemd-container.sh`: PID, mount and cgroup namespaces, /usr from
//! the host) and runs `ch-luod --emulate` from the shipped unit (`contrib/systemd/ch-luod.service`,
//! `Type=notify`, `Restart=always`, a file descriptor store). The probe guest runs on this host's
//! KVM; its VMM and the successor reach the agent through the socket, bound in a directory the
//! container shares. Between the handover and the restore the agent is killed with SIGKILL, and
//! then restarted with `systemctl restart`: each time systemd starts it again, it takes the
//! session back from the fd store, and the successor restores the guest with all its RAM.
//! Ignored by default; run it with `cargo test --test slow_agent -- --ignored` (root, KVM,
//! `unshare` and systemd needed; it fails, never skips, when one is missing).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ProbeStatus, ProbeVm, VmmProcess, repo_root, require_kvm, scratch_dir};
use liveupdate::agent::{AgentClient, Direction};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
const TAKEOVER: Duration = Duration::from_secs(20);
/// systemd starts the agent again within this (`RestartSec=100ms`, plus process start).
const RESTART: Duration = Duration::from_secs(15);

/// systemd as PID 1 of a container, killed (with everything in it) on drop.
struct Container {
    unshare: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Container {
    /// Boots the container with the shipped unit, `ExecStart=` pointing at this build's
    /// `ch-luod --emulate` on `dir/agent.sock`; returns once the agent answers.
    fn start(dir: &Path) -> Self {
        let units = dir.join("units");
        let drop_in = units.join("ch-luod.service.d");
        std::fs::create_dir_all(&drop_in).unwrap();
        std::fs::copy(
            repo_root().join("contrib/systemd/ch-luod.service"),
            units.join("ch-luod.service"),
        )
        .unwrap();
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_ch-luod"));
        let socket = dir.join("agent.sock");
        let log = dir.join("agent.log");
        std::fs::write(
            drop_in.join("test.conf"),
            format!(
                "[Service]\nExecStart=\nExecStart={} --emulate -v --socket {}\n\
                 StandardError=append:{}\n",
                bin.display(),
                socket.display(),
                log.display()
            ),
        )
        .unwrap();
        std::fs::write(
            units.join("chv-test.target"),
            "[Unit]\nDescription=ch-luod test\nWants=ch-luod.service\n",
        )
        .unwrap();
        let console = std::fs::File::create(dir.join("systemd.log")).unwrap();
        let unshare = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--cgroup",
                "--propagation",
                "private",
            ])
            .arg(repo_root().join("scripts/lib/systemd-container.sh"))
            .arg(dir.join("root"))
            .arg(&units)
            .arg("chv-test.target")
            .arg(bin.parent().unwrap())
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("cannot run unshare (util-linux)");
        let mut container = Self {
            unshare,
            socket,
            log,
        };
        container.wait_for_agent(None);
        container
    }

    /// The host pid of the container's systemd (the child of `unshare`), once it runs.
    fn systemd_pid(&self) -> Option<u32> {
        let children = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        let text = std::fs::read_to_string(children).unwrap_or_default();
        text.split_whitespace()
            .next()
            .and_then(|pid| pid.parse().ok())
    }

    /// The agent's host pid, if one runs: a child of the container's systemd.
    fn agent_pid(&self) -> Option<u32> {
        let systemd = self.systemd_pid()?;
        let children = format!("/proc/{systemd}/task/{systemd}/children");
        let text = std::fs::read_to_string(children).unwrap_or_default();
        text.split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .find(|pid: &u32| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.ends_with("ch-luod"))
            })
    }

    /// Waits until an agent other than `old` runs under systemd and answers; its pid.
    fn wait_for_agent(&mut self, old: Option<u32>) -> u32 {
        let deadline = Instant::now() + RESTART;
        loop {
            if let Some(status) = self.unshare.try_wait().unwrap() {
                panic!("the container ended ({status}): {}", self.diagnostics());
            }
            if let Some(pid) = self.agent_pid().filter(|pid| Some(*pid) != old)
                && let Ok(mut client) = AgentClient::connect(&self.socket)
                && client.ping().is_ok()
            {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no agent answered under systemd within {RESTART:?}: {}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `systemctl ARGS` inside the container.
    fn systemctl(&self, args: &[&str]) -> String {
        let output = Command::new("nsenter")
            .args([
                "-t",
                &self.systemd_pid().unwrap().to_string(),
                "-m",
                "-p",
                "-r",
            ])
            .arg("systemctl")
            .args(args)
            .output()
            .expect("cannot run nsenter");
        assert!(output.status.success(), "systemctl {args:?}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn sessions(&self) -> Vec<liveupdate::agent::SessionInfo> {
        AgentClient::connect(&self.socket).unwrap().list().unwrap()
    }

    fn diagnostics(&self) -> String {
        let agent_log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let console =
            std::fs::read_to_string(self.log.with_file_name("systemd.log")).unwrap_or_default();
        format!("\nagent log:\n{agent_log}\nsystemd:\n{console}")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let children = format!("/proc/{0}/task/{0}/children", self.unshare.id());
        if let Some(pid) = std::fs::read_to_string(children)
            .unwrap_or_default()
            .split_whitespace()
            .next()
        {
            // SIGKILL to the container's PID 1 ends every process in it.
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let _ = self.unshare.wait();
    }
}

/// How many memfds process `pid` holds open.
fn memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:"))
        .count()
}

/// The last complete status line of a VMM that exited (its last line may be cut short).
fn last_complete_status(vmm: &VmmProcess) -> ProbeStatus {
    vmm.lines()
        .iter()
        .rev()
        .filter_map(|line| ProbeStatus::parse(line))
        .find(|status| status.fields.contains_key("errors"))
        .unwrap_or_else(|| panic!("no complete status line in {:?}", vmm.lines()))
}

/// Live-updates `vmm` into `session` and returns the old VMM's last status once it exited.
fn hand_over(vmm: &mut VmmProcess, session: &str) -> ProbeStatus {
    vmm.live_update(session);
    assert_eq!(
        vmm.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        vmm.stderr()
    );
    last_complete_status(vmm)
}

/// Starts the successor of `session` and asserts the guest carried on from `before`.
fn restore(container: &Container, session: &str, dir: &Path, before: &ProbeStatus) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let api = format!("path={}", dir.join("api.sock").display());
    let agent = format!("agent={}", container.socket.display());
    let source = format!("source_url=luo://{session}");
    let successor = VmmProcess::spawn(
        &[
            "--api-socket",
            &api,
            "--liveupdate",
            &agent,
            "--restore",
            &source,
        ],
        dir,
    );
    let mut after = Vec::new();
    let mut next = 0;
    for _ in 0..3 {
        let (index, status) = successor.next_status(next, TAKEOVER);
        next = index;
        after.push(status);
    }
    let context = format!("before {before:?}, after {after:?}");
    assert!(
        after[0].get("seq") > before.get("seq") && after[0].get("seq") <= before.get("seq") + 2,
        "status lines do not continue: {context}"
    );
    assert!(after[2].get("pages") > before.get("pages"), "{context}");
    for status in &after {
        assert_eq!(status.get("errors"), 0, "{context}");
        assert_eq!(status.get("tsc_back"), 0, "{context}");
    }
    successor
}

#[test]
#[ignore = "slow group: systemd in a container; run with --ignored"]
fn the_agent_killed_or_restarted_by_systemd_mid_update_loses_no_guest() {
    // Arrange: systemd runs the agent; the probe guest runs with it.
    require_kvm();
    let dir = scratch_dir("agent-systemd");
    let mut container = Container::start(&dir);
    let first_agent = container.agent_pid().unwrap();
    let agent = format!("agent={}", container.socket.display());
    let vmm_dir = dir.join("vmm0");
    std::fs::create_dir_all(&vmm_dir).unwrap();
    let mut vmm = VmmProcess::probe_with(
        &vmm_dir,
        &ProbeVm {
            memory: "256M",
            cmdline: "fill=1 status_ms=100",
            extra: &["--liveupdate", &agent],
            ..ProbeVm::default()
        },
    );
    let (next, _) = vmm.next_banner(0, BOOT);
    vmm.next_status(next, LINE);

    // Act 1: hand over, then SIGKILL the agent; systemd starts it again.
    let before = hand_over(&mut vmm, "killed");
    let kill = Command::new("kill")
        .args(["-9", &first_agent.to_string()])
        .status()
        .unwrap();
    let second_agent = container.wait_for_agent(Some(first_agent));
    let after_kill = container.sessions();
    let restarts = container.systemctl(&["show", "-p", "NRestarts", "ch-luod.service"]);
    let successor = restore(&container, "killed", &dir.join("vmm1"), &before);

    // Assert 1: a new agent process took the session back whole; the guest carried on.
    assert!(kill.success());
    assert_ne!(second_agent, first_agent);
    assert_eq!(restarts.trim(), "NRestarts=1", "restarted by systemd");
    assert_eq!(after_kill.len(), 1, "{after_kill:?}");
    assert_eq!(after_kill[0].name, "killed");
    assert_eq!(after_kill[0].direction, Direction::HandedOver);
    assert!(
        container.sessions().is_empty(),
        "{:?}",
        container.sessions()
    );
    // No copy of the finished session's memfds is left in the agent: its memory is freed.
    assert_eq!(
        memfds(second_agent),
        0,
        "the agent still holds the session's memfds"
    );

    // Act 2: hand over again, then `systemctl restart` (how a new binary is put in place).
    let mut vmm = successor;
    let before = hand_over(&mut vmm, "restarted");
    container.systemctl(&["restart", "ch-luod.service"]);
    let third_agent = container.wait_for_agent(Some(second_agent));
    let after_restart = container.sessions();
    let successor = restore(&container, "restarted", &dir.join("vmm2"), &before);

    // Assert 2: the same, through a clean stop and start.
    assert_ne!(third_agent, second_agent);
    assert_eq!(after_restart.len(), 1, "{after_restart:?}");
    assert_eq!(after_restart[0].direction, Direction::HandedOver);
    assert!(
        container.sessions().is_empty(),
        "{:?}",
        container.sessions()
    );
    assert_eq!(
        memfds(third_agent),
        0,
        "the agent still holds the session's memfds"
    );
    let state = container.systemctl(&["show", "-p", "ActiveState", "ch-luod.service"]);
    assert_eq!(state.trim(), "ActiveState=active");
    drop(successor);
}
