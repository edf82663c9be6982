//! The REST API: cloud-hypervisor's endpoints under `/api/v1/`, served over HTTP/1.1 on a UNIX
//! socket (`http`), plus a tiny client (`client`) used by `ch-remote` and the tests.
//!
//! The server parses each request into an [`ApiRequest`] and hands it to an [`ApiHandler`] (the
//! VMM control loop); the handler's [`ApiResponse`] or [`ApiError`] becomes the HTTP response.
//! Routes live in one table, [`ROUTES`]: an endpoint is one row plus one `ApiRequest` variant.

pub mod client;
mod http;
mod socket;
#[cfg(test)]
mod testing;

use std::error::Error as StdError;
use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use crate::config::{
    ConfigError, DeviceConfig, NetConfig, ReceiveMigrationData, SendMigrationData, SnapshotRestore,
    UserDeviceConfig, VmConfig, VmRestoreConfig, VmSnapshotConfig, VsockConfig,
};
use crate::state_format::StateFormat;

pub use http::{
    ApiServerError, HttpServer, MAX_BODY_SIZE, READ_TIMEOUT, start_http_server,
    start_http_server_on,
};

/// Path prefix of every endpoint.
pub const API_ROOT: &str = "/api/v1/";

/// A parsed API request, handed to the [`ApiHandler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET vmm.ping`.
    VmmPing,
    /// `PUT vmm.shutdown`.
    VmmShutdown,
    /// `PUT vm.create` with a `VmConfig` body.
    VmCreate(Box<VmConfig>),
    /// `PUT vm.boot`.
    VmBoot,
    /// `GET vm.info`.
    VmInfo,
    /// `PUT vm.pause`.
    VmPause,
    /// `PUT vm.resume`.
    VmResume,
    /// `PUT vm.shutdown`.
    VmShutdown,
    /// `PUT vm.reboot`.
    VmReboot,
    /// `PUT vm.delete`.
    VmDelete,
    /// `GET vm.counters`.
    VmCounters,
    /// `PUT vm.live-update` with a `LiveUpdateConfig` body.
    VmLiveUpdate(LiveUpdateConfig),
    /// `PUT vm.add-user-device` with a `UserDeviceConfig` body.
    VmAddUserDevice(UserDeviceConfig),
    /// `PUT vm.add-device` with a `DeviceConfig` body (a kernel VFIO device).
    VmAddDevice(DeviceConfig),
    /// `PUT vm.remove-device` with a `{"id"}` body: the device's id.
    VmRemoveDevice(String),
    /// `PUT vm.add-net` with a `NetConfig` body and the tap fds that came with it.
    VmAddNet(Box<NetConfig>, PassedFds),
    /// `PUT vm.add-vsock` with a `VsockConfig` body.
    VmAddVsock(VsockConfig),
    /// `PUT vm.send-migration` with a `SendMigrationData` body.
    VmSendMigration(SendMigrationData),
    /// `PUT vm.receive-migration` with a `ReceiveMigrationData` body.
    VmReceiveMigration(ReceiveMigrationData),
    /// `PUT vm.snapshot` with a `VmSnapshotConfig` body (its URL checked).
    VmSnapshot(VmSnapshotConfig),
    /// `PUT vm.restore` with a `RestoreConfig` body, checked.
    VmRestore(SnapshotRestore),
}

/// File descriptors that came with a request as `SCM_RIGHTS` (cloud-hypervisor's clients send
/// tap fds that way). Shared so the request stays `Clone`; the endpoint takes them once.
#[derive(Clone, Default)]
pub struct PassedFds(Arc<Mutex<Vec<OwnedFd>>>);

impl PassedFds {
    /// Wraps `fds`.
    pub fn new(fds: Vec<OwnedFd>) -> Self {
        Self(Arc::new(Mutex::new(fds)))
    }

    /// Takes the fds (later calls get none).
    pub fn take(&self) -> Vec<OwnedFd> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many are left.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether none are left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for PassedFds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PassedFds({})", self.len())
    }
}

/// Two requests are alike whatever fds they carry: fds have no value to compare.
impl PartialEq for PassedFds {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len()
    }
}

impl Eq for PassedFds {}

/// Where a hot-added PCI device went: the reply of `vm.add-*` on a running VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciDeviceInfo {
    /// The device id.
    pub id: String,
    /// Segment, bus, device and function, as `0000:00:05.0`.
    pub bdf: String,
}

impl PciDeviceInfo {
    /// The device `id` in `slot` of bus 0 of segment 0 (function 0: we have no other).
    pub fn new(id: String, slot: u8) -> Self {
        Self {
            id,
            bdf: crate::device_manager::pci_bdf(slot),
        }
    }
}

/// The body of `vm.live-update`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveUpdateConfig {
    /// Name of the live-update session the VM goes into (1 to 63 bytes); the successor restores
    /// it with `--restore source_url=luo://<session>`.
    pub session: String,
    /// The release whose state format to write (e.g. `"0.1.0"`), so that release's VMM can
    /// restore the VM; default: this build's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_format: Option<String>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204 No Content.
    Empty,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// A failed request: an HTTP status and the error chain (top error first), sent as a JSON array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (4xx or 5xx).
    pub status: u16,
    /// The error chain, from the top error down to the root cause.
    pub messages: Vec<String>,
}

impl ApiError {
    /// An error with one message.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            messages: vec![message.into()],
        }
    }

    /// An error whose messages are `error`'s source chain.
    pub fn from_error(status: u16, error: &dyn StdError) -> Self {
        let mut messages = vec![error.to_string()];
        let mut source = error.source();
        while let Some(cause) = source {
            messages.push(cause.to_string());
            source = cause.source();
        }
        Self { status, messages }
    }

    /// 400: the request is invalid (bad body, bad config, wrong state for a body-less action).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: no such route, VM not created, unknown device.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 405: the route exists but not with this method.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, message)
    }

    /// 501: one of cloud-hypervisor's endpoints this VMM does not implement.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(501, message)
    }

    /// 409: a conflict (VM already created, duplicate id).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 413: the request body is over [`MAX_BODY_SIZE`].
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(413, message)
    }

    /// 500: an internal failure, with its whole chain.
    pub fn internal(error: &dyn StdError) -> Self {
        Self::from_error(500, error)
    }
}

/// An invalid VM configuration is the client's fault: 400.
impl From<ConfigError> for ApiError {
    fn from(error: ConfigError) -> Self {
        Self::from_error(400, &error)
    }
}

/// Serves parsed API requests; implemented by the VMM control loop (and fakes in tests).
pub trait ApiHandler: Send + Sync {
    /// Executes one request; called from the server's connection threads.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Read-only queries.
    Get,
    /// Actions.
    Put,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
        }
    }
}

/// How a route turns its request body into an [`ApiRequest`].
#[derive(Debug, Clone, Copy)]
pub enum RouteBody {
    /// No body allowed (a body gives 400).
    None(fn() -> ApiRequest),
    /// A required JSON body, parsed by the function (its error gives 400).
    Json(fn(&[u8]) -> Result<ApiRequest, String>),
    /// A required JSON body and any fds sent with it (`SCM_RIGHTS`).
    JsonWithFds(fn(&[u8], PassedFds) -> Result<ApiRequest, String>),
}

/// One endpoint: `method /api/v1/name`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// Endpoint name after [`API_ROOT`], e.g. `vm.boot`.
    pub name: &'static str,
    /// The only method accepted.
    pub method: Method,
    /// The request body and how it becomes an `ApiRequest`.
    pub body: RouteBody,
}

const fn empty(name: &'static str, method: Method, request: fn() -> ApiRequest) -> Route {
    Route {
        name,
        method,
        body: RouteBody::None(request),
    }
}

const fn json(
    name: &'static str,
    method: Method,
    request: fn(&[u8]) -> Result<ApiRequest, String>,
) -> Route {
    Route {
        name,
        method,
        body: RouteBody::Json(request),
    }
}

fn vm_create(body: &[u8]) -> Result<ApiRequest, String> {
    VmConfig::from_json(body)
        .map(|config| ApiRequest::VmCreate(Box::new(config)))
        .map_err(|e| e.to_string())
}

fn vm_live_update(body: &[u8]) -> Result<ApiRequest, String> {
    let config: LiveUpdateConfig =
        serde_json::from_slice(body).map_err(|e| format!("Invalid LiveUpdateConfig JSON: {e}"))?;
    liveupdate::session::check_name(&config.session).map_err(|e| e.to_string())?;
    StateFormat::requested(config.state_format.as_deref()).map_err(|e| e.to_string())?;
    Ok(ApiRequest::VmLiveUpdate(config))
}

fn vm_add_user_device(body: &[u8]) -> Result<ApiRequest, String> {
    let device = UserDeviceConfig::from_json(body).map_err(|e| e.to_string())?;
    if device.socket.as_os_str().is_empty() {
        return Err("Invalid UserDeviceConfig: the socket path is empty".into());
    }
    if device.id.as_deref() == Some("") {
        return Err("Invalid UserDeviceConfig: the id is empty".into());
    }
    Ok(ApiRequest::VmAddUserDevice(device))
}

fn vm_add_device(body: &[u8]) -> Result<ApiRequest, String> {
    let device = DeviceConfig::from_json(body).map_err(|e| e.to_string())?;
    if device.path.as_os_str().is_empty() {
        return Err("Invalid DeviceConfig: the path is empty".into());
    }
    if device.id.as_deref() == Some("") {
        return Err("Invalid DeviceConfig: the id is empty".into());
    }
    Ok(ApiRequest::VmAddDevice(device))
}

fn vm_add_net(body: &[u8], fds: PassedFds) -> Result<ApiRequest, String> {
    let mut net = NetConfig::from_json(body).map_err(|e| e.to_string())?;
    if net.id.as_deref() == Some("") {
        return Err("Invalid NetConfig: the id is empty".into());
    }
    // As cloud-hypervisor: fd numbers in the JSON mean nothing here; only passed fds count.
    net.fds = (!fds.is_empty()).then(|| vec![-1; fds.len()]);
    if net.fds.is_some() && net.num_queues == crate::config::DEFAULT_NET_QUEUES {
        net.num_queues = 2 * fds.len();
    }
    net.validate()
        .map_err(|e| format!("Invalid NetConfig: {e}"))?;
    Ok(ApiRequest::VmAddNet(Box::new(net), fds))
}

fn vm_add_vsock(body: &[u8]) -> Result<ApiRequest, String> {
    let vsock = VsockConfig::from_json(body).map_err(|e| e.to_string())?;
    if vsock.id.as_deref() == Some("") {
        return Err("Invalid VsockConfig: the id is empty".into());
    }
    vsock
        .validate()
        .map_err(|e| format!("Invalid VsockConfig: {e}"))?;
    Ok(ApiRequest::VmAddVsock(vsock))
}

fn vm_send_migration(body: &[u8]) -> Result<ApiRequest, String> {
    serde_json::from_slice(body)
        .map(ApiRequest::VmSendMigration)
        .map_err(|e| format!("Invalid SendMigrationData JSON: {e}"))
}

fn vm_receive_migration(body: &[u8]) -> Result<ApiRequest, String> {
    serde_json::from_slice(body)
        .map(ApiRequest::VmReceiveMigration)
        .map_err(|e| format!("Invalid ReceiveMigrationData JSON: {e}"))
}

fn vm_snapshot(body: &[u8]) -> Result<ApiRequest, String> {
    let config: VmSnapshotConfig =
        serde_json::from_slice(body).map_err(|e| format!("Invalid VmSnapshotConfig JSON: {e}"))?;
    config.directory().map_err(|e| e.to_string())?;
    Ok(ApiRequest::VmSnapshot(config))
}

fn vm_restore(body: &[u8]) -> Result<ApiRequest, String> {
    let config: VmRestoreConfig =
        serde_json::from_slice(body).map_err(|e| format!("Invalid RestoreConfig JSON: {e}"))?;
    config
        .check()
        .map(ApiRequest::VmRestore)
        .map_err(|e| e.to_string())
}

fn vm_remove_device(body: &[u8]) -> Result<ApiRequest, String> {
    #[derive(serde::Deserialize)]
    struct VmRemoveDeviceData {
        id: String,
    }
    let data: VmRemoveDeviceData = serde_json::from_slice(body)
        .map_err(|e| format!("Invalid VmRemoveDeviceData JSON: {e}"))?;
    if data.id.is_empty() {
        return Err("Invalid VmRemoveDeviceData: the id is empty".into());
    }
    Ok(ApiRequest::VmRemoveDevice(data.id))
}

/// Every endpoint the server serves (and `docs/openapi.yaml` documents).
pub const ROUTES: &[Route] = &[
    empty("vmm.ping", Method::Get, || ApiRequest::VmmPing),
    empty("vmm.shutdown", Method::Put, || ApiRequest::VmmShutdown),
    json("vm.create", Method::Put, vm_create),
    empty("vm.boot", Method::Put, || ApiRequest::VmBoot),
    empty("vm.info", Method::Get, || ApiRequest::VmInfo),
    empty("vm.pause", Method::Put, || ApiRequest::VmPause),
    empty("vm.resume", Method::Put, || ApiRequest::VmResume),
    empty("vm.shutdown", Method::Put, || ApiRequest::VmShutdown),
    empty("vm.reboot", Method::Put, || ApiRequest::VmReboot),
    empty("vm.delete", Method::Put, || ApiRequest::VmDelete),
    empty("vm.counters", Method::Get, || ApiRequest::VmCounters),
    json("vm.live-update", Method::Put, vm_live_update),
    json("vm.add-user-device", Method::Put, vm_add_user_device),
    json("vm.add-device", Method::Put, vm_add_device),
    json("vm.remove-device", Method::Put, vm_remove_device),
    json("vm.add-vsock", Method::Put, vm_add_vsock),
    json("vm.send-migration", Method::Put, vm_send_migration),
    json("vm.receive-migration", Method::Put, vm_receive_migration),
    json("vm.snapshot", Method::Put, vm_snapshot),
    json("vm.restore", Method::Put, vm_restore),
    Route {
        name: "vm.add-net",
        method: Method::Put,
        body: RouteBody::JsonWithFds(vm_add_net),
    },
];

/// cloud-hypervisor's endpoints this VMM does not implement: they answer 501 "not supported by
/// this VMM" (with any method), so a client can tell them from a VM that does not exist (404).
pub const NOT_SUPPORTED: &[&str] = &[
    "vm.power-button",
    "vm.nmi",
    "vm.resize",
    "vm.resize-disk",
    "vm.resize-zone",
    "vm.add-disk",
    "vm.add-fs",
    "vm.add-pmem",
    "vm.add-vdpa",
    "vm.add-generic-vhost-user",
    "vm.coredump",
];

/// Maps a method, a path and a body to a request, with cloud-hypervisor's error statuses.
pub fn route_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    route_request_with_fds(method, path, body, Vec::new())
}

/// As [`route_request`], with the fds that came with the request: only endpoints that take
/// fds get them; elsewhere, and on a refused request, they are closed.
pub fn route_request_with_fds(
    method: &str,
    path: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<ApiRequest, ApiError> {
    let path = path.split_once('?').map_or(path, |(path, _query)| path);
    if let Some(name) = path
        .strip_prefix(API_ROOT)
        .filter(|name| NOT_SUPPORTED.contains(name))
    {
        return Err(ApiError::not_implemented(format!(
            "{name} is not supported by this VMM"
        )));
    }
    let route = path
        .strip_prefix(API_ROOT)
        .and_then(|name| ROUTES.iter().find(|route| route.name == name))
        .ok_or_else(|| ApiError::not_found(format!("Unknown endpoint {path}")))?;
    if method != route.method.as_str() {
        return Err(ApiError::method_not_allowed(format!(
            "Method {method} not allowed on {path}; use {}",
            route.method.as_str()
        )));
    }
    if !fds.is_empty() && !matches!(route.body, RouteBody::JsonWithFds(_)) {
        // As documented: other endpoints do not use fds (they are closed here).
        log::debug!("{} fds sent with {path} closed unused", fds.len());
    }
    match route.body {
        RouteBody::None(request) if body.is_empty() => Ok(request()),
        RouteBody::None(_) => Err(ApiError::bad_request(format!(
            "{path} takes no request body"
        ))),
        RouteBody::Json(_) if body.is_empty() => Err(ApiError::bad_request(format!(
            "{path} needs a request body"
        ))),
        RouteBody::Json(parse) => parse(body).map_err(ApiError::bad_request),
        RouteBody::JsonWithFds(_) if body.is_empty() => Err(ApiError::bad_request(format!(
            "{path} needs a request body"
        ))),
        RouteBody::JsonWithFds(parse) => {
            parse(body, PassedFds::new(fds)).map_err(ApiError::bad_request)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_route_parses_to_its_request() {
        let cases = [
            ("GET", "vmm.ping", ApiRequest::VmmPing),
            ("PUT", "vmm.shutdown", ApiRequest::VmmShutdown),
            ("PUT", "vm.boot", ApiRequest::VmBoot),
            ("GET", "vm.info", ApiRequest::VmInfo),
            ("PUT", "vm.pause", ApiRequest::VmPause),
            ("PUT", "vm.resume", ApiRequest::VmResume),
            ("PUT", "vm.shutdown", ApiRequest::VmShutdown),
            ("PUT", "vm.reboot", ApiRequest::VmReboot),
            ("PUT", "vm.delete", ApiRequest::VmDelete),
            ("GET", "vm.counters", ApiRequest::VmCounters),
        ];

        let parsed: Vec<_> = cases
            .iter()
            .map(|(method, name, _)| route_request(method, &format!("/api/v1/{name}"), b""))
            .collect();

        let expected: Vec<_> = cases.into_iter().map(|(_, _, r)| Ok(r)).collect();
        assert_eq!(parsed, expected);
    }

    #[test]
    fn vm_create_parses_its_body() {
        let request = route_request(
            "PUT",
            "/api/v1/vm.create",
            br#"{"payload": {"kernel": "/vmlinux"}}"#,
        )
        .unwrap();

        let ApiRequest::VmCreate(config) = request else {
            panic!("expected VmCreate, got {request:?}");
        };
        assert_eq!(
            config.payload.kernel,
            Some(std::path::PathBuf::from("/vmlinux"))
        );
    }

    #[test]
    fn vm_add_user_device_parses_its_body_ignoring_cloud_hypervisor_extras() {
        let body = br#"{"socket": "/run/dev.sock", "id": "dev0", "pci_segment": 0}"#;

        let request = route_request("PUT", "/api/v1/vm.add-user-device", body);

        assert_eq!(
            request,
            Ok(ApiRequest::VmAddUserDevice(UserDeviceConfig {
                socket: std::path::PathBuf::from("/run/dev.sock"),
                persist: false,
                id: Some("dev0".to_string()),
            }))
        );
    }

    #[test]
    fn vm_add_user_device_without_socket_or_with_empty_values_is_a_bad_request() {
        let bodies: [&[u8]; 4] = [
            br#"{"id": "dev0"}"#,
            br#"{"socket": ""}"#,
            br#"{"socket": "/s", "id": ""}"#,
            b"[1, 2]",
        ];

        let statuses: Vec<u16> = bodies
            .iter()
            .map(|body| {
                route_request("PUT", "/api/v1/vm.add-user-device", body)
                    .unwrap_err()
                    .status
            })
            .collect();

        assert_eq!(statuses, [400, 400, 400, 400]);
    }

    #[test]
    fn vm_add_device_parses_its_body_ignoring_cloud_hypervisor_extras() {
        let body = br#"{"path": "/sys/bus/pci/devices/0000:00:03.0", "id": "edu",
            "iommu": false, "pci_segment": 0}"#;

        let request = route_request("PUT", "/api/v1/vm.add-device", body);

        assert_eq!(
            request,
            Ok(ApiRequest::VmAddDevice(DeviceConfig {
                path: std::path::PathBuf::from("/sys/bus/pci/devices/0000:00:03.0"),
                id: Some("edu".to_string()),
                kexec: crate::config::KexecPolicy::Refuse,
                removed: false,
            }))
        );
    }

    #[test]
    fn vm_remove_device_takes_the_id_and_refuses_an_empty_one() {
        let request = route_request("PUT", "/api/v1/vm.remove-device", br#"{"id": "edu"}"#);
        let empty = route_request("PUT", "/api/v1/vm.remove-device", br#"{"id": ""}"#);
        let missing = route_request("PUT", "/api/v1/vm.remove-device", b"{}");

        assert_eq!(request, Ok(ApiRequest::VmRemoveDevice("edu".into())));
        assert!(
            empty.is_err_and(|e| e.status == 400 && e.messages.join(" ").contains("id is empty"))
        );
        assert!(
            missing
                .is_err_and(|e| e.status == 400 && e.messages.join(" ").contains("missing field"))
        );
    }

    #[test]
    fn vm_add_device_without_id_leaves_it_to_the_vmm() {
        let body = br#"{"path": "/sys/bus/pci/devices/0000:00:03.0"}"#;

        let request = route_request("PUT", "/api/v1/vm.add-device", body);

        assert!(
            matches!(
                request,
                Ok(ApiRequest::VmAddDevice(DeviceConfig { id: None, .. }))
            ),
            "{request:?}"
        );
    }

    #[test]
    fn vm_add_device_without_path_or_with_empty_values_or_no_body_is_a_bad_request() {
        let bodies: [&[u8]; 6] = [
            br#"{"id": "dev0"}"#,
            br#"{"path": ""}"#,
            br#"{"path": "/sys/x", "id": ""}"#,
            br#"{"path": 7}"#,
            b"{path",
            b"",
        ];

        let errors: Vec<ApiError> = bodies
            .iter()
            .map(|body| route_request("PUT", "/api/v1/vm.add-device", body).unwrap_err())
            .collect();

        let statuses: Vec<u16> = errors.iter().map(|e| e.status).collect();
        assert_eq!(statuses, [400; 6]);
        assert!(
            errors[0].messages[0].contains("Invalid DeviceConfig JSON"),
            "{:?}",
            errors[0]
        );
        assert!(
            errors[1].messages[0].contains("path is empty"),
            "{:?}",
            errors[1]
        );
    }

    #[test]
    fn vm_add_device_with_get_is_method_not_allowed() {
        let error = route_request("GET", "/api/v1/vm.add-device", b"").unwrap_err();

        assert_eq!(error.status, 405);
    }

    #[test]
    fn pci_device_info_names_slot_in_hex_on_bus_zero() {
        let info = PciDeviceInfo::new("dev0".to_string(), 0x1a);

        let json = serde_json::to_value(&info).unwrap();

        assert_eq!(
            json,
            serde_json::json!({"id": "dev0", "bdf": "0000:00:1a.0"})
        );
    }

    #[test]
    fn vm_create_with_bad_json_is_a_bad_request_naming_the_error() {
        let error = route_request("PUT", "/api/v1/vm.create", b"{not json").unwrap_err();

        assert_eq!(error.status, 400);
        assert!(
            error.messages[0].contains("Invalid VmConfig JSON"),
            "{error:?}"
        );
    }

    #[test]
    fn vm_create_without_body_is_a_bad_request() {
        let error = route_request("PUT", "/api/v1/vm.create", b"").unwrap_err();

        assert_eq!(error.status, 400);
    }

    #[test]
    fn body_on_a_bodyless_action_is_a_bad_request() {
        let error = route_request("PUT", "/api/v1/vm.boot", b"{}").unwrap_err();

        assert_eq!(
            error,
            ApiError::bad_request("/api/v1/vm.boot takes no request body")
        );
    }

    #[test]
    fn unknown_path_is_not_found() {
        let unknown = route_request("GET", "/api/v1/vm.frobnicate", b"").unwrap_err();
        let outside = route_request("GET", "/vm.info", b"").unwrap_err();

        assert_eq!(unknown.status, 404);
        assert_eq!(outside.status, 404);
    }

    #[test]
    fn wrong_method_is_method_not_allowed() {
        let error = route_request("GET", "/api/v1/vm.boot", b"").unwrap_err();

        assert_eq!(error.status, 405);
    }

    #[test]
    fn query_string_is_ignored() {
        let request = route_request("GET", "/api/v1/vm.info?verbose=1", b"");

        assert_eq!(request, Ok(ApiRequest::VmInfo));
    }

    #[test]
    fn error_chain_becomes_messages_top_first() {
        let root = std::io::Error::other("disk gone");
        let top = crate::api::client::ClientError::Io(root);

        let error = ApiError::internal(&top);

        assert_eq!(error.status, 500);
        assert_eq!(error.messages, ["API socket I/O failed", "disk gone"]);
    }

    #[test]
    fn config_error_is_a_bad_request() {
        let error = ApiError::from(ConfigError::HugepagesNotSupported);

        assert_eq!(error.status, 400);
        assert_eq!(
            error.messages,
            ["Live update needs shmem-backed RAM; hugepages=on is not supported"]
        );
    }

    /// The routes `docs/openapi.yaml` documents, as "METHOD name".
    fn documented_routes() -> BTreeSet<String> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let document: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let paths = document["paths"].as_mapping().unwrap();
        let mut routes = BTreeSet::new();
        for (path, operations) in paths {
            let name = path.as_str().unwrap().strip_prefix('/').unwrap();
            for (method, _) in operations.as_mapping().unwrap() {
                let method = method.as_str().unwrap().to_uppercase();
                routes.insert(format!("{method} {name}"));
            }
        }
        routes
    }

    #[test]
    fn openapi_documents_exactly_the_served_routes() {
        let served: BTreeSet<String> = ROUTES
            .iter()
            .map(|route| format!("{} {}", route.method.as_str(), route.name))
            .collect();

        assert_eq!(documented_routes(), served);
    }

    #[test]
    fn snapshot_and_restore_take_file_urls() {
        let snapshot = route_request(
            "PUT",
            "/api/v1/vm.snapshot",
            br#"{"destination_url":"file:///var/snap"}"#,
        );
        let restore = route_request(
            "PUT",
            "/api/v1/vm.restore",
            br#"{"source_url":"file:///var/snap","prefault":true,"resume":true}"#,
        );

        assert_eq!(
            snapshot,
            Ok(ApiRequest::VmSnapshot(VmSnapshotConfig {
                destination_url: "file:///var/snap".into()
            }))
        );
        assert_eq!(
            restore,
            Ok(ApiRequest::VmRestore(SnapshotRestore {
                directory: "/var/snap".into(),
                resume: true,
                net_fds: Vec::new(),
            }))
        );
    }

    #[test]
    fn a_snapshot_url_that_is_not_a_file_url_is_a_bad_request() {
        let error = route_request(
            "PUT",
            "/api/v1/vm.snapshot",
            br#"{"destination_url":"tcp:host:1"}"#,
        )
        .unwrap_err();

        assert_eq!(error.status, 400);
        assert_eq!(
            error.messages,
            [r#"Invalid destination_url "tcp:host:1": expected file:///<directory>"#]
        );
    }

    #[test]
    fn openapi_server_url_is_the_api_root() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
        let document: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();

        let url = document["servers"][0]["url"].as_str().unwrap();

        let path = url.strip_prefix("http://localhost").unwrap();
        assert_eq!(format!("{path}/"), API_ROOT);
    }

    #[test]
    fn endpoints_we_do_not_implement_answer_501_not_404() {
        let coredump = route_request("PUT", "/api/v1/vm.coredump", b"{}").unwrap_err();
        let resize = route_request("GET", "/api/v1/vm.resize", b"").unwrap_err();
        let unknown = route_request("PUT", "/api/v1/vm.frobnicate", b"").unwrap_err();

        assert_eq!(coredump.status, 501);
        assert_eq!(
            coredump.messages,
            ["vm.coredump is not supported by this VMM"]
        );
        assert_eq!(resize.status, 501);
        assert_eq!(unknown.status, 404);
    }
}
