//! Shared helpers for the integration tests: build the probe guest, run the VMM binary, read the
//! guest's serial lines, call the API.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod netns;

pub use vmm::api::client::{Response, request};

/// How [`VmmProcess::probe_with`] boots the probe guest.
pub struct ProbeVm<'a> {
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM, e.g. "64M".
    pub memory: &'a str,
    /// The probe's command line.
    pub cmdline: &'a str,
    /// The `--serial` mode (`tty`: the probe's lines are the VMM's stdout).
    pub serial: &'a str,
    /// The `--console` mode.
    pub console: &'a str,
    /// More VMM arguments.
    pub extra: &'a [&'a str],
    /// More environment for the VMM process.
    pub env: &'a [(&'a str, &'a str)],
    /// Fds the VMM process inherits, each at the number given (e.g. a tap for `--net fd=[3]`).
    pub fds: &'a [(std::os::fd::BorrowedFd<'a>, std::os::fd::RawFd)],
    /// The VMM binary (`None`: this build's `cloud-hypervisor`).
    pub program: Option<&'a Path>,
}

impl Default for ProbeVm<'_> {
    fn default() -> Self {
        Self {
            cpus: 1,
            memory: "64M",
            cmdline: "",
            serial: "tty",
            console: "off",
            extra: &[],
            env: &[],
            fds: &[],
            program: None,
        }
    }
}

/// The number of fds process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The number of fds `pid` has open once it settles at `expected` (an API connection's thread
/// may still be closing its socket when the client has its answer), or after 2 s.
pub fn open_fds_settled(pid: u32, expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let count = open_fds(pid);
        if count == expected || Instant::now() >= deadline {
            return count;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fails (never skips) without /dev/kvm, saying what to do.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm: run on a host with KVM (modprobe kvm_intel or kvm_amd)"
    );
}

/// The error chain of a failed API call, joined.
pub fn messages(response: &Response) -> String {
    response.error_messages().join(" / ")
}

/// How long the device-test helpers below wait for one probe line.
const PROBE_LINE: Duration = Duration::from_secs(10);

/// Asserts the guest runs on: two more status lines after line `skip`, the second later, no
/// memory errors.
pub fn assert_guest_runs_on(vmm: &VmmProcess, skip: usize) {
    let (next, first) = vmm.next_status(skip, PROBE_LINE);
    let (_, second) = vmm.next_status(next, PROBE_LINE);
    assert!(second.get("seq") > first.get("seq"), "{first:?} {second:?}");
    assert_eq!(second.get("errors"), 0, "{second:?}");
}

/// The next `probe: userdev started ...` line after line `skip`, and the index after it.
pub fn next_started(vmm: &VmmProcess, skip: usize) -> (usize, BTreeMap<String, String>) {
    vmm.next_probe_line(skip, PROBE_LINE, "userdev started", |_| true)
}

/// The next `probe: userdev ...` line with the device's counter after line `skip`, and the
/// index after it.
pub fn next_userdev(vmm: &VmmProcess, skip: usize) -> (usize, BTreeMap<String, String>) {
    vmm.next_probe_line(skip, PROBE_LINE, "userdev", |fields| {
        fields.contains_key("counter")
    })
}

/// Field `key` of a probe line, as a decimal number.
pub fn field(fields: &BTreeMap<String, String>, key: &str) -> u64 {
    fields[key]
        .parse()
        .unwrap_or_else(|e| panic!("{key} in {fields:?}: {e}"))
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the probe guest once per test process and returns the ELF's path.
pub fn probe_guest() -> PathBuf {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let script = repo_root().join("scripts/build-probe-guest");
            let out = Command::new(&script)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(
                out.status.success(),
                "scripts/build-probe-guest failed (needs gcc and binutils: apt-get install gcc binutils):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().expect("build-probe-guest printed nothing");
            PathBuf::from(last.trim())
        })
        .clone()
}

/// A unique scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chv-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A running `cloud-hypervisor` process whose serial console is its stdin/stdout.
pub struct VmmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<(Mutex<Lines>, Condvar)>,
    stderr_path: PathBuf,
    pub api_socket: Option<PathBuf>,
}

impl VmmProcess {
    /// Starts the VMM with `args` (stdout captured line by line, stderr to a file in `dir`).
    pub fn spawn(args: &[&str], dir: &Path) -> Self {
        Self::spawn_with_env(args, dir, &[])
    }

    /// Boots the probe guest with `cpus` vCPUs, `memory` (e.g. "256M") and a probe command line.
    pub fn probe(cpus: u8, memory: &str, cmdline: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::probe_with(
            dir,
            &ProbeVm {
                cpus,
                memory,
                cmdline,
                extra,
                ..ProbeVm::default()
            },
        )
    }

    /// Boots the probe guest as `vm` says, with its API socket in `dir`.
    pub fn probe_with(dir: &Path, vm: &ProbeVm<'_>) -> Self {
        let kernel = probe_guest();
        let socket = dir.join("api.sock");
        let cpus = format!("boot={}", vm.cpus);
        let memory = format!("size={}", vm.memory);
        let mut args = vec![
            "--api-socket",
            socket.to_str().unwrap(),
            "--cpus",
            &cpus,
            "--memory",
            &memory,
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            vm.cmdline,
            "--serial",
            vm.serial,
            "--console",
            vm.console,
        ];
        args.extend_from_slice(vm.extra);
        let program = vm
            .program
            .unwrap_or(Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor")));
        Self::spawn_program(program, &args, dir, vm.env, vm.fds)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.0.lock().unwrap().lines.clone()
    }

    /// What the VMM wrote on stderr.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for a line (after the first `skip` lines) for which `accept` returns Some.
    pub fn wait_for<T>(
        &self,
        skip: usize,
        timeout: Duration,
        mut accept: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.output;
        let mut seen = skip;
        let mut lines = m.lock().unwrap();
        loop {
            while seen < lines.lines.len() {
                if let Some(found) = accept(&lines.lines[seen]) {
                    return found;
                }
                seen += 1;
            }
            let now = Instant::now();
            if lines.closed || now >= deadline {
                let tail: Vec<_> = lines.lines.iter().rev().take(20).rev().cloned().collect();
                drop(lines);
                panic!(
                    "no expected line within {timeout:?} (output closed: {}); last lines:\n{}\nstderr:\n{}",
                    self.output.0.lock().unwrap().closed,
                    tail.join("\n"),
                    self.stderr()
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits for the next probe status line after line `skip`; returns (line index, status).
    pub fn next_status(&self, skip: usize, timeout: Duration) -> (usize, ProbeStatus) {
        let mut index = skip;
        self.wait_for(skip, timeout, |line| {
            index += 1;
            ProbeStatus::parse(line).map(|s| (index, s))
        })
    }

    /// Waits for the next `probe: <kind> ...` line after line `skip` whose fields `accept`;
    /// returns the index after it and its fields.
    pub fn next_probe_line(
        &self,
        skip: usize,
        timeout: Duration,
        kind: &str,
        accept: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> (usize, BTreeMap<String, String>) {
        let mut index = skip;
        let fields = self.wait_for(skip, timeout, |line| {
            index += 1;
            probe_fields(line, kind).filter(|fields| accept(fields))
        });
        (index, fields)
    }

    /// Types `bytes` into the guest's terminal.
    pub fn type_input(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Calls the REST API.
    pub fn api(&self, method: &str, endpoint: &str, body: Option<&str>) -> Response {
        let socket = self
            .api_socket
            .as_ref()
            .expect("VMM started without --api-socket");
        request(socket, method, endpoint, body.map(str::as_bytes)).unwrap()
    }

    /// Waits for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "VMM did not exit within {timeout:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits for the process to end and returns how (a signal shows in the status, not a code).
    pub fn wait_status(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "VMM did not exit within {timeout:?}; stderr:\n{}",
            self.stderr()
        );
    }

    /// Runs `ch-remote --api-socket <socket> args...`.
    pub fn ch_remote(&self, args: &[&str]) -> std::process::Output {
        let socket = self
            .api_socket
            .as_ref()
            .expect("VMM started without --api-socket");
        Command::new(env!("CARGO_BIN_EXE_ch-remote"))
            .arg("--api-socket")
            .arg(socket)
            .args(args)
            .output()
            .expect("cannot run ch-remote")
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `probe: status ...` line of the probe guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeStatus {
    pub fields: BTreeMap<String, u64>,
}

impl ProbeStatus {
    /// Parses a status line; None for any other line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("probe: status ")?;
        let fields = rest
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
            .collect();
        Some(Self { fields })
    }

    pub fn get(&self, key: &str) -> u64 {
        *self
            .fields
            .get(key)
            .unwrap_or_else(|| panic!("status line has no {key}: {self:?}"))
    }
}

// Helpers for probe_guest.rs, api_lifecycle.rs and bad_input.rs.

/// The `key=value` pairs of a `probe: <kind> ...` line (found anywhere in `line`, since firmware
/// text may precede it); None for any other line.
pub fn probe_fields(line: &str, kind: &str) -> Option<BTreeMap<String, String>> {
    let (_, rest) = line.split_once("probe: ")?;
    let rest = rest.strip_prefix(kind)?.strip_prefix(' ')?;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Parses `0x...` hex or decimal, as the probe prints numbers.
pub fn parse_probe_number(text: &str) -> u64 {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    }
    .unwrap_or_else(|e| panic!("not a probe number: {text:?}: {e}"))
}

/// The physical ranges `[start, end)` of a banner's `pattern=` field.
pub fn pattern_ranges(banner: &BTreeMap<String, String>) -> Vec<(u64, u64)> {
    let pattern = banner.get("pattern").expect("banner has no pattern field");
    pattern
        .split(',')
        .map(|range| {
            let (start, end) = range.split_once('-').expect("pattern range without '-'");
            (parse_probe_number(start), parse_probe_number(end))
        })
        .collect()
}

/// The events of an `--event-monitor` file (a stream of JSON objects) as (source, event).
pub fn read_events(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the event file {}: {e}", path.display()));
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map(|event| {
            let event = event.unwrap_or_else(|e| panic!("bad JSON in the event file: {e}\n{text}"));
            let field = |name: &str| event[name].as_str().unwrap_or_default().to_string();
            (field("source"), field("event"))
        })
        .collect()
}

/// The events of `path` once `(source, event)` is among them, or after `timeout` as they are
/// (a VMM writes some events after the guest already runs again).
pub fn read_events_until(
    path: &Path,
    (source, event): (&str, &str),
    timeout: Duration,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = read_events(path);
        if Instant::now() >= deadline || events.iter().any(|(s, e)| s == source && e == event) {
            return events;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that `expected` occur in `events` in this order (others may come between).
pub fn assert_events_in_order(events: &[(String, String)], expected: &[(&str, &str)]) {
    let mut rest = events.iter();
    for (source, event) in expected {
        assert!(
            rest.any(|(s, e)| s == source && e == event),
            "event {source}/{event} missing or out of order in {events:?}"
        );
    }
}

impl VmmProcess {
    /// Waits for the next `probe: start` banner after line `skip`; returns (index after it, fields).
    pub fn next_banner(&self, skip: usize, timeout: Duration) -> (usize, BTreeMap<String, String>) {
        let mut index = skip;
        self.wait_for(skip, timeout, |line| {
            index += 1;
            probe_fields(line, "start").map(|fields| (index, fields))
        })
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Polls `vmm.ping` until the API answers (the socket is bound a moment after start).
    pub fn wait_for_api(&mut self, timeout: Duration) {
        let socket = self
            .api_socket
            .clone()
            .expect("VMM started without --api-socket");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if request(&socket, "GET", "vmm.ping", None).is_ok_and(|r| r.is_success()) {
                return;
            }
            assert!(
                self.is_running(),
                "VMM exited before serving its API; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "API at {} not up within {timeout:?}; stderr:\n{}",
            socket.display(),
            self.stderr()
        );
    }

    /// The VM's `state` as `vm.info` reports it.
    pub fn vm_state(&self) -> String {
        let response = self.api("GET", "vm.info", None);
        assert_eq!(
            response.status,
            200,
            "vm.info failed: {:?}",
            response.error_messages()
        );
        let info: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        info["state"].as_str().unwrap_or_default().to_string()
    }
}

// Helpers for live_update.rs.

/// A `ch-luod --emulate` session agent on a socket in a test's scratch directory, killed on drop.
pub struct Agent {
    child: Child,
    pub socket: PathBuf,
}

impl Agent {
    /// Starts the agent on `dir/agent.sock` and waits until it listens.
    pub fn start(dir: &Path) -> Self {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_ch-luod")), dir, &[])
    }

    /// Like [`Agent::start`], with extra environment variables for the agent.
    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_program(Path::new(env!("CARGO_BIN_EXE_ch-luod")), dir, env)
    }

    /// Like [`Agent::start`], with extra options for the agent.
    pub fn start_with_args(dir: &Path, args: &[&str]) -> Self {
        Self::spawn(Path::new(env!("CARGO_BIN_EXE_ch-luod")), dir, &[], args)
    }

    /// Like [`Agent::start`], running the agent binary `program` (e.g. another build's) with
    /// extra environment variables.
    pub fn start_program(program: &Path, dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn(program, dir, env, &[])
    }

    fn spawn(program: &Path, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let socket = dir.join("agent.sock");
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(program)
            .args(["--emulate", "-v"])
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start ch-luod");
        let mut agent = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&agent.socket).is_err() {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("ch-luod exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "ch-luod did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Upgrades the agent in place: a new `ch-luod --emulate --upgrade` takes every session and
    /// the socket over; returns once the old agent exited (asserted with status 0).
    pub fn upgrade(&mut self) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.socket.with_file_name("agent.log"))
            .unwrap();
        let new = Command::new(env!("CARGO_BIN_EXE_ch-luod"))
            .args(["--emulate", "-v", "--upgrade", "--socket"])
            .arg(&self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start ch-luod --upgrade");
        let mut old = std::mem::replace(&mut self.child, new);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = old.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the old agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "the old agent exited with {status}");
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the new agent exited"
        );
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The VMM option value: `agent=<socket>`.
    pub fn arg(&self) -> String {
        format!("agent={}", self.socket.display())
    }

    /// A new protocol connection.
    pub fn client(&self) -> liveupdate::agent::AgentClient {
        liveupdate::agent::AgentClient::connect(&self.socket).unwrap()
    }

    /// The sessions the agent holds.
    pub fn sessions(&self) -> Vec<liveupdate::agent::SessionInfo> {
        self.client().list().unwrap()
    }

    /// Waits for the agent process to exit and returns its status code (`None`: a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("ch-luod did not exit within {timeout:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl VmmProcess {
    /// Like [`VmmProcess::spawn`], with extra environment variables for the VMM.
    pub fn spawn_with_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_with_fds(args, dir, env, &[])
    }

    /// Like [`VmmProcess::spawn_with_env`], with `fds` inherited at the numbers given.
    pub fn spawn_with_fds(
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
        fds: &[(std::os::fd::BorrowedFd<'_>, std::os::fd::RawFd)],
    ) -> Self {
        let program = Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
        Self::spawn_program(program, args, dir, env, fds)
    }

    /// Like [`VmmProcess::spawn_with_fds`], running the VMM binary `program` (e.g. another
    /// build's).
    pub fn spawn_program(
        program: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
        fds: &[(std::os::fd::BorrowedFd<'_>, std::os::fd::RawFd)],
    ) -> Self {
        let stderr_path = dir.join("vmm.stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = Command::new(program);
        for (fd, target) in fds {
            liveupdate::sys::listen::pass_fd_at(&mut command, *fd, *target);
        }
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().unwrap();
        let output = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*sink;
                m.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*sink;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        let api_socket = args
            .iter()
            .position(|a| *a == "--api-socket")
            .and_then(|i| args.get(i + 1))
            .map(|v| PathBuf::from(v.trim_start_matches("path=")));
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            output,
            stderr_path,
            api_socket,
        }
    }

    /// Starts a successor VMM (API socket `dir/api.sock`) that takes over session `session`
    /// from `agent`; it waits for the handover if the session is not handed over yet.
    pub fn successor(agent: &Agent, session: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::successor_with_env(agent, session, dir, extra, &[])
    }

    /// Like [`VmmProcess::successor`], with extra environment variables for the successor.
    pub fn successor_with_env(
        agent: &Agent,
        session: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let program = Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
        Self::successor_program(program, agent, session, dir, extra, env)
    }

    /// Like [`VmmProcess::successor_with_env`], running the VMM binary `program` (e.g. another
    /// build's).
    pub fn successor_program(
        program: &Path,
        agent: &Agent,
        session: &str,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = format!("path={}", dir.join("api.sock").display());
        let agent = agent.arg();
        let source = format!("source_url=luo://{session}");
        let mut args = vec![
            "--api-socket",
            &socket,
            "--liveupdate",
            &agent,
            "--restore",
            &source,
        ];
        args.extend_from_slice(extra);
        Self::spawn_program(program, &args, dir, env, &[])
    }

    /// Waits until this successor is connected to the agent (its API listener and its agent
    /// connection are its only sockets). Its API is no help here: it does not answer while the
    /// successor waits for the handover.
    pub fn wait_until_connected(&mut self, timeout: Duration) {
        let fds = format!("/proc/{}/fd", self.pid());
        let deadline = Instant::now() + timeout;
        loop {
            let sockets = std::fs::read_dir(&fds)
                .map(|dir| {
                    dir.filter_map(Result::ok)
                        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                        .filter(|target| target.to_string_lossy().starts_with("socket:"))
                        .count()
                })
                .unwrap_or(0);
            if sockets >= 2 {
                return;
            }
            assert!(self.is_running(), "successor exited: {}", self.stderr());
            assert!(
                Instant::now() < deadline,
                "successor not connected within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `vm.live-update` into `session` and returns the raw response.
    pub fn try_live_update(&self, session: &str) -> Response {
        let body = serde_json::json!({ "session": session }).to_string();
        self.api("PUT", "vm.live-update", Some(&body))
    }

    /// Live-updates the VM into `session`; asserts success and returns `timings_us`.
    pub fn live_update(&self, session: &str) -> serde_json::Value {
        let response = self.try_live_update(session);
        assert_eq!(
            response.status,
            200,
            "live update into {session:?} failed: {:?}\nstderr:\n{}",
            response.error_messages(),
            self.stderr()
        );
        let reply: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(reply["session"], session, "{reply}");
        reply["timings_us"].clone()
    }

    /// `vm.info` as JSON.
    pub fn vm_info(&self) -> serde_json::Value {
        let response = self.api("GET", "vm.info", None);
        assert_eq!(
            response.status,
            200,
            "vm.info failed: {:?}",
            response.error_messages()
        );
        serde_json::from_slice(&response.body).unwrap()
    }
}

/// A running `vfio-user-testdev` serving `<dir>/<name>.sock`, killed on drop.
pub struct TestDev {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl TestDev {
    /// Starts the device with extra arguments and waits for its socket (the server publishes
    /// it once it listens).
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let child = Command::new(env!("CARGO_BIN_EXE_vfio-user-testdev"))
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vfio-user-testdev did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    /// `socket=PATH`, as `--user-device` takes it.
    pub fn arg(&self) -> String {
        format!("socket={}", self.socket.display())
    }

    /// A `vm.add-user-device` body naming the device `id`.
    pub fn body(&self, id: &str) -> String {
        serde_json::json!({ "socket": self.socket, "id": id }).to_string()
    }

    /// Whether the server still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills the server and waits for it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for TestDev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
