//! cloud-hypervisor's local migration requests: `vm.send-migration` and `vm.receive-migration`
//! bodies (`SendMigrationData`, `ReceiveMigrationData`) and ch-remote's `key=value` forms.
//!
//! Only local migration exists here (`local=on`, or `memory_mode` "memfds"): the VM moves to a
//! VMM process on the same host through the restart-mode live update, guest RAM passed as a
//! memfd over the UNIX socket, never copied. A migration that would copy guest RAM to another
//! host (`tcp:`, or `unix:` without `local=on`) is refused as not supported (501), as are the
//! options that only make sense for it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::ConfigError;
use super::cli::Options;

/// Why a migration request cannot be served.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MigrationError {
    /// A URL that is neither `unix:<path>` nor `tcp:<host>:<port>`.
    #[error("Invalid {field} {url:?}: expected unix:<path> or tcp:<host>:<port>")]
    BadUrl {
        /// `destination_url` or `receiver_url`.
        field: &'static str,
        /// The URL.
        url: String,
    },
    /// Options that contradict each other, or a value out of range.
    #[error("Invalid migration request: {0}")]
    Invalid(&'static str),
    /// What this VMM does not do.
    #[error("{0} is not supported by this VMM")]
    NotSupported(&'static str),
}

impl MigrationError {
    /// The API status: 501 for what this VMM does not do, 400 for a bad request.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotSupported(_) => 501,
            _ => 400,
        }
    }
}

/// The body of `vm.send-migration` (cloud-hypervisor's `SendMigrationData`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationData {
    /// `unix:<path>` of the receiving VMM (`tcp:` is refused).
    pub destination_url: String,
    /// Pass guest RAM as memfds (required here).
    #[serde(default)]
    pub local: bool,
    /// Keep the source VM, paused, after success (refused: the destination runs on its RAM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preserve_source: Option<bool>,
    /// Accepted; a local migration's pause is far below any sensible value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Accepted; a local migration is not iterative.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Accepted (`Cancel` or `Ignore`); see `timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_strategy: Option<String>,
    /// Must be 1 for a local migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// TLS is for `tcp:` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// `Precopy` (the default), `Postcopy` (refused) or `MemFds` (the same as `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<String>,
}

impl SendMigrationData {
    /// The receiving VMM's socket, once the request is one this VMM serves.
    pub fn local_socket(&self) -> Result<PathBuf, MigrationError> {
        let url = parse_url("destination_url", &self.destination_url)?;
        let mode = self.memory_mode.as_deref().map(str::to_ascii_lowercase);
        let local = self.local || mode.as_deref() == Some("memfds");
        match mode.as_deref() {
            None | Some("precopy" | "memfds") => {}
            Some("postcopy") if local => {
                return Err(MigrationError::Invalid("postcopy excludes local"));
            }
            Some("postcopy") => return Err(MigrationError::NotSupported("Postcopy migration")),
            Some(_) => {
                return Err(MigrationError::Invalid(
                    "memory_mode must be Precopy, Postcopy or MemFds",
                ));
            }
        }
        if self.downtime_ms == Some(0) || self.timeout_s == Some(0) {
            return Err(MigrationError::Invalid(
                "downtime_ms and timeout_s must be nonzero",
            ));
        }
        if let Some(strategy) = &self.timeout_strategy
            && !matches!(strategy.to_ascii_lowercase().as_str(), "cancel" | "ignore")
        {
            return Err(MigrationError::Invalid(
                "timeout_strategy must be Cancel or Ignore",
            ));
        }
        if self.connections.is_some_and(|n| !(1..=128).contains(&n)) {
            return Err(MigrationError::Invalid("connections must be 1 to 128"));
        }
        if !local {
            return Err(MigrationError::NotSupported(
                "A migration that copies guest RAM (send-migration without local=on)",
            ));
        }
        let MigrationUrl::Unix(path) = url else {
            return Err(MigrationError::Invalid(
                "local migration needs a unix:<path> destination_url",
            ));
        };
        if self.connections.is_some_and(|n| n != 1) {
            return Err(MigrationError::Invalid(
                "local migration uses one connection",
            ));
        }
        if self.tls_dir.is_some() {
            return Err(MigrationError::Invalid("tls_dir is for tcp: only"));
        }
        if self.preserve_source == Some(true) {
            return Err(MigrationError::NotSupported(
                "preserve_source=on (the destination runs the guest on the very same RAM)",
            ));
        }
        Ok(path)
    }
}

/// The body of `vm.receive-migration` (cloud-hypervisor's `ReceiveMigrationData`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationData {
    /// `unix:<path>` to listen on (`tcp:` is refused).
    pub receiver_url: String,
    /// TLS is for `tcp:` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Accepted for older clients; the sender decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mode: Option<String>,
    /// Replacement VFIO fds (refused: VFIO devices move with the VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    /// A replacement iommufd (refused, as `vfio_fds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd_fd: Option<serde_json::Value>,
    /// NUMA zone moves (refused: no NUMA zones here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_updates: Option<Vec<serde_json::Value>>,
}

impl ReceiveMigrationData {
    /// The socket to receive on, once the request is one this VMM serves.
    pub fn local_socket(&self) -> Result<PathBuf, MigrationError> {
        let url = parse_url("receiver_url", &self.receiver_url)?;
        let MigrationUrl::Unix(path) = url else {
            return Err(MigrationError::NotSupported(
                "Receiving a migration over tcp: (a copy of guest RAM from another host)",
            ));
        };
        if self.tls_dir.is_some() {
            return Err(MigrationError::Invalid("tls_dir is for tcp: only"));
        }
        if self.vfio_fds.as_ref().is_some_and(|fds| !fds.is_empty()) || self.iommufd_fd.is_some() {
            return Err(MigrationError::NotSupported(
                "vfio_fds and iommufd_fd (VFIO devices move with the VM)",
            ));
        }
        if self.zone_updates.as_ref().is_some_and(|z| !z.is_empty()) {
            return Err(MigrationError::NotSupported("zone_updates (NUMA zones)"));
        }
        Ok(path)
    }
}

enum MigrationUrl {
    Unix(PathBuf),
    Tcp,
}

fn parse_url(field: &'static str, url: &str) -> Result<MigrationUrl, MigrationError> {
    let bad = || MigrationError::BadUrl {
        field,
        url: url.to_string(),
    };
    if let Some(path) = url.strip_prefix("unix:") {
        // cloud-hypervisor's URLs are `unix:/path`; `unix:///path` is taken too.
        let path = path.strip_prefix("//").unwrap_or(path);
        return if path.is_empty() {
            Err(bad())
        } else {
            Ok(MigrationUrl::Unix(PathBuf::from(path)))
        };
    }
    match url
        .strip_prefix("tcp:")
        .and_then(|rest| rest.rsplit_once(':'))
    {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(MigrationUrl::Tcp)
        }
        _ => Err(bad()),
    }
}

/// Parses ch-remote's `send-migration destination_url=<url>[,local=on|off][,preserve_source=]
/// [,downtime_ms=][,timeout_s=][,timeout_strategy=][,connections=][,tls_dir=][,memory_mode=]`.
pub fn parse_send_migration(input: &str) -> Result<SendMigrationData, ConfigError> {
    const KEYS: &[&str] = &[
        "destination_url",
        "local",
        "preserve_source",
        "downtime_ms",
        "timeout_s",
        "timeout_strategy",
        "connections",
        "tls_dir",
        "memory_mode",
    ];
    let options = Options::parse("send-migration", input, KEYS)?;
    let number = |key: &'static str| {
        options
            .get(key)
            .map(|value| {
                value
                    .parse::<u64>()
                    .map_err(|_| options.invalid(key, value, "expected a number"))
            })
            .transpose()
    };
    let connections = number("connections")?
        .map(|n| u32::try_from(n).map_err(|_| options.invalid("connections", "", "too large")))
        .transpose()?;
    Ok(SendMigrationData {
        destination_url: options.required("destination_url")?.to_string(),
        local: options.bool("local")?.unwrap_or(false),
        preserve_source: options.bool("preserve_source")?,
        downtime_ms: number("downtime_ms")?,
        timeout_s: number("timeout_s")?,
        timeout_strategy: options.get("timeout_strategy").map(str::to_string),
        connections,
        tls_dir: options.path("tls_dir")?,
        memory_mode: options.get("memory_mode").map(str::to_string),
    })
}

/// Parses ch-remote's `receive-migration receiver_url=<url>[,tls_dir=][,memory_mode=]`, or a
/// bare URL.
pub fn parse_receive_migration(input: &str) -> Result<ReceiveMigrationData, ConfigError> {
    if !input.contains('=') {
        return Ok(ReceiveMigrationData {
            receiver_url: input.to_string(),
            ..ReceiveMigrationData::default()
        });
    }
    let keys = &["receiver_url", "tls_dir", "memory_mode"];
    let options = Options::parse("receive-migration", input, keys)?;
    Ok(ReceiveMigrationData {
        receiver_url: options.required("receiver_url")?.to_string(),
        tls_dir: options.path("tls_dir")?,
        memory_mode: options.get("memory_mode").map(str::to_string),
        ..ReceiveMigrationData::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(url: &str) -> SendMigrationData {
        SendMigrationData {
            destination_url: url.to_string(),
            local: true,
            ..SendMigrationData::default()
        }
    }

    #[test]
    fn local_send_over_unix_names_the_receivers_socket() {
        assert_eq!(
            send("unix:/run/dst.sock").local_socket(),
            Ok(PathBuf::from("/run/dst.sock"))
        );
        assert_eq!(
            send("unix:///run/dst.sock").local_socket(),
            Ok(PathBuf::from("/run/dst.sock"))
        );
    }

    #[test]
    fn memory_mode_memfds_means_local() {
        let data = SendMigrationData {
            local: false,
            memory_mode: Some("MemFds".into()),
            ..send("unix:/d")
        };
        assert_eq!(data.local_socket(), Ok(PathBuf::from("/d")));
    }

    #[test]
    fn a_copy_of_guest_ram_is_not_supported() {
        for data in [
            SendMigrationData {
                local: false,
                ..send("unix:/d")
            },
            SendMigrationData {
                local: false,
                ..send("tcp:127.0.0.1:6000")
            },
            SendMigrationData {
                local: false,
                memory_mode: Some("Postcopy".into()),
                ..send("tcp:127.0.0.1:6000")
            },
        ] {
            let error = data.local_socket().unwrap_err();
            assert_eq!(error.status(), 501, "{error}");
        }
    }

    #[test]
    fn contradictory_or_out_of_range_options_are_bad_requests() {
        let cases = [
            send("tcp:127.0.0.1:6000"),
            send("http://x"),
            send("unix:"),
            SendMigrationData {
                connections: Some(2),
                ..send("unix:/d")
            },
            SendMigrationData {
                connections: Some(0),
                ..send("unix:/d")
            },
            SendMigrationData {
                tls_dir: Some("/etc/tls".into()),
                ..send("unix:/d")
            },
            SendMigrationData {
                downtime_ms: Some(0),
                ..send("unix:/d")
            },
            SendMigrationData {
                memory_mode: Some("Postcopy".into()),
                ..send("unix:/d")
            },
            SendMigrationData {
                timeout_strategy: Some("later".into()),
                ..send("unix:/d")
            },
        ];
        for data in cases {
            let error = data.local_socket().unwrap_err();
            assert_eq!(error.status(), 400, "{data:?}: {error}");
        }
    }

    #[test]
    fn preserve_source_is_refused_as_not_supported() {
        let data = SendMigrationData {
            preserve_source: Some(true),
            ..send("unix:/d")
        };
        assert_eq!(data.local_socket().unwrap_err().status(), 501);
    }

    #[test]
    fn cloud_hypervisors_json_bodies_parse_and_unknown_fields_do_not() {
        let data: SendMigrationData = serde_json::from_str(
            r#"{"destination_url":"unix:/d","local":true,"downtime_ms":300,"timeout_s":3600,
                "timeout_strategy":"Cancel","connections":1}"#,
        )
        .unwrap();
        assert_eq!(data.local_socket(), Ok(PathBuf::from("/d")));
        let data: ReceiveMigrationData =
            serde_json::from_str(r#"{"receiver_url":"unix:/r"}"#).unwrap();
        assert_eq!(data.local_socket(), Ok(PathBuf::from("/r")));
        let error = serde_json::from_str::<SendMigrationData>(
            r#"{"destination_url":"unix:/d","locale":true}"#,
        )
        .unwrap_err();
        assert!(error.to_string().contains("locale"), "{error}");
    }

    #[test]
    fn receiving_over_tcp_or_with_replacement_fds_is_not_supported() {
        let tcp = ReceiveMigrationData {
            receiver_url: "tcp:0.0.0.0:6000".into(),
            ..ReceiveMigrationData::default()
        };
        assert_eq!(tcp.local_socket().unwrap_err().status(), 501);
        let vfio = ReceiveMigrationData {
            receiver_url: "unix:/r".into(),
            vfio_fds: Some(vec![serde_json::json!({"id": "vfio0"})]),
            ..ReceiveMigrationData::default()
        };
        assert_eq!(vfio.local_socket().unwrap_err().status(), 501);
    }

    #[test]
    fn ch_remote_forms_parse() {
        let data =
            parse_send_migration("destination_url=unix:/d,local=on,downtime_ms=300").unwrap();
        assert_eq!(data.destination_url, "unix:/d");
        assert!(data.local);
        assert_eq!(data.downtime_ms, Some(300));
        assert_eq!(
            parse_receive_migration("receiver_url=unix:/r")
                .unwrap()
                .receiver_url,
            "unix:/r"
        );
        assert_eq!(
            parse_receive_migration("unix:/r").unwrap().receiver_url,
            "unix:/r"
        );
        assert!(matches!(
            parse_send_migration("destination_url=unix:/d,bogus=1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_send_migration("local=on"),
            Err(ConfigError::MissingKey { .. })
        ));
        assert!(matches!(
            parse_send_migration("destination_url=unix:/d,local=maybe"),
            Err(ConfigError::InvalidValue { .. })
        ));
    }
}
