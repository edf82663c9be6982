//! A live-update session backed by a directory: the session the snapshot step writes out, and
//! a restore reads back.
//!
//! - **Outgoing**: `preserve_fd` keeps a copy of each fd under its token (guest RAM arrives in
//!   prepare, while the guest still runs, so nothing can be written yet); once the guest is
//!   paused and its state saved, [`write_files`] writes each file to the directory: the state
//!   blob as `state`, guest RAM as `memory` (sparse), anything else as `file-<token>`.
//! - **Incoming**: opened from a checked [`Manifest`]; `retrieve_fd` reads a file back into a
//!   new memfd (sparse again), since guest RAM must live in a memfd.
//!
//! No fd attachments: what only a restart-mode session can carry (taps, sockets, device
//! connections) is handled as across a kexec (re-created, or the snapshot is refused), with
//! one difference the session tells ([`Session::processes_outlive`]): no kexec comes between,
//! so a device served by another process (a vfio-user server with `persist=on`) stays with the
//! VM, which runs on, and a restore connects to that server again.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use liveupdate::participant::STATE_TOKEN;
use liveupdate::session::{Session, SessionError, Token};

use super::SnapshotError;
use super::manifest::{self, FileEntry, Manifest, SessionFile};
use super::sparse::copy_sparse;
use crate::live_update::participants::RAM_TOKEN;
use crate::sys;

/// The files an outgoing session holds, by token, shared with whoever writes them out.
pub type Preserved = Arc<Mutex<BTreeMap<Token, OwnedFd>>>;

/// A session in a directory.
#[derive(Debug)]
pub enum DirSession {
    /// Being snapshotted: files wait in memory until written.
    Outgoing {
        /// The snapshot directory.
        dir: PathBuf,
        /// The preserved files.
        files: Preserved,
    },
    /// Being restored.
    Incoming {
        /// The snapshot directory.
        dir: PathBuf,
        /// Its checked manifest.
        manifest: Manifest,
        /// Tokens already retrieved (each file is retrieved once).
        retrieved: BTreeSet<Token>,
    },
}

/// The file name of the file under `token`.
pub fn file_name(token: Token) -> String {
    match token {
        STATE_TOKEN => "state".into(),
        RAM_TOKEN => "memory".into(),
        other => format!("file-{other}"),
    }
}

impl DirSession {
    /// An outgoing session into `dir`, and the handle its files are written out through.
    pub fn outgoing(dir: &Path) -> (Self, Preserved) {
        let files = Preserved::default();
        let session = Self::Outgoing {
            dir: dir.to_path_buf(),
            files: files.clone(),
        };
        (session, files)
    }

    /// The session of the snapshot in `dir`, once its manifest checks out.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let manifest = Manifest::check(dir)?;
        Ok(Self::Incoming {
            dir: dir.to_path_buf(),
            manifest,
            retrieved: BTreeSet::new(),
        })
    }
}

fn wrong_direction(operation: &'static str, direction: &'static str) -> SessionError {
    SessionError::WrongDirection {
        operation,
        direction,
    }
}

fn os_error(operation: &'static str) -> impl Fn(io::Error) -> SessionError {
    move |source| SessionError::Os { operation, source }
}

impl Session for DirSession {
    fn name(&self) -> Result<String, SessionError> {
        let (Self::Outgoing { dir, .. } | Self::Incoming { dir, .. }) = self;
        Ok(dir.display().to_string())
    }

    fn preserve_fd(&mut self, fd: BorrowedFd<'_>, token: Token) -> Result<(), SessionError> {
        let Self::Outgoing { files, .. } = self else {
            return Err(wrong_direction("preserve", "incoming"));
        };
        let copy = fd.try_clone_to_owned().map_err(os_error("dup"))?;
        let mut files = files.lock().unwrap_or_else(PoisonError::into_inner);
        if files.contains_key(&token) {
            return Err(SessionError::TokenExists { token });
        }
        files.insert(token, copy);
        Ok(())
    }

    fn retrieve_fd(&mut self, token: Token) -> Result<OwnedFd, SessionError> {
        let Self::Incoming {
            dir,
            manifest,
            retrieved,
        } = self
        else {
            return Err(wrong_direction("retrieve", "outgoing"));
        };
        let entry = manifest
            .file(token)
            .ok_or(SessionError::NoSuchToken { token })?;
        if retrieved.contains(&token) {
            return Err(SessionError::AlreadyRetrieved { token });
        }
        let path = manifest::path_of(dir, &entry.name).map_err(|e| SessionError::Os {
            operation: "open snapshot file",
            source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let name: &CStr = if token == RAM_TOKEN {
            c"guest-ram"
        } else {
            c"snapshot-file"
        };
        let memfd = read_into_memfd(&path, entry.size, name)?;
        retrieved.insert(token);
        Ok(memfd)
    }

    /// A snapshot is taken while the VM runs on, and restored on a running host.
    fn processes_outlive(&self) -> bool {
        true
    }

    fn finish(&mut self) -> Result<(), SessionError> {
        match self {
            // The directory stays as it is: a snapshot may be restored again.
            Self::Incoming { .. } => Ok(()),
            Self::Outgoing { .. } => Err(wrong_direction("finish", "outgoing")),
        }
    }
}

/// A new memfd holding the file at `path`, which must be `size` bytes long.
fn read_into_memfd(path: &Path, size: u64, name: &CStr) -> Result<OwnedFd, SessionError> {
    let file = File::open(path).map_err(os_error("open snapshot file"))?;
    let actual = file
        .metadata()
        .map_err(os_error("stat snapshot file"))?
        .len();
    if actual != size {
        return Err(SessionError::Os {
            operation: "read snapshot file",
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} has {actual} bytes, the manifest says {size}",
                    path.display()
                ),
            ),
        });
    }
    let memfd = sys::memfd_create(name).map_err(os_error("memfd_create"))?;
    memfd.set_len(size).map_err(os_error("size memfd"))?;
    copy_sparse(&file, &memfd, size).map_err(os_error("read snapshot file"))?;
    Ok(OwnedFd::from(memfd))
}

/// Writes every preserved file into `dir` (each created new: a file there already is an
/// error) and returns their manifest entries. `created` collects the paths made, for the
/// caller to remove on failure.
pub fn write_files(
    dir: &Path,
    files: &Preserved,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<SessionFile>, SnapshotError> {
    let files = files.lock().unwrap_or_else(PoisonError::into_inner);
    let mut entries = Vec::with_capacity(files.len());
    for (token, fd) in files.iter() {
        let name = file_name(*token);
        let path = dir.join(&name);
        let source = File::from(fd.try_clone().map_err(io_error("dup", &path))?);
        let size = source.metadata().map_err(io_error("stat", &path))?.len();
        let target = create_new(&path, created)?;
        let crc64 = if *token == RAM_TOKEN {
            target.set_len(size).map_err(io_error("size", &path))?;
            copy_sparse(&source, &target, size).map_err(io_error("write", &path))?;
            None
        } else {
            let len = usize::try_from(size)
                .ok()
                .filter(|len| *len <= liveupdate::state::MAX_BLOB_SIZE)
                .ok_or_else(|| SnapshotError::TooLarge {
                    path: path.clone(),
                    size,
                })?;
            let mut bytes = vec![0u8; len];
            source
                .read_exact_at(&mut bytes, 0)
                .map_err(io_error("read", &path))?;
            target
                .write_all_at(&bytes, 0)
                .map_err(io_error("write", &path))?;
            Some(manifest::checksum(&bytes))
        };
        entries.push(SessionFile {
            token: *token,
            file: FileEntry { name, size, crc64 },
        });
    }
    Ok(entries)
}

/// Creates `path`, which must not exist, and records it in `created`.
pub fn create_new(path: &Path, created: &mut Vec<PathBuf>) -> Result<File, SnapshotError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SnapshotError::Exists(path.to_path_buf())
            } else {
                SnapshotError::Io {
                    operation: "create",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    created.push(path.to_path_buf());
    Ok(file)
}

fn io_error<'a>(
    operation: &'static str,
    path: &'a Path,
) -> impl Fn(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        operation,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;

    use super::*;

    fn memfd_with(len: u64, bytes: &[(u64, &[u8])]) -> File {
        let file = sys::memfd_create(c"dir-session-test").unwrap();
        file.set_len(len).unwrap();
        for (offset, data) in bytes {
            file.write_all_at(data, *offset).unwrap();
        }
        file
    }

    /// Writes a session of a state blob and 4 MiB of RAM into a new directory, with its
    /// manifest; returns the directory.
    fn written_snapshot(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dir-session-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut session, preserved) = DirSession::outgoing(&dir);
        let state = memfd_with(5, &[(0, b"STATE")]);
        let ram = memfd_with(4 << 20, &[(1 << 20, b"guest data")]);
        session.preserve_fd(state.as_fd(), STATE_TOKEN).unwrap();
        session.preserve_fd(ram.as_fd(), RAM_TOKEN).unwrap();
        let mut created = Vec::new();
        let files = write_files(&dir, &preserved, &mut created).unwrap();
        std::fs::write(dir.join(manifest::CONFIG), b"{}").unwrap();
        let manifest = Manifest {
            format_version: manifest::FORMAT_VERSION,
            vmm_version: "test".into(),
            config: FileEntry {
                name: manifest::CONFIG.into(),
                size: 2,
                crc64: Some(manifest::checksum(b"{}")),
            },
            files,
        };
        std::fs::write(
            dir.join(manifest::MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        dir
    }

    #[test]
    fn files_written_out_come_back_by_token_as_memfds_once() {
        let dir = written_snapshot("roundtrip");
        let mut session = DirSession::open(&dir).unwrap();

        let ram = File::from(session.retrieve_fd(RAM_TOKEN).unwrap());
        let mut state = File::from(session.retrieve_fd(STATE_TOKEN).unwrap());
        let again = session.retrieve_fd(RAM_TOKEN);

        let mut data = [0u8; 10];
        ram.read_exact_at(&mut data, 1 << 20).unwrap();
        assert_eq!(&data, b"guest data");
        assert_eq!(ram.metadata().unwrap().len(), 4 << 20);
        let mut blob = String::new();
        state.read_to_string(&mut blob).unwrap();
        assert_eq!(blob, "STATE");
        assert!(matches!(again, Err(SessionError::AlreadyRetrieved { .. })));
        session.finish().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_state_file_is_refused_as_corrupt() {
        let dir = written_snapshot("corrupt");
        std::fs::write(dir.join("state"), b"STATF").unwrap();

        let error = DirSession::open(&dir).unwrap_err();

        assert!(matches!(error, SnapshotError::Checksum { .. }), "{error:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_outgoing_session_cannot_be_retrieved_from() {
        let (mut session, _) = DirSession::outgoing(Path::new("/nonexistent"));

        let error = session.retrieve_fd(STATE_TOKEN).unwrap_err();

        assert!(
            matches!(error, SessionError::WrongDirection { .. }),
            "{error:?}"
        );
    }
}
