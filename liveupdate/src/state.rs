//! The state blob: every participant's saved `State`, versioned, checksummed and bounded.
//!
//! ```text
//! offset 0   magic "CHLUSTAT"
//!        8   format version (u16 le), 2 bytes reserved (0), 4 bytes reserved (0)
//!       16   payload length (u64 le)
//!       24   payload: postcard-encoded envelopes [{id, version, state bytes}, ...]
//!   24 + n   CRC-64/XZ of everything before it (u64 le)
//! ```
//!
//! The blob comes from another process (maybe another build, maybe a corrupted file), so it is
//! untrusted: the size is checked before anything is read, then the checksum, then the format
//! version, then that the reserved bytes are zero (so a later format may give them a meaning
//! without this build misreading it), and each participant's state is decoded only by the code
//! that owns its type. `tests/fuzz_state.rs` fuzzes all of it.
//!
//! Each state type carries its own version ([`Versioned`]): the saving side writes it into the
//! envelope and the restoring side reads that version, an older one through the type's explicit
//! upgrade, and refuses a newer or unknown one before anything runs.

use std::collections::BTreeMap;

pub use postcard::Error as DecodeError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// First bytes of every blob.
pub const MAGIC: [u8; 8] = *b"CHLUSTAT";
/// The blob format this build writes.
pub const FORMAT_VERSION: u16 = 1;
/// The oldest blob format this build still reads (we accept n-2 once there are more).
pub const OLDEST_FORMAT_VERSION: u16 = 1;
/// Largest blob we read; vCPU and device state of a large VM is a few MiB.
pub const MAX_BLOB_SIZE: usize = 64 << 20;

const HEADER_LEN: usize = 24;
const CHECKSUM_LEN: usize = 8;

/// CRC-64/XZ of `bytes`. It runs in the pause, on both sides: carry-less multiplication where
/// the CPU has it (32 KB in 2-3 us on the test hosts, 16 us with slice-by-16 tables).
pub fn crc64(bytes: &[u8]) -> u64 {
    let mut digest = crc64fast::Digest::new();
    digest.write(bytes);
    digest.sum64()
}

/// Why a blob or one of its states could not be read.
#[derive(Debug, Error)]
pub enum StateError {
    /// Shorter than a header and checksum.
    #[error("State blob is truncated ({len} bytes)")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Larger than [`MAX_BLOB_SIZE`].
    #[error("State blob of {len} bytes is larger than the {MAX_BLOB_SIZE}-byte limit")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not a state blob at all.
    #[error("Not a live-update state blob (bad magic)")]
    BadMagic,
    /// A reserved header byte is not zero.
    #[error("State blob has {value:#04x} in reserved header byte {offset}; it must be 0")]
    Reserved {
        /// Offset of the first non-zero reserved byte.
        offset: usize,
        /// Its value.
        value: u8,
    },
    /// The payload length does not match the blob's size.
    #[error("State blob says {declared} payload bytes but holds {actual}")]
    LengthMismatch {
        /// Length in the header.
        declared: u64,
        /// Length available.
        actual: usize,
    },
    /// The checksum does not match: the blob is corrupt.
    #[error("State blob is corrupt: checksum {found:#018x}, expected {expected:#018x}")]
    Checksum {
        /// Checksum stored in the blob.
        found: u64,
        /// Checksum of the content.
        expected: u64,
    },
    /// Written by a newer build than this one.
    #[error(
        "State blob format {found} is newer than this build reads (up to {supported}); use a newer VMM"
    )]
    NewerFormat {
        /// Format of the blob.
        found: u16,
        /// Newest format this build reads.
        supported: u16,
    },
    /// Written by a build too old for this one.
    #[error("State blob format {found} is older than this build reads (from {oldest})")]
    OlderFormat {
        /// Format of the blob.
        found: u16,
        /// Oldest format this build reads.
        oldest: u16,
    },
    /// The payload does not decode into envelopes.
    #[error("State blob payload is malformed")]
    Payload(#[source] postcard::Error),
    /// Two envelopes share an id.
    #[error("State blob holds {id} twice")]
    DuplicateId {
        /// The id.
        id: String,
    },
    /// A state the restoring code needs is not in the blob.
    #[error("State blob has no state for {id}")]
    Missing {
        /// The id.
        id: String,
    },
    /// A participant's state is newer than this build reads.
    #[error("State of {id} has version {found}, newer than this build reads ({supported})")]
    NewerState {
        /// The participant.
        id: String,
        /// Version in the blob.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// A participant's state is of an older version this build has no upgrade for.
    #[error(
        "State of {id} has version {found}, which this build has no upgrade from (it writes {supported})"
    )]
    UnknownState {
        /// The participant.
        id: String,
        /// Version in the blob.
        found: u16,
        /// Version this build writes.
        supported: u16,
    },
    /// A participant's state does not decode into its type.
    #[error("State of {id} is malformed")]
    BadState {
        /// The participant.
        id: String,
        /// Why.
        #[source]
        source: postcard::Error,
    },
    /// States were left that no part of this build restored.
    #[error("State blob holds states nothing restored: {ids:?}")]
    Orphans {
        /// Their ids.
        ids: Vec<String>,
    },
}

/// One participant's saved state, tagged with its id and version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The participant's id.
    pub id: String,
    /// Version of the participant's `State` type.
    pub version: u16,
    /// The state itself, postcard-encoded (compact and fast: this is written and read while
    /// the guest is paused). Serde sees it as bytes, not a sequence of `u8`: postcard writes
    /// both alike (a length, then the bytes), but as bytes in one copy, not byte by byte.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
}

impl Envelope {
    /// Wraps `state` of participant `id` under its type's version.
    pub fn wrap<S: Versioned>(id: &str, state: &S) -> Result<Self, postcard::Error> {
        Ok(Self {
            id: id.to_string(),
            version: S::VERSION,
            state: postcard::to_stdvec(state)?,
        })
    }

    /// Decodes the state: of its type's version, or of an older one the type upgrades.
    pub fn decode<S: Versioned>(self) -> Result<S, StateError> {
        let Self { id, version, state } = self;
        let decoded = if version == S::VERSION {
            decode_exact(&state)
        } else if version > S::VERSION {
            return Err(StateError::NewerState {
                id,
                found: version,
                supported: S::VERSION,
            });
        } else {
            log::info!(
                "State of {id} is of version {version}: upgrading to {}",
                S::VERSION
            );
            S::read_older(version, &state).ok_or_else(|| StateError::UnknownState {
                id: id.clone(),
                found: version,
                supported: S::VERSION,
            })?
        };
        decoded.map_err(|source| StateError::BadState { id, source })
    }
}

/// A type saved in the state blob, with the one version both the saving and the restoring side
/// use.
///
/// Changing the type's shape (a field added, removed, reordered or retyped) means: copy the
/// old definition into a frozen struct (`FooV1`), bump `VERSION`, and read the old version in
/// [`Versioned::read_older`] through [`upgrade`]. `vmm`'s `state_schemas` test fails for a type
/// whose shape changed under the same version (see docs/state-versions.md).
pub trait Versioned: Serialize + DeserializeOwned {
    /// The version this build writes, and the newest it reads.
    const VERSION: u16;

    /// Reads a state saved under `version`, older than [`Self::VERSION`]; `None` when this build
    /// has no upgrade from that version (the restore is then refused).
    fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, DecodeError>> {
        let _ = (version, bytes);
        None
    }
}

/// Decodes `bytes` as the frozen older struct `Old` and upgrades it: the body of each arm of a
/// [`Versioned::read_older`].
pub fn upgrade<Old: DeserializeOwned, New: From<Old>>(bytes: &[u8]) -> Result<New, DecodeError> {
    decode_exact::<Old>(bytes).map(New::from)
}

/// Decodes a `T` from the start of `bytes` and returns it with the bytes after it: for a state
/// whose last field is another type's state, upgraded by that type (a virtio device's in its
/// transport's).
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, &[u8]), DecodeError> {
    postcard::take_from_bytes(bytes)
}

/// A participant with nothing to save (e.g. a test hook).
impl Versioned for () {
    const VERSION: u16 = 1;
}

#[derive(Serialize, Deserialize)]
struct Payload {
    envelopes: Vec<Envelope>,
}

/// Encodes envelopes into a blob.
pub fn encode(envelopes: Vec<Envelope>) -> Result<Vec<u8>, StateError> {
    encode_with_version(envelopes, FORMAT_VERSION)
}

/// Room an envelope takes in the payload besides its id and state: postcard's varint lengths
/// of both and its version.
const ENVELOPE_OVERHEAD: usize = 16;

/// The most bytes a blob of `envelopes` takes.
fn blob_room(envelopes: &[Envelope]) -> usize {
    let payload = envelopes
        .iter()
        .map(|e| e.id.len() + e.state.len() + ENVELOPE_OVERHEAD)
        .sum::<usize>();
    // The envelopes' count is a varint too.
    HEADER_LEN + ENVELOPE_OVERHEAD + payload + CHECKSUM_LEN
}

fn encode_with_version(envelopes: Vec<Envelope>, version: u16) -> Result<Vec<u8>, StateError> {
    // One allocation of the blob's size, written once: the save runs in the pause, where every
    // page the heap first touches is a page fault (the old way, a payload grown by doubling
    // and then copied, took 50-110 us for 32 KB on the test machines, 15-20 us warm).
    let mut blob = Vec::with_capacity(blob_room(&envelopes));
    blob.extend_from_slice(&MAGIC);
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(&[0; 6]);
    // The payload's length, known once it is written.
    blob.extend_from_slice(&[0; 8]);
    let mut blob =
        postcard::to_extend(&Payload { envelopes }, blob).map_err(StateError::Payload)?;
    let payload_len = (blob.len() - HEADER_LEN) as u64;
    blob[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&payload_len.to_le_bytes());
    let checksum = crc64(&blob);
    blob.extend_from_slice(&checksum.to_le_bytes());
    Ok(blob)
}

/// The states of a decoded blob, taken out one by one by the code that restores them.
#[derive(Debug)]
pub struct StateSet {
    envelopes: BTreeMap<String, Envelope>,
}

/// Decodes and checks a blob.
pub fn decode(blob: &[u8]) -> Result<StateSet, StateError> {
    if blob.len() > MAX_BLOB_SIZE {
        return Err(StateError::TooLarge { len: blob.len() });
    }
    if blob.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(StateError::Truncated { len: blob.len() });
    }
    if blob[..8] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let (content, stored) = blob.split_at(blob.len() - CHECKSUM_LEN);
    let found = u64::from_le_bytes(array(stored));
    let expected = crc64(content);
    if found != expected {
        return Err(StateError::Checksum { found, expected });
    }
    let version = u16::from_le_bytes(array(&blob[8..10]));
    if version > FORMAT_VERSION {
        return Err(StateError::NewerFormat {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version < OLDEST_FORMAT_VERSION {
        return Err(StateError::OlderFormat {
            found: version,
            oldest: OLDEST_FORMAT_VERSION,
        });
    }
    if let Some(offset) = (10..16).find(|&offset| blob[offset] != 0) {
        return Err(StateError::Reserved {
            offset,
            value: blob[offset],
        });
    }
    let declared = u64::from_le_bytes(array(&blob[16..24]));
    let payload = &content[HEADER_LEN..];
    if declared != payload.len() as u64 {
        return Err(StateError::LengthMismatch {
            declared,
            actual: payload.len(),
        });
    }
    let Payload { envelopes } = decode_exact(payload).map_err(StateError::Payload)?;
    let mut set = BTreeMap::new();
    for envelope in envelopes {
        if set.contains_key(&envelope.id) {
            return Err(StateError::DuplicateId { id: envelope.id });
        }
        set.insert(envelope.id.clone(), envelope);
    }
    Ok(StateSet { envelopes: set })
}

/// Decodes `bytes` as one `T` and nothing after it.
fn decode_exact<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(postcard::Error::DeserializeBadEncoding);
    }
    Ok(value)
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl StateSet {
    /// Takes the state of `id`: of its type's version, or of an older one the type upgrades.
    pub fn take<S: Versioned>(&mut self, id: &str) -> Result<S, StateError> {
        self.take_envelope(id)?.decode()
    }

    /// Takes the envelope of `id` out of the set, to decode later (elsewhere, e.g. on the
    /// thread that restores it) with [`Envelope::decode`].
    pub fn take_envelope(&mut self, id: &str) -> Result<Envelope, StateError> {
        self.envelopes
            .remove(id)
            .ok_or_else(|| StateError::Missing { id: id.to_string() })
    }

    /// The envelope of `id`, left in the set (to inspect or compare a state without its type).
    pub fn envelope(&self, id: &str) -> Option<&Envelope> {
        self.envelopes.get(id)
    }

    /// Ids still in the set.
    pub fn remaining(&self) -> Vec<String> {
        self.envelopes.keys().cloned().collect()
    }

    /// Checks that every state was taken.
    pub fn finish(self) -> Result<(), StateError> {
        if self.envelopes.is_empty() {
            Ok(())
        } else {
            Err(StateError::Orphans {
                ids: self.remaining(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc64_xz() {
        // The catalogue's check value of CRC-64/XZ, and a length past the SIMD block size.
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 7) as u8).collect();
        let by_bits = long.iter().fold(u64::MAX, |crc, &byte| {
            (0..8).fold(crc ^ u64::from(byte), |crc, _| {
                (crc >> 1) ^ (0xC96C_5795_D787_0F42 * (crc & 1))
            })
        });
        assert_eq!(crc64(&long), !by_bits);
    }

    /// A state type at version 2, whose version 1 had a narrower count and no label.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Counter {
        count: u64,
        label: String,
    }

    /// Version 1 of [`Counter`], frozen.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct CounterV1 {
        count: u32,
    }

    impl Versioned for Counter {
        const VERSION: u16 = 2;

        fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, DecodeError>> {
            match version {
                1 => Some(upgrade::<CounterV1, Self>(bytes)),
                _ => None,
            }
        }
    }

    impl From<CounterV1> for Counter {
        fn from(old: CounterV1) -> Self {
            Self {
                count: u64::from(old.count),
                label: "unnamed".into(),
            }
        }
    }

    impl Versioned for CounterV1 {
        const VERSION: u16 = 1;
    }

    fn counter(count: u64) -> Counter {
        Counter {
            count,
            label: "c".into(),
        }
    }

    /// An envelope of `state` under any `version` (as another build would write it).
    fn envelope_with_version<S: Serialize>(id: &str, version: u16, state: &S) -> Envelope {
        Envelope {
            id: id.into(),
            version,
            state: postcard::to_stdvec(state).unwrap(),
        }
    }

    fn blob_with_counter() -> Vec<u8> {
        encode(vec![Envelope::wrap("counter/0", &counter(7)).unwrap()]).unwrap()
    }

    /// An envelope as builds before the state was marked as bytes declared it.
    #[derive(Serialize, Deserialize)]
    struct EnvelopeWithByteSequence {
        id: String,
        version: u16,
        state: Vec<u8>,
    }

    #[test]
    fn an_envelope_is_written_and_read_as_when_its_state_was_a_sequence_of_u8() {
        let envelope = envelope_with_version("counter/0", 1, &counter(300));
        let older = EnvelopeWithByteSequence {
            id: envelope.id.clone(),
            version: envelope.version,
            state: envelope.state.clone(),
        };

        let written = postcard::to_stdvec(&envelope).unwrap();
        let written_before = postcard::to_stdvec(&older).unwrap();
        let read: Envelope = decode_exact(&written_before).unwrap();

        assert_eq!(written, written_before);
        assert_eq!(read, envelope);
    }

    /// Envelopes whose lengths take varints of every size postcard writes for them.
    fn envelopes_of_every_length_class() -> Vec<Envelope> {
        [0, 1, 127, 128, 16_383, 16_384, 200_000]
            .iter()
            .enumerate()
            .map(|(i, &len)| Envelope {
                id: "p".repeat(if i % 2 == 0 { 3 } else { 300 }),
                version: u16::MAX,
                state: vec![0xa5; len],
            })
            .collect()
    }

    #[test]
    fn a_blob_is_the_header_the_payload_and_the_checksum_of_both() {
        let envelopes = envelopes_of_every_length_class();
        let payload = postcard::to_stdvec(&Payload {
            envelopes: envelopes.clone(),
        })
        .unwrap();
        let mut expected = MAGIC.to_vec();
        expected.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        expected.extend_from_slice(&[0; 6]);
        expected.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        expected.extend_from_slice(&payload);
        let checksum = crc64(&expected);
        expected.extend_from_slice(&checksum.to_le_bytes());

        assert_eq!(encode(envelopes).unwrap(), expected);
    }

    #[test]
    fn a_blob_is_written_into_the_one_allocation_made_for_it() {
        let envelopes = envelopes_of_every_length_class();
        let room = blob_room(&envelopes);

        let blob = encode(envelopes).unwrap();

        assert!(blob.len() <= room);
        // A blob that outgrew its room would have been moved into a larger allocation.
        assert_eq!(blob.capacity(), room);
    }

    #[test]
    fn encoded_states_decode_to_the_same_values() {
        let mut set = decode(&blob_with_counter()).unwrap();

        let taken: Counter = set.take("counter/0").unwrap();

        assert_eq!(taken, counter(7));
        set.finish().unwrap();
    }

    #[test]
    fn a_flipped_byte_is_reported_as_corrupt() {
        let mut blob = blob_with_counter();
        let middle = blob.len() / 2;
        blob[middle] ^= 0x20;

        assert!(matches!(decode(&blob), Err(StateError::Checksum { .. })));
    }

    #[test]
    fn a_newer_format_is_refused_with_both_versions() {
        let blob = encode_with_version(vec![], FORMAT_VERSION + 1).unwrap();

        let error = decode(&blob).unwrap_err();

        assert!(
            matches!(error, StateError::NewerFormat { found, supported } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION)
        );
        assert!(error.to_string().contains("newer"));
    }

    #[test]
    fn a_non_zero_reserved_byte_is_refused_even_with_a_valid_checksum() {
        let mut blob = blob_with_counter();
        blob[13] = 0x40;
        let end = blob.len() - CHECKSUM_LEN;
        let checksum = crc64(&blob[..end]);
        blob[end..].copy_from_slice(&checksum.to_le_bytes());

        let error = decode(&blob).unwrap_err();

        assert!(
            matches!(
                error,
                StateError::Reserved {
                    offset: 13,
                    value: 0x40
                }
            ),
            "{error:?}"
        );
        assert!(error.to_string().contains("reserved header byte 13"));
    }

    #[test]
    fn truncated_oversized_and_foreign_blobs_are_refused() {
        let blob = blob_with_counter();

        assert!(matches!(
            decode(&blob[..10]),
            Err(StateError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&vec![0; MAX_BLOB_SIZE + 1]),
            Err(StateError::TooLarge { .. })
        ));
        assert!(matches!(decode(&[0x7f; 64]), Err(StateError::BadMagic)));
    }

    #[test]
    fn an_envelope_carries_its_types_version() {
        let envelope = Envelope::wrap("counter/0", &counter(1)).unwrap();

        assert_eq!(envelope.version, Counter::VERSION);
    }

    #[test]
    fn an_older_state_is_read_through_its_upgrade() {
        // Arrange: what a build whose `Counter` was still at version 1 saved.
        let old = Envelope::wrap("counter/0", &CounterV1 { count: 41 }).unwrap();
        let mut set = decode(&encode(vec![old]).unwrap()).unwrap();

        let taken: Counter = set.take("counter/0").unwrap();

        assert_eq!(
            taken,
            Counter {
                count: 41,
                label: "unnamed".into()
            }
        );
    }

    #[test]
    fn a_newer_participant_state_is_refused() {
        let blob = encode(vec![envelope_with_version("counter/0", 3, &counter(1))]).unwrap();
        let mut set = decode(&blob).unwrap();

        let result = set.take::<Counter>("counter/0");

        assert!(matches!(
            result,
            Err(StateError::NewerState {
                found: 3,
                supported: 2,
                ..
            })
        ));
    }

    #[test]
    fn an_older_version_without_an_upgrade_is_refused() {
        let blob = encode(vec![envelope_with_version("counter/0", 0, &counter(1))]).unwrap();
        let mut set = decode(&blob).unwrap();

        let error = set.take::<Counter>("counter/0").unwrap_err();

        assert!(
            matches!(error, StateError::UnknownState { ref id, found: 0, supported: 2 } if id == "counter/0"),
            "{error:?}"
        );
        assert!(error.to_string().contains("no upgrade from"), "{error}");
    }

    #[test]
    fn a_state_saved_in_the_current_shape_under_the_old_version_is_refused() {
        // A type changed without a version bump looks like this to its successor: bytes that
        // do not decode as the version they claim.
        let blob = encode(vec![envelope_with_version(
            "counter/0",
            1,
            &counter(u64::MAX),
        )])
        .unwrap();
        let mut set = decode(&blob).unwrap();

        let result = set.take::<Counter>("counter/0");

        assert!(
            matches!(result, Err(StateError::BadState { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn states_nobody_took_are_reported() {
        let set = decode(&blob_with_counter()).unwrap();

        assert!(matches!(set.finish(), Err(StateError::Orphans { ids }) if ids == ["counter/0"]));
    }

    #[test]
    fn a_missing_state_is_reported_by_id() {
        let mut set = decode(&blob_with_counter()).unwrap();

        assert!(
            matches!(set.take::<Counter>("vcpu/0"), Err(StateError::Missing { id }) if id == "vcpu/0")
        );
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let envelope = Envelope::wrap("counter/0", &counter(1)).unwrap();
        let blob = encode(vec![envelope.clone(), envelope]).unwrap();

        assert!(matches!(decode(&blob), Err(StateError::DuplicateId { .. })));
    }

    #[test]
    fn a_state_of_the_wrong_shape_is_refused() {
        let blob = encode(vec![envelope_with_version("counter/0", 2, &"text")]).unwrap();
        let mut set = decode(&blob).unwrap();

        assert!(matches!(
            set.take::<Counter>("counter/0"),
            Err(StateError::BadState { .. })
        ));
    }
}
