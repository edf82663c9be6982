//! A tiny HTTP/1.1 client for the API socket: one request per connection, as `ch-remote` does.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::API_ROOT;

/// Largest response accepted (the server's own body limit is the same).
const MAX_RESPONSE_SIZE: usize = 64 << 20;

/// Errors from talking to the API socket.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("Cannot connect to the API socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("API socket I/O failed")]
    Io(#[source] io::Error),
    /// The server's response is not valid HTTP.
    #[error("Malformed HTTP response: {0}")]
    MalformedResponse(String),
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body (empty for 204).
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error messages of a failed request (the server sends a JSON array of strings);
    /// falls back to the raw body.
    pub fn error_messages(&self) -> Vec<String> {
        serde_json::from_slice::<Vec<String>>(&self.body).unwrap_or_else(|_| {
            vec![format!(
                "HTTP {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )]
        })
    }
}

/// The full request path of an endpoint: `vm.info` becomes `/api/v1/vm.info`; a path starting
/// with `/` is used as is.
pub fn endpoint_path(endpoint: &str) -> String {
    if endpoint.starts_with('/') {
        endpoint.to_string()
    } else {
        format!("{API_ROOT}{endpoint}")
    }
}

/// Sends one request and waits for the whole response. `path` is an endpoint name (`vm.boot`)
/// or a full path (see [`endpoint_path`]).
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Response, ClientError> {
    request_with_fds(socket, method, path, body, &[])
}

/// As [`request`], sending `fds` with the request as `SCM_RIGHTS` (cloud-hypervisor's way of
/// passing tap fds to `vm.add-net`).
pub fn request_with_fds(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    fds: &[RawFd],
) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let body = body.unwrap_or_default();
    let mut message = format!(
        "{method} {} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n",
        endpoint_path(path)
    );
    if !body.is_empty() {
        message.push_str("Content-Type: application/json\r\n");
    }
    message.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = message.into_bytes();
    bytes.extend_from_slice(body);
    let mut sent = 0;
    if !fds.is_empty() {
        // The fds go with the first bytes; a stream socket may take only part of them.
        sent = stream
            .send_with_fds(&[bytes.as_slice()], fds)
            .map_err(|e| ClientError::Io(io::Error::from_raw_os_error(e.errno())))?;
    }
    stream.write_all(&bytes[sent..]).map_err(ClientError::Io)?;
    stream.flush().map_err(ClientError::Io)?;
    read_response(&mut stream)
}

fn read_response(stream: &mut UnixStream) -> Result<Response, ClientError> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(response) = parse_response(&buffer)? {
            return Ok(response);
        }
        let read = stream.read(&mut chunk).map_err(ClientError::Io)?;
        if read == 0 {
            return Err(ClientError::MalformedResponse(
                "connection closed before the response was complete".to_string(),
            ));
        }
        if buffer.len() + read > MAX_RESPONSE_SIZE {
            return Err(ClientError::MalformedResponse(
                "response too large".to_string(),
            ));
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// Parses a complete response from `buffer`, or returns `None` if more bytes are needed.
fn parse_response(buffer: &[u8]) -> Result<Option<Response>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientError::MalformedResponse(e.to_string())),
    };
    let status = parsed
        .code
        .ok_or_else(|| ClientError::MalformedResponse("no status code".to_string()))?;
    // Interim 100 Continue: skip it and parse what follows.
    if status == 100 {
        return parse_response(&buffer[head_len..]);
    }
    let length = match parsed
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("Content-Length"))
    {
        Some(header) => std::str::from_utf8(header.value)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .ok_or_else(|| ClientError::MalformedResponse("bad Content-Length".to_string()))?,
        None => 0,
    };
    let body = &buffer[head_len..];
    if body.len() < length {
        return Ok(None);
    }
    Ok(Some(Response {
        status,
        body: body[..length].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::testing::{FakeHandler, socket_dir};
    use crate::api::{ApiResponse, start_http_server};

    #[test]
    fn endpoint_names_get_the_api_root() {
        assert_eq!(endpoint_path("vm.info"), "/api/v1/vm.info");
        assert_eq!(endpoint_path("/other"), "/other");
    }

    #[test]
    fn request_returns_status_and_body() {
        let dir = socket_dir("client");
        let socket = dir.join("api.sock");
        let value = serde_json::json!({"version": "0.1.0"});
        let handler = Arc::new(FakeHandler::answering(Ok(ApiResponse::Json(value.clone()))));
        let server = start_http_server(&socket, handler).unwrap();

        let response = request(&socket, "GET", "vmm.ping", None).unwrap();

        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(response.is_success());
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&response.body).unwrap(),
            value
        );
    }

    #[test]
    fn connection_failure_names_the_socket() {
        let error =
            request(Path::new("/nonexistent/api.sock"), "GET", "vmm.ping", None).unwrap_err();

        assert!(matches!(error, ClientError::Connect { .. }));
        assert!(
            error.to_string().contains("/nonexistent/api.sock"),
            "{error}"
        );
    }

    #[test]
    fn non_json_error_body_is_reported_raw() {
        let response = Response {
            status: 502,
            body: b"gateway".to_vec(),
        };

        assert_eq!(response.error_messages(), ["HTTP 502: gateway"]);
    }

    #[test]
    fn partial_response_waits_for_the_whole_body() {
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{}";
        let whole = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n{\"\"}";

        assert_eq!(parse_response(partial).unwrap(), None);
        assert_eq!(
            parse_response(whole).unwrap(),
            Some(Response {
                status: 200,
                body: b"{\"\"}".to_vec()
            })
        );
    }
}
