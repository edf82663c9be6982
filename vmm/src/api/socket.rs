//! The API socket's setup: it keeps others out at every instant. The socket is bound inside a
//! fresh 0700 directory next to the target path, chmodded to 0600, and only then renamed into
//! place. A `<path>.lock` file held with `flock` stops two VMMs from sharing a path; a stale
//! socket left by a dead VMM is removed, anything else at the path is left alone.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::http::{ApiServerError, io_error};

/// Locks `<path>.lock`, clears a stale socket and binds a listening socket (mode 0600) at `path`.
/// Returns the listener, the held lock and the lock file's path.
pub(super) fn bind_api_socket(
    path: &Path,
) -> Result<(UnixListener, File, PathBuf), ApiServerError> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = acquire_lock(path, &lock_path)?;
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(io_error("remove the stale socket", path))?;
        }
        Ok(_) => return Err(ApiServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("inspect", path)(e)),
    }
    let listener = bind_private(path)?;
    Ok((listener, lock, lock_path))
}

fn acquire_lock(path: &Path, lock_path: &Path) -> Result<File, ApiServerError> {
    let lock_error = |source| ApiServerError::Lock {
        path: lock_path.to_path_buf(),
        source,
    };
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path)
        .map_err(lock_error)?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(ApiServerError::SocketInUse(path.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(lock_error(e)),
    }
}

/// Binds in a private directory, restricts the socket to its owner, then moves it into place.
fn bind_private(path: &Path) -> Result<UnixListener, ApiServerError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);
    let private_dir = parent.join(format!(
        ".api{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(io_error("create the private directory", &private_dir))?;
    let staged = private_dir.join("s");
    let result = UnixListener::bind(&staged)
        .map_err(io_error("bind", &staged))
        .and_then(|listener| {
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
                .map_err(io_error("set the mode of", &staged))?;
            fs::rename(&staged, path).map_err(io_error("move the socket to", path))?;
            Ok(listener)
        });
    // Best effort: the staged socket may still be there if a step failed.
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&private_dir);
    result
}
