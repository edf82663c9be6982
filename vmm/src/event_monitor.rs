//! The event monitor (`--event-monitor path=`): one pretty-printed JSON object per event,
//! `{"timestamp": {"secs", "nanos"}, "source", "event", "properties"?}`, in cloud-hypervisor's
//! format. The timestamp is the time since the monitor was created.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::warn;
use serde::Serialize;
use thiserror::Error;

/// Errors from the event monitor.
#[derive(Debug, Error)]
pub enum EventMonitorError {
    /// `--event-monitor fd=N` names no fd open for writing.
    #[error("--event-monitor fd={fd} is not usable: {reason}")]
    BadFd {
        /// The fd number.
        fd: i32,
        /// Why.
        reason: String,
    },
    /// The event file could not be created.
    #[error("Cannot create the event monitor file {path}")]
    Create {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Duration,
    source: &'a str,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a BTreeMap<String, String>>,
}

/// Writes VMM and VM events to a file; shareable between threads.
#[derive(Debug)]
pub struct EventMonitor {
    start: Instant,
    file: Mutex<File>,
}

impl EventMonitor {
    /// Writes to `file` (e.g. a pipe the VMM inherited, `--event-monitor fd=N`); timestamps
    /// count from now.
    pub fn to_file(file: File) -> Self {
        Self {
            start: Instant::now(),
            file: Mutex::new(file),
        }
    }

    /// Creates (or truncates) the event file; timestamps count from now.
    pub fn new(path: &Path) -> Result<Self, EventMonitorError> {
        let file = File::create(path).map_err(|source| EventMonitorError::Create {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            start: Instant::now(),
            file: Mutex::new(file),
        })
    }

    /// Writes one event and flushes it. A write failure is logged, never fatal: the VM matters
    /// more than its event log.
    pub fn emit(&self, source: &str, event: &str, properties: Option<&BTreeMap<String, String>>) {
        let record = Event {
            timestamp: self.start.elapsed(),
            source,
            event,
            properties,
        };
        let mut text = match serde_json::to_string_pretty(&record) {
            Ok(text) => text,
            Err(e) => {
                warn!("Cannot serialise event {source}/{event}: {e}");
                return;
            }
        };
        text.push_str("\n\n");
        // A poisoned lock only means another writer panicked; the file is still usable.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            warn!("Cannot write event {source}/{event}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{name}-{}", std::process::id()))
    }

    #[test]
    fn emitted_events_parse_as_a_sequence_of_json_objects() {
        let path = temp_path("event-monitor-sequence");
        let monitor = EventMonitor::new(&path).unwrap();
        let properties = BTreeMap::from([("id".to_string(), "_disk0".to_string())]);

        monitor.emit("vmm", "starting", None);
        monitor.emit("virtio-device", "activated", Some(&properties));

        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let events: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&text)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["source"], "vmm");
        assert_eq!(events[0]["event"], "starting");
        assert!(events[0].get("properties").is_none());
        assert!(events[0]["timestamp"]["secs"].is_u64());
        assert!(events[0]["timestamp"]["nanos"].is_u64());
        assert_eq!(events[1]["properties"]["id"], "_disk0");
    }

    #[test]
    fn new_truncates_an_existing_file() {
        let path = temp_path("event-monitor-truncate");
        std::fs::write(&path, "old content").unwrap();

        let monitor = EventMonitor::new(&path).unwrap();
        monitor.emit("vm", "booted", None);

        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!text.contains("old content"));
        let event: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["event"], "booted");
    }

    #[test]
    fn new_fails_in_a_missing_directory() {
        let result = EventMonitor::new(Path::new("/nonexistent-dir/events.json"));

        assert!(matches!(result, Err(EventMonitorError::Create { .. })));
    }
}
