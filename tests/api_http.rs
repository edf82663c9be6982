//! `ch-remote` against our HTTP server with a fake handler: what it sends, prints and returns.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use vmm::api::{ApiError, ApiHandler, ApiRequest, ApiResponse, HttpServer, start_http_server};

/// Answers ping and info with JSON, boot with a 404, the rest with 204; records requests.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<ApiRequest>>,
}

impl ApiHandler for Recorder {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.seen.lock().unwrap().push(request.clone());
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Json(serde_json::json!({
                "build_version": "test", "version": "0.1.0", "pid": 1, "features": ["kvm"]
            }))),
            ApiRequest::VmBoot => Err(ApiError {
                status: 404,
                messages: vec!["VM is not created".into(), "no config".into()],
            }),
            _ => Ok(ApiResponse::Empty),
        }
    }
}

struct Fixture {
    dir: PathBuf,
    socket: PathBuf,
    recorder: Arc<Recorder>,
    _server: HttpServer,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn serve(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("api-http-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("api.sock");
    let recorder = Arc::new(Recorder::default());
    let server = start_http_server(&socket, recorder.clone()).unwrap();
    Fixture {
        dir,
        socket,
        recorder,
        _server: server,
    }
}

fn ch_remote(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ch-remote"))
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn ping_prints_the_json_body() {
    let fixture = serve("ping");

    let output = ch_remote(&fixture.socket, &["ping"], b"");

    assert!(output.status.success(), "{output:?}");
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["version"], "0.1.0");
}

#[test]
fn failed_call_prints_the_error_chain_and_fails() {
    let fixture = serve("boot");

    let output = ch_remote(&fixture.socket, &["boot"], b"");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("404"), "{stderr}");
    assert!(stderr.contains("VM is not created"), "{stderr}");
    assert!(stderr.contains("no config"), "{stderr}");
}

#[test]
fn create_from_stdin_sends_the_config() {
    let fixture = serve("create");

    let output = ch_remote(
        &fixture.socket,
        &["create", "-"],
        br#"{"payload": {"kernel": "/vmlinux"}, "memory": {"size": 1073741824}}"#,
    );

    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty());
    let seen = fixture.recorder.seen.lock().unwrap().clone();
    let [ApiRequest::VmCreate(config)] = seen.as_slice() else {
        panic!("expected one VmCreate, got {seen:?}");
    };
    assert_eq!(config.memory.size, 1 << 30);
}

#[test]
fn shutdown_vmm_sends_vmm_shutdown() {
    let fixture = serve("shutdown-vmm");

    let output = ch_remote(&fixture.socket, &["shutdown-vmm"], b"");

    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        *fixture.recorder.seen.lock().unwrap(),
        [ApiRequest::VmmShutdown]
    );
}

#[test]
fn unreachable_socket_is_named() {
    let output = ch_remote(Path::new("/nonexistent/api.sock"), &["ping"], b"");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("/nonexistent/api.sock"), "{stderr}");
}
