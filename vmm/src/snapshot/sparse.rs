//! Copying a file's contents without its holes: guest RAM the guest never wrote is a hole in
//! the RAM memfd, and should stay one in the snapshot's memory file (and back).
//!
//! Data extents come from `SEEK_DATA`/`SEEK_HOLE`; inside them, pages that are all zeros are
//! skipped too (a guest that zeroed memory), so the target must read as zeros wherever nothing
//! is written: a new file sized with `set_len`, or a new memfd.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::sys;

/// The unit of the all-zeros test (the host page size).
const PAGE: usize = 4 << 10;
/// How much is read at once.
const CHUNK: usize = 1 << 20;

/// Copies bytes `[0, len)` of `from` into `to` at the same offsets, leaving out holes and
/// all-zero pages. `to` must read as zeros in that range. Returns the bytes written.
pub fn copy_sparse(from: &File, to: &File, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0;
    let mut offset = 0;
    while offset < len {
        let Some(data) = sys::seek_data(from.as_fd(), offset)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = sys::seek_hole(from.as_fd(), data)?.unwrap_or(len).min(len);
        let mut at = data;
        while at < hole {
            let n = usize::try_from(hole - at).map_or(CHUNK, |rest| rest.min(CHUNK));
            let chunk = &mut buf[..n];
            from.read_exact_at(chunk, at)?;
            written += write_nonzero(to, chunk, at)?;
            at += n as u64;
        }
        offset = hole;
    }
    Ok(written)
}

/// Writes the runs of pages of `chunk` (at `offset` in `to`) that are not all zeros; returns
/// the bytes written.
fn write_nonzero(to: &File, chunk: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut run_start = None;
    let pages = chunk.chunks(PAGE).enumerate();
    for (index, page) in pages {
        let zero = page.iter().all(|byte| *byte == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(index * PAGE),
            (true, Some(start)) => {
                let run = &chunk[start..index * PAGE];
                to.write_all_at(run, offset + start as u64)?;
                written += run.len() as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        let run = &chunk[start..];
        to.write_all_at(run, offset + start as u64)?;
        written += run.len() as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn memfd(len: u64) -> File {
        let file = sys::memfd_create(c"sparse-test").unwrap();
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn only_written_nonzero_pages_are_copied_and_the_copy_reads_the_same() {
        let len = 8 << 20;
        let from = memfd(len);
        from.write_all_at(b"start", 0).unwrap();
        from.write_all_at(&[0u8; PAGE], 2 << 20).unwrap();
        from.write_all_at(&[7u8; 3 * PAGE], (5 << 20) + 100)
            .unwrap();
        let to = memfd(len);

        let written = copy_sparse(&from, &to, len).unwrap();

        let mut original = vec![0u8; 8 << 20];
        let mut copy = vec![0u8; 8 << 20];
        from.read_exact_at(&mut original, 0).unwrap();
        to.read_exact_at(&mut copy, 0).unwrap();
        assert!(original == copy, "the copy differs");
        // Page 0, and the four pages the unaligned 3-page write touched.
        assert_eq!(written, 5 * PAGE as u64);
        assert!(to.metadata().unwrap().blocks() * 512 <= 5 * PAGE as u64);
    }

    #[test]
    fn a_file_without_data_copies_nothing() {
        let from = memfd(1 << 20);
        let to = memfd(1 << 20);

        assert_eq!(copy_sparse(&from, &to, 1 << 20).unwrap(), 0);
    }
}
