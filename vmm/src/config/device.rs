//! Kernel VFIO devices in the configuration: the ids by which the API names them (given, or
//! `_vfio_device<N>`) and adding one (`vm.add-device`).

use std::path::Path;

use super::{ConfigError, DeviceConfig, VmConfig, check_exists};

impl DeviceConfig {
    /// Parses a `DeviceConfig` JSON document (`vm.add-device`), refusing every key we cannot
    /// honour.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        super::json::from_checked_json(json, "DeviceConfig", &super::schema::DEVICE)
    }

    /// Checks that the sysfs path exists (whether it is bound to vfio-pci shows on attach).
    pub fn check_path(&self) -> Result<(), ConfigError> {
        check_exists("VFIO device", &self.path)
    }

    /// Whether both name the same host device (`/sys/bus/pci/devices/<BDF>` is a link).
    pub fn is_same_host_device(&self, other: &Self) -> bool {
        let resolve = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        self.path == other.path || resolve(&self.path) == resolve(&other.path)
    }
}

impl VmConfig {
    /// The index of the VFIO device with API id `id`, unless it was removed.
    pub fn vfio_device_index(&self, id: &str) -> Option<usize> {
        (0..self.devices.len())
            .find(|index| !self.devices[*index].removed && self.vfio_device_id(*index) == id)
    }

    /// Gives every VFIO device its API id for good, so that ids do not change when a device
    /// before it leaves the list.
    fn pin_vfio_device_ids(&mut self) {
        for index in 0..self.devices.len() {
            let id = self.vfio_device_id(index);
            self.devices[index].id = Some(id);
        }
    }

    /// Takes VFIO device `index` out of the configuration of a VM that is not running.
    pub fn remove_vfio_device(&mut self, index: usize) {
        if index < self.devices.len() {
            self.pin_vfio_device_ids();
            self.devices.remove(index);
        }
    }

    /// Drops the devices removed from the running VM: at boot, slots and vectors are handed
    /// out afresh.
    pub fn drop_removed_devices(&mut self) {
        if self.devices.iter().any(|device| device.removed) {
            self.pin_vfio_device_ids();
            self.devices.retain(|device| !device.removed);
        }
        if self.net.iter().any(|net| net.removed) {
            self.pin_net_ids();
            self.net.retain(|net| !net.removed);
        }
        if self.vsock.as_ref().is_some_and(|vsock| vsock.removed) {
            self.vsock = None;
        }
    }

    /// The API id of VFIO device `index`: its own, or `_vfio_device<index>`.
    pub fn vfio_device_id(&self, index: usize) -> String {
        self.devices
            .get(index)
            .and_then(|device| device.id.clone())
            .unwrap_or_else(|| format!("_vfio_device{index}"))
    }

    /// Appends a VFIO device, giving it the first free `_vfio_device<N>` id when it has none,
    /// and returns its id. A taken id (of any device) or a host device already assigned is
    /// refused and the configuration left as it was.
    pub fn add_vfio_device(&mut self, mut device: DeviceConfig) -> Result<String, ConfigError> {
        if self
            .devices
            .iter()
            .any(|other| !other.removed && other.is_same_host_device(&device))
        {
            return Err(ConfigError::DuplicateDevicePath(device.path));
        }
        let id = self.new_device_id(device.id.take(), "_vfio_device", self.devices.len())?;
        device.id = Some(id.clone());
        self.devices.push(device);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::UserDeviceConfig;
    use crate::config::tests::valid_config;

    fn device(path: &str, id: Option<&str>) -> DeviceConfig {
        DeviceConfig {
            path: PathBuf::from(path),
            id: id.map(str::to_string),
            kexec: crate::config::KexecPolicy::Refuse,
            removed: false,
        }
    }

    #[test]
    fn removed_device_frees_its_id_and_path_and_is_dropped_at_boot_keeping_the_other_ids() {
        let mut config = valid_config();
        config.devices.push(device("/a", None));
        config.devices.push(device("/b", None));
        config.devices[0].removed = true;

        let index_of_removed = config.vfio_device_index("_vfio_device0");
        let index_of_other = config.vfio_device_index("_vfio_device1");
        let id_free = !config.has_device_id("_vfio_device0");
        let readded = config.add_vfio_device(device("/a", Some("a")));
        config.drop_removed_devices();

        assert_eq!(index_of_removed, None);
        assert_eq!(index_of_other, Some(1));
        assert!(id_free);
        assert_eq!(readded, Ok("a".to_string()));
        let left: Vec<_> = config.devices.iter().map(|d| d.id.clone()).collect();
        assert_eq!(
            left,
            [Some("_vfio_device1".to_string()), Some("a".to_string())]
        );
    }

    #[test]
    fn removal_before_boot_keeps_the_generated_ids_of_the_devices_after_it() {
        let mut config = valid_config();
        config.devices.push(device("/a", None));
        config.devices.push(device("/b", None));

        config.remove_vfio_device(0);

        assert_eq!(config.devices.len(), 1);
        assert_eq!(config.vfio_device_index("_vfio_device1"), Some(0));
    }

    #[test]
    fn added_vfio_device_without_id_gets_the_first_free_generated_id() {
        let mut config = valid_config();
        config.devices.push(device("/a", None));
        config.devices.push(device("/b", Some("_vfio_device2")));

        let id = config.add_vfio_device(device("/c", None)).unwrap();

        assert_eq!(id, "_vfio_device3");
        assert_eq!(config.devices[2].id.as_deref(), Some("_vfio_device3"));
    }

    #[test]
    fn added_vfio_device_with_an_id_taken_by_any_device_is_refused_and_nothing_changes() {
        let mut config = valid_config();
        config.devices.push(device("/a", Some("edu")));
        config.user_devices.push(UserDeviceConfig {
            socket: PathBuf::from("/u.sock"),
            persist: false,
            id: Some("user".into()),
        });
        let before = config.clone();

        let results = ["edu", "user", "disk0", "_vfio_device0"].map(|id| {
            config
                .add_vfio_device(device("/b", Some(id)))
                .map_err(|e| e.to_string())
        });

        assert_eq!(
            results,
            [
                Err("Duplicate device id 'edu'".to_string()),
                Err("Duplicate device id 'user'".to_string()),
                Err("Duplicate device id 'disk0'".to_string()),
                Ok("_vfio_device0".to_string()),
            ]
        );
        assert_eq!(config.devices.len(), before.devices.len() + 1);
        assert_eq!(config.devices[..1], before.devices[..]);
    }

    #[test]
    fn added_vfio_device_already_assigned_is_refused_even_through_a_link() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let real = dir.as_path().join("0000:00:03.0");
        std::fs::create_dir(&real).unwrap();
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut config = valid_config();
        config
            .add_vfio_device(device(real.to_str().unwrap(), None))
            .unwrap();

        let same = config.add_vfio_device(device(real.to_str().unwrap(), Some("b")));
        let linked = config.add_vfio_device(device(link.to_str().unwrap(), Some("c")));

        assert_eq!(same, Err(ConfigError::DuplicateDevicePath(real)));
        assert_eq!(linked, Err(ConfigError::DuplicateDevicePath(link)));
        assert_eq!(config.devices.len(), 1);
    }

    #[test]
    fn config_naming_one_host_device_twice_is_refused() {
        let mut config = valid_config();
        let path = env!("CARGO_MANIFEST_DIR");
        config.devices.push(device(path, Some("a")));
        config.devices.push(device(path, Some("b")));

        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateDevicePath(PathBuf::from(path)))
        );
    }

    #[test]
    fn user_device_cannot_take_the_generated_id_of_a_vfio_device() {
        let mut config = valid_config();
        config.devices.push(device("/a", None));

        let result = config.add_user_device(UserDeviceConfig {
            socket: PathBuf::from("/u.sock"),
            persist: false,
            id: Some("_vfio_device0".into()),
        });

        assert_eq!(
            result,
            Err(ConfigError::DuplicateDeviceId("_vfio_device0".into()))
        );
    }

    #[test]
    fn missing_sysfs_path_is_refused_naming_it() {
        let error = device("/sys/bus/pci/devices/no-such", None)
            .check_path()
            .unwrap_err();

        assert!(
            error.to_string().contains("/sys/bus/pci/devices/no-such"),
            "{error}"
        );
    }
}
