//! The vsock device in the configuration: cloud-hypervisor's `VsockConfig` (`--vsock`,
//! `vm.add-vsock`), one per VM, and the id by which the API names it (given, or `_vsock0`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, VmConfig};

/// Longest UNIX socket path (`sun_path` less its NUL). The device also connects to
/// `<path>_<port>`, so a path this long leaves no room for ports: see [`VsockConfig::validate`].
const MAX_SOCKET_PATH: usize = 107;
/// Room kept for `_<port>` (up to ten digits).
const PORT_SUFFIX: usize = 11;

/// The vsock device, in cloud-hypervisor's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more: 0 to 2 are reserved).
    pub cid: u32,
    /// The UNIX socket host processes connect to (`CONNECT <port>`); guest connections to
    /// host port P go to `<socket>_P`.
    pub socket: PathBuf,
    /// A virtual IOMMU: not supported (must be false).
    #[serde(default)]
    pub iommu: bool,
    /// Device id (for the API and counters); `_vsock0` when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// PCI segment: only 0.
    #[serde(default)]
    pub pci_segment: u16,
    /// Removed from the running VM (`vm.remove-device`); it keeps its place until the next boot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

fn invalid(key: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::InvalidValue {
        flag: "vsock",
        key,
        value: value.to_string(),
        reason,
    }
}

impl VsockConfig {
    /// Parses a `VsockConfig` JSON document (`vm.add-vsock`), refusing every key we cannot
    /// honour.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        super::json::from_checked_json(json, "VsockConfig", &super::schema::VSOCK)
    }

    /// Checks what can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cid < 3 || self.cid == u32::MAX {
            return Err(invalid(
                "cid",
                self.cid,
                "expected a CID from 3 to 4294967294 (0 to 2 are reserved)",
            ));
        }
        if self.iommu {
            return Err(invalid("iommu", "on", "a virtual IOMMU is not supported"));
        }
        if self.pci_segment != 0 {
            return Err(invalid(
                "pci_segment",
                self.pci_segment,
                "only PCI segment 0 exists",
            ));
        }
        let length = self.socket.as_os_str().len();
        if length == 0 || length > MAX_SOCKET_PATH - PORT_SUFFIX {
            return Err(invalid(
                "socket",
                self.socket.display(),
                "expected a path of 1 to 96 bytes (the device adds _<port> for guest connections)",
            ));
        }
        Ok(())
    }

    /// Checks the socket can be created now: nothing at the path, a writable directory.
    pub fn check_socket(&self) -> Result<(), ConfigError> {
        if self.socket.symlink_metadata().is_ok() {
            return Err(invalid(
                "socket",
                self.socket.display(),
                "the path exists (remove it, or give another path)",
            ));
        }
        let parent = match self.socket.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let writable = parent
            .metadata()
            .map(|m| m.is_dir() && !m.permissions().readonly())
            .unwrap_or(false);
        if !writable {
            return Err(invalid(
                "socket",
                self.socket.display(),
                "its directory does not exist or is not writable",
            ));
        }
        Ok(())
    }
}

impl VmConfig {
    /// The API id of the vsock device: its own, or `_vsock0`.
    pub fn vsock_id(&self) -> Option<String> {
        let vsock = self.vsock.as_ref()?;
        Some(vsock.id.clone().unwrap_or_else(|| "_vsock0".to_string()))
    }

    /// Gives the VM its vsock device, with `_vsock0` as id when it has none; returns the id. A
    /// second device or a taken id is refused and the configuration left as it was.
    pub fn add_vsock(&mut self, mut vsock: VsockConfig) -> Result<String, ConfigError> {
        vsock.validate()?;
        if self.vsock.is_some() {
            return Err(ConfigError::VsockExists);
        }
        let id = self.new_device_id(vsock.id.take(), "_vsock", 0)?;
        vsock.id = Some(id.clone());
        self.vsock = Some(vsock);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vsock(cid: u32, socket: &str) -> VsockConfig {
        VsockConfig {
            cid,
            socket: PathBuf::from(socket),
            iommu: false,
            id: None,
            pci_segment: 0,
            removed: false,
        }
    }

    fn refused_key(config: &VsockConfig) -> &'static str {
        match config.validate() {
            Err(ConfigError::InvalidValue { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn reserved_cids_are_refused() {
        assert_eq!(refused_key(&vsock(2, "/tmp/v.sock")), "cid");
        assert_eq!(refused_key(&vsock(u32::MAX, "/tmp/v.sock")), "cid");
        assert_eq!(vsock(3, "/tmp/v.sock").validate(), Ok(()));
    }

    #[test]
    fn a_socket_path_too_long_for_its_port_suffix_is_refused() {
        let long = format!("/tmp/{}", "v".repeat(100));

        assert_eq!(refused_key(&vsock(3, &long)), "socket");
    }

    #[test]
    fn an_existing_socket_path_or_a_missing_directory_is_refused() {
        let existing = vsock(3, env!("CARGO_MANIFEST_DIR"));
        let nowhere = vsock(3, "/nonexistent-dir/v.sock");

        assert!(existing.check_socket().is_err());
        assert!(nowhere.check_socket().is_err());
    }

    #[test]
    fn a_second_vsock_device_is_refused() {
        let mut config = VmConfig::default();

        let first = config.add_vsock(vsock(3, "/tmp/a.sock"));
        let second = config.add_vsock(vsock(4, "/tmp/b.sock"));

        assert_eq!(first, Ok("_vsock0".to_string()));
        assert_eq!(second, Err(ConfigError::VsockExists));
    }
}
