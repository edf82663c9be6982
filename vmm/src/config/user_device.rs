//! vfio-user devices in the configuration: `UserDeviceConfig`, and the ids by which the API
//! names them (given, or `_user_device<N>`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, VmConfig, check_exists};

/// One vfio-user device (`--user-device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeviceConfig {
    /// The server's UNIX socket.
    pub socket: PathBuf,
    /// The server keeps the device running across a reconnect (e.g. `vfio-user-testdev
    /// --persist`). A live update hands the connection over and needs no reconnect; this
    /// matters for a snapshot (allowed only then: its restore re-attaches) and when restoring
    /// a state saved by an older build, which re-attaches too.
    #[serde(default)]
    pub persist: bool,
    /// Device id (for the API); `vm.add-user-device` fills in `_user_device<N>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl UserDeviceConfig {
    /// Parses a `UserDeviceConfig` JSON document (`vm.add-user-device`), refusing every key
    /// we cannot honour.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        super::json::from_checked_json(json, "UserDeviceConfig", &super::schema::USER_DEVICE)
    }

    /// Checks that the server's socket exists (whether it serves vfio-user shows on attach).
    pub fn check_socket(&self) -> Result<(), ConfigError> {
        check_exists("vfio-user socket", &self.socket)
    }
}

impl VmConfig {
    /// The API id of vfio-user device `index`: its own, or `_user_device<index>`.
    pub fn user_device_id(&self, index: usize) -> String {
        self.user_devices
            .get(index)
            .and_then(|device| device.id.clone())
            .unwrap_or_else(|| format!("_user_device{index}"))
    }

    /// Whether a disk, a network card, a vfio-user device or a VFIO device already has the id
    /// `id`.
    pub fn has_device_id(&self, id: &str) -> bool {
        let disk =
            self.disks.iter().enumerate().any(|(index, disk)| {
                disk.id.clone().unwrap_or_else(|| format!("_disk{index}")) == id
            });
        disk || (0..self.user_devices.len()).any(|index| self.user_device_id(index) == id)
            || self.net_index(id).is_some()
            || self.vsock_id().as_deref() == Some(id)
            || self.vfio_device_index(id).is_some()
    }

    /// The id a device being added gets: `given`, unless another device has it, or else the
    /// first free `<prefix><N>` from `N = first` on.
    pub(super) fn new_device_id(
        &self,
        given: Option<String>,
        prefix: &str,
        first: usize,
    ) -> Result<String, ConfigError> {
        match given {
            Some(id) if self.has_device_id(&id) => Err(ConfigError::DuplicateDeviceId(id)),
            Some(id) => Ok(id),
            None => Ok((first..)
                .map(|n| format!("{prefix}{n}"))
                .find(|id| !self.has_device_id(id))
                .unwrap_or_default()),
        }
    }

    /// Appends a vfio-user device, giving it the first free `_user_device<N>` id when it has
    /// none, and returns its id. A taken id is refused and the configuration left as it was.
    pub fn add_user_device(&mut self, mut device: UserDeviceConfig) -> Result<String, ConfigError> {
        let id = self.new_device_id(device.id.take(), "_user_device", self.user_devices.len())?;
        device.id = Some(id.clone());
        self.user_devices.push(device);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::valid_config;

    fn user_device(socket: &str, id: Option<&str>) -> UserDeviceConfig {
        UserDeviceConfig {
            socket: PathBuf::from(socket),
            persist: false,
            id: id.map(str::to_string),
        }
    }

    #[test]
    fn added_user_device_without_id_gets_the_first_free_generated_id() {
        let mut config = valid_config();
        config.user_devices.push(user_device("/a.sock", None));
        config
            .user_devices
            .push(user_device("/b.sock", Some("_user_device2")));

        let id = config
            .add_user_device(user_device("/c.sock", None))
            .unwrap();

        assert_eq!(id, "_user_device3");
        assert_eq!(config.user_devices[2].id.as_deref(), Some("_user_device3"));
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn added_user_device_with_a_taken_id_is_refused_and_nothing_changes() {
        let mut config = valid_config();
        config
            .user_devices
            .push(user_device("/a.sock", Some("dev")));
        let before = config.clone();

        let same_kind = config.add_user_device(user_device("/b.sock", Some("dev")));
        let disk = config.add_user_device(user_device("/b.sock", Some("disk0")));

        assert_eq!(same_kind, Err(ConfigError::DuplicateDeviceId("dev".into())));
        assert_eq!(disk, Err(ConfigError::DuplicateDeviceId("disk0".into())));
        assert_eq!(config, before);
    }

    #[test]
    fn user_device_sharing_a_disk_id_is_refused() {
        let mut config = valid_config();
        config
            .user_devices
            .push(user_device("/a.sock", Some("disk0")));

        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateDeviceId("disk0".to_string()))
        );
    }
}
