//! The serial port and the console on a pty (`--serial pty`, `--console pty`) and the serial
//! port on a UNIX socket (`--serial socket=PATH`), on real KVM with the probe guest: what the
//! host types reaches the guest (`probe: input 0x..`), the guest's lines reach the host, and
//! `vm.info` names the pty. Both carry on through a restart-mode live update (same pty, same
//! socket, same client) and come back fresh after a kexec (a new pty, the socket bound again).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{Agent, ProbeVm, VmmProcess, read_events_until, require_kvm, scratch_dir};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
const TAKEOVER: Duration = Duration::from_secs(20);
const EXIT: Duration = Duration::from_secs(10);
const CMDLINE: &str = "fill=1 status_ms=100 virtio=1";

#[derive(Default)]
struct Received {
    lines: Vec<String>,
    closed: bool,
}

/// Lines read from a pty or a socket by a thread of their own.
struct Lines {
    lines: Arc<(Mutex<Received>, Condvar)>,
}

impl Lines {
    fn read_from(reader: impl Read + Send + 'static) -> Self {
        let lines = Arc::new((Mutex::new(Received::default()), Condvar::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().lines.push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap().closed = true;
            sink.1.notify_all();
        });
        Self { lines }
    }

    /// Waits for a line after the first `skip` that contains `text`; returns the index after it.
    fn wait_for(&self, skip: usize, text: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut state = m.lock().unwrap();
        loop {
            if let Some(i) = state.lines.iter().skip(skip).position(|l| l.contains(text)) {
                return skip + i + 1;
            }
            let now = Instant::now();
            assert!(
                !state.closed && now < deadline,
                "no line with {text:?} within {timeout:?} (closed: {}); last lines:\n{}",
                state.closed,
                state
                    .lines
                    .iter()
                    .rev()
                    .take(10)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    fn count(&self) -> usize {
        self.lines.0.lock().unwrap().lines.len()
    }

    /// Waits until the other end is gone (end of input, or a hang-up).
    fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut state = m.lock().unwrap();
        while !state.closed {
            let now = Instant::now();
            assert!(now < deadline, "still open after {timeout:?}");
            state = cv.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

/// Opens a pty's slave as a host user would.
fn open_pty(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// Boots the probe with `serial` and `console` modes (and `extra` VMM arguments), its API up.
fn boot(
    dir: &Path,
    serial: &str,
    console: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> VmmProcess {
    std::fs::create_dir_all(dir).unwrap();
    let mut vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            cmdline: CMDLINE,
            serial,
            console,
            extra,
            env,
            ..ProbeVm::default()
        },
    );
    vmm.wait_for_api(BOOT);
    vmm
}

/// `vm.info` once the VM runs (a successor answers 409 while it restores).
fn running_info(vmm: &mut VmmProcess) -> serde_json::Value {
    vmm.wait_for_api(TAKEOVER);
    let deadline = Instant::now() + TAKEOVER;
    loop {
        let response = vmm.api("GET", "vm.info", None);
        if response.status == 200 {
            let info: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            if info["state"] == "Running" {
                return info;
            }
        }
        assert!(
            Instant::now() < deadline,
            "VM not running within {TAKEOVER:?}: {:?}\nstderr:\n{}",
            response.error_messages(),
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pty_path(info: &serde_json::Value, device: &str) -> PathBuf {
    assert_eq!(info["config"][device]["mode"], "Pty", "{info}");
    PathBuf::from(info["config"][device]["file"].as_str().unwrap())
}

/// Types `byte` and waits for the probe to report it.
fn type_and_expect_echo(writer: &mut impl Write, lines: &Lines, byte: u8) {
    let skip = lines.count();
    writer.write_all(&[byte]).unwrap();
    lines.wait_for(skip, &format!("probe: input {byte:#04x}"), LINE);
}

#[test]
fn serial_and_console_ptys_carry_the_guests_lines_and_the_hosts_input() {
    require_kvm();
    let dir = scratch_dir("pty");
    let vmm = boot(&dir, "pty", "pty", &[], &[]);

    let info = vmm.vm_info();
    let serial_path = pty_path(&info, "serial");
    let console_path = pty_path(&info, "console");
    let mut serial = open_pty(&serial_path);
    let serial_lines = Lines::read_from(serial.try_clone().unwrap());
    let console_lines = Lines::read_from(open_pty(&console_path));

    serial_lines.wait_for(0, "probe: status", LINE);
    type_and_expect_echo(&mut serial, &serial_lines, b'Z');
    // Written at boot, before anyone opened the console's pty: the pty kept it.
    console_lines.wait_for(0, "probe: hello from virtio-console", LINE);
    assert_ne!(serial_path, console_path);
    assert!(
        vmm.lines().is_empty(),
        "the guest wrote to stdout: {:?}",
        vmm.lines()
    );
}

#[test]
fn a_reboot_keeps_the_pty() {
    require_kvm();
    let dir = scratch_dir("pty-reboot");
    let vmm = boot(&dir, "pty", "off", &[], &[]);
    let path = pty_path(&vmm.vm_info(), "serial");
    let mut terminal = open_pty(&path);
    let lines = Lines::read_from(terminal.try_clone().unwrap());
    let booted = lines.wait_for(0, "probe: start", LINE);

    let response = vmm.api("PUT", "vm.reboot", None);

    assert!(response.status < 300, "{:?}", response.error_messages());
    lines.wait_for(booted, "probe: start", LINE);
    assert_eq!(pty_path(&vmm.vm_info(), "serial"), path);
    type_and_expect_echo(&mut terminal, &lines, b's');
}

#[test]
fn a_pty_keeps_its_path_and_its_open_terminal_through_a_restart_mode_update() {
    require_kvm();
    let dir = scratch_dir("pty-lu");
    let agent = Agent::start(&dir);
    let agent_arg = agent.arg();
    let mut old = boot(
        &dir.join("old"),
        "pty",
        "off",
        &["--liveupdate", &agent_arg],
        &[],
    );
    let path = pty_path(&old.vm_info(), "serial");
    let mut terminal = open_pty(&path);
    let lines = Lines::read_from(terminal.try_clone().unwrap());
    type_and_expect_echo(&mut terminal, &lines, b'a');

    old.live_update("pty");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let mut successor = VmmProcess::successor(&agent, "pty", &dir.join("new"), &[]);
    let info = running_info(&mut successor);

    assert_eq!(pty_path(&info, "serial"), path);
    let after = lines.count();
    lines.wait_for(after, "probe: status", LINE);
    type_and_expect_echo(&mut terminal, &lines, b'b');
}

#[test]
fn across_a_kexec_a_new_pty_is_opened_and_reported() {
    require_kvm();
    let dir = scratch_dir("pty-kexec");
    let agent = Agent::start(&dir);
    let agent_arg = agent.arg();
    let env = [("CHV_TEST_AS_ACROSS_KEXEC", "1")];
    let mut old = boot(
        &dir.join("old"),
        "pty",
        "off",
        &["--liveupdate", &agent_arg],
        &env,
    );
    let old_terminal = Lines::read_from(open_pty(&pty_path(&old.vm_info(), "serial")));
    old_terminal.wait_for(0, "probe: status", LINE);

    old.live_update("pty-kexec");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let events = dir.join("new").join("events.json");
    std::fs::create_dir_all(dir.join("new")).unwrap();
    let monitor = format!("path={}", events.display());
    let mut successor = VmmProcess::successor(
        &agent,
        "pty-kexec",
        &dir.join("new"),
        &["--event-monitor", &monitor],
    );
    let info = running_info(&mut successor);

    // The old pty went with the old VMM, as a kexec takes every pty.
    old_terminal.wait_closed(LINE);
    let path = pty_path(&info, "serial");
    let recorded = read_events_until(&events, ("vm", "pty-recreated"), LINE);
    assert!(
        recorded
            .iter()
            .any(|(s, e)| s == "vm" && e == "pty-recreated"),
        "{recorded:?}"
    );
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.contains(&format!("\"{}\"", path.display())), "{text}");
    let mut terminal = open_pty(&path);
    let lines = Lines::read_from(terminal.try_clone().unwrap());
    type_and_expect_echo(&mut terminal, &lines, b'k');
}

#[test]
fn a_serial_socket_client_talks_to_the_guest_and_stays_connected_through_an_update() {
    require_kvm();
    let dir = scratch_dir("serial-socket");
    let agent = Agent::start(&dir);
    let agent_arg = agent.arg();
    let socket = dir.join("serial.sock");
    let serial = format!("socket={}", socket.display());
    let mut old = boot(
        &dir.join("old"),
        &serial,
        "off",
        &["--liveupdate", &agent_arg],
        &[],
    );
    let info = old.vm_info();
    assert_eq!(info["config"]["serial"]["mode"], "Socket", "{info}");
    assert_eq!(info["config"]["serial"]["socket"], socket.to_str().unwrap());
    let mut client = UnixStream::connect(&socket).unwrap();
    let lines = Lines::read_from(client.try_clone().unwrap());
    lines.wait_for(0, "probe: status", LINE);
    type_and_expect_echo(&mut client, &lines, b'x');

    old.live_update("serial-socket");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let mut successor = VmmProcess::successor(&agent, "serial-socket", &dir.join("new"), &[]);
    running_info(&mut successor);

    type_and_expect_echo(&mut client, &lines, b'y');
    // A second client replaces the first, as in cloud-hypervisor.
    let mut second = UnixStream::connect(&socket).unwrap();
    let second_lines = Lines::read_from(second.try_clone().unwrap());
    lines.wait_closed(LINE);
    type_and_expect_echo(&mut second, &second_lines, b'z');
    // The socket file goes with the VMM that owns it last.
    successor.api("PUT", "vmm.shutdown", None);
    assert_eq!(successor.wait_exit(EXIT), Some(0), "{}", successor.stderr());
    assert!(!socket.exists(), "the serial socket file stayed behind");
}

#[test]
fn across_a_kexec_the_serial_socket_is_bound_again_at_its_path() {
    require_kvm();
    let dir = scratch_dir("serial-socket-kexec");
    let agent = Agent::start(&dir);
    let agent_arg = agent.arg();
    let socket = dir.join("serial.sock");
    let serial = format!("socket={}", socket.display());
    let env = [("CHV_TEST_AS_ACROSS_KEXEC", "1")];
    let mut old = boot(
        &dir.join("old"),
        &serial,
        "off",
        &["--liveupdate", &agent_arg],
        &env,
    );
    let client = UnixStream::connect(&socket).unwrap();
    let old_lines = Lines::read_from(client);
    old_lines.wait_for(0, "probe: status", LINE);

    old.live_update("serial-socket-kexec");
    assert_eq!(old.wait_exit(EXIT), Some(0), "{}", old.stderr());
    let mut successor = VmmProcess::successor(&agent, "serial-socket-kexec", &dir.join("new"), &[]);
    running_info(&mut successor);

    old_lines.wait_closed(LINE);
    let mut client = UnixStream::connect(&socket).unwrap();
    let lines = Lines::read_from(client.try_clone().unwrap());
    type_and_expect_echo(&mut client, &lines, b'q');
}

/// Runs the VMM with `args` on the probe and returns its exit code and stderr.
fn refused(dir: &Path, serial: &str, console: &str) -> (Option<i32>, String) {
    let mut vmm = VmmProcess::probe_with(
        dir,
        &ProbeVm {
            serial,
            console,
            ..ProbeVm::default()
        },
    );
    let code = vmm.wait_exit(EXIT);
    (code, vmm.stderr())
}

#[test]
fn a_serial_socket_path_in_use_is_refused_naming_it() {
    let dir = scratch_dir("serial-socket-in-use");
    let socket = dir.join("taken.sock");
    std::fs::write(&socket, b"").unwrap();

    let (code, stderr) = refused(&dir, &format!("socket={}", socket.display()), "off");

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("Cannot listen on {}", socket.display())),
        "{stderr}"
    );
}

#[test]
fn a_console_socket_is_refused_as_cloud_hypervisor_refuses_it() {
    let dir = scratch_dir("console-socket");
    let socket = dir.join("console.sock");

    let (code, stderr) = refused(&dir, "null", &format!("socket={}", socket.display()));

    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("The console mode Socket is not supported"),
        "{stderr}"
    );
    assert!(!socket.exists());
}
