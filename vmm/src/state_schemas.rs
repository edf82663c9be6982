//! The shape of every type saved in the live-update state blob, checked against the shapes
//! recorded beside the golden states (`tests/data/golden-states/schemas/<type>.v<version>.json`).
//!
//! postcard is not self-describing: a successor decodes a state by its type alone, so a field
//! added, removed, reordered or retyped under the same version is misread, silently or not.
//! Each type's shape is traced from its serde `Deserialize` (serde-reflection: every field name
//! and type, nested types included) and must equal the file recorded for its current version.
//! A changed shape needs a new version: bump the type's `Versioned::VERSION`, keep the old
//! definition as a frozen struct read in `read_older`, and record the new shape with
//! `CHV_RECORD_SCHEMAS=1 cargo test -p vmm state_schemas` (the old version's file stays).

use std::path::PathBuf;

use devices::legacy::cmos::CmosState;
use devices::legacy::serial::SerialState;
use devices::pci::PciHotplugState;
use devices::virtio::block::BlockState;
use devices::virtio::console::ConsoleState;
use devices::virtio::net::NetState;
use devices::virtio::pci::VirtioPciState;
use devices::virtio::rng::RngState;
use devices::virtio::vsock::VsockState;
use liveupdate::state::Versioned;
use serde_reflection::{Error, Format, Registry, Tracer, TracerConfig};

use crate::cpu::VcpuState;
use crate::device_manager::{
    DetachedVfioState, HostEndState, NetTapState, PciRootState, PciRootStateV1, VsockSocketsState,
};
use crate::interrupts::InterruptState;
use crate::live_update::participants::{
    ClockState, ConfigState, MemoryState, PitState, VcpusState,
};
use crate::platform::IrqchipsState;

/// Environment variable that makes the test record the shapes instead of checking them.
const RECORD_ENV: &str = "CHV_RECORD_SCHEMAS";

/// One saved type: its name in the files and messages, its version, its traced shape.
struct Schema {
    name: &'static str,
    version: u16,
    shape: String,
}

/// Traces `T` and every type inside it. An enum's variants are found one pass at a time: the
/// passes go on while any enum seen so far still has variants left.
fn trace<T: Versioned>() -> serde_reflection::Result<(Format, Registry)> {
    let mut enums: Vec<String> = Vec::new();
    loop {
        let mut tracer = Tracer::new(config());
        let (format, _) = tracer.trace_simple_type::<T>()?;
        for _ in 0..MAX_PASSES {
            let incomplete = enums
                .iter()
                .filter(|name| tracer.check_incomplete_enum(name).is_some())
                .count();
            if incomplete == 0 {
                break;
            }
            tracer.trace_simple_type::<T>()?;
        }
        match tracer.registry() {
            Err(Error::MissingVariants(names)) if names.iter().any(|n| !enums.contains(n)) => {
                enums.extend(names);
                enums.sort();
                enums.dedup();
            }
            traced => return traced.map(|registry| (format, registry)),
        }
    }
}

/// The tracer's settings: the string it makes up is a valid MAC address, as saved states hold
/// some (`MacAddr` parses its string form) and every other string takes any text.
fn config() -> TracerConfig {
    TracerConfig::default()
        .default_string_value(SAMPLE_STRING.into())
        .default_borrowed_str_value(SAMPLE_STRING)
}

const SAMPLE_STRING: &str = "02:00:00:00:00:01";

/// Passes over one type at most (each finds one more variant of every unfinished enum).
const MAX_PASSES: usize = 64;

fn schema<T: Versioned>(name: &'static str) -> Schema {
    let shape = trace::<T>()
        .map_err(|e| e.to_string())
        .and_then(|traced| serde_json::to_string_pretty(&traced).map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("cannot trace the shape of {name}: {e}"));
    Schema {
        name,
        version: T::VERSION,
        shape,
    }
}

/// Every type a participant saves (a new participant adds its type here).
fn saved_types() -> Vec<Schema> {
    vec![
        schema::<ConfigState>("ConfigState"),
        schema::<MemoryState>("MemoryState"),
        schema::<VcpusState>("VcpusState"),
        schema::<VcpuState>("VcpuState"),
        schema::<InterruptState>("InterruptState"),
        schema::<IrqchipsState>("IrqchipsState"),
        schema::<PitState>("PitState"),
        schema::<ClockState>("ClockState"),
        schema::<SerialState>("SerialState"),
        schema::<CmosState>("CmosState"),
        schema::<PciRootState>("PciRootState"),
        schema::<PciRootStateV1>("PciRootState"),
        schema::<PciHotplugState>("PciHotplugState"),
        schema::<VirtioPciState<BlockState>>("VirtioPciState-BlockState"),
        schema::<VirtioPciState<ConsoleState>>("VirtioPciState-ConsoleState"),
        schema::<VirtioPciState<RngState>>("VirtioPciState-RngState"),
        schema::<VirtioPciState<NetState>>("VirtioPciState-NetState"),
        schema::<VirtioPciState<VsockState>>("VirtioPciState-VsockState"),
        schema::<NetTapState>("NetTapState"),
        schema::<VsockSocketsState>("VsockSocketsState"),
        schema::<HostEndState>("HostEndState"),
        schema::<DetachedVfioState>("DetachedVfioState"),
        schema::<vfio::VfioDeviceState>("VfioDeviceState"),
        schema::<vfio_user::VfioUserDeviceState>("VfioUserDeviceState"),
        schema::<vfio_user::VfioUserDeviceStateV1>("VfioUserDeviceState"),
    ]
}

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden-states/schemas")
}

fn file_of(schema: &Schema) -> PathBuf {
    schema_dir().join(format!("{}.v{}.json", schema.name, schema.version))
}

#[test]
fn every_saved_type_has_the_shape_recorded_for_its_version() {
    let schemas = saved_types();
    if std::env::var(RECORD_ENV).is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(schema_dir()).unwrap();
        for schema in &schemas {
            std::fs::write(file_of(schema), format!("{}\n", schema.shape)).unwrap();
        }
        return;
    }

    let mut problems = Vec::new();
    for schema in &schemas {
        let file = file_of(schema);
        let (name, version) = (schema.name, schema.version);
        match std::fs::read_to_string(&file) {
            Err(_) => problems.push(format!(
                "{name} version {version} has no recorded shape ({}): a new type, or a version \
                 bump whose shape is not recorded yet ({RECORD_ENV}=1)",
                file.display()
            )),
            Ok(recorded) if recorded.trim_end() != schema.shape => problems.push(format!(
                "{name} changed its shape without a version bump (still version {version}, \
                 recorded in {}): bump its Versioned::VERSION, keep the old definition frozen \
                 and read it in read_older",
                file.display()
            )),
            Ok(_) => {}
        }
    }

    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_changed_shape_is_told_apart_from_the_recorded_one() {
    // Arrange: the shape of a type, and of the same type with one field retyped.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Before {
        count: u32,
        name: String,
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename = "Before")]
    struct After {
        count: u64,
        name: String,
    }
    impl Versioned for Before {
        const VERSION: u16 = 1;
    }
    impl Versioned for After {
        const VERSION: u16 = 1;
    }
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename = "Before")]
    struct Reordered {
        name: String,
        count: u32,
    }
    impl Versioned for Reordered {
        const VERSION: u16 = 1;
    }

    let before = schema::<Before>("Before").shape;

    assert_ne!(before, schema::<After>("Before").shape);
    assert_ne!(before, schema::<Reordered>("Before").shape);
    assert_eq!(before, schema::<Before>("Before").shape);
}
