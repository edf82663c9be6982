//! `manifest.json`: what a snapshot directory holds and how to tell it is whole. Written last
//! (through a rename), so a directory whose snapshot was cut short has none.
//!
//! ```json
//! {
//!   "format_version": 1,
//!   "vmm_version": "0.1.0",
//!   "config": { "name": "config.json", "size": 1234, "crc64": "0x..." },
//!   "files": [
//!     { "token": 0, "name": "state", "size": 5678, "crc64": "0x..." },
//!     { "token": 1, "name": "memory", "size": 1073741824 }
//!   ]
//! }
//! ```
//!
//! `files` are the session's files by token (see `dir_session`); guest RAM has a size but no
//! checksum (reading all of it again would double the time the guest is paused).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use liveupdate::session::Token;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// The snapshot format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The VM configuration's file name.
pub const CONFIG: &str = "config.json";
/// Largest manifest or checksummed file read into memory (the state blob's own limit).
const MAX_CHECKED_SIZE: u64 = liveupdate::state::MAX_BLOB_SIZE as u64;

/// One file of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Its name in the directory (no path separators).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// CRC-64/XZ of its contents, as `0x` and 16 hex digits; absent for guest RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc64: Option<String>,
}

/// A file of the session, under its token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    /// The token it was preserved under.
    pub token: Token,
    /// The file.
    #[serde(flatten)]
    pub file: FileEntry,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the build that wrote it.
    pub format_version: u32,
    /// The version of the VMM that wrote it (informative).
    pub vmm_version: String,
    /// `config.json`.
    pub config: FileEntry,
    /// The session's files.
    pub files: Vec<SessionFile>,
}

/// The checksum of `bytes`, as the manifest writes it.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{:#018x}", liveupdate::state::crc64(bytes))
}

impl Manifest {
    /// Reads `dir`'s manifest and checks the directory against it: the format version, every
    /// file there with its size, and the checksums.
    pub fn check(dir: &Path) -> Result<Self, SnapshotError> {
        super::require_directory(dir)?;
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Err(SnapshotError::NoManifest(dir.to_path_buf()));
        }
        let bytes = read_bounded(&path)?;
        // The version first, so that a future layout is named as such, not as garbage.
        let version: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad_manifest(&path, e))?;
        let found = version["format_version"].as_u64();
        if found != Some(u64::from(FORMAT_VERSION)) {
            return Err(SnapshotError::FormatVersion {
                found: version["format_version"].to_string(),
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Self = serde_json::from_slice(&bytes).map_err(|e| bad_manifest(&path, e))?;
        check_file(dir, &manifest.config)?;
        for file in &manifest.files {
            check_file(dir, &file.file)?;
        }
        Ok(manifest)
    }

    /// The entry of `token`.
    pub fn file(&self, token: Token) -> Option<&FileEntry> {
        self.files
            .iter()
            .find(|file| file.token == token)
            .map(|file| &file.file)
    }
}

fn bad_manifest(path: &Path, error: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::BadManifest {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// The path of `entry` in `dir`, refusing names that would leave it.
pub fn path_of(dir: &Path, name: &str) -> Result<PathBuf, SnapshotError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(bad_manifest(
            &dir.join(MANIFEST),
            format!("invalid file name {name:?}"),
        ));
    }
    Ok(dir.join(name))
}

fn check_file(dir: &Path, entry: &FileEntry) -> Result<(), SnapshotError> {
    let path = path_of(dir, &entry.name)?;
    let size = match std::fs::metadata(&path) {
        Ok(meta) => meta.len(),
        Err(source) => return Err(SnapshotError::MissingFile { path, source }),
    };
    if size != entry.size {
        return Err(SnapshotError::WrongSize {
            path,
            expected: entry.size,
            actual: size,
        });
    }
    if let Some(expected) = &entry.crc64 {
        let found = checksum(&read_bounded(&path)?);
        if &found != expected {
            return Err(SnapshotError::Checksum {
                path,
                expected: expected.clone(),
                found,
            });
        }
    }
    Ok(())
}

/// Reads a small file whole, refusing one larger than any state blob.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let io_error = |source| SnapshotError::Io {
        operation: "read",
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    if len > MAX_CHECKED_SIZE {
        return Err(SnapshotError::TooLarge {
            path: path.to_path_buf(),
            size: len,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_CHECKED_SIZE)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    Ok(bytes)
}
