//! The binaries' logger: records to stderr, each line stamped with the program's name and the
//! time since it started.

use std::io::Write;
use std::time::Instant;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    program: &'static str,
    show_target: bool,
    start: Instant,
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
        // Logging must never fail the program; a closed stderr just loses the line.
        let _ = writeln!(
            std::io::stderr().lock(),
            "{}: {:>4}.{:06}s: <{}> {target}{}",
            self.program,
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            record.level(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Logs at warn, info (`-v`), debug (`-vv`) or trace (`-vvv`) and above, naming the record's
/// module when `show_target`.
pub fn init(program: &'static str, verbose: u8, show_target: bool) {
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
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
