//! The VM configuration: cloud-hypervisor's `VmConfig` JSON shape (the subset we support), its
//! defaults, its validation and the command-line parsers that build it (`cli`).
//!
//! A JSON configuration is checked against cloud-hypervisor's schema before it is parsed
//! (`schema`): keys we do not implement are accepted only with their neutral value (`null`,
//! `false`, `[]`, ...), and every other one is refused, all of them named in one error.
//!
//! Guest RAM is always a shared memfd so that live update can preserve it: `memory.shared=false`
//! is accepted for compatibility but changes nothing, and `memory.hugepages=true` is refused
//! because the kernel's live update cannot preserve hugetlb memfds.

mod cli;
mod device;
mod json;
mod migration;
mod net;
mod schema;
mod snapshot;
mod user_device;
mod vsock;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use migration::{
    MigrationError, ReceiveMigrationData, SendMigrationData, parse_receive_migration,
    parse_send_migration,
};
pub use net::{DEFAULT_NET_QUEUES, NetConfig, NetKexecPolicy};
pub use snapshot::{
    SnapshotRequestError, SnapshotRestore, VmRestoreConfig, VmSnapshotConfig, parse_vm_restore,
};
pub use user_device::UserDeviceConfig;
pub use vsock::VsockConfig;

pub use cli::{
    LUO_URL_SCHEME, LiveUpdateSource, PathOrFd, RestoreConfig, RestoreSource, VmCliArgs,
    parse_api_socket, parse_device, parse_event_monitor, parse_liveupdate, parse_net,
    parse_restore, parse_size, parse_user_device, parse_vsock,
};

/// Default guest RAM size, as cloud-hypervisor: 512 MiB.
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Smallest guest RAM we accept: 64 MiB (room for the boot structures, kernel and initramfs).
pub const MIN_MEMORY_SIZE: u64 = 64 << 20;
/// Guest RAM must be a whole number of these (the host page size backing the memfd).
pub const MEMORY_ALIGNMENT: u64 = 4 << 10;
/// Largest vCPU count: x86 APIC ids 0..=254 (255 is the broadcast id), as cloud-hypervisor.
pub const MAX_VCPUS: u8 = 254;
/// Default entropy source of the virtio-rng device.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

/// Errors from parsing or validating a VM configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `key=value` option has a key the flag does not know.
    #[error("Unknown key '{key}' in --{flag}")]
    UnknownKey {
        /// The flag, without dashes.
        flag: &'static str,
        /// The unknown key.
        key: String,
    },
    /// A value could not be parsed.
    #[error("Invalid value '{value}' for --{flag} {key}: {reason}")]
    InvalidValue {
        /// The flag, without dashes.
        flag: &'static str,
        /// The key inside the flag's value (or the flag again for bare values).
        key: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A required key is missing from a flag's value.
    #[error("Missing key '{key}' in --{flag}")]
    MissingKey {
        /// The flag, without dashes.
        flag: &'static str,
        /// The missing key.
        key: &'static str,
    },
    /// The JSON document is not a valid configuration object.
    #[error("Invalid {what} JSON: {reason}")]
    Json {
        /// cloud-hypervisor's name of the object, e.g. `VmConfig`.
        what: &'static str,
        /// What serde found wrong.
        reason: String,
    },
    /// A JSON configuration sets keys we cannot honour or that nobody knows.
    #[error("{}", json::unsupported_message(.unsupported, .unknown))]
    Unsupported {
        /// Paths of cloud-hypervisor's keys set to a value we cannot honour, sorted.
        unsupported: Vec<String>,
        /// Paths of keys cloud-hypervisor does not know either, sorted.
        unknown: Vec<String>,
    },
    /// `boot_vcpus` is zero or above `max_vcpus`, or `max_vcpus` is above the limit.
    #[error("Invalid vCPU counts boot={boot} max={max} (need 1 <= boot <= max <= {MAX_VCPUS})")]
    InvalidVcpus {
        /// Requested boot vCPUs.
        boot: u8,
        /// Requested maximum vCPUs.
        max: u8,
    },
    /// More vCPUs than boot ones: we have no CPU hot-plug.
    #[error("CPU hot-plug is not supported: max_vcpus {max} must equal boot_vcpus {boot}")]
    VcpuHotplugNotSupported {
        /// Requested boot vCPUs.
        boot: u8,
        /// Requested maximum vCPUs.
        max: u8,
    },
    /// Guest RAM is too small or not 4 KiB aligned.
    #[error("Invalid memory size {0} (need at least 64 MiB and a multiple of 4 KiB)")]
    InvalidMemorySize(u64),
    /// Hugepages cannot be preserved by live update.
    #[error("Live update needs shmem-backed RAM; hugepages=on is not supported")]
    HugepagesNotSupported,
    /// Neither a kernel nor a firmware was given.
    #[error("The payload needs a kernel")]
    MissingKernel,
    /// A file named in the configuration does not exist.
    #[error("The {what} '{path}' does not exist")]
    MissingFile {
        /// What the file is for ("kernel", "disk", ...).
        what: &'static str,
        /// The path as given.
        path: PathBuf,
    },
    /// Serial and console both want the controlling terminal.
    #[error("Serial and console cannot both use the tty")]
    TtyConflict,
    /// A `File` mode without a file.
    #[error("The {0} mode File needs a file path")]
    MissingOutputFile(&'static str),
    /// A `Socket` mode without a socket path.
    #[error("The {0} mode Socket needs a socket path")]
    MissingSocketPath(&'static str),
    /// A mode we do not implement.
    #[error("The {device} mode {mode:?} is not supported")]
    UnsupportedMode {
        /// "serial" or "console".
        device: &'static str,
        /// The refused mode.
        mode: ConsoleMode,
    },
    /// Two disks share an id.
    #[error("Duplicate disk id '{0}'")]
    DuplicateDiskId(String),
    /// Two devices (of any kinds) share an id.
    #[error("Duplicate device id '{0}'")]
    DuplicateDeviceId(String),
    /// A VM has one vsock device.
    #[error("The VM has a vsock device already")]
    VsockExists,
    /// Two VFIO devices name the same host device.
    #[error("Duplicate VFIO device path '{}'", .0.display())]
    DuplicateDevicePath(PathBuf),
}

/// The VM configuration, in cloud-hypervisor's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPU counts.
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM.
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot (required in JSON, as cloud-hypervisor).
    pub payload: PayloadConfig,
    /// virtio-blk disks, in order.
    #[serde(
        default,
        deserialize_with = "json::null_as_default",
        serialize_with = "json::empty_as_null"
    )]
    pub disks: Vec<DiskConfig>,
    /// Network cards, in order.
    #[serde(
        default,
        deserialize_with = "json::null_as_default",
        serialize_with = "json::empty_as_null"
    )]
    pub net: Vec<NetConfig>,
    /// vfio-user devices, in order.
    #[serde(
        default,
        deserialize_with = "json::null_as_default",
        serialize_with = "json::empty_as_null"
    )]
    pub user_devices: Vec<UserDeviceConfig>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Kernel VFIO devices (`--device`), in order.
    #[serde(
        default,
        deserialize_with = "json::null_as_default",
        serialize_with = "json::empty_as_null"
    )]
    pub devices: Vec<DeviceConfig>,
    /// The legacy 16550 serial port.
    #[serde(default = "ConsoleConfig::default_serial")]
    pub serial: ConsoleConfig,
    /// The virtio console.
    #[serde(default = "ConsoleConfig::default_console")]
    pub console: ConsoleConfig,
    /// The virtio-rng device (always present, as cloud-hypervisor).
    #[serde(default)]
    pub rng: RngConfig,
}

/// vCPU counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    #[serde(default = "one")]
    pub boot_vcpus: u8,
    /// vCPUs the VM may ever have.
    #[serde(default = "one")]
    pub max_vcpus: u8,
}

/// Guest RAM. It is always a shared memfd (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Size in bytes.
    #[serde(default = "default_memory_size")]
    pub size: u64,
    /// Accepted for compatibility; RAM is shared regardless.
    #[serde(default)]
    pub shared: bool,
    /// Must be false: hugetlb memory cannot be live-updated.
    #[serde(default)]
    pub hugepages: bool,
}

/// What to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Firmware image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Device id (for counters and the API); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// One host PCI device assigned through kernel VFIO (`--device`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// The device's sysfs path, `/sys/bus/pci/devices/<BDF>`, bound to vfio-pci.
    pub path: PathBuf,
    /// Device id (for the API); `vm.add-device` fills in `_vfio_device<N>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What a kexec-mode live update does with the device (restart mode always hands it over).
    /// Left out of the JSON when it is the default, as cloud-hypervisor has no such field.
    #[serde(default, skip_serializing_if = "KexecPolicy::is_default")]
    pub kexec: KexecPolicy,
    /// Removed from the running VM (`vm.remove-device`, or the guest ejected it). It keeps its
    /// place, and so the slots and MSI vectors of the devices after it, until the next boot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// What a kexec-mode live update does with a VFIO device, which no kernel can carry across a
/// kexec today (`--device ...,kexec=refuse|detach`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KexecPolicy {
    /// The update is refused in prepare, the guest untouched.
    #[default]
    Refuse,
    /// The guest is asked to release the device (a hot-unplug) before the update, and it is
    /// added again (a hot-plug) once the VM runs on the new kernel.
    Detach,
}

impl KexecPolicy {
    /// Whether this is the default, [`KexecPolicy::Refuse`].
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Where a serial port or console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// No device at all.
    Off,
    /// A new pseudo-terminal.
    Pty,
    /// The VMM's own terminal (stdin/stdout).
    Tty,
    /// Output appended to a file.
    File,
    /// A UNIX socket the VMM listens on (the serial port only).
    Socket,
    /// The device exists but output is dropped.
    Null,
}

/// The serial port or the console (same shape in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    /// Where output goes.
    pub mode: ConsoleMode,
    /// Output file, for mode `File`; for mode `Pty`, the pty's path once it is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The socket's path, for mode `Socket`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// The virtio-rng device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngConfig {
    /// Host entropy source.
    #[serde(default = "default_rng_source")]
    pub src: PathBuf,
}

fn one() -> u8 {
    1
}

fn default_memory_size() -> u64 {
    DEFAULT_MEMORY_SIZE
}

fn default_rng_source() -> PathBuf {
    PathBuf::from(DEFAULT_RNG_SOURCE)
}

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: 1,
            max_vcpus: 1,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY_SIZE,
            shared: false,
            hugepages: false,
        }
    }
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            src: default_rng_source(),
        }
    }
}

impl ConsoleConfig {
    /// The serial port's default: present, output dropped.
    pub fn default_serial() -> Self {
        Self {
            mode: ConsoleMode::Null,
            file: None,
            socket: None,
        }
    }

    /// The console's default: the VMM's terminal.
    pub fn default_console() -> Self {
        Self {
            mode: ConsoleMode::Tty,
            file: None,
            socket: None,
        }
    }

    fn validate(&self, device: &'static str) -> Result<(), ConfigError> {
        match self.mode {
            ConsoleMode::File if self.file.is_none() => Err(ConfigError::MissingOutputFile(device)),
            // As cloud-hypervisor: only the serial port listens on a socket.
            ConsoleMode::Socket if device != "serial" => Err(ConfigError::UnsupportedMode {
                device,
                mode: self.mode,
            }),
            ConsoleMode::Socket if self.socket.is_none() => {
                Err(ConfigError::MissingSocketPath(device))
            }
            _ => Ok(()),
        }
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            payload: PayloadConfig::default(),
            disks: Vec::new(),
            net: Vec::new(),
            user_devices: Vec::new(),
            vsock: None,
            devices: Vec::new(),
            serial: ConsoleConfig::default_serial(),
            console: ConsoleConfig::default_console(),
            rng: RngConfig::default(),
        }
    }
}

fn check_exists(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.exists() {
        Ok(())
    } else {
        Err(ConfigError::MissingFile {
            what,
            path: path.to_path_buf(),
        })
    }
}

impl VmConfig {
    /// Checks the configuration before a VM is built from it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (boot, max) = (self.cpus.boot_vcpus, self.cpus.max_vcpus);
        if boot == 0 || boot > max || max > MAX_VCPUS {
            return Err(ConfigError::InvalidVcpus { boot, max });
        }
        if max != boot {
            return Err(ConfigError::VcpuHotplugNotSupported { boot, max });
        }
        let size = self.memory.size;
        if size < MIN_MEMORY_SIZE || !size.is_multiple_of(MEMORY_ALIGNMENT) {
            return Err(ConfigError::InvalidMemorySize(size));
        }
        if self.memory.hugepages {
            return Err(ConfigError::HugepagesNotSupported);
        }
        match (&self.payload.kernel, &self.payload.firmware) {
            (Some(kernel), _) => check_exists("kernel", kernel)?,
            (None, Some(firmware)) => check_exists("firmware", firmware)?,
            (None, None) => return Err(ConfigError::MissingKernel),
        }
        if let Some(initramfs) = &self.payload.initramfs {
            check_exists("initramfs", initramfs)?;
        }
        let mut ids = std::collections::BTreeSet::new();
        for disk in &self.disks {
            check_exists("disk", &disk.path)?;
            if let Some(id) = &disk.id
                && !ids.insert(id.clone())
            {
                return Err(ConfigError::DuplicateDiskId(id.clone()));
            }
        }
        for (index, net) in self.net.iter().enumerate() {
            net.validate()?;
            let id = self.net_id(index);
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId(id));
            }
        }
        if let (Some(vsock), Some(id)) = (&self.vsock, self.vsock_id()) {
            vsock.validate()?;
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId(id));
            }
        }
        for index in 0..self.user_devices.len() {
            let id = self.user_device_id(index);
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId(id));
            }
        }
        for (index, device) in self.devices.iter().enumerate() {
            device.check_path()?;
            let id = self.vfio_device_id(index);
            if !ids.insert(id.clone()) {
                return Err(ConfigError::DuplicateDeviceId(id));
            }
            if self.devices[..index]
                .iter()
                .any(|other| other.is_same_host_device(device))
            {
                return Err(ConfigError::DuplicateDevicePath(device.path.clone()));
            }
        }
        self.serial.validate("serial")?;
        self.console.validate("console")?;
        if self.serial.mode == ConsoleMode::Tty && self.console.mode == ConsoleMode::Tty {
            return Err(ConfigError::TtyConflict);
        }
        check_exists("entropy source", &self.rng.src)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config whose files all exist (this source file stands in for kernel and disk).
    pub(super) fn valid_config() -> VmConfig {
        let existing = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/config/mod.rs");
        VmConfig {
            payload: PayloadConfig {
                kernel: Some(existing.clone()),
                ..PayloadConfig::default()
            },
            disks: vec![DiskConfig {
                path: existing,
                readonly: false,
                id: Some("disk0".to_string()),
            }],
            console: ConsoleConfig::default_serial(),
            ..VmConfig::default()
        }
    }

    #[test]
    fn valid_config_passes() {
        assert_eq!(valid_config().validate(), Ok(()));
    }

    #[test]
    fn four_vcpus_pass() {
        let mut config = valid_config();
        config.cpus = CpusConfig {
            boot_vcpus: 4,
            max_vcpus: 4,
        };

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn zero_vcpus_are_refused() {
        let mut config = valid_config();
        config.cpus.boot_vcpus = 0;

        assert_eq!(
            config.validate(),
            Err(ConfigError::InvalidVcpus { boot: 0, max: 1 })
        );
    }

    #[test]
    fn boot_above_max_vcpus_is_refused() {
        let mut config = valid_config();
        config.cpus = CpusConfig {
            boot_vcpus: 4,
            max_vcpus: 2,
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::InvalidVcpus { boot: 4, max: 2 })
        );
    }

    #[test]
    fn more_max_than_boot_vcpus_is_refused_as_cpu_hotplug() {
        let mut config = valid_config();
        config.cpus = CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 4,
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::VcpuHotplugNotSupported { boot: 2, max: 4 })
        );
    }

    #[test]
    fn small_or_unaligned_memory_is_refused() {
        let mut small = valid_config();
        small.memory.size = 32 << 20;
        let mut unaligned = valid_config();
        unaligned.memory.size = (128 << 20) + 1;

        assert_eq!(
            small.validate(),
            Err(ConfigError::InvalidMemorySize(32 << 20))
        );
        assert_eq!(
            unaligned.validate(),
            Err(ConfigError::InvalidMemorySize((128 << 20) + 1))
        );
    }

    #[test]
    fn hugepages_are_refused_for_live_update() {
        let mut config = valid_config();
        config.memory.hugepages = true;

        let error = config.validate().unwrap_err();

        assert_eq!(error, ConfigError::HugepagesNotSupported);
        assert!(error.to_string().contains("hugepages=on is not supported"));
    }

    #[test]
    fn unshared_memory_is_accepted() {
        let mut config = valid_config();
        config.memory.shared = false;

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn missing_kernel_file_is_named() {
        let mut config = valid_config();
        config.payload.kernel = Some(PathBuf::from("/nonexistent/vmlinux"));

        assert_eq!(
            config.validate(),
            Err(ConfigError::MissingFile {
                what: "kernel",
                path: PathBuf::from("/nonexistent/vmlinux")
            })
        );
    }

    #[test]
    fn payload_without_kernel_is_refused() {
        let mut config = valid_config();
        config.payload.kernel = None;

        assert_eq!(config.validate(), Err(ConfigError::MissingKernel));
    }

    #[test]
    fn missing_disk_file_is_named() {
        let mut config = valid_config();
        config.disks[0].path = PathBuf::from("/nonexistent/disk.img");

        let error = config.validate().unwrap_err();

        assert!(
            error.to_string().contains("/nonexistent/disk.img"),
            "{error}"
        );
    }

    #[test]
    fn duplicate_disk_ids_are_refused() {
        let mut config = valid_config();
        config.disks.push(config.disks[0].clone());

        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateDiskId("disk0".to_string()))
        );
    }

    #[test]
    fn serial_and_console_on_the_tty_conflict() {
        let mut config = valid_config();
        config.serial = ConsoleConfig::default_console();
        config.console = ConsoleConfig::default_console();

        assert_eq!(config.validate(), Err(ConfigError::TtyConflict));
    }

    #[test]
    fn file_mode_without_file_is_refused() {
        let mut config = valid_config();
        config.serial = ConsoleConfig {
            mode: ConsoleMode::File,
            file: None,
            socket: None,
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::MissingOutputFile("serial"))
        );
    }

    #[test]
    fn a_vfio_device_that_does_not_exist_is_refused() {
        let mut config = valid_config();
        config.devices.push(DeviceConfig {
            path: PathBuf::from("/sys/bus/pci/devices/no-such-device"),
            id: None,
            kexec: KexecPolicy::Refuse,
            removed: false,
        });

        let result = config.validate();

        assert!(
            matches!(
                result,
                Err(ConfigError::MissingFile {
                    what: "VFIO device",
                    ..
                })
            ),
            "{result:?}"
        );
    }
}
