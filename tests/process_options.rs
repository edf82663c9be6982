//! The VMM process's own options, as cloud-hypervisor has them: the API socket and the event
//! monitor given as inherited fds (`--api-socket fd=N`, `--event-monitor fd=N`), the log file
//! (`--log-file`), `--seccomp` and `--landlock`. Each runs an empty VMM (no VM, no KVM needed) or fails at
//! start with a clear error.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use liveupdate::sys::listen::pass_fd_at;
use vmm::api::client::request;

const EXIT: Duration = Duration::from_secs(10);

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chv-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn command(args: &[&str], fds: &[(BorrowedFd<'_>, RawFd)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
    for (fd, target) in fds {
        pass_fd_at(&mut command, *fd, *target);
    }
    command.args(args);
    command
}

/// Runs a VMM that must fail at start; returns its output.
fn refused(args: &[&str], fds: &[(BorrowedFd<'_>, RawFd)]) -> Output {
    let output = command(args, fds).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Starts a VMM expected to run; stderr goes to `dir/vmm.stderr`.
fn spawn(dir: &Path, args: &[&str], fds: &[(BorrowedFd<'_>, RawFd)]) -> Child {
    let stderr = std::fs::File::create(dir.join("vmm.stderr")).unwrap();
    command(args, fds)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Pings the API at `socket` until it answers.
fn wait_for_api(socket: &Path) {
    let deadline = Instant::now() + EXIT;
    while Instant::now() < deadline {
        if request(socket, "GET", "vmm.ping", None).is_ok_and(|r| r.status == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the API at {} never answered", socket.display());
}

/// Asks the VMM to exit through the API at `socket` and waits for a clean exit.
fn shut_down(child: &mut Child, socket: &Path) {
    let response = request(socket, "PUT", "vmm.shutdown", None).unwrap();
    assert!(response.status < 300, "{:?}", response.error_messages());
    let deadline = Instant::now() + EXIT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("the VMM did not exit after vmm.shutdown");
}

#[test]
fn the_api_is_served_on_an_inherited_listening_socket() {
    let dir = scratch_dir("api-fd");
    let socket = dir.join("api.sock");
    let listener = UnixListener::bind(&socket).unwrap();

    let mut vmm = spawn(&dir, &["--api-socket", "fd=3"], &[(listener.as_fd(), 3)]);
    drop(listener);

    wait_for_api(&socket);
    shut_down(&mut vmm, &socket);
}

#[test]
fn events_are_written_to_an_inherited_pipe() {
    let dir = scratch_dir("events-fd");
    let socket = dir.join("api.sock");
    let (mut reader, writer) = std::io::pipe().unwrap();
    let api = format!("path={}", socket.display());

    let mut vmm = spawn(
        &dir,
        &["--api-socket", &api, "--event-monitor", "fd=4"],
        &[(writer.as_fd(), 4)],
    );
    drop(writer);
    wait_for_api(&socket);
    shut_down(&mut vmm, &socket);

    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let names: Vec<_> = events.iter().map(|e| e["event"].clone()).collect();
    assert_eq!(names, ["starting", "shutdown"], "{text}");
}

#[test]
fn an_api_fd_that_is_no_socket_or_not_open_is_refused() {
    let file = std::fs::File::open(env!("CARGO_MANIFEST_DIR")).unwrap();

    let not_a_socket = refused(&["--api-socket", "fd=3"], &[(file.as_fd(), 3)]);
    let not_open = refused(&["--api-socket", "fd=57"], &[]);

    assert!(
        stderr(&not_a_socket).contains("--api-socket fd=3 is not usable: not a socket"),
        "{}",
        stderr(&not_a_socket)
    );
    assert!(
        stderr(&not_open).contains("--api-socket fd=57 is not usable: not open"),
        "{}",
        stderr(&not_open)
    );
}

#[test]
fn an_api_fd_that_is_bound_but_not_listening_is_refused() {
    let dir = scratch_dir("api-fd-unlistened");
    let datagram = std::os::unix::net::UnixDatagram::bind(dir.join("d.sock")).unwrap();

    let output = refused(&["--api-socket", "fd=3"], &[(datagram.as_fd(), 3)]);

    assert!(
        stderr(&output).contains("--api-socket fd=3 is not usable: a socket, but not listening"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_event_fd_not_open_for_writing_is_refused() {
    let (reader, _writer) = std::io::pipe().unwrap();

    let output = refused(
        &[
            "--api-socket",
            "/tmp/unused-events.sock",
            "--event-monitor",
            "fd=3",
        ],
        &[(reader.as_fd(), 3)],
    );

    assert!(
        stderr(&output).contains("--event-monitor fd=3 is not usable: not open for writing"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_log_goes_to_the_log_file_instead_of_stderr() {
    let dir = scratch_dir("log-file");
    let socket = dir.join("api.sock");
    let log = dir.join("vmm.log");
    let api = format!("path={}", socket.display());

    let mut vmm = spawn(
        &dir,
        &[
            "--api-socket",
            &api,
            "-v",
            "--log-file",
            log.to_str().unwrap(),
        ],
        &[],
    );
    wait_for_api(&socket);
    shut_down(&mut vmm, &socket);

    let logged = std::fs::read_to_string(&log).unwrap();
    let stderr = std::fs::read_to_string(dir.join("vmm.stderr")).unwrap();
    assert!(logged.contains("<INFO>"), "{logged}");
    assert!(
        logged.contains("Seccomp filters: a syscall outside them kills the VMM"),
        "{logged}"
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn a_log_file_that_cannot_be_created_is_refused() {
    let output = refused(
        &[
            "--api-socket",
            "/tmp/unused-log.sock",
            "--log-file",
            "/nonexistent/dir/vmm.log",
        ],
        &[],
    );

    assert!(
        stderr(&output).contains("Cannot create the log file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn every_seccomp_value_of_cloud_hypervisor_runs_and_others_are_refused() {
    let dir = scratch_dir("seccomp");
    let socket = dir.join("api.sock");
    let api = format!("path={}", socket.display());

    for value in ["true", "false", "log", "errno"] {
        let mut vmm = spawn(&dir, &["--api-socket", &api, "--seccomp", value], &[]);
        wait_for_api(&socket);
        shut_down(&mut vmm, &socket);
    }
    let bogus = refused(&["--api-socket", &api, "--seccomp", "maybe"], &[]);
    assert!(
        stderr(&bogus).contains("--seccomp \"maybe\": expected true, false, log or errno"),
        "{}",
        stderr(&bogus)
    );
}

#[test]
fn landlock_is_refused_as_not_supported() {
    let api = "path=/tmp/unused-landlock.sock";

    for args in [
        &["--api-socket", api, "--landlock"][..],
        &[
            "--api-socket",
            api,
            "--landlock-rules",
            "path=/tmp,access=rw",
        ][..],
    ] {
        let output = refused(args, &[]);

        assert!(
            stderr(&output).contains("--landlock and --landlock-rules are not supported"),
            "{}",
            stderr(&output)
        );
    }
}
