//! Runs the real `ch-luod --emulate` binary and drives it with the client library.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use liveupdate::agent::{AgentClient, Direction, ErrorKind};

const BIN: &str = env!("CARGO_BIN_EXE_ch-luod");

/// A private directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ch-luod-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ch-luod`, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Agent {
    fn start_emulated(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("luod.sock");
        let child = Command::new(BIN)
            .args(["--emulate", "-v", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = Self {
            child,
            socket,
            _dir: dir,
        };
        agent.wait_for_socket();
        agent
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ch-luod exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "ch-luod did not listen within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> AgentClient {
        AgentClient::connect(&self.socket).unwrap()
    }

    fn run_client(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn memfd_with(bytes: &[u8]) -> File {
    let mut file = File::from(liveupdate::sys::memfd_create("agent-it", 0).unwrap());
    file.set_len(4096).unwrap();
    file.write_all(bytes).unwrap();
    file
}

fn read_at(file: &mut File, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    bytes
}

#[test]
fn memfd_survives_handover_through_the_real_agent() {
    let agent = Agent::start_emulated("e2e");
    let mut original = memfd_with(b"guest memory");
    let mut old_vmm = agent.client();
    old_vmm.create_session("vm0").unwrap();
    old_vmm.preserve("vm0", original.as_fd(), 1).unwrap();
    old_vmm.handover("vm0").unwrap();
    drop(old_vmm);

    let mut new_vmm = agent.client();
    new_vmm.retrieve_session("vm0").unwrap();
    let mut retrieved = File::from(new_vmm.retrieve_fd("vm0", 1).unwrap());
    retrieved.seek(SeekFrom::Start(64)).unwrap();
    retrieved.write_all(b"after").unwrap();

    assert_eq!(read_at(&mut retrieved, 0, 12), b"guest memory");
    assert_eq!(read_at(&mut original, 64, 5), b"after");
    new_vmm.finish("vm0").unwrap();
    assert!(new_vmm.list().unwrap().is_empty());
}

#[test]
fn attached_socket_moves_to_the_successor_and_closes_on_finish() {
    let agent = Agent::start_emulated("attach");
    let (server, vmm_end) = UnixStream::pair().unwrap();
    let mut old_vmm = agent.client();
    old_vmm.create_session("vm0").unwrap();
    old_vmm.attach("vm0", vmm_end.as_fd(), 7).unwrap();
    let duplicate = old_vmm.attach("vm0", vmm_end.as_fd(), 7).unwrap_err();
    old_vmm.handover("vm0").unwrap();
    drop((old_vmm, vmm_end));

    let mut new_vmm = agent.client();
    new_vmm.retrieve_session("vm0").unwrap();
    let listed = new_vmm.list().unwrap()[0].attachments.clone();
    let mut attachments = new_vmm.retrieve_attachments("vm0").unwrap();
    let stream = UnixStream::from(attachments.remove(&7).unwrap());
    (&stream).write_all(b"ping").unwrap();
    let mut received = [0u8; 4];
    (&server).read_exact(&mut received).unwrap();
    new_vmm.finish("vm0").unwrap();
    drop(stream);
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    (&server).read_to_end(&mut rest).unwrap();

    assert_eq!(duplicate.kind(), Some(ErrorKind::TokenExists));
    assert_eq!(listed, [7]);
    assert_eq!(&received, b"ping");
    assert!(attachments.is_empty());
    assert!(
        rest.is_empty(),
        "EOF once the agent and the successor closed"
    );
}

#[test]
fn malformed_bytes_do_not_kill_the_agent() {
    let mut agent = Agent::start_emulated("garbage");
    for garbage in [
        &b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"[..],
        b"LUOD\x01\x00\x00\x00\xff\xff\xff\xff",
    ] {
        let mut stream = UnixStream::connect(&agent.socket).unwrap();
        stream.write_all(garbage).unwrap();
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
    }
    // Half a message, then hang up.
    UnixStream::connect(&agent.socket)
        .unwrap()
        .write_all(b"LU")
        .unwrap();

    let mode = agent.client().ping().unwrap();

    assert_eq!(mode, "restart");
    assert!(agent.child.try_wait().unwrap().is_none(), "ch-luod died");
}

#[test]
fn list_subcommand_prints_sessions_and_cancel_drops_them() {
    let agent = Agent::start_emulated("cli");
    agent.client().create_session("vm0").unwrap();

    let list = agent.run_client(&["list"]);
    let cancel = agent.run_client(&["cancel", "vm0"]);
    let sessions = agent.client().list().unwrap();

    assert!(list.status.success(), "{list:?}");
    let line = String::from_utf8(list.stdout).unwrap();
    assert!(
        line.contains(r#""name":"vm0""#) && line.contains(r#""direction":"outgoing""#),
        "{line}"
    );
    assert!(cancel.status.success(), "{cancel:?}");
    assert!(sessions.is_empty(), "{sessions:?}");
}

#[test]
fn errors_cross_the_process_boundary_with_their_kind() {
    let agent = Agent::start_emulated("errors");
    let mut client = agent.client();
    let null = File::open("/dev/null").unwrap();
    client.create_session("vm0").unwrap();

    let unpreservable = client.preserve("vm0", null.as_fd(), 1).unwrap_err();
    let missing = client.retrieve_session("never").unwrap_err();

    assert_eq!(unpreservable.kind(), Some(ErrorKind::Unpreservable));
    assert_eq!(missing.kind(), Some(ErrorKind::NoSuchSession));
    assert_eq!(client.list().unwrap()[0].direction, Direction::Outgoing);
}

#[test]
fn second_agent_on_the_same_socket_is_refused() {
    let agent = Agent::start_emulated("twice");

    let second = Command::new(BIN)
        .args(["--emulate", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();

    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("Another ch-luod is serving"), "{stderr}");
    agent.client().ping().unwrap();
}

#[test]
fn sigterm_stops_the_agent_and_removes_its_socket() {
    let mut agent = Agent::start_emulated("sigterm");

    let kill = Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .expect("`kill` is missing: install procps");
    let status = agent.child.wait().unwrap();

    assert!(kill.success());
    assert!(status.success(), "{status}");
    assert!(!agent.socket.exists());
}

#[test]
fn kernel_mode_starts_or_fails_clearly() {
    let dir = TempDir::new("kernel");
    let socket = dir.0.join("luod.sock");
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Without /dev/liveupdate (this host) it must exit at once naming the kernel options; with
    // it (the QEMU test bed) it serves in kernel mode, or says another process owns the device.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if let Ok(mut client) = AgentClient::connect(&socket) {
            assert_eq!(client.ping().unwrap(), "kernel");
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "ch-luod neither served nor exited"
        );
        thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&output.stderr);
    match status {
        Some(status) => {
            assert!(!status.success());
            let device_missing = !Path::new("/dev/liveupdate").exists();
            let expected = if device_missing {
                "CONFIG_LIVEUPDATE and liveupdate=on"
            } else {
                "busy"
            };
            assert!(stderr.contains(expected), "{stderr}");
            assert!(!socket.exists());
        }
        None => assert!(Path::new("/dev/liveupdate").exists()),
    }
}

#[test]
fn client_without_agent_says_so() {
    let dir = TempDir::new("noagent");
    let socket = dir.0.join("none.sock");

    let output = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .arg("ping")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is ch-luod running?"), "{stderr}");
}

#[test]
fn another_uid_may_not_touch_a_session() {
    use std::os::unix::process::CommandExt;
    // The agent runs as root with a 0660 socket; the other client runs as nobody in group root,
    // so it can connect, and only the agent's ownership check stands in its way.
    let dir = TempDir::new("uid");
    let socket = dir.0.join("luod.sock");
    // The build directory may sit in a home only root may enter (CI caches it there), so the
    // other user runs a copy of the client from the test's own directory.
    let client = dir.0.join("ch-luod");
    std::fs::copy(BIN, &client).unwrap();
    let child = Command::new(BIN)
        .args(["--emulate", "--socket-mode", "0660", "--socket"])
        .arg(&socket)
        .spawn()
        .unwrap();
    let mut agent = Agent {
        child,
        socket,
        _dir: dir,
    };
    agent.wait_for_socket();
    agent.client().create_session("vm0").unwrap();

    let output = Command::new(&client)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["cancel", "vm0"])
        .uid(65534)
        .gid(0)
        .output()
        .expect("running a client as uid 65534 needs root: run the tests as root");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("belongs to another user"), "{stderr}");
    assert_eq!(agent.client().list().unwrap().len(), 1);
}

impl Agent {
    /// Starts `ch-luod --upgrade` on this agent's socket with `args`; returns it unwaited.
    fn spawn_upgrade(&self, args: &[&str]) -> Child {
        Command::new(BIN)
            .args(["-v", "--upgrade", "--socket"])
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Waits until the agent process exits; its status code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn stderr_of(child: Child) -> (Option<i32>, String) {
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_upgrade_in_place_carries_every_session_and_the_socket_to_the_new_agent() {
    // Arrange: a session on each side, with files and an attached socket.
    let mut agent = Agent::start_emulated("upgrade");
    let (device_server, attached) = UnixStream::pair().unwrap();
    let mut vmm = agent.client();
    for (name, bytes) in [
        ("out", &b"outgoing"[..]),
        ("handed", b"handed"),
        ("taken", b"taken"),
    ] {
        vmm.create_session(name).unwrap();
        vmm.preserve(name, memfd_with(bytes).as_fd(), 1).unwrap();
    }
    vmm.attach("handed", attached.as_fd(), 20).unwrap();
    drop(attached);
    vmm.handover("handed").unwrap();
    vmm.handover("taken").unwrap();
    vmm.retrieve_session("taken").unwrap();
    let sessions_before = vmm.list().unwrap();
    drop(vmm);

    // Act
    let mut new_agent = agent.spawn_upgrade(&["--emulate"]);
    let old_code = agent.wait_exit(Duration::from_secs(15));

    // Assert: the old agent left, the new one serves the same socket and every session.
    assert_eq!(old_code, Some(0));
    if new_agent.try_wait().unwrap().is_some() {
        panic!("the new agent exited: {:?}", stderr_of(new_agent));
    }
    let mut successor = agent.client();
    assert_eq!(successor.list().unwrap(), sessions_before);
    successor.retrieve_session("handed").unwrap();
    let mut ram = File::from(successor.retrieve_fd("handed", 1).unwrap());
    assert_eq!(read_at(&mut ram, 0, 6), b"handed");
    let stream = UnixStream::from(successor.retrieve_attachment("handed", 20).unwrap());
    (&stream).write_all(b"hi").unwrap();
    let mut greeting = [0u8; 2];
    (&device_server).read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hi");
    let mut taken = File::from(successor.retrieve_fd("taken", 1).unwrap());
    assert_eq!(read_at(&mut taken, 0, 5), b"taken");
    for name in ["handed", "taken"] {
        successor.finish(name).unwrap();
    }
    successor.cancel("out").unwrap();
    assert!(successor.list().unwrap().is_empty());
    new_agent.kill().unwrap();
    new_agent.wait().unwrap();
}

#[test]
fn an_upgrade_is_refused_while_a_connection_is_open_and_the_agent_serves_on() {
    let agent = Agent::start_emulated("upgrade-busy");
    let mut waiting_successor = agent.client();
    waiting_successor.create_session("vm").unwrap();

    let (code, stderr) = stderr_of(agent.spawn_upgrade(&["--emulate", "--upgrade-wait", "1"]));

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("1 other connection(s) to the agent are open"),
        "{stderr}"
    );
    assert_eq!(waiting_successor.list().unwrap().len(), 1);
    assert_eq!(agent.client().ping().unwrap(), "restart");
}

#[test]
fn an_upgrade_to_the_other_mode_or_without_an_agent_is_refused_clearly() {
    let agent = Agent::start_emulated("upgrade-mode");
    agent.client().create_session("vm").unwrap();
    let dir = TempDir::new("upgrade-nobody");

    let (mode_code, mode_stderr) = stderr_of(agent.spawn_upgrade(&[]));
    let nobody = Command::new(BIN)
        .args(["--emulate", "--upgrade", "--socket"])
        .arg(dir.0.join("none.sock"))
        .output()
        .unwrap();

    assert_eq!(mode_code, Some(1), "{mode_stderr}");
    assert!(
        mode_stderr.contains(
            "This agent runs in restart mode; a kernel-mode agent cannot take its sessions"
        ),
        "{mode_stderr}"
    );
    assert_eq!(agent.client().list().unwrap().len(), 1);
    let nobody_stderr = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(1), "{nobody_stderr}");
    assert!(
        nobody_stderr.contains("is ch-luod running?"),
        "{nobody_stderr}"
    );
}
