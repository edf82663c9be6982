//! HTTP/1.1 over a UNIX socket (set up by `socket`), parsed with `httparse`; each connection on
//! its own thread, kept alive between requests. Answers are framed byte for byte as
//! cloud-hypervisor's server frames them (see [`format_response`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, warn};
use thiserror::Error;

use super::{API_ROOT, ApiError, ApiHandler, ApiResponse, ROUTES, route_request_with_fds, socket};

/// Largest accepted request body, as cloud-hypervisor: 4 MiB.
pub const MAX_BODY_SIZE: usize = 4 << 20;
/// How long a connection may take to send its whole request (and each write of the reply), and
/// how long a new connection may wait before its first request starts.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may stay idle between requests before we close it.
const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// Largest request head (request line and headers).
const MAX_HEAD_SIZE: usize = 64 << 10;
const MAX_HEADERS: usize = 64;
/// Connections served at once; more get a 503 and are closed (the VMM handles one request at a
/// time anyway, this only bounds threads).
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
    connections: Arc<Connections>,
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
    let connections = Arc::new(Connections::default());
    let thread = {
        let stopping = stopping.clone();
        let in_flight = in_flight.clone();
        let connections = connections.clone();
        thread::Builder::new()
            .name("http-server".to_string())
            .spawn(move || accept_loop(&listener, &handler, &stopping, &in_flight, &connections))
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
        connections,
        thread: Some(thread),
    })
}

fn accept_loop(
    listener: &UnixListener,
    handler: &Arc<dyn ApiHandler>,
    stopping: &Arc<AtomicBool>,
    in_flight: &Arc<AtomicUsize>,
    connections: &Arc<Connections>,
) {
    // The connection threads it starts inherit this filter.
    confine::confine_thread_or_exit(confine::ThreadKind::Api);
    for stream in listener.incoming() {
        if stopping.load(Ordering::Acquire) {
            break;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                warn!("API accept failed: {e}");
                // Out of fds, for example: do not spin while it lasts.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(id) = connections.add(&stream) else {
            warn!("Too many API connections, none idle; refusing a new one");
            // A fresh socket's buffer takes this small answer without blocking.
            let error = ApiError::new(503, "Too many open API connections");
            let (status, body) = error_response(&error);
            let _ = stream.write_all(&format_response(status, Some(&body), None, false));
            continue;
        };
        let handler = handler.clone();
        let stopping = stopping.clone();
        let in_flight = in_flight.clone();
        let open = connections.clone();
        let spawned = thread::Builder::new()
            .name("http-connection".to_string())
            .spawn(move || {
                let idle = |waiting| open.set_idle(id, waiting);
                serve_connection(stream, handler.as_ref(), &stopping, &in_flight, &idle);
                open.remove(id);
            });
        if let Err(e) = spawned {
            connections.remove(id);
            warn!("Cannot start an API connection thread: {e}");
        }
    }
}

/// The open connections: counted against [`MAX_CONNECTIONS`], and ended by [`HttpServer::stop`]
/// so that idle kept-alive ones do not outlive the server.
#[derive(Debug, Default)]
struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, OpenConnection>>,
}

#[derive(Debug)]
struct OpenConnection {
    stream: UnixStream,
    /// Since when it has waited for its next request, after answering one (kept alive).
    idle_since: Option<Instant>,
}

impl Connections {
    /// Registers a copy of `stream`. When the server is full, the connection kept alive and
    /// idle the longest is ended to make room (idle clients must not lock others out); None
    /// when none is idle (or the copy fails).
    fn add(&self, stream: &UnixStream) -> Option<u64> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= MAX_CONNECTIONS {
            let (&oldest, _) = open
                .iter()
                .filter_map(|(id, c)| c.idle_since.map(|since| (id, since)))
                .min_by_key(|(_, since)| *since)?;
            if let Some(evicted) = open.remove(&oldest) {
                debug!("API connections full: ending the longest idle one");
                let _ = evicted.stream.shutdown(Shutdown::Read);
            }
        }
        let copy = stream
            .try_clone()
            .inspect_err(|e| warn!("Cannot copy an API connection: {e}"))
            .ok()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        open.insert(
            id,
            OpenConnection {
                stream: copy,
                idle_since: None,
            },
        );
        Some(id)
    }

    /// Marks connection `id` as waiting for its next request (`true`) or serving one.
    fn set_idle(&self, id: u64, waiting: bool) {
        if let Some(connection) = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&id)
        {
            connection.idle_since = waiting.then(Instant::now);
        }
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Ends the reading side of every connection: a thread waiting for the next request sees the
    /// end of the stream and closes; an answer being written still goes out.
    fn stop_reading(&self) {
        for stream in self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = stream.stream.shutdown(Shutdown::Read);
        }
    }
}

/// Serves the requests of one connection, kept alive as cloud-hypervisor's server does, until
/// the client closes it, asks for `Connection: close`, sends something unparsable or stays idle
/// for [`KEEP_ALIVE_IDLE`].
fn serve_connection(
    stream: UnixStream,
    handler: &dyn ApiHandler,
    stopping: &AtomicBool,
    in_flight: &AtomicUsize,
    set_idle: &dyn Fn(bool),
) {
    if let Err(e) = stream.set_write_timeout(Some(READ_TIMEOUT)) {
        warn!("Cannot set the API connection timeout: {e}");
        return;
    }
    let mut connection = Connection::new(stream);
    // A new connection must start its request at once; a kept-alive one may wait longer.
    let mut idle = READ_TIMEOUT;
    loop {
        let request = match connection.read_request(idle) {
            Ok(Some(request)) => {
                set_idle(false);
                request
            }
            Ok(None) => return,
            Err(RequestError::Io(e)) => {
                debug!("API connection dropped: {e}");
                return;
            }
            Err(RequestError::Api(e)) => {
                // Where the next request would start is unknown: answer and close.
                let (status, body) = error_response(&e);
                connection.send(&format_response(status, Some(&body), None, false));
                return;
            }
        };
        // Counted from dispatch until the answer is written, so stop() can wait for it.
        in_flight.fetch_add(1, Ordering::AcqRel);
        let (status, body, allow) = if stopping.load(Ordering::Acquire) {
            // A request on a kept-alive connection after stop(): the VM is no longer ours to serve.
            let (status, body) =
                error_response(&ApiError::new(503, "The API server is shutting down"));
            (status, Some(body), None)
        } else {
            let path = request.path.clone();
            let (status, body) = respond(request.method, &path, request.body, request.fds, handler);
            let allow = if status == 405 {
                allowed_method(&path)
            } else {
                None
            };
            (status, body, allow)
        };
        let keep_alive = request.keep_alive && !stopping.load(Ordering::Acquire);
        let sent = connection.send(&format_response(status, body.as_deref(), allow, keep_alive));
        in_flight.fetch_sub(1, Ordering::AcqRel);
        if !keep_alive || !sent {
            return;
        }
        idle = KEEP_ALIVE_IDLE;
        set_idle(true);
    }
}

fn respond(
    method: String,
    path: &str,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
    handler: &dyn ApiHandler,
) -> (u16, Option<Vec<u8>>) {
    let result = route_request_with_fds(&method, path, &body, fds)
        .and_then(|api_request| handler.handle(api_request));
    match result {
        Ok(ApiResponse::Empty) => (204, None),
        Ok(ApiResponse::Json(value)) => match serde_json::to_vec(&value) {
            Ok(body) => (200, Some(body)),
            Err(e) => {
                let (status, body) = error_response(&ApiError::internal(&e));
                (status, Some(body))
            }
        },
        Err(e) => {
            let (status, body) = error_response(&e);
            (status, Some(body))
        }
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

/// Status and body (the error chain as a JSON array of strings) of an error.
fn error_response(error: &ApiError) -> (u16, Vec<u8>) {
    // Serialising a list of strings cannot fail; fall back to an empty array anyway.
    let body = serde_json::to_vec(&error.messages).unwrap_or_else(|_| b"[]".to_vec());
    (error.status, body)
}

/// One parsed HTTP request.
struct HttpRequest {
    method: String,
    path: String,
    body: Vec<u8>,
    /// Descriptors sent with the request (`SCM_RIGHTS`).
    fds: Vec<OwnedFd>,
    /// Whether the client lets the connection stay open after the answer.
    keep_alive: bool,
}

/// Most descriptors one request may carry (one tap fd per queue pair of a card).
const MAX_REQUEST_FDS: usize = 16;

enum RequestError {
    /// The peer went away or timed out: nothing to answer.
    Io(io::Error),
    /// The request is invalid: answer with this error.
    Api(ApiError),
}

/// What the request line and headers say, owned so the buffer they came from can be consumed.
#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    method: String,
    path: String,
    content_length: usize,
    expects_continue: bool,
    keep_alive: bool,
}

/// Parses a request head from the start of `buffer`: its length and content, or None while it
/// is incomplete.
fn parse_head(buffer: &[u8]) -> Result<Option<(usize, RequestHead)>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "Malformed HTTP request: {e}"
            )));
        }
    };
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("Transfer-Encoding").is_some() {
        return Err(ApiError::bad_request(
            "Transfer-Encoding is not supported; send Content-Length",
        ));
    }
    let content_length = match header("Content-Length") {
        None => 0,
        Some(value) => std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| ApiError::bad_request("Invalid Content-Length"))?,
    };
    if content_length > MAX_BODY_SIZE {
        return Err(ApiError::payload_too_large(format!(
            "Request body of {content_length} bytes is over the {MAX_BODY_SIZE} byte limit"
        )));
    }
    let connection_has = |token: &str| {
        header("Connection").is_some_and(|value| {
            value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    // HTTP/1.1 keeps a connection unless told to close; HTTP/1.0 closes unless told to keep.
    let keep_alive = match parsed.version {
        Some(0) => connection_has("keep-alive"),
        _ => !connection_has("close"),
    };
    let head = RequestHead {
        method: parsed.method.unwrap_or_default().to_string(),
        path: parsed.path.unwrap_or_default().to_string(),
        content_length,
        expects_continue: header("Expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")),
        keep_alive,
    };
    Ok(Some((head_len, head)))
}

/// A client connection with what was read from it but not used yet: a read may take the start
/// of the next request on a kept-alive connection.
struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            pending: Vec::with_capacity(1024),
            fds: Vec::new(),
        }
    }

    /// Writes a whole answer; false if the client is gone.
    fn send(&mut self, bytes: &[u8]) -> bool {
        match self
            .stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
        {
            Ok(()) => true,
            Err(e) => {
                debug!("Cannot send the API response: {e}");
                false
            }
        }
    }

    /// Reads the next request. None when the client closed the connection, or sent nothing
    /// for `idle`, before a new request began. Once it began, the whole request must come
    /// within [`READ_TIMEOUT`].
    fn read_request(&mut self, idle: Duration) -> Result<Option<HttpRequest>, RequestError> {
        if self.pending.is_empty() {
            match self.read_more(Instant::now() + idle) {
                Ok(()) => {}
                Err(RequestError::Io(e)) => {
                    debug!("API connection idle or closed: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        // One deadline for the whole request, so a slow trickle cannot hold a thread for long.
        let deadline = Instant::now() + READ_TIMEOUT;
        let (head_len, head) = loop {
            if let Some(parsed) = parse_head(&self.pending).map_err(RequestError::Api)? {
                break parsed;
            }
            if self.pending.len() > MAX_HEAD_SIZE {
                return Err(RequestError::Api(ApiError::bad_request(
                    "HTTP request head too large",
                )));
            }
            self.read_more(deadline)?;
        };
        self.pending.drain(..head_len);
        let length = head.content_length;
        if head.expects_continue && self.pending.len() < length {
            self.stream.write_all(CONTINUE).map_err(RequestError::Io)?;
        }
        while self.pending.len() < length {
            self.read_more(deadline)?;
        }
        let body = self.pending.drain(..length).collect();
        Ok(Some(HttpRequest {
            method: head.method,
            path: head.path,
            body,
            fds: std::mem::take(&mut self.fds),
            keep_alive: head.keep_alive,
        }))
    }

    /// Appends what the next read brings before `deadline`; the end of the stream is an error
    /// (a request is incomplete, or none came).
    fn read_more(&mut self, deadline: Instant) -> Result<(), RequestError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(RequestError::Io(ErrorKind::TimedOut.into()));
        }
        self.stream
            .set_read_timeout(Some(remaining))
            .map_err(RequestError::Io)?;
        // Descriptors may come with any part of the request; more than the limit drop it.
        let room = MAX_REQUEST_FDS.saturating_sub(self.fds.len());
        let mut chunk = [0u8; 4096];
        let (read, received) = liveupdate::sys::recv_with_fds(&self.stream, &mut chunk, room)
            .map_err(RequestError::Io)?;
        self.fds.extend(received);
        match read {
            0 => Err(RequestError::Io(ErrorKind::UnexpectedEof.into())),
            read => {
                self.pending.extend_from_slice(&chunk[..read]);
                Ok(())
            }
        }
    }
}

/// The interim answer to `Expect: 100-continue`, in the same status-line form as every answer.
const CONTINUE: &[u8] = b"HTTP/1.1 100 \r\n\r\n";

/// Formats a whole response as cloud-hypervisor's server (Firecracker's micro_http) writes it:
/// a status line with the code and no reason phrase (`HTTP/1.1 204 `: cloud-hypervisor's own
/// API client parses everything after `HTTP/1.1 ` up to the line end as the number), then
/// `Server`, `Connection`, `Allow` (405 only), `Content-Type` and `Content-Length` in this order,
/// the last two on every answer but a 204.
fn format_response(
    status: u16,
    body: Option<&[u8]>,
    allow: Option<&str>,
    keep_alive: bool,
) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut head = format!(
        "HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nConnection: {connection}\r\n"
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
    /// [`DRAIN_TIMEOUT`]), ends the connections kept alive, removes the socket and the lock file.
    /// A request that still arrives on a connection gets a 503.
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
        self.connections.stop_reading();
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

    /// Reads one whole answer (head and `Content-Length` bytes of body) from a kept-alive stream.
    fn read_one_answer(stream: &mut UnixStream) -> String {
        let mut bytes = Vec::new();
        let mut byte = [0u8; 1];
        while !bytes.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).unwrap();
            bytes.push(byte[0]);
        }
        let head = String::from_utf8(bytes).unwrap();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.parse().unwrap());
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        head + &String::from_utf8(body).unwrap()
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

    // The next three pin the bytes cloud-hypervisor's server writes: its own API client takes
    // the text between `HTTP/1.1 ` and the line end as the status number, so there is no reason
    // phrase; the headers come in this order, exactly so spelt.

    #[test]
    fn empty_response_is_204_without_body_or_length() {
        let fixture = serve("no-content", Ok(ApiResponse::Empty));

        let response = raw(
            &fixture.socket,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert_eq!(
            response,
            "HTTP/1.1 204 \r\n\
             Server: Cloud Hypervisor API\r\n\
             Connection: keep-alive\r\n\
             \r\n"
        );
    }

    #[test]
    fn json_response_is_200_with_type_and_length() {
        let value = serde_json::json!({"state": "Running"});
        let fixture = serve("json", Ok(ApiResponse::Json(value)));

        let response = raw(
            &fixture.socket,
            b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert_eq!(
            response,
            "HTTP/1.1 200 \r\n\
             Server: Cloud Hypervisor API\r\n\
             Connection: keep-alive\r\n\
             Content-Type: application/json\r\n\
             Content-Length: 19\r\n\
             \r\n\
             {\"state\":\"Running\"}"
        );
    }

    #[test]
    fn error_response_is_the_chain_as_a_json_array() {
        let fixture = serve(
            "error-bytes",
            Err(ApiError {
                status: 500,
                messages: vec!["Cannot pause".into(), "busy".into()],
            }),
        );

        let response = raw(
            &fixture.socket,
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n",
        );

        assert_eq!(
            response,
            "HTTP/1.1 500 \r\n\
             Server: Cloud Hypervisor API\r\n\
             Connection: keep-alive\r\n\
             Content-Type: application/json\r\n\
             Content-Length: 23\r\n\
             \r\n\
             [\"Cannot pause\",\"busy\"]"
        );
    }

    #[test]
    fn connection_serves_requests_until_the_client_closes() {
        let value = serde_json::json!({"state": "Running"});
        let fixture = serve("keep-alive", Ok(ApiResponse::Json(value)));
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        let ping = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n\r\n";

        let mut answers = Vec::new();
        for _ in 0..3 {
            stream.write_all(ping).unwrap();
            answers.push(read_one_answer(&mut stream));
        }

        assert!(
            answers.iter().all(|a| a.starts_with("HTTP/1.1 200 \r\n")),
            "{answers:?}"
        );
        assert_eq!(fixture.handler.seen().len(), 3);
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let fixture = serve("pipelined", Ok(ApiResponse::Empty));
        let body = r#"{"payload": {"kernel": "/vmlinux"}}"#;
        let two = format!(
            "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
             PUT /api/v1/vm.boot HTTP/1.1\r\n\r\n",
            body.len()
        );

        let response = raw(&fixture.socket, two.as_bytes());

        assert_eq!(
            response.matches("HTTP/1.1 204 \r\n").count(),
            2,
            "{response}"
        );
        let seen = fixture.handler.seen();
        assert!(
            matches!(
                seen.as_slice(),
                [ApiRequest::VmCreate(_), ApiRequest::VmBoot]
            ),
            "{seen:?}"
        );
    }

    #[test]
    fn connection_close_is_honoured() {
        let fixture = serve("close", Ok(ApiResponse::Empty));
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();

        // Without shutting down our side: the server closes after its answer.
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();

        assert!(
            response.starts_with(
                "HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: close\r\n"
            ),
            "{response}"
        );
    }

    #[test]
    fn http_1_0_closes_unless_asked_to_keep_alive() {
        let fixture = serve("http10", Ok(ApiResponse::Empty));
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
            .unwrap();

        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();

        assert!(response.contains("Connection: close\r\n"), "{response}");
    }

    #[test]
    fn stop_ends_idle_kept_alive_connections() {
        let mut fixture = serve("stop-idle", Ok(ApiResponse::Empty));
        let mut stream = UnixStream::connect(&fixture.socket).unwrap();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let first = read_one_answer(&mut stream);
        let start = Instant::now();

        fixture.server.stop();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();

        assert!(first.starts_with("HTTP/1.1 204 "), "{first}");
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
        assert!(start.elapsed() < READ_TIMEOUT, "{:?}", start.elapsed());
    }

    #[test]
    fn when_full_the_longest_idle_kept_alive_connection_makes_room() {
        let fixture = serve("full-idle", Ok(ApiResponse::Empty));
        let mut held: Vec<UnixStream> = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = UnixStream::connect(&fixture.socket).unwrap();
            stream
                .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
                .unwrap();
            read_one_answer(&mut stream);
            held.push(stream);
        }
        // Every connection answered once and now waits, kept alive.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fixture
            .server
            .connections
            .open
            .lock()
            .unwrap()
            .values()
            .any(|c| c.idle_since.is_none())
        {
            assert!(Instant::now() < deadline, "connections not idle");
            thread::sleep(Duration::from_millis(5));
        }

        let mut extra = UnixStream::connect(&fixture.socket).unwrap();
        extra
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let answer = read_one_answer(&mut extra);
        let mut rest = Vec::new();
        held[0].read_to_end(&mut rest).unwrap();

        assert!(answer.starts_with("HTTP/1.1 204 "), "{answer}");
        assert!(
            rest.is_empty(),
            "the oldest idle connection was not simply closed"
        );
    }

    #[test]
    fn connections_over_the_limit_get_503() {
        let fixture = serve("full", Ok(ApiResponse::Empty));
        let held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&fixture.socket).unwrap())
            .collect();
        // Wait until the accept loop has registered them all.
        let deadline = Instant::now() + Duration::from_secs(2);
        while fixture.server.connections.open.lock().unwrap().len() < MAX_CONNECTIONS {
            assert!(Instant::now() < deadline, "connections not accepted");
            thread::sleep(Duration::from_millis(5));
        }

        // The answer comes before any request, and the connection is closed at once.
        let mut extra = UnixStream::connect(&fixture.socket).unwrap();
        let mut response = String::new();
        extra.read_to_string(&mut response).unwrap();

        drop(held);
        assert!(response.starts_with("HTTP/1.1 503 \r\n"), "{response}");
        assert!(response.contains("Connection: close\r\n"), "{response}");
        assert_eq!(body_of(&response), r#"["Too many open API connections"]"#);
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
        let mut interim = [0u8; 17];
        stream.read_exact(&mut interim).unwrap();

        stream.write_all(body).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).unwrap();

        assert_eq!(&interim, b"HTTP/1.1 100 \r\n\r\n");
        assert!(rest.starts_with("HTTP/1.1 204 "), "{rest}");
    }
}
