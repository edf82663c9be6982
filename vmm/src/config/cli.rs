//! Command-line parsing in cloud-hypervisor's syntax: `--flag key=value,key=value`.
//!
//! Sizes take an optional `K`, `M` or `G` suffix (powers of 1024); booleans are `on|off` (also
//! `true|false`). Every error names the flag, the key and the rejected value.

use std::path::PathBuf;

use super::snapshot::{SnapshotRequestError, SnapshotRestore, VmRestoreConfig};
use super::{
    ConfigError, ConsoleConfig, ConsoleMode, CpusConfig, DeviceConfig, DiskConfig, KexecPolicy,
    MemoryConfig, NetConfig, NetKexecPolicy, PayloadConfig, RngConfig, UserDeviceConfig, VmConfig,
    VsockConfig,
};

/// The VM-related flags as given on the command line, before parsing their values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmCliArgs {
    /// `--cpus boot=N[,max=M]`.
    pub cpus: Option<String>,
    /// `--memory size=S[,shared=on|off][,hugepages=on|off]`.
    pub memory: Option<String>,
    /// `--kernel PATH`.
    pub kernel: Option<PathBuf>,
    /// `--firmware PATH`.
    pub firmware: Option<PathBuf>,
    /// `--initramfs PATH`.
    pub initramfs: Option<PathBuf>,
    /// `--cmdline STR`.
    pub cmdline: Option<String>,
    /// `--disk path=P[,readonly=on|off][,id=X]`, one entry per disk.
    pub disks: Vec<String>,
    /// `--net tap=NAME,mac=...,fd=[...]...`, one entry per network card.
    pub net: Vec<String>,
    /// `--vsock cid=N,socket=PATH[,id=X]`.
    pub vsock: Option<String>,
    /// `--user-device socket=P[,id=X][,persist=on|off]`, one entry per vfio-user device.
    pub user_devices: Vec<String>,
    /// `--device path=/sys/bus/pci/devices/<BDF>[,id=X][,kexec=refuse|detach]`, one entry per
    /// VFIO device.
    pub devices: Vec<String>,
    /// `--serial off|null|pty|tty|file=PATH`.
    pub serial: Option<String>,
    /// `--console off|null|pty|tty|file=PATH`.
    pub console: Option<String>,
    /// `--rng src=PATH`.
    pub rng: Option<String>,
}

impl VmCliArgs {
    /// Builds the VM configuration (unvalidated: call [`VmConfig::validate`]).
    pub fn to_vm_config(&self) -> Result<VmConfig, ConfigError> {
        let mut config = VmConfig {
            payload: PayloadConfig {
                kernel: self.kernel.clone(),
                initramfs: self.initramfs.clone(),
                cmdline: self.cmdline.clone(),
                firmware: self.firmware.clone(),
            },
            ..VmConfig::default()
        };
        if let Some(cpus) = &self.cpus {
            config.cpus = parse_cpus(cpus)?;
        }
        if let Some(memory) = &self.memory {
            config.memory = parse_memory(memory)?;
        }
        config.disks = self
            .disks
            .iter()
            .map(|disk| parse_disk(disk))
            .collect::<Result<_, _>>()?;
        config.net = self
            .net
            .iter()
            .map(|net| parse_net(net))
            .collect::<Result<_, _>>()?;
        if let Some(vsock) = &self.vsock {
            config.vsock = Some(parse_vsock(vsock)?);
        }
        config.user_devices = self
            .user_devices
            .iter()
            .map(|device| parse_user_device(device))
            .collect::<Result<_, _>>()?;
        config.devices = self
            .devices
            .iter()
            .map(|device| parse_device(device))
            .collect::<Result<_, _>>()?;
        if let Some(serial) = &self.serial {
            config.serial = parse_console("serial", serial)?;
        }
        if let Some(console) = &self.console {
            config.console = parse_console("console", console)?;
        }
        if let Some(rng) = &self.rng {
            config.rng = parse_rng(rng)?;
        }
        Ok(config)
    }
}

/// The `key=value` pairs of one flag's value, checked against the keys the flag knows.
pub(super) struct Options<'a> {
    flag: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Options<'a> {
    pub(super) fn parse(
        flag: &'static str,
        input: &'a str,
        known: &[&str],
    ) -> Result<Self, ConfigError> {
        let mut pairs = Vec::new();
        for item in split_options(input).filter(|item| !item.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if !known.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    flag,
                    key: key.to_string(),
                });
            }
            pairs.push((key, value));
        }
        Ok(Self { flag, pairs })
    }

    /// The last value given for `key` (later values win, as cloud-hypervisor).
    pub(super) fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    pub(super) fn invalid(
        &self,
        key: &'static str,
        value: &str,
        reason: &'static str,
    ) -> ConfigError {
        ConfigError::InvalidValue {
            flag: self.flag,
            key,
            value: value.to_string(),
            reason,
        }
    }

    pub(super) fn bool(&self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|value| match value {
                "on" | "true" => Ok(true),
                "off" | "false" => Ok(false),
                _ => Err(self.invalid(key, value, "expected on or off")),
            })
            .transpose()
    }

    fn u8(&self, key: &'static str) -> Result<Option<u8>, ConfigError> {
        self.get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| self.invalid(key, value, "expected a number from 0 to 255"))
            })
            .transpose()
    }

    fn size(&self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|value| parse_size(value).ok_or_else(|| self.invalid(key, value, SIZE_SYNTAX)))
            .transpose()
    }

    pub(super) fn path(&self, key: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        self.get(key)
            .map(|value| {
                if value.is_empty() {
                    Err(self.invalid(key, value, "expected a path"))
                } else {
                    Ok(PathBuf::from(value))
                }
            })
            .transpose()
    }

    /// The value of a key that must be given.
    pub(super) fn required(&self, key: &'static str) -> Result<&'a str, ConfigError> {
        self.get(key).ok_or(ConfigError::MissingKey {
            flag: self.flag,
            key,
        })
    }

    fn required_path(&self, key: &'static str) -> Result<PathBuf, ConfigError> {
        self.path(key)?.ok_or(ConfigError::MissingKey {
            flag: self.flag,
            key,
        })
    }
}

/// Splits `key=value` items at the commas outside brackets, so `fd=[3,4]` stays one item.
fn split_options(input: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0usize;
    let mut start = 0;
    let mut items = Vec::new();
    for (at, c) in input.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&input[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    items.push(&input[start..]);
    items.into_iter()
}

const SIZE_SYNTAX: &str = "expected bytes with an optional K, M or G suffix";

/// Parses a size: decimal bytes with an optional `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(input: &str) -> Option<u64> {
    let (digits, shift) = match input.as_bytes().last()? {
        b'K' | b'k' => (&input[..input.len() - 1], 10),
        b'M' | b'm' => (&input[..input.len() - 1], 20),
        b'G' | b'g' => (&input[..input.len() - 1], 30),
        _ => (input, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    number.checked_mul(1u64 << shift)
}

fn parse_cpus(input: &str) -> Result<CpusConfig, ConfigError> {
    let options = Options::parse("cpus", input, &["boot", "max"])?;
    let boot_vcpus = options.u8("boot")?.unwrap_or(1);
    let max_vcpus = options.u8("max")?.unwrap_or(boot_vcpus);
    Ok(CpusConfig {
        boot_vcpus,
        max_vcpus,
    })
}

fn parse_memory(input: &str) -> Result<MemoryConfig, ConfigError> {
    let options = Options::parse("memory", input, &["size", "shared", "hugepages"])?;
    let defaults = MemoryConfig::default();
    Ok(MemoryConfig {
        size: options.size("size")?.unwrap_or(defaults.size),
        shared: options.bool("shared")?.unwrap_or(defaults.shared),
        hugepages: options.bool("hugepages")?.unwrap_or(defaults.hugepages),
    })
}

fn parse_disk(input: &str) -> Result<DiskConfig, ConfigError> {
    let options = Options::parse("disk", input, &["path", "readonly", "id"])?;
    let id = match options.get("id") {
        Some("") => return Err(options.invalid("id", "", "expected a non-empty id")),
        id => id.map(str::to_string),
    };
    Ok(DiskConfig {
        path: options.required_path("path")?,
        readonly: options.bool("readonly")?.unwrap_or(false),
        id,
    })
}

/// Parses `socket=PATH[,id=ID][,persist=on|off]` (`--user-device`, `ch-remote add-user-device`).
pub fn parse_user_device(input: &str) -> Result<UserDeviceConfig, ConfigError> {
    let options = Options::parse("user-device", input, &["socket", "persist", "id"])?;
    let id = match options.get("id") {
        Some("") => return Err(options.invalid("id", "", "expected a non-empty id")),
        id => id.map(str::to_string),
    };
    Ok(UserDeviceConfig {
        socket: options.required_path("socket")?,
        persist: options.bool("persist")?.unwrap_or(false),
        id,
    })
}

/// Parses `path=/sys/bus/pci/devices/<BDF>[,id=ID][,kexec=refuse|detach]` (`--device`,
/// `ch-remote add-device`). cloud-hypervisor's `iommu` and `pci_segment` keys are refused: we
/// have no virtual IOMMU and one segment.
pub fn parse_device(input: &str) -> Result<DeviceConfig, ConfigError> {
    let options = Options::parse("device", input, &["path", "id", "kexec"])?;
    let id = match options.get("id") {
        Some("") => return Err(options.invalid("id", "", "expected a non-empty id")),
        id => id.map(str::to_string),
    };
    let kexec = match options.get("kexec") {
        None | Some("refuse") => KexecPolicy::Refuse,
        Some("detach") => KexecPolicy::Detach,
        Some(other) => return Err(options.invalid("kexec", other, "expected refuse or detach")),
    };
    Ok(DeviceConfig {
        path: options.required_path("path")?,
        id,
        kexec,
        removed: false,
    })
}

/// The `--net` keys of cloud-hypervisor that we refuse by name, with why.
const NET_REFUSED_KEYS: &[(&str, &str)] = &[
    ("vhost_user", "vhost-user is not supported"),
    ("socket", "vhost-user is not supported"),
    ("vhost_mode", "vhost-user is not supported"),
    ("iommu", "a virtual IOMMU is not supported"),
    ("pci_device_id", "choosing the PCI slot is not supported"),
    ("bw_size", "rate limiting is not supported"),
    ("bw_one_time_burst", "rate limiting is not supported"),
    ("bw_refill_time", "rate limiting is not supported"),
    ("ops_size", "rate limiting is not supported"),
    ("ops_one_time_burst", "rate limiting is not supported"),
    ("ops_refill_time", "rate limiting is not supported"),
];

/// Parses cloud-hypervisor's `--net` value (`ch-remote add-net` too):
/// `tap=NAME,ip=,mask=,mac=,host_mac=,mtu=,num_queues=,queue_size=,id=,fd=[FD,...],
/// offload_tso=,offload_ufo=,offload_csum=,pci_segment=0`, plus ours, `kexec=recreate|fds|refuse`.
pub fn parse_net(input: &str) -> Result<NetConfig, ConfigError> {
    const KNOWN: &[&str] = &[
        "tap",
        "ip",
        "mask",
        "mac",
        "host_mac",
        "mtu",
        "num_queues",
        "queue_size",
        "id",
        "fd",
        "offload_tso",
        "offload_ufo",
        "offload_csum",
        "pci_segment",
        "kexec",
    ];
    let refused: Vec<&str> = NET_REFUSED_KEYS.iter().map(|(key, _)| *key).collect();
    let known: Vec<&str> = KNOWN.iter().chain(&refused).copied().collect();
    let options = Options::parse("net", input, &known)?;
    for (key, reason) in NET_REFUSED_KEYS {
        if let Some(value) = options.get(key) {
            return Err(options.invalid(key, value, reason));
        }
    }
    let number = |key: &'static str| -> Result<Option<u64>, ConfigError> {
        options
            .get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| options.invalid(key, value, "expected a number"))
            })
            .transpose()
    };
    let narrow = |key: &'static str, value: u64| -> Result<u16, ConfigError> {
        u16::try_from(value).map_err(|_| options.invalid(key, &value.to_string(), "too large"))
    };
    let address = |key: &'static str| -> Result<Option<std::net::Ipv4Addr>, ConfigError> {
        options
            .get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| options.invalid(key, value, "expected an IPv4 address"))
            })
            .transpose()
    };
    let mac = |key: &'static str| -> Result<Option<tap::MacAddr>, ConfigError> {
        options
            .get(key)
            .map(|value| {
                value.parse().map_err(|_| {
                    options.invalid(key, value, "expected a MAC like 12:34:56:78:9a:bc")
                })
            })
            .transpose()
    };
    let fds = options
        .get("fd")
        .map(|value| {
            let inner = value
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .unwrap_or(value);
            inner
                .split(',')
                .filter(|fd| !fd.is_empty())
                .map(|fd| {
                    fd.parse::<i32>()
                        .ok()
                        .filter(|fd| *fd >= 0)
                        .ok_or_else(|| options.invalid("fd", value, "expected fd=[N,...]"))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let defaults = NetConfig::default();
    let num_queues = match (number("num_queues")?, &fds) {
        (Some(n), _) => usize::try_from(n).unwrap_or(usize::MAX),
        // cloud-hypervisor's rule: fds given without num_queues mean one pair per fd.
        (None, Some(fds)) if !fds.is_empty() => 2 * fds.len(),
        (None, _) => defaults.num_queues,
    };
    let kexec = match options.get("kexec") {
        None | Some("recreate") => NetKexecPolicy::Recreate,
        Some("fds") => NetKexecPolicy::Fds,
        Some("refuse") => NetKexecPolicy::Refuse,
        Some(other) => {
            return Err(options.invalid("kexec", other, "expected recreate, fds or refuse"));
        }
    };
    let id = match options.get("id") {
        Some("") => return Err(options.invalid("id", "", "expected a non-empty id")),
        id => id.map(str::to_string),
    };
    let net = NetConfig {
        tap: options.get("tap").map(str::to_string),
        ip: address("ip")?,
        mask: address("mask")?,
        mac: mac("mac")?.unwrap_or(defaults.mac),
        host_mac: mac("host_mac")?,
        mtu: number("mtu")?.map(|v| narrow("mtu", v)).transpose()?,
        num_queues,
        queue_size: number("queue_size")?
            .map(|v| narrow("queue_size", v))
            .transpose()?
            .unwrap_or(defaults.queue_size),
        id,
        fds,
        pci_segment: number("pci_segment")?
            .map(|v| narrow("pci_segment", v))
            .transpose()?
            .unwrap_or(0),
        offload_tso: options.bool("offload_tso")?.unwrap_or(true),
        offload_ufo: options.bool("offload_ufo")?.unwrap_or(true),
        offload_csum: options.bool("offload_csum")?.unwrap_or(true),
        kexec,
        ..defaults
    };
    net.validate()?;
    Ok(net)
}

/// Parses cloud-hypervisor's `--vsock cid=N,socket=PATH[,id=ID][,iommu=off][,pci_segment=0]`
/// (`ch-remote add-vsock` too).
pub fn parse_vsock(input: &str) -> Result<VsockConfig, ConfigError> {
    let options = Options::parse(
        "vsock",
        input,
        &["cid", "socket", "id", "iommu", "pci_segment"],
    )?;
    let cid = options.get("cid").ok_or(ConfigError::MissingKey {
        flag: "vsock",
        key: "cid",
    })?;
    let cid = cid
        .parse()
        .map_err(|_| options.invalid("cid", cid, "expected a number"))?;
    let id = match options.get("id") {
        Some("") => return Err(options.invalid("id", "", "expected a non-empty id")),
        id => id.map(str::to_string),
    };
    let pci_segment = match options.get("pci_segment") {
        Some(value) => value
            .parse()
            .map_err(|_| options.invalid("pci_segment", value, "expected a number"))?,
        None => 0,
    };
    let vsock = VsockConfig {
        cid,
        socket: options.required_path("socket")?,
        iommu: options.bool("iommu")?.unwrap_or(false),
        id,
        pci_segment,
        removed: false,
    };
    vsock.validate()?;
    Ok(vsock)
}

fn parse_console(flag: &'static str, input: &str) -> Result<ConsoleConfig, ConfigError> {
    let mode = match input {
        "off" => ConsoleMode::Off,
        "null" => ConsoleMode::Null,
        "pty" => ConsoleMode::Pty,
        "tty" => ConsoleMode::Tty,
        _ => {
            let options = Options::parse(flag, input, &["file", "socket"])?;
            let (mode, file, socket) = match (options.get("file"), options.get("socket")) {
                (Some(_), None) => (
                    ConsoleMode::File,
                    Some(options.required_path("file")?),
                    None,
                ),
                (None, Some(_)) => (
                    ConsoleMode::Socket,
                    None,
                    Some(options.required_path("socket")?),
                ),
                _ => {
                    return Err(options.invalid(
                        "file",
                        input,
                        "expected off, null, pty, tty, file=<path> or socket=<path>",
                    ));
                }
            };
            return Ok(ConsoleConfig { mode, file, socket });
        }
    };
    Ok(ConsoleConfig {
        mode,
        file: None,
        socket: None,
    })
}

fn parse_rng(input: &str) -> Result<RngConfig, ConfigError> {
    let options = Options::parse("rng", input, &["src"])?;
    Ok(RngConfig {
        src: options.required_path("src")?,
    })
}

/// URL scheme of a live-update session in `--restore source_url=`.
pub const LUO_URL_SCHEME: &str = "luo://";

/// Where a VM is restored from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreConfig {
    /// The live-update session's name.
    pub session: String,
    /// Resume the guest once restored (the default for a live update).
    pub resume: bool,
    /// New tap fds for network cards with `kexec=fds`, by card id (`net_fds=[id@[fd,...]]`).
    pub net_fds: Vec<(String, Vec<i32>)>,
    /// How long to wait for the session to be handed over (`timeout=S`; default 120 s).
    pub timeout: Option<std::time::Duration>,
}

/// A socket or file given by path, or as an fd the VMM inherited (`path=` or `fd=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathOrFd {
    /// `path=PATH` (or a bare path where allowed).
    Path(PathBuf),
    /// `fd=N`: an fd open in the VMM at start.
    Fd(i32),
}

/// Parses `--api-socket path=PATH`, `--api-socket fd=N` (an inherited listening socket) or a
/// bare `--api-socket PATH`.
pub fn parse_api_socket(input: &str) -> Result<PathOrFd, ConfigError> {
    parse_path_or_fd("api-socket", input, true)
}

/// Parses `--event-monitor path=PATH` or `--event-monitor fd=N` (an inherited fd to write
/// events to).
pub fn parse_event_monitor(input: &str) -> Result<PathOrFd, ConfigError> {
    parse_path_or_fd("event-monitor", input, false)
}

/// Where live-update sessions come from (`--liveupdate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveUpdateSource {
    /// `agent=PATH`: the session agent (`ch-luod`) listening there.
    Agent(PathBuf),
    /// `inherit=NAME`: the session fd the service manager passed under this name
    /// (`LISTEN_FDNAMES`; systemd's `LUOSession=`).
    Inherit(String),
}

/// Parses `--liveupdate agent=PATH` or `--liveupdate inherit=NAME` (exactly one of the two).
pub fn parse_liveupdate(input: &str) -> Result<LiveUpdateSource, ConfigError> {
    let options = Options::parse("liveupdate", input, &["agent", "inherit"])?;
    match (options.get("agent"), options.get("inherit")) {
        (Some(_), Some(name)) => {
            Err(options.invalid("inherit", name, "give either agent= or inherit=, not both"))
        }
        (Some(_), None) => Ok(LiveUpdateSource::Agent(options.required_path("agent")?)),
        (None, Some(name)) => {
            // A systemd fd name: at most 255 characters, no ':' (the names' separator).
            if name.is_empty() || name.len() > 255 || name.contains(':') {
                return Err(options.invalid(
                    "inherit",
                    name,
                    "expected the fd name of the session (1 to 255 characters, no ':')",
                ));
            }
            Ok(LiveUpdateSource::Inherit(name.to_string()))
        }
        (None, None) => Err(ConfigError::MissingKey {
            flag: "liveupdate",
            key: "agent or inherit",
        }),
    }
}

/// What `--restore` restores from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreSource {
    /// A live-update session (`source_url=luo://NAME`).
    Session(RestoreConfig),
    /// A snapshot directory (`source_url=file:///dir`).
    Snapshot(SnapshotRestore),
}

impl RestoreSource {
    /// New tap fds for cards with `kexec=fds`, by card id.
    pub fn net_fds(&self) -> &[(String, Vec<i32>)] {
        match self {
            Self::Session(restore) => &restore.net_fds,
            Self::Snapshot(restore) => &restore.net_fds,
        }
    }
}

/// Parses `--restore source_url=luo://NAME[,resume=on|off][,net_fds=[id@[fd,...],...]]`
/// (restore from a live-update session; resumes by default) or `--restore
/// source_url=file:///dir[,resume=on|off][,prefault=on|off][,memory_restore_mode=copy|ondemand]
/// [,net_fds=...]` (restore a snapshot; stays paused by default, as cloud-hypervisor).
pub fn parse_restore(input: &str) -> Result<RestoreSource, ConfigError> {
    let keys = &[
        "source_url",
        "resume",
        "net_fds",
        "prefault",
        "memory_restore_mode",
        "timeout",
    ];
    let options = Options::parse("restore", input, keys)?;
    let url = options.get("source_url").ok_or(ConfigError::MissingKey {
        flag: "restore",
        key: "source_url",
    })?;
    let net_fds = match options.get("net_fds") {
        Some(value) => parse_net_fds(value)
            .ok_or_else(|| options.invalid("net_fds", value, "expected [id@[fd,...],...]"))?,
        None => Vec::new(),
    };
    let Some(session) = url.strip_prefix(LUO_URL_SCHEME) else {
        if let Some(value) = options.get("timeout") {
            return Err(options.invalid("timeout", value, "only a luo:// session takes it"));
        }
        let mode = options.get("memory_restore_mode");
        let body = VmRestoreConfig {
            source_url: url.to_string(),
            prefault: options.bool("prefault")?.unwrap_or(false),
            memory_restore_mode: mode.map(str::to_string),
            resume: options.bool("resume")?.unwrap_or(false),
            ..VmRestoreConfig::default()
        };
        let snapshot = body.check().map_err(|error| match error {
            SnapshotRequestError::Invalid(_) => options.invalid(
                "memory_restore_mode",
                mode.unwrap_or_default(),
                "expected copy or ondemand",
            ),
            _ => options.invalid(
                "source_url",
                url,
                "expected luo://<session> or file:///<directory>",
            ),
        })?;
        return Ok(RestoreSource::Snapshot(SnapshotRestore {
            net_fds,
            ..snapshot
        }));
    };
    for key in ["prefault", "memory_restore_mode"] {
        if let Some(value) = options.get(key) {
            return Err(options.invalid(key, value, "only a file:// snapshot takes it"));
        }
    }
    let timeout = options
        .get("timeout")
        .map(|value| match value.parse::<u64>() {
            Ok(seconds @ 1..) => Ok(std::time::Duration::from_secs(seconds)),
            _ => Err(options.invalid("timeout", value, "expected whole seconds, at least 1")),
        })
        .transpose()?;
    if liveupdate::session::check_name(session).is_err() {
        return Err(options.invalid(
            "source_url",
            url,
            "the session name must have 1 to 63 bytes",
        ));
    }
    Ok(RestoreSource::Session(RestoreConfig {
        session: session.to_string(),
        resume: options.bool("resume")?.unwrap_or(true),
        net_fds,
        timeout,
    }))
}

/// Parses `[id@[3,4],id2@[5]]` (cloud-hypervisor's `net_fds`).
fn parse_net_fds(value: &str) -> Option<Vec<(String, Vec<i32>)>> {
    let inner = value.strip_prefix('[')?.strip_suffix(']')?;
    split_options(inner)
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (id, fds) = item.split_once('@')?;
            let fds = fds.strip_prefix('[')?.strip_suffix(']')?;
            let fds = fds
                .split(',')
                .map(|fd| fd.parse::<i32>().ok().filter(|fd| *fd >= 0))
                .collect::<Option<Vec<_>>>()?;
            (!id.is_empty() && !fds.is_empty()).then(|| (id.to_string(), fds))
        })
        .collect()
}

fn parse_path_or_fd(
    flag: &'static str,
    input: &str,
    bare_allowed: bool,
) -> Result<PathOrFd, ConfigError> {
    if bare_allowed && !input.is_empty() && !input.contains('=') {
        return Ok(PathOrFd::Path(PathBuf::from(input)));
    }
    let options = Options::parse(flag, input, &["path", "fd"])?;
    match (options.get("path"), options.get("fd")) {
        (Some(_), None) => Ok(PathOrFd::Path(options.required_path("path")?)),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|fd| *fd >= 0)
            .map(PathOrFd::Fd)
            .ok_or_else(|| options.invalid("fd", fd, "expected a file descriptor number")),
        (Some(_), Some(_)) => Err(options.invalid("fd", input, "give path= or fd=, not both")),
        (None, None) => Err(options.invalid("path", input, "expected path=<path> or fd=<fd>")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_with_memory(memory: &str) -> VmCliArgs {
        VmCliArgs {
            memory: Some(memory.to_string()),
            ..VmCliArgs::default()
        }
    }

    #[test]
    fn sizes_accept_bytes_and_k_m_g_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
    }

    #[test]
    fn sizes_reject_garbage_empty_and_overflow() {
        assert_eq!(parse_size("abc"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999999G"), None);
    }

    #[test]
    fn memory_flag_parses_size_and_switches() {
        let config = args_with_memory("size=1G,shared=on,hugepages=off")
            .to_vm_config()
            .unwrap();

        assert_eq!(
            config.memory,
            MemoryConfig {
                size: 1 << 30,
                shared: true,
                hugepages: false
            }
        );
    }

    #[test]
    fn bad_memory_size_names_flag_and_value() {
        let error = args_with_memory("size=abc").to_vm_config().unwrap_err();

        let message = error.to_string();
        assert!(message.contains("--memory"), "{message}");
        assert!(message.contains("'abc'"), "{message}");
    }

    #[test]
    fn bad_on_off_value_is_rejected() {
        let error = args_with_memory("size=1G,shared=maybe")
            .to_vm_config()
            .unwrap_err();

        assert_eq!(
            error,
            ConfigError::InvalidValue {
                flag: "memory",
                key: "shared",
                value: "maybe".to_string(),
                reason: "expected on or off",
            }
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let error = args_with_memory("size=1G,color=blue")
            .to_vm_config()
            .unwrap_err();

        assert_eq!(
            error,
            ConfigError::UnknownKey {
                flag: "memory",
                key: "color".to_string()
            }
        );
    }

    #[test]
    fn cpus_max_defaults_to_boot() {
        let args = VmCliArgs {
            cpus: Some("boot=4".to_string()),
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        assert_eq!(
            config.cpus,
            CpusConfig {
                boot_vcpus: 4,
                max_vcpus: 4
            }
        );
    }

    #[test]
    fn cpus_out_of_range_is_rejected() {
        let args = VmCliArgs {
            cpus: Some("boot=300".to_string()),
            ..VmCliArgs::default()
        };

        let error = args.to_vm_config().unwrap_err();

        assert!(error.to_string().contains("'300'"), "{error}");
    }

    #[test]
    fn repeated_disks_keep_their_order_and_options() {
        let args = VmCliArgs {
            disks: vec![
                "path=/a.img".to_string(),
                "path=/b.img,readonly=on,id=data".to_string(),
            ],
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        assert_eq!(
            config.disks,
            vec![
                DiskConfig {
                    path: PathBuf::from("/a.img"),
                    readonly: false,
                    id: None
                },
                DiskConfig {
                    path: PathBuf::from("/b.img"),
                    readonly: true,
                    id: Some("data".to_string())
                },
            ]
        );
    }

    #[test]
    fn disk_without_path_is_rejected() {
        let args = VmCliArgs {
            disks: vec!["readonly=on".to_string()],
            ..VmCliArgs::default()
        };

        let error = args.to_vm_config().unwrap_err();

        assert_eq!(
            error,
            ConfigError::MissingKey {
                flag: "disk",
                key: "path"
            }
        );
    }

    #[test]
    fn user_devices_keep_their_sockets_in_order() {
        let args = VmCliArgs {
            user_devices: vec![
                "socket=/a.sock".to_string(),
                "socket=/b.sock,persist=on".to_string(),
            ],
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        let sockets: Vec<_> = config
            .user_devices
            .iter()
            .map(|d| d.socket.clone())
            .collect();
        assert_eq!(
            sockets,
            [PathBuf::from("/a.sock"), PathBuf::from("/b.sock")]
        );
    }

    #[test]
    fn user_device_with_unknown_key_is_rejected() {
        let args = VmCliArgs {
            user_devices: vec!["path=/a.sock".to_string()],
            ..VmCliArgs::default()
        };

        let error = args.to_vm_config().unwrap_err();

        assert_eq!(
            error,
            ConfigError::UnknownKey {
                flag: "user-device",
                key: "path".to_string()
            }
        );
    }

    #[test]
    fn user_device_with_id_and_persist_parses() {
        let device = parse_user_device("socket=/a.sock,id=nic0,persist=on").unwrap();

        assert_eq!(
            device,
            UserDeviceConfig {
                socket: PathBuf::from("/a.sock"),
                persist: true,
                id: Some("nic0".to_string()),
            }
        );
    }

    #[test]
    fn user_device_with_empty_id_is_rejected() {
        let error = parse_user_device("socket=/a.sock,id=").unwrap_err();

        assert!(
            matches!(error, ConfigError::InvalidValue { key: "id", .. }),
            "{error:?}"
        );
    }

    #[test]
    fn serial_and_console_modes_parse() {
        let args = VmCliArgs {
            serial: Some("tty".to_string()),
            console: Some("file=/tmp/console.log".to_string()),
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        assert_eq!(config.serial.mode, ConsoleMode::Tty);
        assert_eq!(config.console.mode, ConsoleMode::File);
        assert_eq!(config.console.file, Some(PathBuf::from("/tmp/console.log")));
    }

    #[test]
    fn unknown_serial_mode_is_rejected() {
        let args = VmCliArgs {
            serial: Some("loud".to_string()),
            ..VmCliArgs::default()
        };

        let error = args.to_vm_config().unwrap_err();

        assert_eq!(
            error,
            ConfigError::UnknownKey {
                flag: "serial",
                key: "loud".to_string()
            }
        );
    }

    #[test]
    fn defaults_match_cloud_hypervisor() {
        let config = VmCliArgs::default().to_vm_config().unwrap();

        assert_eq!(config.cpus.boot_vcpus, 1);
        assert_eq!(config.memory.size, 512 << 20);
        assert_eq!(config.serial.mode, ConsoleMode::Null);
        assert_eq!(config.console.mode, ConsoleMode::Tty);
        assert_eq!(config.rng.src, PathBuf::from("/dev/urandom"));
    }

    #[test]
    fn liveupdate_takes_an_agent_socket_or_an_inherited_name() {
        let agent = parse_liveupdate("agent=/run/ch-luod.sock").unwrap();
        let inherit = parse_liveupdate("inherit=vm").unwrap();

        assert_eq!(
            agent,
            LiveUpdateSource::Agent(PathBuf::from("/run/ch-luod.sock"))
        );
        assert_eq!(inherit, LiveUpdateSource::Inherit("vm".into()));
    }

    #[test]
    fn liveupdate_needs_exactly_one_of_agent_and_inherit() {
        let both = parse_liveupdate("agent=/s,inherit=vm").unwrap_err();
        let neither = parse_liveupdate("").unwrap_err();

        assert!(both.to_string().contains("not both"), "{both}");
        assert!(matches!(
            neither,
            ConfigError::MissingKey {
                flag: "liveupdate",
                ..
            }
        ));
    }

    #[test]
    fn liveupdate_inherit_refuses_empty_or_colon_names() {
        for input in ["inherit=", "inherit=a:b", "agent="] {
            let err = parse_liveupdate(input).unwrap_err();

            assert!(
                matches!(
                    err,
                    ConfigError::InvalidValue {
                        flag: "liveupdate",
                        ..
                    }
                ),
                "{input}: {err}"
            );
        }
    }

    #[test]
    fn api_socket_accepts_path_key_and_bare_path() {
        assert_eq!(
            parse_api_socket("path=/run/ch.sock"),
            Ok(PathOrFd::Path(PathBuf::from("/run/ch.sock")))
        );
        assert_eq!(
            parse_api_socket("/run/ch.sock"),
            Ok(PathOrFd::Path(PathBuf::from("/run/ch.sock")))
        );
    }

    #[test]
    fn api_socket_and_event_monitor_accept_an_fd() {
        assert_eq!(parse_api_socket("fd=3"), Ok(PathOrFd::Fd(3)));
        assert_eq!(parse_event_monitor("fd=4"), Ok(PathOrFd::Fd(4)));
    }

    #[test]
    fn a_bad_fd_or_both_keys_are_refused() {
        for input in ["fd=-1", "fd=x", "fd=", "path=/a,fd=3"] {
            let error = parse_api_socket(input).unwrap_err();

            assert!(
                matches!(
                    error,
                    ConfigError::InvalidValue {
                        flag: "api-socket",
                        ..
                    }
                ),
                "{input}: {error:?}"
            );
        }
    }

    #[test]
    fn event_monitor_needs_path_key() {
        assert_eq!(
            parse_event_monitor("path=/tmp/events"),
            Ok(PathOrFd::Path(PathBuf::from("/tmp/events")))
        );
        assert_eq!(
            parse_event_monitor("/tmp/events"),
            Err(ConfigError::UnknownKey {
                flag: "event-monitor",
                key: "/tmp/events".to_string()
            })
        );
    }

    #[test]
    fn serial_socket_mode_parses_with_its_path() {
        let args = VmCliArgs {
            serial: Some("socket=/run/serial.sock".to_string()),
            console: Some("pty".to_string()),
            kernel: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")),
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        assert_eq!(config.serial.mode, ConsoleMode::Socket);
        assert_eq!(
            config.serial.socket,
            Some(PathBuf::from("/run/serial.sock"))
        );
        assert_eq!(config.console.mode, ConsoleMode::Pty);
        config.validate().unwrap();
    }

    #[test]
    fn console_socket_mode_is_refused_as_cloud_hypervisor_does() {
        let args = VmCliArgs {
            console: Some("socket=/run/console.sock".to_string()),
            kernel: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")),
            ..VmCliArgs::default()
        };

        let error = args.to_vm_config().unwrap().validate().unwrap_err();

        assert_eq!(
            error,
            ConfigError::UnsupportedMode {
                device: "console",
                mode: ConsoleMode::Socket
            }
        );
    }

    #[test]
    fn vfio_devices_keep_their_paths_and_ids_in_order() {
        let args = VmCliArgs {
            devices: vec![
                "path=/sys/bus/pci/devices/0000:00:03.0".to_string(),
                "path=/sys/bus/pci/devices/0000:00:04.0,id=edu,kexec=detach".to_string(),
            ],
            ..VmCliArgs::default()
        };

        let config = args.to_vm_config().unwrap();

        assert_eq!(
            config.devices,
            [
                DeviceConfig {
                    path: PathBuf::from("/sys/bus/pci/devices/0000:00:03.0"),
                    id: None,
                    kexec: KexecPolicy::Refuse,
                    removed: false,
                },
                DeviceConfig {
                    path: PathBuf::from("/sys/bus/pci/devices/0000:00:04.0"),
                    id: Some("edu".to_string()),
                    kexec: KexecPolicy::Detach,
                    removed: false,
                },
            ]
        );
    }

    #[test]
    fn vfio_device_without_path_with_iommu_or_a_bad_kexec_policy_is_rejected() {
        for (input, key) in [
            ("id=edu", "path"),
            ("path=/sys/x,iommu=on", "iommu"),
            ("path=/sys/x,kexec=keep", "kexec"),
        ] {
            let args = VmCliArgs {
                devices: vec![input.to_string()],
                ..VmCliArgs::default()
            };

            let error = args.to_vm_config().unwrap_err();

            assert!(error.to_string().contains(key), "{input}: {error}");
        }
    }

    #[test]
    fn net_flag_keeps_an_fd_list_together_and_counts_one_pair_per_fd() {
        let net = parse_net("fd=[3,4],mac=12:34:56:78:9a:bc,id=n0").unwrap();

        assert_eq!(net.fds, Some(vec![3, 4]));
        assert_eq!(net.num_queues, 4);
        assert_eq!(net.mac.to_string(), "12:34:56:78:9a:bc");
        assert_eq!(net.id.as_deref(), Some("n0"));
    }

    #[test]
    fn net_flag_parses_host_side_and_offloads() {
        let net = parse_net(
            "tap=t0,ip=192.0.2.1,mask=255.255.255.0,mtu=9000,queue_size=512,offload_tso=off",
        )
        .unwrap();

        assert_eq!(net.tap_name(), Some("t0"));
        assert_eq!(net.ip, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(net.mtu, Some(9000));
        assert_eq!(net.queue_size, 512);
        assert!(!net.offload_tso && net.offload_csum);
    }

    #[test]
    fn net_rate_limiting_is_refused_by_name() {
        let error = parse_net("tap=t0,bw_size=1000").unwrap_err();

        assert!(
            matches!(error, ConfigError::InvalidValue { key: "bw_size", .. }),
            "{error:?}"
        );
    }

    #[test]
    fn restore_takes_net_fds_by_card_id() {
        let restore = parse_restore("source_url=luo://s,net_fds=[net0@[3,4],net1@[5]]").unwrap();

        assert_eq!(
            restore.net_fds(),
            vec![
                ("net0".to_string(), vec![3, 4]),
                ("net1".to_string(), vec![5])
            ]
        );
    }

    #[test]
    fn restore_with_malformed_net_fds_is_refused() {
        let error = parse_restore("source_url=luo://s,net_fds=[net0@3]").unwrap_err();

        assert!(
            matches!(error, ConfigError::InvalidValue { key: "net_fds", .. }),
            "{error:?}"
        );
    }

    #[test]
    fn restore_of_a_file_url_is_a_snapshot_that_stays_paused_by_default() {
        let snapshot = parse_restore("source_url=file:///var/snap,prefault=on").unwrap();
        let session = parse_restore("source_url=luo://s").unwrap();

        assert_eq!(
            snapshot,
            RestoreSource::Snapshot(SnapshotRestore {
                directory: PathBuf::from("/var/snap"),
                resume: false,
                net_fds: Vec::new(),
            })
        );
        assert!(matches!(
            session,
            RestoreSource::Session(RestoreConfig { resume: true, .. })
        ));
    }

    #[test]
    fn restore_takes_a_timeout_in_whole_seconds_for_a_session_only() {
        let with = parse_restore("source_url=luo://s,timeout=30").unwrap();
        let without = parse_restore("source_url=luo://s").unwrap();
        let refused = [
            "source_url=file:///var/snap,timeout=5",
            "source_url=luo://s,timeout=0",
            "source_url=luo://s,timeout=1.5",
            "source_url=luo://s,timeout=soon",
        ];

        assert!(matches!(
            with,
            RestoreSource::Session(RestoreConfig { timeout: Some(t), .. }) if t.as_secs() == 30
        ));
        assert!(matches!(
            without,
            RestoreSource::Session(RestoreConfig { timeout: None, .. })
        ));
        for input in refused {
            let error = parse_restore(input).unwrap_err();
            assert!(
                matches!(error, ConfigError::InvalidValue { key: "timeout", .. }),
                "{input}: {error:?}"
            );
        }
    }

    #[test]
    fn restore_of_another_url_or_with_snapshot_keys_on_a_session_is_refused() {
        let other = parse_restore("source_url=tcp:host:1").unwrap_err();
        let prefault = parse_restore("source_url=luo://s,prefault=on").unwrap_err();

        assert!(
            matches!(
                other,
                ConfigError::InvalidValue {
                    key: "source_url",
                    ..
                }
            ),
            "{other:?}"
        );
        assert!(
            matches!(
                prefault,
                ConfigError::InvalidValue {
                    key: "prefault",
                    ..
                }
            ),
            "{prefault:?}"
        );
    }
}
