//! The binaries' logger: records to stderr (or a log file), each line stamped with the
//! program's name and the time since it started.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    program: &'static str,
    show_target: bool,
    start: Instant,
    /// Where records go instead of stderr (`--log-file`).
    file: Option<Mutex<File>>,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.start.elapsed();
        let target = if self.show_target {
            format!("{}: ", record.target())
        } else {
            String::new()
        };
        let line = format!(
            "{}: {:>4}.{:06}s: <{}> {target}{}\n",
            self.program,
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            record.args()
        );
        // Logging must never fail the program; a closed stderr or a full disk loses the line.
        let _ = match &self.file {
            Some(file) => file
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .write_all(line.as_bytes()),
            None => std::io::stderr().lock().write_all(line.as_bytes()),
        };
    }

    fn flush(&self) {}
}

/// Logs at warn, info (`-v`), debug (`-vv`) or trace (`-vvv`) and above to stderr, naming the
/// record's module when `show_target`.
#[allow(dead_code, reason = "each binary uses one of init and init_to")]
pub fn init(program: &'static str, verbose: u8, show_target: bool) {
    init_to(program, verbose, show_target, None);
}

/// As [`init`], into `file` instead of stderr when given.
#[allow(dead_code, reason = "each binary uses one of init and init_to")]
pub fn init_to(program: &'static str, verbose: u8, show_target: bool, file: Option<File>) {
    let level = match verbose {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    // The logger lives for the whole process.
    let logger = Box::leak(Box::new(StderrLogger {
        program,
        show_target,
        start: Instant::now(),
        file: file.map(Mutex::new),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
