//! The disk image behind a virtio-blk device: opening it and moving sectors between it and
//! guest buffers.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestMemoryError, GuestMemoryMmap};

use super::request::Segment;

/// Size of a virtio-blk sector; requests address the disk in these units.
pub(super) const SECTOR_SIZE: u64 = 512;

/// Length of the GET_ID answer.
pub(super) const SERIAL_LEN: usize = 20;

/// Bytes moved per positioned read or write. vm-memory 0.18 has no positioned I/O straight into
/// guest memory, so data goes through this reusable buffer: bounded, allocated once per disk.
const BOUNCE_LEN: usize = 64 * 1024;

/// Errors of a virtio-blk disk: opening it, and the failures behind an IOERR status.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("Cannot open disk image {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why opening failed.
        #[source]
        source: io::Error,
    },
    /// The image size could not be read.
    #[error("Cannot read the size of disk image {}", path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// Why the size is unknown.
        #[source]
        source: io::Error,
    },
    /// A request reaches past the end of the disk.
    #[error("Request at sector {sector} for {len} bytes is past the end of the disk")]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Data length of the request.
        len: u64,
    },
    /// A data length that is not a whole number of sectors.
    #[error("Data length {len} is not a multiple of 512")]
    PartialSector {
        /// Data length of the request.
        len: u64,
    },
    /// A write to a read-only disk.
    #[error("Disk is read-only")]
    ReadOnly,
    /// Reading the image failed.
    #[error("Read at byte {offset} failed")]
    Read {
        /// Byte offset in the image.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing the image failed.
    #[error("Write at byte {offset} failed")]
    Write {
        /// Byte offset in the image.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Flushing the image failed.
    #[error("Flush failed")]
    Flush(#[source] io::Error),
    /// A guest buffer could not be accessed.
    #[error("Guest buffer access failed")]
    GuestMemory(#[source] GuestMemoryError),
}

/// An open disk image.
pub(super) struct Disk {
    file: File,
    path: PathBuf,
    readonly: bool,
    /// Sync after every write: the driver cannot send flushes (VIRTIO_BLK_F_FLUSH not acked).
    writethrough: bool,
    capacity_sectors: u64,
    serial: [u8; SERIAL_LEN],
    bounce: Vec<u8>,
}

impl Disk {
    /// Opens `path` (read-only when asked); `serial` is the GET_ID answer, derived from the path
    /// when `None`.
    pub(super) fn open(
        path: &Path,
        readonly: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        // Seeking to the end works for regular files and host block devices alike (a block
        // device's metadata reports length 0).
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        let serial = match serial {
            Some(serial) => serial_from_str(serial),
            None => serial_from_path(path),
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            readonly,
            writethrough: false,
            // A trailing partial sector is not addressable.
            capacity_sectors: len / SECTOR_SIZE,
            serial,
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// The image path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether writes are refused.
    pub(super) fn readonly(&self) -> bool {
        self.readonly
    }

    /// Makes every write durable before it completes (for drivers without flush).
    pub(super) fn set_writethrough(&mut self, writethrough: bool) {
        self.writethrough = writethrough;
    }

    /// Size in 512-byte sectors.
    pub(super) fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The GET_ID answer.
    pub(super) fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// Reads the sectors from `sector` on into `buffers`; returns the bytes moved.
    pub(super) fn read(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        buffers: &[Segment],
    ) -> Result<u64, BlockError> {
        let mut offset = self.byte_range(sector, buffers)?;
        let start = offset;
        for buffer in buffers {
            for (addr, len) in buffer.chunks(BOUNCE_LEN) {
                let chunk = &mut self.bounce[..len];
                self.file
                    .read_exact_at(chunk, offset)
                    .map_err(|source| BlockError::Read { offset, source })?;
                mem.write_slice(chunk, addr)
                    .map_err(BlockError::GuestMemory)?;
                offset += len as u64;
            }
        }
        Ok(offset - start)
    }

    /// Writes `buffers` to the sectors from `sector` on; returns the bytes moved.
    pub(super) fn write(
        &mut self,
        mem: &GuestMemoryMmap,
        sector: u64,
        buffers: &[Segment],
    ) -> Result<u64, BlockError> {
        if self.readonly {
            return Err(BlockError::ReadOnly);
        }
        let mut offset = self.byte_range(sector, buffers)?;
        let start = offset;
        for buffer in buffers {
            for (addr, len) in buffer.chunks(BOUNCE_LEN) {
                let chunk = &mut self.bounce[..len];
                mem.read_slice(chunk, addr)
                    .map_err(BlockError::GuestMemory)?;
                self.file
                    .write_all_at(chunk, offset)
                    .map_err(|source| BlockError::Write { offset, source })?;
                offset += len as u64;
            }
        }
        if self.writethrough {
            self.flush()?;
        }
        Ok(offset - start)
    }

    /// Makes written data durable.
    pub(super) fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(BlockError::Flush)
    }

    /// Checks that a request of `buffers` at `sector` is whole sectors inside the disk; returns
    /// its first byte offset.
    fn byte_range(&self, sector: u64, buffers: &[Segment]) -> Result<u64, BlockError> {
        let len: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::PartialSector { len });
        }
        let end_sector = sector.checked_add(len / SECTOR_SIZE);
        if end_sector.is_none_or(|end| end > self.capacity_sectors) {
            return Err(BlockError::OutOfRange { sector, len });
        }
        // Cannot overflow: sector < capacity_sectors = file length / 512.
        Ok(sector * SECTOR_SIZE)
    }
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("readonly", &self.readonly)
            .field("writethrough", &self.writethrough)
            .field("capacity_sectors", &self.capacity_sectors)
            .finish_non_exhaustive()
    }
}

/// The first 20 bytes of `serial`, zero padded.
fn serial_from_str(serial: &str) -> [u8; SERIAL_LEN] {
    let mut id = [0; SERIAL_LEN];
    let bytes = serial.as_bytes();
    let len = bytes.len().min(SERIAL_LEN);
    id[..len].copy_from_slice(&bytes[..len]);
    id
}

/// A serial that stays the same for the same path across VMM versions (so not std's hasher):
/// the FNV-1a hash of the path in 16 hex digits.
fn serial_from_path(path: &Path) -> [u8; SERIAL_LEN] {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(FNV_OFFSET, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        });
    serial_from_str(&format!("{hash:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_from_long_id_is_truncated_to_twenty_bytes() {
        let serial = serial_from_str("abcdefghijklmnopqrstuvwxyz");

        assert_eq!(&serial, b"abcdefghijklmnopqrst");
    }

    #[test]
    fn serial_from_path_is_stable_and_path_specific() {
        let a = serial_from_path(Path::new("/images/a.raw"));
        let b = serial_from_path(Path::new("/images/b.raw"));

        assert_eq!(a, serial_from_path(Path::new("/images/a.raw")));
        assert_ne!(a, b);
        assert!(a[..16].iter().all(u8::is_ascii_hexdigit));
        assert_eq!(&a[16..], &[0; 4]);
    }

    #[test]
    fn open_missing_file_names_path_in_error() {
        let path = std::env::temp_dir().join("blkcon-does-not-exist.raw");

        let err = Disk::open(&path, false, None).unwrap_err();

        assert!(matches!(err, BlockError::Open { .. }));
        assert!(
            err.to_string().contains("blkcon-does-not-exist.raw"),
            "{err}"
        );
    }
}
