//! Replays the regression corpus in `tests/corpus/`: hand-picked inputs at the edges of the
//! state blob decoder and the agent's frame reader, and every input a fuzzer once found wrong.
//! Each file is named `<what it is>.<expected outcome>.bin`; the test decodes it and checks the
//! outcome is that one (see `tests/corpus/README.md`).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use liveupdate::agent::protocol::{self, ProtocolError, Request};
use liveupdate::state::{self, StateError};

/// The corpus files of `dir`, each with the outcome its name expects.
fn corpus(dir: &str) -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_str().unwrap();
            let stem = name
                .strip_suffix(".bin")
                .unwrap_or_else(|| panic!("{name}: not a .bin file"));
            let (_, expected) = stem
                .rsplit_once('.')
                .unwrap_or_else(|| panic!("{name}: no expected outcome in the name"));
            (path.clone(), expected.to_string())
        })
        .collect()
}

fn state_outcome(blob: &[u8]) -> &'static str {
    match state::decode(blob) {
        Ok(_) => "ok",
        Err(StateError::Truncated { .. }) => "truncated",
        Err(StateError::TooLarge { .. }) => "too-large",
        Err(StateError::BadMagic) => "bad-magic",
        Err(StateError::Checksum { .. }) => "checksum",
        Err(StateError::NewerFormat { .. }) => "newer-format",
        Err(StateError::OlderFormat { .. }) => "older-format",
        Err(StateError::Reserved { .. }) => "reserved",
        Err(StateError::LengthMismatch { .. }) => "length",
        Err(StateError::Payload(_)) => "payload",
        Err(StateError::DuplicateId { .. }) => "duplicate-id",
        Err(other) => panic!("decode cannot give {other:?}"),
    }
}

/// What the agent makes of a frame: it reads it from a socket as it would from a VMM, then
/// decodes the body as a request.
fn agent_outcome(frame: &[u8]) -> &'static str {
    let (writer, reader) = UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &writer, frame).unwrap();
    drop(writer);
    let received = match protocol::recv(&reader, Duration::from_secs(5)) {
        Ok(Some(received)) => received,
        Ok(None) => return "nothing",
        Err(ProtocolError::BadMagic) => return "bad-magic",
        Err(ProtocolError::BadVersion(_)) => return "bad-version",
        Err(ProtocolError::BadFlags(_)) => return "bad-flags",
        Err(ProtocolError::TooLarge(_)) => return "too-large",
        Err(ProtocolError::Truncated) => return "truncated",
        Err(other) => panic!("reading a frame gave {other:?}"),
    };
    match protocol::decode_body::<Request>(&received.body) {
        Ok(_) => "request",
        Err(ProtocolError::BadBody(_)) => "bad-body",
        Err(other) => panic!("decoding a body gave {other:?}"),
    }
}

fn replay(dir: &str, outcome: fn(&[u8]) -> &'static str) {
    let mut wrong = Vec::new();
    for (path, expected) in corpus(dir) {
        // Act
        let got = outcome(&fs::read(&path).unwrap());

        if got != expected {
            wrong.push(format!("{}: {got}", path.display()));
        }
    }
    assert!(
        wrong.is_empty(),
        "unexpected outcomes:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_state_blob_of_the_corpus_is_decoded_or_refused_as_its_name_says() {
    replay("state", state_outcome);
}

#[test]
fn every_agent_frame_of_the_corpus_is_read_or_refused_as_its_name_says() {
    replay("agent", agent_outcome);
}
