//! Snapshot to a directory and restore from one (`vm.snapshot`, `vm.restore`, `--restore
//! source_url=file:///dir`), as a live update whose session is a directory.
//!
//! A snapshot runs the live-update machine over the VM's participants (prepare, freeze), then
//! its snapshot step: the directory session ([`dir_session`]) writes the state blob and guest
//! RAM into the directory while the guest is paused, and the guest resumes in place. Host-side
//! things no file can hold (taps, sockets, device connections) are treated as across a kexec.
//! A restore checks the directory against its manifest ([`manifest`]), then goes through the
//! same restore path as a live update, on a new memfd filled from the memory file.
//! The layout is documented in `docs/snapshot.md`.

pub mod dir_session;
pub mod manifest;
pub mod sparse;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use liveupdate::machine::{Incoming, MachineError, Timings};
use liveupdate::participant::STATE_TOKEN;
use log::{info, warn};
use thiserror::Error;

use crate::config::VmConfig;
use crate::live_update::participants::RAM_TOKEN;
use crate::live_update::{self, Restored};
use crate::vcpu_thread::VcpuEvent;
use crate::vm::{Vm, VmError};
use dir_session::DirSession;
use manifest::{CONFIG, FORMAT_VERSION, FileEntry, MANIFEST, Manifest, SessionFile};

/// Why a snapshot or a restore failed.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The directory does not exist (or cannot be reached).
    #[error("Snapshot directory {path} does not exist")]
    NoDirectory {
        /// The directory.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file of the snapshot exists already (a snapshot goes into a directory without one).
    #[error("{0} exists already: snapshot into a directory without a snapshot")]
    Exists(PathBuf),
    /// The directory holds no manifest: no snapshot, or one cut short.
    #[error("{0} holds no snapshot (no manifest.json)")]
    NoManifest(PathBuf),
    /// The manifest cannot be read.
    #[error("Invalid snapshot manifest {path}: {reason}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A snapshot of another format version.
    #[error(
        "Snapshot format version {found} is not supported: this build reads version {supported}"
    )]
    FormatVersion {
        /// The version found (as written in the manifest).
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// A file the manifest lists is missing.
    #[error("Snapshot file {path} is missing")]
    MissingFile {
        /// The file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// A file has another size than the manifest says (e.g. truncated).
    #[error("Snapshot file {path} has {actual} bytes, the manifest says {expected}")]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// Size in the manifest.
        expected: u64,
        /// Size found.
        actual: u64,
    },
    /// A file's contents do not match the manifest's checksum: it is corrupt.
    #[error("Snapshot file {path} is corrupt: checksum {found}, the manifest says {expected}")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Checksum in the manifest.
        expected: String,
        /// Checksum of the contents.
        found: String,
    },
    /// A file that is read whole is too large to be one of ours.
    #[error("Snapshot file {path} is too large ({size} bytes)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The saved state cannot be used by this build.
    #[error("The snapshot's state is unusable")]
    State(#[source] MachineError),
    /// Reading or writing a file failed.
    #[error("Cannot {operation} {path}")]
    Io {
        /// What was done.
        operation: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be snapshotted or rebuilt.
    #[error("The VM could not be snapshotted or restored")]
    Vm(#[source] VmError),
}

impl SnapshotError {
    /// The HTTP status: 400 for a directory that is not a usable snapshot (or destination),
    /// 500 for a failure of ours.
    pub fn status(&self) -> u16 {
        match self {
            Self::Io { .. } | Self::Vm(_) => 500,
            _ => 400,
        }
    }
}

/// Snapshots `vm` (with its `config`) into `dir`, an existing directory without a snapshot.
/// The guest is paused only while its state and RAM are written (`guest_paused` in the timings), then
/// runs on (a paused VM stays paused). On failure the files written so far are removed.
pub fn snapshot(vm: &mut Vm, config: &VmConfig, dir: &Path) -> Result<Timings, SnapshotError> {
    let mut created = Vec::new();
    let result = write_snapshot(vm, config, dir, &mut created);
    if result.is_err() {
        for path in created.iter().rev() {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("Cannot remove {} of a failed snapshot: {e}", path.display());
            }
        }
    }
    result
}

fn write_snapshot(
    vm: &mut Vm,
    config: &VmConfig,
    dir: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<Timings, SnapshotError> {
    check_destination(dir)?;
    let config_entry = write_config(dir, config, created)?;
    let (session, preserved) = DirSession::outgoing(dir);
    let state_file = live_update::state_memfd().map_err(|source| SnapshotError::Io {
        operation: "create the state memfd for",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written: Option<Result<Vec<SessionFile>, SnapshotError>> = None;
    let writer = |_session| {
        let result = dir_session::write_files(dir, &preserved, created);
        let outcome = result.as_ref().map(|_| ()).map_err(ToString::to_string);
        written = Some(result);
        outcome
    };
    let vm_result = vm.snapshot(config, Box::new(session), state_file, writer);
    let files = match (vm_result, written) {
        (Ok(timings), Some(Ok(files))) => (timings, files),
        // The writer's own error says more than the machine's copy of its message.
        (Err(_), Some(Err(error))) => return Err(error),
        (Err(error), _) => return Err(SnapshotError::Vm(error)),
        (Ok(_), _) => {
            return Err(SnapshotError::State(MachineError::Snapshot(
                "the session was never written".into(),
            )));
        }
    };
    let (timings, files) = files;
    write_manifest(dir, config_entry, files, created)?;
    info!("VM snapshotted into {}: {:?}", dir.display(), timings.steps);
    Ok(timings)
}

/// That `dir` exists and is a directory.
pub(super) fn require_directory(dir: &Path) -> Result<(), SnapshotError> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(SnapshotError::NotADirectory(dir.to_path_buf())),
        Err(source) => Err(SnapshotError::NoDirectory {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// `dir` must be a directory and hold none of a snapshot's files.
fn check_destination(dir: &Path) -> Result<(), SnapshotError> {
    require_directory(dir)?;
    let session_files = [STATE_TOKEN, RAM_TOKEN].map(dir_session::file_name);
    let mut names = [MANIFEST, CONFIG]
        .into_iter()
        .chain(session_files.iter().map(String::as_str));
    match names.find_map(|name| Some(dir.join(name)).filter(|path| path.exists())) {
        Some(path) => Err(SnapshotError::Exists(path)),
        None => Ok(()),
    }
}

fn write_config(
    dir: &Path,
    config: &VmConfig,
    created: &mut Vec<PathBuf>,
) -> Result<FileEntry, SnapshotError> {
    let path = dir.join(CONFIG);
    let json =
        serde_json::to_vec_pretty(&config.to_info_json()).map_err(|e| SnapshotError::Io {
            operation: "encode",
            path: path.clone(),
            source: e.into(),
        })?;
    write_new(&path, &json, created)?;
    Ok(FileEntry {
        name: CONFIG.into(),
        size: json.len() as u64,
        crc64: Some(manifest::checksum(&json)),
    })
}

/// Writes the manifest last, through a rename, so a snapshot cut short has none.
fn write_manifest(
    dir: &Path,
    config: FileEntry,
    files: Vec<SessionFile>,
    created: &mut Vec<PathBuf>,
) -> Result<(), SnapshotError> {
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        config,
        files,
    };
    let path = dir.join(MANIFEST);
    let partial = dir.join(format!("{MANIFEST}.partial"));
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Io {
        operation: "encode",
        path: path.clone(),
        source: e.into(),
    })?;
    write_new(&partial, &json, created)?;
    std::fs::rename(&partial, &path).map_err(|source| SnapshotError::Io {
        operation: "rename into place",
        path: path.clone(),
        source,
    })?;
    created.pop();
    created.push(path);
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], created: &mut Vec<PathBuf>) -> Result<(), SnapshotError> {
    use std::io::Write;
    let mut file = dir_session::create_new(path, created)?;
    file.write_all(bytes).map_err(|source| SnapshotError::Io {
        operation: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Restores the VM of the snapshot in `dir`, running if `resume`, else paused. Nothing runs
/// unless the whole directory checks out and the VM is rebuilt.
pub fn restore(
    dir: &Path,
    resume: bool,
    on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>,
) -> Result<Restored, SnapshotError> {
    let start = Instant::now();
    let session = DirSession::open(dir)?;
    let checked = Instant::now();
    let mut incoming =
        Incoming::restore(Box::new(session)).map_err(|(_session, e)| SnapshotError::State(e))?;
    let (vm, config, _paused_at_ns) =
        Vm::restore(&mut incoming, None, on_event, resume).map_err(SnapshotError::Vm)?;
    incoming.finish().map_err(SnapshotError::State)?;
    let mut timings = std::mem::take(incoming.timings_mut());
    timings.record("check", checked.duration_since(start));
    timings.record("restore", start.elapsed());
    info!("VM restored from {}: {:?}", dir.display(), timings.steps);
    Ok(Restored {
        vm,
        config,
        timings,
    })
}
