//! cloud-hypervisor's snapshot requests: the `vm.snapshot` body (`VmSnapshotConfig`), the
//! `vm.restore` body (`RestoreConfig`) and their command-line forms (`ch-remote snapshot URL`,
//! `ch-remote restore ...`, `--restore source_url=file:///dir`).
//!
//! Only `file://` URLs exist, as in cloud-hypervisor. Guest RAM is always read back eagerly:
//! `prefault` is accepted (the memory is populated anyway), `memory_restore_mode` takes `Copy`
//! and `OnDemand` alike. Replacement fds for the restored VM go through `--restore net_fds=`;
//! the API refuses them (`net_fds`, `vfio_fds`, `iommufd_fd`), as it does NUMA `zone_updates`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::ConfigError;
use super::cli::Options;

/// The only URL scheme of a snapshot directory.
pub const FILE_URL_SCHEME: &str = "file://";

/// Why a snapshot or restore request cannot be served (400).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotRequestError {
    /// Not a `file:///<directory>` URL.
    #[error("Invalid {field} {url:?}: expected file:///<directory>")]
    BadUrl {
        /// `destination_url` or `source_url`.
        field: &'static str,
        /// The URL.
        url: String,
    },
    /// An option this VMM does not take.
    #[error("{0} is not supported by this VMM")]
    NotSupported(&'static str),
    /// A value out of range.
    #[error("Invalid restore request: {0}")]
    Invalid(&'static str),
}

/// The body of `vm.snapshot` (cloud-hypervisor's `VmSnapshotConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    /// `file:///<directory>`: an existing directory without a snapshot.
    pub destination_url: String,
}

impl VmSnapshotConfig {
    /// The directory to write into.
    pub fn directory(&self) -> Result<PathBuf, SnapshotRequestError> {
        directory("destination_url", &self.destination_url)
    }
}

/// The body of `vm.restore` (cloud-hypervisor's `RestoreConfig`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRestoreConfig {
    /// `file:///<directory>` holding a snapshot.
    pub source_url: String,
    /// Accepted: guest RAM is read back whole before the VM runs.
    #[serde(default)]
    pub prefault: bool,
    /// `Copy` (the default) or `OnDemand`; both read guest RAM back eagerly here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<String>,
    /// Run the VM once restored (default: it stays paused, as in cloud-hypervisor).
    #[serde(default)]
    pub resume: bool,
    /// NUMA zone moves (refused: no NUMA zones here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_updates: Option<Vec<serde_json::Value>>,
    /// Replacement tap fds (refused here: `--restore ...,net_fds=` takes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_fds: Option<Vec<serde_json::Value>>,
    /// Replacement VFIO fds (refused: a VM with VFIO devices cannot be snapshotted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    /// A replacement iommufd (refused, as `vfio_fds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd_fd: Option<serde_json::Value>,
}

/// A restore from a snapshot directory, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRestore {
    /// The snapshot directory.
    pub directory: PathBuf,
    /// Run the VM once restored.
    pub resume: bool,
    /// New tap fds for cards with `kexec=fds`, by card id (command line only).
    pub net_fds: Vec<(String, Vec<i32>)>,
}

impl VmRestoreConfig {
    /// The restore this request asks for, once it is one this VMM serves.
    pub fn check(&self) -> Result<SnapshotRestore, SnapshotRequestError> {
        let directory = directory("source_url", &self.source_url)?;
        check_memory_restore_mode(self.memory_restore_mode.as_deref())?;
        if self.zone_updates.as_ref().is_some_and(|z| !z.is_empty()) {
            return Err(SnapshotRequestError::NotSupported(
                "zone_updates (NUMA zones)",
            ));
        }
        if self.net_fds.as_ref().is_some_and(|n| !n.is_empty()) {
            return Err(SnapshotRequestError::NotSupported(
                "net_fds in vm.restore (pass them with --restore source_url=...,net_fds=[...])",
            ));
        }
        if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) || self.iommufd_fd.is_some() {
            return Err(SnapshotRequestError::NotSupported(
                "vfio_fds and iommufd_fd (a VM with VFIO devices cannot be snapshotted)",
            ));
        }
        Ok(SnapshotRestore {
            directory,
            resume: self.resume,
            net_fds: Vec::new(),
        })
    }
}

fn check_memory_restore_mode(mode: Option<&str>) -> Result<(), SnapshotRequestError> {
    match mode.map(str::to_ascii_lowercase).as_deref() {
        None | Some("copy" | "ondemand") => Ok(()),
        Some(_) => Err(SnapshotRequestError::Invalid(
            "memory_restore_mode must be Copy or OnDemand",
        )),
    }
}

/// The directory of a `file:///<directory>` URL (`file:` and `file:/dir` are taken too).
pub fn directory(field: &'static str, url: &str) -> Result<PathBuf, SnapshotRequestError> {
    let path = url
        .strip_prefix(FILE_URL_SCHEME)
        .or_else(|| url.strip_prefix("file:"))
        .filter(|path| path.starts_with('/'));
    match path {
        Some(path) => Ok(PathBuf::from(path)),
        None => Err(SnapshotRequestError::BadUrl {
            field,
            url: url.to_string(),
        }),
    }
}

/// The keys of a restore string (`--restore`, `ch-remote restore`) for a snapshot.
const RESTORE_KEYS: &[&str] = &["source_url", "prefault", "memory_restore_mode", "resume"];

/// Parses ch-remote's `restore source_url=file:///dir[,prefault=on|off]
/// [,memory_restore_mode=copy|ondemand][,resume=true|false]` into the `vm.restore` body.
pub fn parse_vm_restore(input: &str) -> Result<VmRestoreConfig, ConfigError> {
    let options = Options::parse("restore", input, RESTORE_KEYS)?;
    let source_url = options.required("source_url")?;
    directory("source_url", source_url)
        .map_err(|_| options.invalid("source_url", source_url, "expected file:///<directory>"))?;
    let mode = options.get("memory_restore_mode");
    check_memory_restore_mode(mode).map_err(|_| {
        options.invalid(
            "memory_restore_mode",
            mode.unwrap_or(""),
            "expected copy or ondemand",
        )
    })?;
    Ok(VmRestoreConfig {
        source_url: source_url.to_string(),
        prefault: options.bool("prefault")?.unwrap_or(false),
        memory_restore_mode: mode.map(str::to_string),
        resume: options.bool("resume")?.unwrap_or(false),
        ..VmRestoreConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_url_names_the_directory() {
        assert_eq!(
            directory("source_url", "file:///var/snap"),
            Ok(PathBuf::from("/var/snap"))
        );
        assert_eq!(
            directory("source_url", "file:/var/snap"),
            Ok(PathBuf::from("/var/snap"))
        );
    }

    #[test]
    fn other_urls_are_refused_by_field() {
        for url in ["luo://s", "/var/snap", "file://relative", "tcp:host:1", ""] {
            let error = VmSnapshotConfig {
                destination_url: url.into(),
            }
            .directory()
            .unwrap_err();

            assert!(
                matches!(
                    error,
                    SnapshotRequestError::BadUrl {
                        field: "destination_url",
                        ..
                    }
                ),
                "{url}: {error:?}"
            );
        }
    }

    #[test]
    fn a_restore_body_stays_paused_unless_resume_is_set() {
        let body: VmRestoreConfig =
            serde_json::from_str(r#"{"source_url":"file:///s","prefault":true}"#).unwrap();

        let restore = body.check().unwrap();

        assert_eq!(restore.directory, PathBuf::from("/s"));
        assert!(!restore.resume);
    }

    #[test]
    fn restore_options_this_vmm_cannot_honour_are_refused() {
        let refused = [
            r#"{"source_url":"file:///s","net_fds":[{"id":"n","num_fds":1}]}"#,
            r#"{"source_url":"file:///s","vfio_fds":[{"id":"v"}]}"#,
            r#"{"source_url":"file:///s","zone_updates":[{"id":"z","host_numa_node":1}]}"#,
            r#"{"source_url":"file:///s","memory_restore_mode":"Lazy"}"#,
        ];

        for body in refused {
            let config: VmRestoreConfig = serde_json::from_str(body).unwrap();
            assert!(config.check().is_err(), "{body}");
        }
    }

    #[test]
    fn ch_remote_restore_string_becomes_the_restore_body() {
        let body = parse_vm_restore(
            "source_url=file:///snap,prefault=on,resume=true,memory_restore_mode=ondemand",
        )
        .unwrap();

        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({
                "source_url": "file:///snap",
                "prefault": true,
                "memory_restore_mode": "ondemand",
                "resume": true
            })
        );
    }

    #[test]
    fn ch_remote_restore_without_a_file_url_is_refused() {
        let error = parse_vm_restore("source_url=luo://s").unwrap_err();

        assert!(
            matches!(
                error,
                ConfigError::InvalidValue {
                    key: "source_url",
                    ..
                }
            ),
            "{error:?}"
        );
    }
}
