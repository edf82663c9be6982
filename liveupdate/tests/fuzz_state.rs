//! Property-based fuzzing of the live-update state blob decoder: `state::decode`, the entry point
//! a successor VMM reads the blob through (`Incoming::restore` → `read_state`), and
//! `StateSet::take`, which decodes each participant's state into its type.
//!
//! The blob comes from another process, maybe another build, maybe a damaged memfd, so:
//! - any bytes are refused with an error or decoded, never a panic;
//! - a changed blob whose checksum was not recomputed is always refused (CRC-64 catches every
//!   single-bit error and every burst up to 64 bits; other changes slip by with odds of 2^-64);
//! - a changed header is refused with its reason even when the checksum was recomputed;
//! - a changed payload with a recomputed checksum (a forged blob) reaches the structural checks
//!   and is refused there or decodes into a well-formed set, never a panic;
//! - whatever is encoded decodes to the same envelopes and typed states.
//!
//! Runs with a modest case count in every `cargo test`; `scripts/fuzz-state` runs it for long.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::collections::BTreeMap;

use liveupdate::state::{
    self, Envelope, FORMAT_VERSION, OLDEST_FORMAT_VERSION, StateError, Versioned,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::{Deserialize, Serialize};

use common::{CHECKSUM_LEN, HEADER_LEN, LENGTH_AT, RESERVED, VERSION_AT};

const REGRESSIONS: &str = "proptest-regressions/fuzz_state.txt";

/// A participant state shaped like the real ones (registers, names, optional and nested parts,
/// maps, enums), so `take` is fuzzed through every kind of field postcard decodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceState {
    id: u32,
    registers: Vec<u64>,
    name: String,
    mac: Option<[u8; 6]>,
    mode: Mode,
    vectors: BTreeMap<u16, bool>,
    offset: i64,
    config: Vec<u8>,
}

/// At version 2; version 1 had the same shape (so its upgrade is the identity), version 0 is
/// not read.
impl Versioned for DeviceState {
    const VERSION: u16 = 2;

    fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, postcard::Error>> {
        (version == 1).then(|| state::upgrade::<Self, Self>(bytes))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Mode {
    Off,
    Legacy(u8),
    Msi { vectors: u16, masked: bool },
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Off),
        any::<u8>().prop_map(Mode::Legacy),
        (any::<u16>(), any::<bool>()).prop_map(|(vectors, masked)| Mode::Msi { vectors, masked }),
    ]
}

fn device_state() -> impl Strategy<Value = DeviceState> {
    (
        any::<u32>(),
        prop::collection::vec(any::<u64>(), 0..8),
        any::<String>(),
        any::<Option<[u8; 6]>>(),
        mode(),
        prop::collection::btree_map(any::<u16>(), any::<bool>(), 0..4),
        any::<i64>(),
        prop::collection::vec(any::<u8>(), 0..32),
    )
        .prop_map(
            |(id, registers, name, mac, mode, vectors, offset, config)| DeviceState {
                id,
                registers,
                name,
                mac,
                mode,
                vectors,
                offset,
                config,
            },
        )
}

/// Participant ids: mostly the `kind/index` shape the VMM uses, sometimes any string at all.
fn id() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z]{1,6}/[0-9]{1,2}", 1 => any::<String>()]
}

/// A state's bytes: a real encoded `DeviceState` or arbitrary bytes.
fn state_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        device_state().prop_map(|state| postcard::to_stdvec(&state).unwrap()),
        prop::collection::vec(any::<u8>(), 0..48),
    ]
}

/// Envelopes with distinct ids, in any order.
fn envelopes() -> impl Strategy<Value = Vec<Envelope>> {
    envelopes_of(0..6)
}

fn envelopes_of(count: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Envelope>> {
    prop::collection::btree_map(id(), (any::<u16>(), state_bytes()), count)
        .prop_map(|map| {
            map.into_iter()
                .map(|(id, (version, state))| Envelope { id, version, state })
                .collect::<Vec<_>>()
        })
        .prop_shuffle()
}

fn valid_blob() -> impl Strategy<Value = (Vec<Envelope>, Vec<u8>)> {
    envelopes().prop_map(|envelopes| {
        let blob = state::encode(envelopes.clone()).unwrap();
        (envelopes, blob)
    })
}

/// A change to a byte string. Indices are taken modulo its length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit { at: usize, bit: u8 },
    SetByte { at: usize, value: u8 },
    Overwrite { at: usize, bytes: Vec<u8> },
    Truncate { keep: usize },
    Extend { bytes: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, count: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = || prop::collection::vec(any::<u8>(), 1..16);
    prop_oneof![
        3 => (any::<usize>(), 0..8u8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => (any::<usize>(), bytes()).prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        1 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => bytes().prop_map(|bytes| Mutation::Extend { bytes }),
        1 => (any::<usize>(), bytes()).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<usize>(), 1..8usize).prop_map(|(at, count)| Mutation::Remove { at, count }),
    ]
}

impl Mutation {
    /// Applies the change to `bytes[from..to]` (the part being fuzzed); returns the new `to`.
    fn apply(&self, bytes: &mut Vec<u8>, from: usize, to: usize) -> usize {
        let len = to - from;
        let pick = |at: usize, room: usize| from + if room == 0 { 0 } else { at % room };
        match self {
            Mutation::FlipBit { at, bit } if len > 0 => bytes[pick(*at, len)] ^= 1 << bit,
            Mutation::SetByte { at, value } if len > 0 => bytes[pick(*at, len)] = *value,
            Mutation::Overwrite { at, bytes: new } if len > 0 => {
                let start = pick(*at, len);
                let end = (start + new.len()).min(to);
                bytes[start..end].copy_from_slice(&new[..end - start]);
            }
            Mutation::Truncate { keep } => {
                let cut = pick(*keep, len);
                bytes.drain(cut..to);
                return cut;
            }
            Mutation::Extend { bytes: new } => {
                bytes.splice(to..to, new.iter().copied());
                return to + new.len();
            }
            Mutation::Insert { at, bytes: new } => {
                let start = pick(*at, len + 1);
                bytes.splice(start..start, new.iter().copied());
                return to + new.len();
            }
            Mutation::Remove { at, count } if len > 0 => {
                let start = pick(*at, len);
                let end = (start + count).min(to);
                bytes.drain(start..end);
                return to - (end - start);
            }
            _ => {}
        }
        to
    }
}

/// The envelopes of a decoded set, by id.
fn contents(set: &state::StateSet) -> BTreeMap<String, Envelope> {
    set.remaining()
        .into_iter()
        .map(|id| {
            let envelope = set.envelope(&id).unwrap().clone();
            (id, envelope)
        })
        .collect()
}

fn by_id(envelopes: &[Envelope]) -> BTreeMap<String, Envelope> {
    envelopes
        .iter()
        .map(|envelope| (envelope.id.clone(), envelope.clone()))
        .collect()
}

/// Checks what every decoded set must satisfy: each envelope is filed under its own id, it
/// encodes into a blob that decodes to the same set, and taking any state as a `DeviceState`
/// gives it or a `BadState`/`NewerState`/`UnknownState` error.
fn check_well_formed(mut set: state::StateSet) -> Result<(), TestCaseError> {
    let found = contents(&set);
    for (id, envelope) in &found {
        prop_assert_eq!(id, &envelope.id);
    }
    let again = state::decode(&state::encode(found.values().cloned().collect()).unwrap()).unwrap();
    prop_assert_eq!(contents(&again), found.clone());
    for id in found.keys() {
        match set.take::<DeviceState>(id) {
            Ok(_)
            | Err(
                StateError::BadState { .. }
                | StateError::NewerState { .. }
                | StateError::UnknownState { .. },
            ) => {}
            Err(other) => prop_assert!(false, "take({id}) gave {other:?}"),
        }
    }
    prop_assert!(set.finish().is_ok());
    Ok(())
}

/// Any byte string, a string behind the right magic, and a sealed blob (valid header, length
/// and checksum) around random payload bytes, which only postcard's decoding can refuse.
fn hostile_blob() -> impl Strategy<Value = Vec<u8>> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..160);
    prop_oneof![
        bytes(),
        bytes().prop_map(|rest| [&b"CHLUSTAT"[..], &rest].concat()),
        (0..4u16, bytes()).prop_map(|(version, payload)| common::seal(version, &payload)),
        bytes().prop_map(|payload| common::seal(FORMAT_VERSION, &payload)),
    ]
}

proptest! {
    #![proptest_config(common::config(REGRESSIONS))]

    #[test]
    fn any_bytes_are_refused_with_a_reason_or_decoded(blob in hostile_blob()) {
        match state::decode(&blob) {
            Ok(set) => check_well_formed(set)?,
            Err(error) => prop_assert!(!error.to_string().is_empty()),
        }
    }

    #[test]
    fn encoded_envelopes_decode_to_the_same_set((envelopes, blob) in valid_blob()) {
        let set = state::decode(&blob).unwrap();

        prop_assert_eq!(contents(&set), by_id(&envelopes));
    }

    #[test]
    fn typed_states_come_back_equal(states in prop::collection::vec(device_state(), 0..5)) {
        let envelopes = states
            .iter()
            .enumerate()
            .map(|(i, state)| Envelope::wrap(&format!("device/{i}"), state).unwrap())
            .collect();
        let mut set = state::decode(&state::encode(envelopes).unwrap()).unwrap();

        for (i, state) in states.iter().enumerate() {
            let taken: DeviceState = set.take(&format!("device/{i}")).unwrap();
            prop_assert_eq!(&taken, state);
        }
        prop_assert!(set.finish().is_ok());
    }

    #[test]
    fn a_changed_blob_with_its_old_checksum_is_always_refused(
        (_, blob) in valid_blob(),
        changes in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut changed = blob.clone();
        for change in &changes {
            let to = changed.len();
            change.apply(&mut changed, 0, to);
        }
        prop_assume!(changed != blob);

        let result = state::decode(&changed);

        prop_assert!(result.is_err(), "{changes:?} decoded: {result:?}");
    }

    #[test]
    fn a_changed_header_is_refused_with_its_reason_even_with_a_fresh_checksum(
        (_, blob) in valid_blob(),
        change in header_change(),
    ) {
        let mut changed = blob.clone();
        change.apply(&mut changed);
        prop_assume!(changed != blob);
        common::reseal(&mut changed);

        let error = state::decode(&changed).unwrap_err();

        change.check(&error)?;
    }

    #[test]
    fn a_forged_payload_is_refused_by_the_structural_checks_or_decodes_well_formed(
        (envelopes, blob) in valid_blob(),
        changes in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut changed = blob.clone();
        let mut end = changed.len() - CHECKSUM_LEN;
        for change in &changes {
            end = change.apply(&mut changed, HEADER_LEN, end);
        }
        common::fix_length(&mut changed);
        common::reseal(&mut changed);

        match state::decode(&changed) {
            Ok(set) if changed == blob => prop_assert_eq!(contents(&set), by_id(&envelopes)),
            Ok(set) => check_well_formed(set)?,
            Err(StateError::Payload(_) | StateError::DuplicateId { .. }) => {}
            Err(other) => prop_assert!(false, "past the checksum, refused by {other:?}"),
        }
    }

    #[test]
    fn repeated_ids_are_always_refused(
        envelopes in envelopes_of(1..6),
        repeat in any::<prop::sample::Index>(),
        other in state_bytes(),
    ) {
        let mut twice = envelopes.clone();
        let mut copy = repeat.get(&envelopes).clone();
        copy.state = other;
        let id = copy.id.clone();
        twice.insert(repeat.index(envelopes.len() + 1), copy);

        let error = state::decode(&state::encode(twice).unwrap()).unwrap_err();

        prop_assert!(
            matches!(&error, StateError::DuplicateId { id: twice } if *twice == id),
            "{error:?}"
        );
    }

    #[test]
    fn any_state_bytes_are_taken_or_refused_as_that_participants(
        state in state_bytes(),
        changes in prop::collection::vec(mutation(), 0..3),
        version in 0..4u16,
    ) {
        let mut changed = state.clone();
        for change in &changes {
            let to = changed.len();
            change.apply(&mut changed, 0, to);
        }
        let envelope = Envelope { id: "device/0".into(), version, state: changed.clone() };
        let mut set = state::decode(&state::encode(vec![envelope]).unwrap()).unwrap();

        let result = set.take::<DeviceState>("device/0");

        match result {
            Ok(taken) => {
                prop_assert!((1..=2).contains(&version));
                // postcard accepts over-long varints, so equal bytes are not required; an equal
                // value is: the state read is the one its encoding says.
                let again = postcard::to_stdvec(&taken).unwrap();
                prop_assert_eq!(postcard::from_bytes::<DeviceState>(&again).unwrap(), taken);
            }
            Err(StateError::NewerState { found, supported: 2, id }) => {
                prop_assert!(version > 2 && found == version && id == "device/0");
            }
            Err(StateError::BadState { id, .. }) => {
                prop_assert!((1..=2).contains(&version) && id == "device/0");
            }
            Err(StateError::UnknownState { found: 0, supported: 2, id }) => {
                prop_assert!(version == 0 && id == "device/0");
            }
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }
}

/// A change to one header field, for a blob whose checksum is then recomputed.
#[derive(Debug, Clone)]
enum HeaderChange {
    Magic { at: usize, value: u8 },
    Version(u16),
    Reserved { at: usize, value: u8 },
    Length(u64),
}

fn header_change() -> impl Strategy<Value = HeaderChange> {
    prop_oneof![
        (0..8usize, any::<u8>())
            .prop_filter("a change", |(at, value)| b"CHLUSTAT"[*at] != *value)
            .prop_map(|(at, value)| HeaderChange::Magic { at, value }),
        any::<u16>()
            .prop_filter("another version", |v| !(OLDEST_FORMAT_VERSION
                ..=FORMAT_VERSION)
                .contains(v))
            .prop_map(HeaderChange::Version),
        (RESERVED, 1..=255u8).prop_map(|(at, value)| HeaderChange::Reserved { at, value }),
        prop_oneof![any::<u64>(), 0..512u64].prop_map(HeaderChange::Length),
    ]
}

impl HeaderChange {
    fn apply(&self, blob: &mut [u8]) {
        match *self {
            HeaderChange::Magic { at, value } => blob[at] = value,
            HeaderChange::Version(version) => {
                blob[VERSION_AT..VERSION_AT + 2].copy_from_slice(&version.to_le_bytes());
            }
            HeaderChange::Reserved { at, value } => blob[at] = value,
            HeaderChange::Length(length) => {
                blob[LENGTH_AT..LENGTH_AT + 8].copy_from_slice(&length.to_le_bytes());
            }
        }
    }

    /// Checks the decoder refused the blob for this change and no other reason. A length equal
    /// to the real one is no change: it decodes (the caller never gets here for it).
    fn check(&self, error: &StateError) -> Result<(), TestCaseError> {
        let expected = match (self, error) {
            (HeaderChange::Magic { .. }, StateError::BadMagic) => true,
            (HeaderChange::Version(v), StateError::NewerFormat { found, supported }) => {
                *v > FORMAT_VERSION && found == v && *supported == FORMAT_VERSION
            }
            (HeaderChange::Version(v), StateError::OlderFormat { found, oldest }) => {
                *v < OLDEST_FORMAT_VERSION && found == v && *oldest == OLDEST_FORMAT_VERSION
            }
            (HeaderChange::Reserved { at, value }, StateError::Reserved { offset, value: got }) => {
                at == offset && value == got
            }
            (HeaderChange::Length(length), StateError::LengthMismatch { declared, .. }) => {
                length == declared
            }
            _ => false,
        };
        prop_assert!(expected, "{self:?} was refused as {error:?}");
        Ok(())
    }
}

/// Which check refused a blob (or `Ok`), to see what the generators reach.
fn outcome(blob: &[u8]) -> &'static str {
    match state::decode(blob) {
        Ok(_) => "ok",
        Err(StateError::Truncated { .. }) => "truncated",
        Err(StateError::TooLarge { .. }) => "too large",
        Err(StateError::BadMagic) => "bad magic",
        Err(StateError::Checksum { .. }) => "checksum",
        Err(StateError::NewerFormat { .. }) => "newer format",
        Err(StateError::OlderFormat { .. }) => "older format",
        Err(StateError::Reserved { .. }) => "reserved",
        Err(StateError::LengthMismatch { .. }) => "length",
        Err(StateError::Payload(_)) => "payload",
        Err(StateError::DuplicateId { .. }) => "duplicate id",
        Err(other) => panic!("decode cannot give {other:?}"),
    }
}

#[test]
fn the_generators_reach_every_check_of_the_decoder() {
    // Arrange: a fixed seed, so this checks the generators, not luck.
    let mut runner = TestRunner::deterministic();
    let forged = (valid_blob(), mutation()).prop_map(|((_, mut blob), change)| {
        let end = blob.len() - CHECKSUM_LEN;
        change.apply(&mut blob, HEADER_LEN, end);
        common::fix_length(&mut blob);
        common::reseal(&mut blob);
        blob
    });
    let header = (valid_blob(), header_change()).prop_map(|((_, mut blob), change)| {
        change.apply(&mut blob);
        common::reseal(&mut blob);
        blob
    });
    let duplicate = (valid_blob(), any::<prop::sample::Index>())
        .prop_filter("non-empty", |((envelopes, _), _)| !envelopes.is_empty())
        .prop_map(|((mut envelopes, _), index)| {
            envelopes.push(index.get(&envelopes).clone());
            state::encode(envelopes).unwrap()
        });
    let strategies = [
        hostile_blob().boxed(),
        forged.boxed(),
        header.boxed(),
        duplicate.boxed(),
    ];

    // Act
    let mut seen = BTreeMap::<&str, usize>::new();
    for strategy in &strategies {
        for _ in 0..400 {
            let blob = strategy.new_tree(&mut runner).unwrap().current();
            *seen.entry(outcome(&blob)).or_default() += 1;
        }
    }

    // Assert: every check but the size limit (64 MiB, a unit test's job) refuses some input,
    // and some forged payloads still decode (the checks behind the checksum were reached).
    for check in [
        "ok",
        "truncated",
        "bad magic",
        "checksum",
        "newer format",
        "older format",
        "reserved",
        "length",
        "payload",
        "duplicate id",
    ] {
        assert!(
            seen.contains_key(check),
            "no input reached {check}: {seen:?}"
        );
    }
}
