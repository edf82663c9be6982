//! Real-world cloud-hypervisor configurations (`tests/data/ch-configs/*.json`, written from
//! cloud-hypervisor's documentation, its own `vm.info` and Kata Containers' shape) sent to
//! `vm.create`: each one we support is accepted and `vm.info` shows every key as sent; each
//! one we do not is refused with 400, naming every key we cannot honour, as its `.expect` file
//! lists them. Also: the `vm.add-*` bodies follow the same rule, and a booted VM's `vm.info`
//! carries its device tree.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use common::{VmmProcess, probe_guest, repo_root, require_kvm, scratch_dir};

const START: Duration = Duration::from_secs(10);
const BOOT: Duration = Duration::from_secs(30);

/// What a corpus file's `.expect` says.
#[derive(Debug)]
enum Expectation {
    /// `accepted`, with `shown <path> <json>` lines for keys `vm.info` shows otherwise.
    Accepted { shown: BTreeMap<String, Value> },
    /// `refused`, with one `unsupported <path>` or `unknown <path>` line per key.
    Refused {
        unsupported: BTreeSet<String>,
        unknown: BTreeSet<String>,
    },
}

fn corpus_dir() -> PathBuf {
    repo_root().join("tests/data/ch-configs")
}

fn parse_expectation(text: &str) -> Expectation {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'));
    let (mut shown, mut unsupported, mut unknown) =
        (BTreeMap::new(), BTreeSet::new(), BTreeSet::new());
    let outcome = lines.next().unwrap_or_default();
    for line in lines {
        match line.split_once(' ') {
            Some(("shown", rest)) => {
                let (path, value) = rest.split_once(' ').unwrap();
                shown.insert(path.to_string(), serde_json::from_str(value).unwrap());
            }
            Some(("unsupported", path)) => {
                unsupported.insert(path.to_string());
            }
            Some(("unknown", path)) => {
                unknown.insert(path.to_string());
            }
            _ => panic!("bad expectation line {line:?}"),
        }
    }
    match outcome {
        "accepted" => Expectation::Accepted { shown },
        "refused" => Expectation::Refused {
            unsupported,
            unknown,
        },
        other => panic!("an expectation starts with accepted or refused, not {other:?}"),
    }
}

/// Every corpus file, by name, with its expectation; `@KERNEL@` and `@DIR@` in the JSON stand
/// for the probe guest and `dir`.
fn corpus(dir: &Path) -> Vec<(String, Value, Expectation)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("@KERNEL@", probe_guest().to_str().unwrap())
                .replace("@DIR@", dir.to_str().unwrap());
            let config = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expect = std::fs::read_to_string(path.with_extension("expect"))
                .unwrap_or_else(|e| panic!("{name}.expect: {e}"));
            (name, config, parse_expectation(&expect))
        })
        .collect()
}

/// The keys an `Unsupported configuration: a, b (why); Unknown configuration keys: c` message
/// lists, as (unsupported, unknown).
fn listed_keys(message: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut unsupported, mut unknown) = (BTreeSet::new(), BTreeSet::new());
    for part in message.split("; ") {
        let (set, keys) = if let Some(keys) = part.strip_prefix("Unsupported configuration: ") {
            (&mut unsupported, keys)
        } else if let Some(keys) = part.strip_prefix("Unknown configuration keys: ") {
            (&mut unknown, keys)
        } else {
            panic!("not a list of keys: {part:?}");
        };
        for key in keys.split(", ") {
            let key = key.split_once(" (").map_or(key, |(key, _why)| key);
            set.insert(key.to_string());
        }
    }
    (unsupported, unknown)
}

/// "Nothing given", as cloud-hypervisor writes it either way.
fn is_none(value: &Value) -> bool {
    value.is_null() || value.as_array().is_some_and(Vec::is_empty)
}

/// Where `shown` in `vm.info` differs from what was `sent`, by path (`shown` lists the keys
/// expected to differ, with what `vm.info` shows instead).
fn differences(
    sent: &Value,
    shown: &Value,
    path: &str,
    expected: &BTreeMap<String, Value>,
    out: &mut Vec<String>,
) {
    if let Some(value) = expected.get(path) {
        if shown != value {
            out.push(format!("{path}: shown {shown}, expected {value}"));
        }
        return;
    }
    match (sent, shown) {
        (sent, shown) if is_none(sent) && is_none(shown) => {}
        (Value::Object(sent), _) => {
            for (key, value) in sent {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                differences(value, &shown[key.as_str()], &inner, expected, out);
            }
        }
        (Value::Array(sent), Value::Array(items)) if sent.len() == items.len() => {
            for (index, (value, item)) in sent.iter().zip(items).enumerate() {
                differences(value, item, &format!("{path}[{index}]"), expected, out);
            }
        }
        (sent, shown) if sent != shown => {
            out.push(format!("{path}: sent {sent}, shown {shown}"));
        }
        _ => {}
    }
}

/// Creates the files an accepted configuration names as disks (`vm.create` checks they exist).
fn create_disk_files(config: &Value) {
    for disk in config["disks"].as_array().into_iter().flatten() {
        if let Some(path) = disk["path"].as_str().filter(|p| !Path::new(p).exists()) {
            std::fs::write(path, [0u8; 512]).unwrap();
        }
    }
}

fn api_only_vmm(dir: &Path) -> VmmProcess {
    require_kvm();
    let socket = dir.join("api.sock");
    let mut vmm = VmmProcess::spawn(&["--api-socket", socket.to_str().unwrap()], dir);
    vmm.wait_for_api(START);
    vmm
}

/// What went against its expectation when `config` was sent to `vm.create`.
fn run_corpus_file(
    vmm: &VmmProcess,
    name: &str,
    config: &Value,
    expect: &Expectation,
) -> Vec<String> {
    let response = vmm.api("PUT", "vm.create", Some(&config.to_string()));
    let mut failures = Vec::new();
    match expect {
        Expectation::Accepted { shown } => {
            if response.status != 204 {
                return vec![format!(
                    "{name}: {} {:?}",
                    response.status,
                    response.error_messages()
                )];
            }
            let info = vmm.vm_info();
            let mut found = Vec::new();
            differences(config, &info["config"], "", shown, &mut found);
            failures.extend(found.into_iter().map(|f| format!("{name}: {f}")));
            let deleted = vmm.api("PUT", "vm.delete", None);
            assert_eq!(
                deleted.status,
                204,
                "{name}: {:?}",
                deleted.error_messages()
            );
        }
        Expectation::Refused {
            unsupported,
            unknown,
        } => {
            let messages = response.error_messages();
            if response.status != 400 {
                return vec![format!("{name}: {} {messages:?}", response.status)];
            }
            let listed = listed_keys(&messages[0]);
            if listed != (unsupported.clone(), unknown.clone()) {
                failures.push(format!(
                    "{name}: listed {listed:?}, expected {:?}",
                    (unsupported, unknown)
                ));
            }
            let info = vmm.api("GET", "vm.info", None);
            if info.status != 404 {
                failures.push(format!("{name}: a refused config created a VM"));
            }
        }
    }
    failures
}

#[test]
fn every_corpus_config_is_accepted_or_refused_naming_each_key_as_expected() {
    // Arrange
    let dir = scratch_dir("ch-configs");
    let vmm = api_only_vmm(&dir);
    let corpus = corpus(&dir);
    let accepted = corpus
        .iter()
        .filter(|(_, _, expect)| matches!(expect, Expectation::Accepted { .. }))
        .count();
    for (_, config, expect) in &corpus {
        if matches!(expect, Expectation::Accepted { .. }) {
            create_disk_files(config);
        }
    }

    // Act
    let failures: Vec<String> = corpus
        .iter()
        .flat_map(|(name, config, expect)| run_corpus_file(&vmm, name, config, expect))
        .collect();

    // Assert
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(accepted >= 4, "the corpus has {accepted} accepted configs");
    assert!(
        corpus.len() - accepted >= 10,
        "the corpus has too few refused configs"
    );
}

#[test]
fn add_bodies_refuse_every_key_we_cannot_honour_at_once() {
    // Arrange
    let dir = scratch_dir("ch-configs-add");
    let vmm = api_only_vmm(&dir);
    let config = serde_json::json!({"payload": {"kernel": probe_guest()}});
    assert_eq!(
        vmm.api("PUT", "vm.create", Some(&config.to_string()))
            .status,
        204
    );

    // Act
    let net = vmm.api(
        "PUT",
        "vm.add-net",
        Some(r#"{"tap": "chvadd0", "iommu": true, "pci_segment": 0, "rate_limiter_config": {}}"#),
    );
    let vsock = vmm.api(
        "PUT",
        "vm.add-vsock",
        Some(r#"{"cid": 3, "socket": "/tmp/x.sock", "pci_device_id": 3, "colour": 1}"#),
    );
    let device = vmm.api(
        "PUT",
        "vm.add-device",
        Some(r#"{"path": "/sys/bus/pci/devices/0000:00:00.0", "x_exclude_mmap_bars": [0]}"#),
    );

    // Assert
    assert_eq!((net.status, vsock.status, device.status), (400, 400, 400));
    assert_eq!(
        net.error_messages(),
        ["Unsupported configuration: iommu, rate_limiter_config"]
    );
    assert_eq!(
        vsock.error_messages(),
        ["Unsupported configuration: pci_device_id; Unknown configuration keys: colour"]
    );
    assert_eq!(
        device.error_messages(),
        ["Unsupported configuration: x_exclude_mmap_bars"]
    );
    assert_eq!(vmm.vm_info()["config"]["net"], Value::Null);
}

#[test]
fn a_booted_vm_shows_its_device_tree_and_a_created_one_none() {
    // Arrange
    let dir = scratch_dir("ch-configs-tree");
    let vmm = api_only_vmm(&dir);
    let config = serde_json::json!({
        "memory": {"size": 64u64 << 20},
        "payload": {"kernel": probe_guest(), "cmdline": "fill=1 status_ms=300"},
        "disks": [{"path": probe_guest(), "readonly": true, "id": "disk0"}],
        "vsock": {"cid": 3, "socket": dir.join("v.sock")},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    assert_eq!(
        vmm.api("PUT", "vm.create", Some(&config.to_string()))
            .status,
        204
    );
    let created = vmm.vm_info();

    // Act
    assert_eq!(vmm.api("PUT", "vm.boot", None).status, 204);
    vmm.next_banner(0, BOOT);
    let tree = vmm.vm_info()["device_tree"].clone();

    // Assert
    assert!(created.get("device_tree").is_none(), "{created}");
    let ids: Vec<&str> = tree
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ids,
        [
            "_rng",
            "_serial",
            "_virtio-pci-_rng",
            "_virtio-pci-_vsock0",
            "_virtio-pci-disk0",
            "_vsock0",
            "disk0"
        ],
        "{tree}"
    );
    assert_eq!(tree["disk0"]["parent"], "_virtio-pci-disk0");
    assert_eq!(
        tree["_virtio-pci-disk0"]["children"],
        serde_json::json!(["disk0"])
    );
    assert_eq!(tree["_virtio-pci-disk0"]["pci_bdf"], "0000:00:01.0");
    assert_eq!(tree["_virtio-pci-_rng"]["pci_bdf"], "0000:00:02.0");
    assert_eq!(tree["_virtio-pci-_vsock0"]["pci_bdf"], "0000:00:03.0");
    assert!(
        tree["_virtio-pci-disk0"]["resources"][0]["PciBar"]["base"].as_u64() > Some(0),
        "{tree}"
    );
    assert_eq!(
        tree["_serial"]["resources"],
        serde_json::json!([{"PioAddressRange": {"base": 0x3f8, "size": 8}}, {"LegacyIrq": 4}])
    );
}
