//! HTTP/1.1 over a UNIX socket (set up by `socket`), parsed with `httparse`; one request per
//! connection, each on its own thread.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use thiserror::Error;

use super::{API_ROOT, ApiError, ApiHandler, ApiResponse, ROUTES, route_request_with_fds, socket};

/// Largest accepted request body, as cloud-hypervisor: 4 MiB.
pub const MAX_BODY_SIZE: usize = 4 << 20;
/// How long a connection may take to send its whole request (and each write of the reply).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line and headers).
const MAX_HEAD_SIZE: usize = 64 << 10;
const MAX_HEADERS: usize = 64;
/// Connections served at once; more are closed at once (the VMM handles one request at a time
/// anyway, this only bounds threads).
const MAX_CONNECTIONS: usize = 32;

/// Errors from starting the API server.
#[derive(Debug, Error)]
pub enum ApiServerError {
    /// Another process holds `<path>.lock`.
    #[error("API socket {0} is in use")]
    SocketInUse(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("Cannot lock {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `--api-socket fd=N` names no listening socket.
    #[error("--api-socket fd={fd} is not usable: {reason}")]
    BadFd {
        /// The fd number.
        fd: i32,
        /// Why.
        reason: String,
    },
    /// Something that is not a socket sits at the socket path.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A filesystem or socket step failed.
    #[error("Cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

pub(super) fn io_error(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> ApiServerError {
    let path = path.to_path_buf();
    move |source| ApiServerError::Io {
        action,
        path,
        source,
    }
}

/// A running API server. Stopping (or dropping) it removes its socket and lock file (not a
/// socket it was given as an fd: whoever bound it owns the path).
#[derive(Debug)]
pub struct HttpServer {
    /// The socket path, with the lock file's path; none for a socket given as an fd.
    paths: Option<(PathBuf, PathBuf)>,
    /// A copy of the listener, to wake the accept loop when stopping.
    listener: UnixListener,
    lock: Option<File>,
    stopping: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// How long [`HttpServer::stop`] waits for answers already being written (e.g. the answer to
/// `vmm.shutdown` itself) before the process may exit.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts serving `handler` on a new UNIX socket at `path` (mode 0600).
pub fn start_http_server(
    path: &Path,
    handler: Arc<dyn ApiHandler>,
) -> Result<HttpServer, ApiServerError> {
    let (listener, lock, lock_path) = socket::bind_api_socket(path)?;
    let mut server = serve(listener, handler).inspect_err(|_| {
        // Nobody will serve the socket: do not leave it behind.
        let _ = fs::remove_file(path);
    })?;
    server.paths = Some((path.to_path_buf(), lock_path));
    server.lock = Some(lock);
    Ok(server)
}

/// Starts serving `handler` on `listener`, a listening socket the VMM inherited
/// (`--api-socket fd=N`).
pub fn start_http_server_on(
    listener: UnixListener,
    handler: Arc<dyn ApiHandler>,
) -> Result<HttpServer, ApiServerError> {
    serve(listener, handler)
}

fn serve(
    listener: UnixListener,
    handler: Arc<dyn ApiHandler>,
) -> Result<HttpServer, ApiServerError> {
    let copy = listener.try_clone().map_err(io_error(
        "copy the listener of",
        Path::new("the API socket"),
    ))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let thread = {
        let stopping = stopping.clone();
        let in_flight = in_flight.clone();
        thread::Builder::new()
            .name("http-server".to_string())
            .spawn(move || accept_loop(&listener, &handler, &stopping, &in_flight))
            .map_err(io_error(
                "start the server thread for",
                Path::new("the API socket"),
            ))?
    };
    Ok(HttpServer {
        paths: None,
        listener: copy,
        lock: None,
        stopping,
        in_flight,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: &UnixListener,
    handler: &Arc<dyn ApiHandler>,
    stopping: &AtomicBool,
    in_flight: &Arc<AtomicUsize>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!("API accept failed: {e}");
                // Out of fds, for example: do not spin while it lasts.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("Too many API connections; closing a new one");
            continue;
        }
        let handler = handler.clone();
        let connection_count = active.clone();
        let in_flight = in_flight.clone();
        let spawned = thread::Builder::new()
            .name("http-connection".to_string())
            .spawn(move || {
                serve_connection(stream, handler.as_ref(), &in_flight);
                connection_count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::AcqRel);
            warn!("Cannot start an API connection thread: {e}");
        }
    }
}

fn serve_connection(mut stream: UnixStream, handler: &dyn ApiHandler, in_flight: &AtomicUsize) {
    if let Err(e) = stream.set_write_timeout(Some(READ_TIMEOUT)) {
        warn!("Cannot set the API connection timeout: {e}");
        return;
    }
    let mut dispatched = false;
    let (status, body, allow) = match read_request(&mut stream) {
        Ok(request) => {
            // Counted from dispatch until the answer is written, so stop() can wait for it.
            in_flight.fetch_add(1, Ordering::AcqRel);
            dispatched = true;
            let path = request.path.clone();
            let (status, body) = respond(request, handler);
            let allow = if status == 405 {
                allowed_method(&path)
            } else {
                None
            };
            (status, body, allow)
        }
        Err(RequestError::Io(e)) => {
            debug!("API connection dropped: {e}");
            return;
        }
        Err(RequestError::Api(e)) => {
            let (status, body) = error_response(&e);
            (status, body, None)
        }
    };
    let response = format_response(status, body.as_deref(), allow);
    if let Err(e) = stream.write_all(&response).and_then(|()| stream.flush()) {
        debug!("Cannot send the API response: {e}");
    }
    if dispatched {
        in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn respond(request: HttpRequest, handler: &dyn ApiHandler) -> (u16, Option<Vec<u8>>) {
    let result = route_request_with_fds(&request.method, &request.path, &request.body, request.fds)
        .and_then(|api_request| handler.handle(api_request));
    match result {
        Ok(ApiResponse::Empty) => (204, None),
        Ok(ApiResponse::Json(value)) => match serde_json::to_vec(&value) {
            Ok(body) => (200, Some(body)),
            Err(e) => error_response(&ApiError::internal(&e)),
        },
        Err(e) => error_response(&e),
    }
}

/// The method a route accepts, for the `Allow` header of a 405.
fn allowed_method(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(API_ROOT)?;
    let name = name.split_once('?').map_or(name, |(name, _query)| name);
    ROUTES
        .iter()
        .find(|route| route.name == name)
        .map(|route| route.method.as_str())
}

fn error_response(error: &ApiError) -> (u16, Option<Vec<u8>>) {
    // Serialising a list of strings cannot fail; fall back to an empty array anyway.
    let body = serde_json::to_vec(&error.messages).unwrap_or_else(|_| b"[]".to_vec());
    (error.status, Some(body))
}

/// One parsed HTTP request.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    /// Descriptors sent with the request (`SCM_RIGHTS`).
    fds: Vec<OwnedFd>,
}

/// Most descriptors one request may carry (one tap fd per queue pair of a card).
const MAX_REQUEST_FDS: usize = 16;

enum RequestError {
    /// The peer went away or timed out: nothing to answer.
    Io(io::Error),
    /// The request is invalid: answer with this error.
    Api(ApiError),
}

/// Reads into `buffer` before `deadline`; end of stream is an error (the request is incomplete).
fn read_before(
    stream: &mut UnixStream,
    buffer: &mut [u8],
    deadline: Instant,
    fds: &mut Vec<OwnedFd>,
) -> Result<usize, RequestError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(RequestError::Io(ErrorKind::TimedOut.into()));
    }
    stream
        .set_read_timeout(Some(remaining))
        .map_err(RequestError::Io)?;
    // Descriptors may come with any part of the request; more than the limit drop it.
    let room = MAX_REQUEST_FDS.saturating_sub(fds.len());
    let (read, received) =
        liveupdate::sys::recv_with_fds(stream, buffer, room).map_err(RequestError::Io)?;
    fds.extend(received);
    match read {
        0 => Err(RequestError::Io(ErrorKind::UnexpectedEof.into())),
        read => Ok(read),
    }
}

fn read_request(stream: &mut UnixStream) -> Result<HttpRequest, RequestError> {
    // One deadline for the whole request, so a slow trickle cannot hold a thread for long.
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut fds = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buffer) {
            Ok(httparse::Status::Complete(head_len)) => {
                let body = buffer[head_len..].to_vec();
                return finish_request(stream, &parsed, body, deadline, fds);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(RequestError::Api(ApiError::bad_request(format!(
                    "Malformed HTTP request: {e}"
                ))));
            }
        }
        if buffer.len() > MAX_HEAD_SIZE {
            return Err(RequestError::Api(ApiError::bad_request(
                "HTTP request head too large",
            )));
        }
        let read = read_before(stream, &mut chunk, deadline, &mut fds)?;
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn finish_request(
    stream: &mut UnixStream,
    parsed: &httparse::Request<'_, '_>,
    mut body: Vec<u8>,
    deadline: Instant,
    mut fds: Vec<OwnedFd>,
) -> Result<HttpRequest, RequestError> {
    let bad = |message: &str| RequestError::Api(ApiError::bad_request(message));
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("Transfer-Encoding").is_some() {
        return Err(bad(
            "Transfer-Encoding is not supported; send Content-Length",
        ));
    }
    let length = match header("Content-Length") {
        None => 0,
        Some(value) => std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| bad("Invalid Content-Length"))?,
    };
    if length > MAX_BODY_SIZE {
        return Err(RequestError::Api(ApiError::payload_too_large(format!(
            "Request body of {length} bytes is over the {MAX_BODY_SIZE} byte limit"
        ))));
    }
    if body.len() > length {
        return Err(bad("More data than Content-Length"));
    }
    let expects_continue =
        header("Expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    if expects_continue && body.len() < length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(RequestError::Io)?;
    }
    let mut filled = body.len();
    body.resize(length, 0);
    while filled < length {
        filled += read_before(stream, &mut body[filled..], deadline, &mut fds)?;
    }
    Ok(HttpRequest {
        method: parsed.method.unwrap_or_default().to_string(),
        path: parsed.path.unwrap_or_default().to_string(),
        body,
        fds,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Formats a whole response; `allow` adds the `Allow` header of a 405.
fn format_response(status: u16, body: Option<&[u8]>, allow: Option<&str>) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: Cloud Hypervisor API\r\nConnection: close\r\n",
        reason(status)
    );
    if let Some(allow) = allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    // RFC 9110: a 204 carries neither a body nor a Content-Length.
    if status != 204 {
        let body = body.unwrap_or_default();
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    if status != 204 {
        response.extend_from_slice(body.unwrap_or_default());
    }
    response
}

impl HttpServer {
    /// The socket path, unless the socket was given as an fd.
    pub fn path(&self) -> Option<&Path> {
        self.paths.as_ref().map(|(path, _)| path.as_path())
    }

    /// Stops accepting, waits for the accept thread and for answers already being written (up to
    /// [`DRAIN_TIMEOUT`]), removes the socket and the lock file. Idle connections are not waited
    /// for.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        // Wake the blocking accept: with a connection of our own to a socket we bound, by
        // shutting down one we were given (its path, if any, is not ours to connect to).
        let woken = match &self.paths {
            Some((path, _)) => UnixStream::connect(path).map(drop),
            None => crate::sys::shutdown_socket(self.listener.as_fd()),
        };
        match woken {
            Ok(()) => {
                if thread.join().is_err() {
                    warn!("The API server thread panicked");
                }
            }
            Err(e) => warn!("Cannot wake the API server: {e}; leaving its thread"),
        }
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while self.in_flight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        if let Some((path, lock_path)) = &self.paths {
            let _ = fs::remove_file(path);
            let _ = fs::remove_file(lock_path);
        }
        self.lock = None;
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::Shutdown;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use super::*;
    use crate::api::ApiRequest;
    use crate::api::client::request;
    use crate::api::testing::{FakeHandler, socket_dir};

    struct Fixture {
        dir: PathBuf,
        socket: PathBuf,
        handler: Arc<FakeHandler>,
        server: HttpServer,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            self.server.stop();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn serve(name: &str, answer: Result<ApiResponse, ApiError>) -> Fixture {
        let dir = socket_dir(name);
        let socket = dir.join("api.sock");
        let handler = Arc::new(FakeHandler::answering(answer));
        let server = start_http_server(&socket, handler.clone()).unwrap();
        Fixture {
            dir,
            socket,
            handler,
            server,
        }
    }

    /// Sends raw bytes, half-closes, and returns the whole raw response.
    fn raw(socket: &Path, bytes: &[u8]) -> String {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.write_all(bytes).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    fn body_of(response: &str) -> &str {
        response.split_once("\r\n\r\n").unwrap().1
    }

    #[test]
    fn every_route_reaches_the_handler_as_its_request() {
        let fixture = serve("routes", Ok(ApiResponse::Empty));
        let calls = [
            ("GET", "vmm.ping"),
            ("PUT", "vmm.shutdown"),
            ("PUT", "vm.boot"),
            ("GET", "vm.info"),
            ("PUT", "vm.pause"),
            ("PUT", "vm.resume"),
            ("PUT", "vm.shutdown"),
            ("PUT", "vm.reboot"),
            ("PUT", "vm.delete"),
            ("GET", "vm.counters"),
        ];

        let statuses: Vec<u16> = calls
            .iter()
            .map(|(method, name)| request(&fixture.socket, method, name, None).unwrap().status)
            .collect();

        assert_eq!(statuses, [204; 10]);
        assert_eq!(
            fixture.handler.seen(),
            [
                ApiRequest::VmmPing,
                ApiRequest::VmmShutdown,
                ApiRequest::VmBoot,
                ApiRequest::VmInfo,
                ApiRequest::VmPause,
                ApiRequest::VmResume,
                ApiRequest::VmShutdown,
                ApiRequest::VmReboot,
                ApiRequest::VmDelete,
                ApiRequest::VmCounters,
            ]
        );
    }

    #[test]
    fn vm_create_body_reaches_the_handler() {
        let fixture = serve("create", Ok(ApiResponse::Empty));

        let response = request(
            &fixture.socket,
            "PUT",
            "vm.create",
            Some(br#"{"payload": {"kernel": "/vmlinux"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2}}"#),
        )
        .unwrap();

        assert_eq!(response.status, 204);
        let seen = fixture.handler.seen();
        let [ApiRequest::VmCreate(config)] = seen.as_slice() else {
            panic!("expected one VmCreate, got {seen:?}");
        };
        assert_eq!(config.cpus.boot_vcpus, 2);
    }

    #[test]
    fn empty_response_is_204_without_body_or_length() {
        let fixture = serve("no-content", Ok(ApiResponse::Empty));

        let response = raw(
            &fixture.socket,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert!(
            response.starts_with("HTTP/1.1 204 No Content\r\n"),
            "{response}"
        );
        assert!(
            response.contains("Server: Cloud Hypervisor API\r\n"),
            "{response}"
        );
        assert!(!response.contains("Content-Length"), "{response}");
        assert_eq!(body_of(&response), "");
    }

    #[test]
    fn json_response_is_200_with_type_and_length() {
        let value = serde_json::json!({"state": "Running"});
        let fixture = serve("json", Ok(ApiResponse::Json(value)));

        let response = raw(
            &fixture.socket,
            b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("Content-Type: application/json\r\n"),
            "{response}"
        );
        assert!(
            response.contains("Server: Cloud Hypervisor API\r\n"),
            "{response}"
        );
        assert!(response.contains("Content-Length: 19\r\n"), "{response}");
        assert_eq!(body_of(&response), r#"{"state":"Running"}"#);
    }

    #[test]
    fn handler_error_becomes_status_and_json_array() {
        let fixture = serve(
            "handler-error",
            Err(ApiError::not_found("VM is not created")),
        );

        let response = request(&fixture.socket, "PUT", "vm.boot", None).unwrap();

        assert_eq!(response.status, 404);
        assert_eq!(response.error_messages(), ["VM is not created"]);
    }

    #[test]
    fn malformed_request_line_is_400_with_json_body() {
        let fixture = serve("malformed", Ok(ApiResponse::Empty));

        let response = raw(&fixture.socket, b"this is not http\r\n\r\n");

        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
        let messages: Vec<String> = serde_json::from_str(body_of(&response)).unwrap();
        assert!(
            messages[0].starts_with("Malformed HTTP request"),
            "{messages:?}"
        );
        assert!(fixture.handler.seen().is_empty());
    }

    #[test]
    fn bad_json_in_vm_create_is_400_naming_the_serde_error() {
        let fixture = serve("bad-json", Ok(ApiResponse::Empty));

        let response = request(
            &fixture.socket,
            "PUT",
            "vm.create",
            Some(b"{\"payload\": 3}"),
        )
        .unwrap();

        assert_eq!(response.status, 400);
        let messages = response.error_messages();
        assert!(messages[0].contains("invalid type"), "{messages:?}");
    }

    #[test]
    fn unknown_path_is_404() {
        let fixture = serve("unknown", Ok(ApiResponse::Empty));

        let response = request(&fixture.socket, "GET", "vm.nothing", None).unwrap();

        assert_eq!(response.status, 404);
        assert_eq!(
            response.error_messages(),
            ["Unknown endpoint /api/v1/vm.nothing"]
        );
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let fixture = serve("method", Ok(ApiResponse::Empty));

        let response = raw(
            &fixture.socket,
            b"POST /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert!(response.starts_with("HTTP/1.1 405 "), "{response}");
        assert!(response.contains("Allow: PUT\r\n"), "{response}");
    }

    #[test]
    fn body_on_bodyless_action_is_400() {
        let fixture = serve("body", Ok(ApiResponse::Empty));

        let response = request(&fixture.socket, "PUT", "vm.pause", Some(b"{}")).unwrap();

        assert_eq!(response.status, 400);
        assert!(fixture.handler.seen().is_empty());
    }

    #[test]
    fn oversized_body_is_413_without_reading_it() {
        let fixture = serve("oversized", Ok(ApiResponse::Empty));
        let head = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_SIZE + 1
        );

        let response = raw(&fixture.socket, head.as_bytes());

        assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    }

    #[test]
    fn invalid_content_length_is_400() {
        let fixture = serve("length", Ok(ApiResponse::Empty));

        let response = raw(
            &fixture.socket,
            b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
        );

        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    }

    #[test]
    fn socket_mode_is_0600() {
        let fixture = serve("mode", Ok(ApiResponse::Empty));

        let mode = fs::metadata(&fixture.socket).unwrap().permissions().mode();

        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn second_server_on_the_same_path_is_refused() {
        let fixture = serve("in-use", Ok(ApiResponse::Empty));
        let handler = Arc::new(FakeHandler::answering(Ok(ApiResponse::Empty)));

        let second = start_http_server(&fixture.socket, handler);

        assert!(
            matches!(second, Err(ApiServerError::SocketInUse(ref p)) if *p == fixture.socket),
            "{second:?}"
        );
        assert_eq!(
            request(&fixture.socket, "GET", "vmm.ping", None)
                .unwrap()
                .status,
            204
        );
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = socket_dir("stale");
        let socket = dir.join("api.sock");
        drop(UnixListener::bind(&socket).unwrap());
        let handler = Arc::new(FakeHandler::answering(Ok(ApiResponse::Empty)));

        let server = start_http_server(&socket, handler).unwrap();

        let status = request(&socket, "GET", "vmm.ping", None).unwrap().status;
        drop(server);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(status, 204);
    }

    #[test]
    fn regular_file_at_the_socket_path_is_kept() {
        let dir = socket_dir("not-socket");
        let socket = dir.join("api.sock");
        fs::write(&socket, "precious").unwrap();
        let handler = Arc::new(FakeHandler::answering(Ok(ApiResponse::Empty)));

        let result = start_http_server(&socket, handler);

        let content = fs::read_to_string(&socket).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            matches!(result, Err(ApiServerError::NotASocket(_))),
            "{result:?}"
        );
        assert_eq!(content, "precious");
    }

    #[test]
    fn stop_removes_socket_and_lock_file() {
        let mut fixture = serve("stop", Ok(ApiResponse::Empty));

        fixture.server.stop();

        assert!(!fixture.socket.exists());
        assert!(!PathBuf::from(format!("{}.lock", fixture.socket.display())).exists());
    }

    #[test]
    fn silent_client_does_not_block_others() {
        let fixture = serve("silent", Ok(ApiResponse::Empty));
        let _silent = UnixStream::connect(&fixture.socket).unwrap();
        let start = Instant::now();

        let response = request(&fixture.socket, "GET", "vmm.ping", None).unwrap();

        assert_eq!(response.status, 204);
        assert!(start.elapsed() < READ_TIMEOUT, "{:?}", start.elapsed());
    }

    #[test]
    fn incomplete_request_is_dropped_at_the_deadline() {
        let fixture = serve("incomplete", Ok(ApiResponse::Empty));
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
            .unwrap();
        let start = Instant::now();

        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();

        let waited = start.elapsed();
        assert!(response.is_empty());
        assert!(
            waited >= READ_TIMEOUT - Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(waited < READ_TIMEOUT * 2, "{waited:?}");
        assert!(fixture.handler.seen().is_empty());
    }

    #[test]
    fn expect_continue_gets_an_interim_response() {
        let fixture = serve("continue", Ok(ApiResponse::Empty));
        let body = br#"{"payload": {"kernel": "/vmlinux"}}"#;
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        let head = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();

        stream.write_all(body).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();

        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(rest.starts_with("HTTP/1.1 204 "), "{rest}");
    }
}
