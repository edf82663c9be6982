//! cloud-hypervisor's configuration schema (`VmConfig` and the `*Config` bodies of `vm.add-*`),
//! key by key: which keys we implement, and which we do not, with the neutral values under
//! which such a key still means "not used". This file is the one list of what we leave out.
//!
//! A JSON document is checked against its schema before it is parsed: every key set to a value
//! we cannot honour, and every key cloud-hypervisor does not know either, is collected with its
//! path (`disks[0].rate_limiter_config`), and all of them are refused in one error. Nothing is
//! dropped silently. Clients written for cloud-hypervisor (Kata's generated client, `ch-remote`,
//! cloud-hypervisor's own `vm.info` sent back) write full objects, so a key we do not implement
//! is accepted when it holds `null` or its neutral value (`iommu: false`, `pci_segment: 0`).
//!
//! The same tables give `vm.info` cloud-hypervisor's shape: [`Schema::fill`] adds every key we
//! leave out with its neutral value, as cloud-hypervisor would write it.
//!
//! Key names are from cloud-hypervisor's OpenAPI document (`vmm/src/api/openapi/
//! cloud-hypervisor.yaml`) and its `vm_config.rs` (fields serialised but not in the document,
//! such as `fds`, `disable_io_uring`, `profile`).

use serde_json::{Map, Value};

/// A value under which a key we do not implement means "not used". `null` always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Neutral {
    /// `null`: listed first where `vm.info` shows `null` for a key that has other neutral
    /// values.
    Null,
    /// `[]`.
    Empty,
    /// This boolean.
    Bool(bool),
    /// This number.
    Int(u64),
    /// This string.
    Str(&'static str),
}

impl Neutral {
    fn matches(self, value: &Value) -> bool {
        match self {
            Self::Null => value.is_null(),
            Self::Empty => value.as_array().is_some_and(Vec::is_empty),
            Self::Bool(b) => value.as_bool() == Some(b),
            Self::Int(n) => value.as_u64() == Some(n),
            Self::Str(s) => value.as_str() == Some(s),
        }
    }

    /// How `vm.info` shows it: an empty list as `null`, as cloud-hypervisor writes a list
    /// nobody gave.
    fn shown(self) -> Value {
        match self {
            Self::Null | Self::Empty => Value::Null,
            Self::Bool(b) => Value::Bool(b),
            Self::Int(n) => Value::from(n),
            Self::Str(s) => Value::from(s),
        }
    }
}

/// How one key of a schema is treated.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// Implemented: the typed parse and `validate` check its value.
    Ours,
    /// Ours only, not cloud-hypervisor's (e.g. `kexec`): implemented, and left out of
    /// `vm.info` when absent.
    Extra,
    /// An object with its own schema; `null` when absent (an `Option` in cloud-hypervisor).
    Object(&'static Schema),
    /// An object with its own schema, written out in full when absent (cloud-hypervisor always
    /// has it).
    Always(&'static Schema),
    /// A list of objects, each with this schema.
    List(&'static Schema),
    /// Not implemented: accepted only as `null` or one of these values; `vm.info` shows the
    /// first (or `null`).
    Unsupported(&'static [Neutral]),
    /// Implemented only when equal to the sibling key `.0` (taken as `.1` when absent), e.g.
    /// `max_vcpus`, as we have no CPU hot-plug.
    SameAs(&'static str, Neutral),
}

/// The keys of one configuration object.
#[derive(Debug)]
pub(super) struct Schema {
    keys: &'static [(&'static str, Kind)],
}

/// What a check found: keys we cannot honour, and keys nobody knows, by path.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Findings {
    pub(super) unsupported: Vec<String>,
    pub(super) unknown: Vec<String>,
}

impl Findings {
    pub(super) fn is_empty(&self) -> bool {
        self.unsupported.is_empty() && self.unknown.is_empty()
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

impl Schema {
    /// Checks `value` (an object, or anything else, which the typed parse then refuses) and
    /// returns every finding under `prefix`, sorted.
    pub(super) fn check(&self, value: &Value, prefix: &str) -> Findings {
        let mut findings = Findings::default();
        self.walk(value, prefix, &mut findings);
        findings.unsupported.sort();
        findings.unknown.sort();
        findings
    }

    fn walk(&self, value: &Value, prefix: &str, findings: &mut Findings) {
        let Some(object) = value.as_object() else {
            return;
        };
        for (key, value) in object {
            let path = join(prefix, key);
            let sibling = |name: &str| object.get(name).filter(|v| !v.is_null());
            let Some((_, kind)) = self.keys.iter().find(|(name, _)| name == key) else {
                findings.unknown.push(path);
                continue;
            };
            match kind {
                Kind::Ours | Kind::Extra => {}
                Kind::Object(schema) | Kind::Always(schema) => schema.walk(value, &path, findings),
                Kind::List(schema) => {
                    for (index, item) in value.as_array().into_iter().flatten().enumerate() {
                        schema.walk(item, &format!("{path}[{index}]"), findings);
                    }
                }
                Kind::Unsupported(neutral) => {
                    if !value.is_null() && !neutral.iter().any(|n| n.matches(value)) {
                        findings.unsupported.push(path);
                    }
                }
                Kind::SameAs(other, absent) => {
                    let same = match sibling(other) {
                        Some(other) => other == value,
                        None => absent.matches(value),
                    };
                    if !value.is_null() && !same {
                        findings.unsupported.push(path);
                    }
                }
            }
        }
    }

    /// Adds each key of the schema missing from `value` with the value cloud-hypervisor would
    /// write for it, through nested objects and lists.
    pub(super) fn fill(&self, value: &mut Value) {
        let Some(object) = value.as_object_mut() else {
            return;
        };
        for (key, kind) in self.keys {
            match (object.get_mut(*key), kind) {
                (Some(_), Kind::Ours | Kind::Extra | Kind::Unsupported(_) | Kind::SameAs(..))
                | (None, Kind::Extra) => {}
                (Some(inner), Kind::Object(schema) | Kind::Always(schema)) => schema.fill(inner),
                (Some(inner), Kind::List(schema)) => {
                    for item in inner.as_array_mut().into_iter().flatten() {
                        schema.fill(item);
                    }
                }
                (None, Kind::Ours | Kind::SameAs(..) | Kind::Object(_) | Kind::List(_)) => {
                    object.insert((*key).to_string(), Value::Null);
                }
                (None, Kind::Always(schema)) => {
                    let mut inner = Value::Object(Map::new());
                    schema.fill(&mut inner);
                    object.insert((*key).to_string(), inner);
                }
                (None, Kind::Unsupported(neutral)) => {
                    let shown = neutral.first().map_or(Value::Null, |n| n.shown());
                    object.insert((*key).to_string(), shown);
                }
            }
        }
    }
}

/// Why a key is left out, where the key's name alone does not say it: shown after the key in
/// the error.
const WHY: &[(&str, &str)] = &[
    (
        "memory.hugepages",
        "hugetlb memory cannot be preserved by a live update",
    ),
    (
        "cpus.max_vcpus",
        "no CPU hot-plug: it must equal boot_vcpus",
    ),
];

/// Why the key at `path` is left out, when [`WHY`] says.
pub(super) fn why(path: &str) -> Option<&'static str> {
    WHY.iter()
        .find(|(key, _)| *key == path)
        .map(|(_, why)| *why)
}

use Kind::{Always, Extra, List, Object, Ours, SameAs, Unsupported};
use Neutral::{Bool, Empty, Int, Null, Str};

/// Only `null` (or absent) means "not used".
const NONE: Kind = Unsupported(&[]);
/// A list we do not implement: `null` or `[]`.
const EMPTY: Kind = Unsupported(&[Empty]);
const FALSE: Kind = Unsupported(&[Bool(false)]);
const TRUE: Kind = Unsupported(&[Bool(true)]);
/// PCI segment 0, the only one we have.
const SEGMENT_0: Kind = Unsupported(&[Int(0)]);

/// `VmConfig`, the body of `vm.create`.
pub(super) static VM: Schema = Schema {
    keys: &[
        ("cpus", Always(&CPUS)),
        ("memory", Always(&MEMORY)),
        ("payload", Object(&PAYLOAD)),
        ("rate_limit_groups", EMPTY),
        ("disks", List(&DISK)),
        ("net", List(&NET)),
        ("rng", Always(&RNG)),
        ("balloon", NONE),
        ("fs", EMPTY),
        ("generic_vhost_user", EMPTY),
        ("pmem", EMPTY),
        ("serial", Always(&CONSOLE)),
        ("console", Always(&CONSOLE)),
        ("debug_console", Always(&DEBUG_CONSOLE)),
        ("devices", List(&DEVICE)),
        ("user_devices", List(&USER_DEVICE)),
        ("vdpa", EMPTY),
        ("vsock", Object(&VSOCK)),
        ("numa", EMPTY),
        ("iommu", FALSE),
        ("watchdog", FALSE),
        ("rtc", NONE),
        ("pvpanic", FALSE),
        ("pci_segments", EMPTY),
        ("platform", Object(&PLATFORM)),
        ("tpm", NONE),
        ("landlock_enable", FALSE),
        ("landlock_rules", EMPTY),
        ("pvmemcontrol", NONE),
        ("gdb", FALSE),
        ("ivshmem", NONE),
        // Older releases (SGX was removed in v39); their clients may still send it empty.
        ("sgx_epc", EMPTY),
    ],
};

static CPUS: Schema = Schema {
    keys: &[
        ("boot_vcpus", Ours),
        ("max_vcpus", SameAs("boot_vcpus", Int(1))),
        ("topology", NONE),
        ("kvm_hyperv", FALSE),
        ("max_phys_bits", Unsupported(&[Int(46)])),
        ("nested", TRUE),
        ("affinity", EMPTY),
        ("features", Always(&CPU_FEATURES)),
        ("core_scheduling", Unsupported(&[Str("Vm")])),
        ("profile", Unsupported(&[Str("Host")])),
    ],
};

static CPU_FEATURES: Schema = Schema {
    keys: &[("amx", FALSE)],
};

static MEMORY: Schema = Schema {
    keys: &[
        ("size", Ours),
        // Accepted, and changes nothing: guest RAM is always a shared memfd.
        ("shared", Ours),
        // Live update cannot preserve hugetlb memfds.
        ("hugepages", FALSE),
        ("hugepage_size", NONE),
        ("hotplug_size", Unsupported(&[Null, Int(0)])),
        ("hotplugged_size", Unsupported(&[Null, Int(0)])),
        ("mergeable", FALSE),
        ("hotplug_method", Unsupported(&[Str("Acpi")])),
        ("prefault", FALSE),
        ("reserve", FALSE),
        ("thp", TRUE),
        ("zones", EMPTY),
    ],
};

static PAYLOAD: Schema = Schema {
    keys: &[
        ("kernel", Ours),
        ("initramfs", Ours),
        ("cmdline", Ours),
        ("firmware", Ours),
        ("igvm", NONE),
        ("host_data", NONE),
        ("fw_cfg_config", NONE),
    ],
};

/// `DiskConfig`, also the body of `vm.add-disk`.
pub(super) static DISK: Schema = Schema {
    keys: &[
        ("path", Ours),
        ("readonly", Ours),
        ("id", Ours),
        ("direct", FALSE),
        ("iommu", FALSE),
        ("num_queues", Unsupported(&[Int(1)])),
        // The device offers 256 entries; cloud-hypervisor's default of 128 is a maximum the
        // guest driver may stay under, so it is accepted too.
        ("queue_size", Unsupported(&[Int(256), Int(128)])),
        ("vhost_user", FALSE),
        ("vhost_socket", NONE),
        ("rate_limiter_config", NONE),
        ("rate_limit_group", NONE),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
        ("serial", NONE),
        ("queue_affinity", EMPTY),
        ("backing_files", FALSE),
        ("sparse", TRUE),
        // Images are raw; "Unknown" (cloud-hypervisor's "detect") is read as raw.
        ("image_type", Unsupported(&[Str("Raw"), Str("Unknown")])),
        ("lock_granularity", Unsupported(&[Str("ByteRange")])),
        ("disable_io_uring", FALSE),
        ("disable_aio", FALSE),
    ],
};

/// `NetConfig`, also the body of `vm.add-net`.
pub(super) static NET: Schema = Schema {
    keys: &[
        ("tap", Ours),
        ("ip", Ours),
        ("mask", Ours),
        ("mac", Ours),
        ("host_mac", Ours),
        ("mtu", Ours),
        ("num_queues", Ours),
        ("queue_size", Ours),
        ("id", Ours),
        ("fds", Ours),
        ("offload_tso", Ours),
        ("offload_ufo", Ours),
        ("offload_csum", Ours),
        ("kexec", Extra),
        ("removed", Extra),
        ("iommu", FALSE),
        ("vhost_user", FALSE),
        ("vhost_socket", NONE),
        ("vhost_mode", Unsupported(&[Str("Client")])),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
        ("rate_limiter_config", NONE),
    ],
};

static RNG: Schema = Schema {
    keys: &[
        ("src", Ours),
        ("iommu", FALSE),
        ("id", NONE),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
    ],
};

/// The serial port and the virtio console: one type in cloud-hypervisor.
static CONSOLE: Schema = Schema {
    keys: &[
        ("mode", Ours),
        ("file", Ours),
        ("socket", Ours),
        ("iommu", FALSE),
        ("id", NONE),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
    ],
};

/// The x86 debug port (0xe9) console, which we do not have: off.
static DEBUG_CONSOLE: Schema = Schema {
    keys: &[
        ("mode", Unsupported(&[Str("Off")])),
        ("file", NONE),
        ("iobase", Unsupported(&[Int(0xe9)])),
    ],
};

/// `DeviceConfig` (kernel VFIO), also the body of `vm.add-device`.
pub(super) static DEVICE: Schema = Schema {
    keys: &[
        ("path", Ours),
        ("id", Ours),
        ("kexec", Extra),
        ("removed", Extra),
        ("iommu", FALSE),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
        ("x_nv_gpudirect_clique", NONE),
        ("x_exclude_mmap_bars", EMPTY),
    ],
};

/// `UserDeviceConfig` (vfio-user), also the body of `vm.add-user-device`.
pub(super) static USER_DEVICE: Schema = Schema {
    keys: &[
        ("socket", Ours),
        ("id", Ours),
        ("persist", Extra),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
    ],
};

/// `VsockConfig`, also the body of `vm.add-vsock`.
pub(super) static VSOCK: Schema = Schema {
    keys: &[
        ("cid", Ours),
        ("socket", Ours),
        ("id", Ours),
        ("removed", Extra),
        ("iommu", FALSE),
        ("pci_segment", SEGMENT_0),
        ("pci_device_id", NONE),
    ],
};

/// Platform settings: all left at cloud-hypervisor's defaults (one PCI segment, no SMBIOS
/// strings, no confidential computing).
static PLATFORM: Schema = Schema {
    keys: &[
        ("num_pci_segments", Unsupported(&[Int(1)])),
        ("iommu_segments", EMPTY),
        ("iommu_address_width_bits", Unsupported(&[Int(64)])),
        ("serial_number", NONE),
        ("system_serial_number", NONE),
        ("uuid", NONE),
        ("system_uuid", NONE),
        ("oem_strings", EMPTY),
        ("system_manufacturer", NONE),
        ("system_product_name", NONE),
        ("system_version", NONE),
        ("system_family", NONE),
        ("system_sku_number", NONE),
        ("chassis_asset_tag", NONE),
        ("tdx", FALSE),
        ("sev_snp", FALSE),
        ("iommufd", FALSE),
        ("vfio_p2p_dma", TRUE),
    ],
};

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn check(value: &Value) -> Findings {
        VM.check(value, "")
    }

    #[test]
    fn every_unsupported_key_is_named_with_its_path_in_one_sorted_list() {
        let config = json!({
            "payload": {"kernel": "/vmlinux"},
            "pmem": [{"file": "/pmem.img"}],
            "balloon": {"size": 0},
            "memory": {"size": 1073741824, "hotplug_size": 1073741824},
            "disks": [{"path": "/a.img"}, {"path": "/b.img", "rate_limiter_config": {}}],
        });

        let findings = check(&config);

        assert_eq!(
            findings.unsupported,
            [
                "balloon",
                "disks[1].rate_limiter_config",
                "memory.hotplug_size",
                "pmem"
            ]
        );
        assert!(findings.unknown.is_empty());
    }

    #[test]
    fn neutral_values_and_nulls_are_accepted() {
        let config = json!({
            "payload": {"kernel": "/vmlinux", "igvm": null},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": false, "max_phys_bits": 46,
                     "nested": true, "features": {"amx": false}, "affinity": null},
            "memory": {"size": 1073741824, "mergeable": false, "hotplug_method": "Acpi",
                       "thp": true, "zones": []},
            "disks": [{"path": "/a.img", "iommu": false, "pci_segment": 0, "num_queues": 1,
                       "queue_size": 128, "image_type": "Raw", "rate_limiter_config": null}],
            "serial": {"mode": "Null", "file": null, "socket": null},
            "fs": [], "pmem": null, "balloon": null, "numa": null,
            "iommu": false, "watchdog": false, "pvpanic": false,
            "platform": {"num_pci_segments": 1, "iommu_segments": null},
        });

        assert_eq!(check(&config), Findings::default());
    }

    #[test]
    fn a_key_we_do_not_implement_set_to_another_value_is_refused() {
        let config = json!({
            "payload": {"kernel": "/vmlinux"},
            "iommu": true,
            "platform": {"num_pci_segments": 2},
            "disks": [{"path": "/a.img", "pci_segment": 1, "image_type": "Qcow2"}],
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1, "features": {"amx": true}},
        });

        assert_eq!(
            check(&config).unsupported,
            [
                "cpus.features.amx",
                "disks[0].image_type",
                "disks[0].pci_segment",
                "iommu",
                "platform.num_pci_segments"
            ]
        );
    }

    #[test]
    fn max_vcpus_is_accepted_only_equal_to_boot_vcpus() {
        let cpus = |cpus: Value| check(&json!({"payload": {}, "cpus": cpus})).unsupported;

        let equal = cpus(json!({"boot_vcpus": 4, "max_vcpus": 4}));
        let above = cpus(json!({"boot_vcpus": 1, "max_vcpus": 4}));
        let default_boot = cpus(json!({"max_vcpus": 2}));

        assert!(equal.is_empty(), "{equal:?}");
        assert_eq!(above, ["cpus.max_vcpus"]);
        assert_eq!(default_boot, ["cpus.max_vcpus"]);
    }

    #[test]
    fn keys_nobody_knows_are_named_apart() {
        let config = json!({
            "payload": {"kernel": "/vmlinux"},
            "frobnicate": 1,
            "net": [{"tap": "t0", "colour": "blue"}],
            "fs": [{"tag": "x", "socket": "/s"}],
        });

        let findings = check(&config);

        assert_eq!(findings.unknown, ["frobnicate", "net[0].colour"]);
        assert_eq!(findings.unsupported, ["fs"]);
    }

    #[test]
    fn fill_writes_what_we_leave_out_as_cloud_hypervisor_would() {
        let mut config = json!({
            "payload": {"kernel": "/vmlinux"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "net": [{"tap": "t0", "kexec": "fds"}],
        });

        VM.fill(&mut config);

        assert_eq!(config["balloon"], Value::Null);
        assert_eq!(config["iommu"], false);
        assert_eq!(config["cpus"]["max_phys_bits"], 46);
        assert_eq!(config["cpus"]["features"], json!({"amx": false}));
        assert_eq!(config["payload"]["initramfs"], Value::Null);
        assert_eq!(
            config["debug_console"],
            json!({"mode": "Off", "file": null, "iobase": 0xe9})
        );
        assert_eq!(config["platform"], Value::Null);
        assert_eq!(config["net"][0]["vhost_mode"], "Client");
        assert_eq!(config["net"][0]["kexec"], "fds");
        assert!(config["net"][0].get("removed").is_none(), "{config}");
        assert_eq!(check(&config), Findings::default());
    }
}
