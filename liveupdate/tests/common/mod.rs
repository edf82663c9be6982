//! Shared by the fuzz targets and the corpus replay: proptest's configuration and the state
//! blob's layout, written down here independently of `liveupdate::state` so the tests check the
//! decoder against the documented format rather than against itself.

#![allow(dead_code)]

use proptest::test_runner::{Config, FileFailurePersistence};

/// Where the magic, version, reserved bytes and payload length sit in a state blob.
pub const VERSION_AT: usize = 8;
pub const RESERVED: std::ops::Range<usize> = 10..16;
pub const LENGTH_AT: usize = 16;
pub const HEADER_LEN: usize = 24;
pub const CHECKSUM_LEN: usize = 8;

/// Cases per property when `PROPTEST_CASES` is not set: enough to matter, quick enough for every
/// `cargo test`. `scripts/fuzz-state` sets it much higher.
const QUICK_CASES: u32 = 256;

/// The configuration of every property: `PROPTEST_CASES` if set, else [`QUICK_CASES`]; failures
/// persisted under `proptest-regressions/` (relative to the crate, where cargo runs tests) so a
/// found input is committed and replayed first by every later run.
pub fn config(regressions: &'static str) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = QUICK_CASES;
    }
    // A few inputs per thousand are skipped (a mutation that changed nothing): long runs may
    // skip more than proptest's default limit of 1024 in all.
    config.max_global_rejects = config.max_global_rejects.max(config.cases / 10);
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(regressions)));
    config
}

/// CRC-64/XZ, the blob's checksum, computed bit by bit from its definition (reflected polynomial
/// 0xC96C5795D7870F42, initial and final value all ones).
pub fn crc64_xz(bytes: &[u8]) -> u64 {
    let mut crc = u64::MAX;
    for &byte in bytes {
        crc ^= u64::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xC96C_5795_D787_0F42
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Recomputes the checksum of `blob` (at least a checksum long) after a change, so that the
/// decoder's checks behind the checksum are reached.
pub fn reseal(blob: &mut [u8]) {
    let end = blob.len() - CHECKSUM_LEN;
    let checksum = crc64_xz(&blob[..end]);
    blob[end..].copy_from_slice(&checksum.to_le_bytes());
}

/// Sets the payload length field of `blob` to what it holds.
pub fn fix_length(blob: &mut [u8]) {
    let payload = (blob.len() - HEADER_LEN - CHECKSUM_LEN) as u64;
    blob[LENGTH_AT..LENGTH_AT + 8].copy_from_slice(&payload.to_le_bytes());
}

/// The blob a build writes around `payload`: valid header, length and checksum.
pub fn seal(version: u16, payload: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    blob.extend_from_slice(b"CHLUSTAT");
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(&[0; 6]);
    blob.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    blob.extend_from_slice(payload);
    blob.extend_from_slice(&[0; CHECKSUM_LEN]);
    reseal(&mut blob);
    blob
}
