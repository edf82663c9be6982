//! cloud-hypervisor's JSON form of the configuration: parsing a document once its schema
//! (`schema`) finds nothing to refuse, the error that names what it found, and the shape
//! `vm.info` shows (lists nobody gave as `null`, every key we leave out at its neutral value).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, VmConfig, schema};

/// The message of [`ConfigError::Unsupported`].
pub(super) fn unsupported_message(unsupported: &[String], unknown: &[String]) -> String {
    let mut parts = Vec::new();
    if !unsupported.is_empty() {
        let keys: Vec<String> = unsupported
            .iter()
            .map(|path| match schema::why(path) {
                Some(why) => format!("{path} ({why})"),
                None => path.clone(),
            })
            .collect();
        parts.push(format!("Unsupported configuration: {}", keys.join(", ")));
    }
    if !unknown.is_empty() {
        parts.push(format!(
            "Unknown configuration keys: {}",
            unknown.join(", ")
        ));
    }
    parts.join("; ")
}

/// Parses a JSON configuration object named `what` once `schema` finds nothing in it to
/// refuse.
pub(super) fn from_checked_json<T: DeserializeOwned>(
    json: &[u8],
    what: &'static str,
    schema: &schema::Schema,
) -> Result<T, ConfigError> {
    let invalid = |e: serde_json::Error| ConfigError::Json {
        what,
        reason: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_slice(json).map_err(invalid)?;
    let findings = schema.check(&value, "");
    if !findings.is_empty() {
        return Err(ConfigError::Unsupported {
            unsupported: findings.unsupported,
            unknown: findings.unknown,
        });
    }
    serde_json::from_value(value).map_err(invalid)
}

/// cloud-hypervisor serialises absent lists as `null`.
pub(super) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// cloud-hypervisor writes an absent list as `null`, and so do we.
pub(super) fn empty_as_null<S: Serializer, T: Serialize>(
    list: &[T],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if list.is_empty() {
        serializer.serialize_none()
    } else {
        serializer.collect_seq(list)
    }
}

impl VmConfig {
    /// Parses a `VmConfig` JSON document (`vm.create`), refusing every key we cannot honour.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        from_checked_json(json, "VmConfig", &schema::VM)
    }

    /// Parses a configuration this VMM (or an older one) saved for a live update: no schema
    /// check, as a VM already running is never refused for rules made stricter since.
    pub fn from_saved_json(json: &[u8]) -> Result<Self, ConfigError> {
        serde_json::from_slice(json).map_err(|e| ConfigError::Json {
            what: "VmConfig",
            reason: e.to_string(),
        })
    }

    /// The configuration as `vm.info` shows it: cloud-hypervisor's shape, with every key we
    /// leave out at its neutral value.
    pub fn to_info_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        schema::VM.fill(&mut value);
        value
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::tests::valid_config;
    use crate::config::{
        ConsoleMode, DeviceConfig, KexecPolicy, NetConfig, NetKexecPolicy, PayloadConfig,
        UserDeviceConfig, VsockConfig,
    };

    #[test]
    fn json_round_trip_keeps_cloud_hypervisor_shape() {
        let config = valid_config();

        let json = serde_json::to_value(&config).unwrap();
        let back = VmConfig::from_json(json.to_string().as_bytes()).unwrap();

        assert_eq!(back, config);
        assert_eq!(json["cpus"]["boot_vcpus"], 1);
        assert_eq!(json["cpus"]["max_vcpus"], 1);
        assert_eq!(json["memory"]["size"], 512u64 << 20);
        assert_eq!(json["memory"]["shared"], false);
        assert_eq!(json["memory"]["hugepages"], false);
        assert_eq!(json["disks"][0]["id"], "disk0");
        assert_eq!(json["disks"][0]["readonly"], false);
        assert_eq!(json["serial"]["mode"], "Null");
        assert_eq!(json["rng"]["src"], "/dev/urandom");
    }

    #[test]
    fn minimal_json_takes_cloud_hypervisor_defaults() {
        let config = VmConfig::from_json(br#"{"payload": {"kernel": "/vmlinux"}}"#).unwrap();

        assert_eq!(
            config,
            VmConfig {
                payload: PayloadConfig {
                    kernel: Some(PathBuf::from("/vmlinux")),
                    ..PayloadConfig::default()
                },
                ..VmConfig::default()
            }
        );
    }

    #[test]
    fn json_from_cloud_hypervisor_with_extra_fields_and_nulls_parses() {
        let json = br#"{
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "kvm_hyperv": false, "max_phys_bits": 46},
            "memory": {"size": 1073741824, "mergeable": false, "shared": true, "thp": true},
            "payload": {"kernel": "/vmlinux", "cmdline": "console=ttyS0"},
            "disks": null,
            "net": null,
            "serial": {"mode": "Tty", "file": null, "socket": null},
            "console": {"mode": "Off", "iommu": false},
            "iommu": false,
            "watchdog": false
        }"#;

        let config = VmConfig::from_json(json).unwrap();

        assert_eq!(config.cpus.boot_vcpus, 2);
        assert_eq!(config.memory.size, 1 << 30);
        assert!(config.disks.is_empty());
        assert_eq!(config.serial.mode, ConsoleMode::Tty);
        assert_eq!(config.console.mode, ConsoleMode::Off);
    }

    #[test]
    fn json_user_devices_as_cloud_hypervisor_writes_them_parse() {
        let json = br#"{
            "payload": {"kernel": "/vmlinux"},
            "user_devices": [{"socket": "/run/dev.sock", "id": "u0", "pci_segment": 0}]
        }"#;

        let config = VmConfig::from_json(json).unwrap();

        assert_eq!(
            config.user_devices,
            [UserDeviceConfig {
                socket: PathBuf::from("/run/dev.sock"),
                persist: false,
                id: Some("u0".to_string()),
            }]
        );
    }

    #[test]
    fn json_with_sections_we_do_not_implement_is_refused_naming_each() {
        let json = br#"{
            "payload": {"kernel": "/vmlinux"},
            "pmem": [{"file": "/pmem.img"}],
            "balloon": {"size": 0},
            "fs": [{"tag": "fs0", "socket": "/fs.sock"}],
            "numa": [{"guest_numa_id": 0}],
            "platform": {"uuid": "8d2b1c3e-0000-4000-8000-000000000000"},
            "iommu": true,
            "disks": [{"path": "/a.img", "rate_limiter_config": {"ops": {"size": 1, "refill_time": 1}}}],
            "frobnicate": true
        }"#;

        let error = VmConfig::from_json(json).unwrap_err();

        assert_eq!(
            error.to_string(),
            "Unsupported configuration: balloon, disks[0].rate_limiter_config, fs, iommu, \
             numa, platform.uuid, pmem; Unknown configuration keys: frobnicate"
        );
    }

    #[test]
    fn hugepages_in_json_are_named_with_the_other_keys() {
        let json = br#"{"payload": {"kernel": "/vmlinux"},
            "memory": {"size": 1073741824, "hugepages": true, "prefault": true}}"#;

        let error = VmConfig::from_json(json).unwrap_err();

        assert_eq!(
            error,
            ConfigError::Unsupported {
                unsupported: vec!["memory.hugepages".into(), "memory.prefault".into()],
                unknown: Vec::new(),
            }
        );
        assert_eq!(
            error.to_string(),
            "Unsupported configuration: memory.hugepages (hugetlb memory cannot be preserved \
             by a live update), memory.prefault"
        );
    }

    #[test]
    fn info_json_has_cloud_hypervisors_shape_and_is_accepted_back() {
        let mut config = valid_config();
        config.net.push(NetConfig {
            tap: Some("tap0".into()),
            kexec: NetKexecPolicy::Refuse,
            ..NetConfig::default()
        });

        let info = config.to_info_json();
        let back = VmConfig::from_json(info.to_string().as_bytes());

        assert_eq!(info["user_devices"], serde_json::Value::Null);
        assert_eq!(info["devices"], serde_json::Value::Null);
        assert_eq!(info["vsock"], serde_json::Value::Null);
        assert_eq!(info["pmem"], serde_json::Value::Null);
        assert_eq!(info["watchdog"], false);
        assert_eq!(info["disks"][0]["num_queues"], 1);
        assert_eq!(info["disks"][0]["direct"], false);
        assert_eq!(info["rng"]["iommu"], false);
        assert_eq!(info["console"]["iommu"], false);
        assert_eq!(info["net"][0]["kexec"], "refuse");
        assert_eq!(back, Ok(config));
    }

    #[test]
    fn add_bodies_refuse_what_we_do_not_implement_naming_each_key() {
        let net = NetConfig::from_json(
            br#"{"tap": "t0", "iommu": true, "pci_device_id": 7, "vhost_mode": "Server"}"#,
        );
        let vsock =
            VsockConfig::from_json(br#"{"cid": 3, "socket": "/v.sock", "pci_segment": 1, "x": 1}"#);
        let device = DeviceConfig::from_json(br#"{"path": "/sys/x", "iommu": false}"#);

        assert_eq!(
            net.unwrap_err().to_string(),
            "Unsupported configuration: iommu, pci_device_id, vhost_mode"
        );
        assert_eq!(
            vsock.unwrap_err().to_string(),
            "Unsupported configuration: pci_segment; Unknown configuration keys: x"
        );
        assert!(device.is_ok(), "{device:?}");
    }

    #[test]
    fn a_saved_config_is_read_back_without_todays_stricter_rules() {
        let saved = br#"{"payload": {"kernel": "/vmlinux"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 2}}"#;

        let checked = VmConfig::from_json(saved);
        let restored = VmConfig::from_saved_json(saved).unwrap();

        assert_eq!(
            checked.map_err(|e| e.to_string()),
            Err(
                "Unsupported configuration: cpus.max_vcpus (no CPU hot-plug: it must equal \
                 boot_vcpus)"
                    .to_string()
            )
        );
        assert_eq!(restored.cpus.max_vcpus, 2);
    }

    #[test]
    fn json_without_payload_is_refused() {
        let error = VmConfig::from_json(br#"{"cpus": {"boot_vcpus": 1}}"#).unwrap_err();

        assert!(error.to_string().contains("payload"), "{error}");
    }

    #[test]
    fn json_with_a_wrong_type_reports_the_serde_error() {
        let error =
            VmConfig::from_json(br#"{"payload": {}, "memory": {"size": "big"}}"#).unwrap_err();

        assert!(matches!(error, ConfigError::Json { .. }));
        assert!(error.to_string().contains("invalid type"), "{error}");
    }

    #[test]
    fn json_with_trailing_garbage_is_refused() {
        let error = VmConfig::from_json(br#"{"payload": {}} x"#).unwrap_err();

        assert!(matches!(error, ConfigError::Json { .. }));
    }

    #[test]
    fn json_vfio_devices_as_cloud_hypervisor_writes_them_parse() {
        let json = br#"{"payload": {"kernel": "/vmlinux"},
            "devices": [{"path": "/sys/bus/pci/devices/0000:00:03.0", "iommu": false,
                         "id": "edu", "pci_segment": 0}]}"#;

        let config = VmConfig::from_json(json).unwrap();

        assert_eq!(
            config.devices,
            [DeviceConfig {
                path: PathBuf::from("/sys/bus/pci/devices/0000:00:03.0"),
                id: Some("edu".to_string()),
                kexec: KexecPolicy::Refuse,
                removed: false,
            }]
        );
    }
}
