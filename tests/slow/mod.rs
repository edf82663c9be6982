//! What the slow group's tests share: release binaries built once, and test-bed scripts run
//! with their output kept in a log and shown when they fail.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// What to install when a test-bed script fails for want of a tool.
pub const PREREQUISITES: &str = "The slow group needs root, /dev/kvm, apt access (for linux-source-7.2 \
and busybox-static) and the Debian packages qemu-system-x86 build-essential flex bison bc \
libelf-dev libssl-dev cpio xz-utils kmod perl, which the scripts install when missing";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The target directory this test binary was built in (`<target>/<profile>/cloud-hypervisor`).
pub fn target_dir() -> PathBuf {
    let debug_bin = Path::new(env!("CARGO_BIN_EXE_cloud-hypervisor"));
    debug_bin
        .parent()
        .and_then(Path::parent)
        .expect("binary path has a target directory")
        .to_path_buf()
}

/// Builds `cloud-hypervisor`, `ch-remote` and `ch-luod` in release mode once per test process
/// and returns the directory holding them.
pub fn release_bins() -> PathBuf {
    static BINS: OnceLock<PathBuf> = OnceLock::new();
    BINS.get_or_init(|| {
        let target = target_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bins", "--target-dir"])
            .arg(&target)
            .current_dir(repo_root())
            .status()
            .expect("cannot run cargo");
        assert!(status.success(), "cargo build --release failed: {status}");
        let bins = target.join("release");
        for name in ["cloud-hypervisor", "ch-remote", "ch-luod"] {
            assert!(
                bins.join(name).is_file(),
                "{name} is missing from {}",
                bins.display()
            );
        }
        bins
    })
    .clone()
}

/// The output of one script run, kept in a log file under the target directory.
pub struct ScriptRun {
    /// Everything the script printed.
    pub output: String,
    /// Where it is kept.
    pub log: PathBuf,
    /// How long the script ran.
    pub seconds: f64,
}

/// Runs `scripts/<script> <args>` with stdout and stderr into `<target>/slow-tests/<log_name>.log`;
/// panics with the end of the log when it fails.
/// A run in which the test bed itself crashed ([`test_bed_crashed`]) is run again, up to
/// [`TEST_BED_RUNS`] runs in all, [`SILENT_TEST_BED_RUNS`] while it goes silent (the earlier logs
/// are kept as `<log_name>.run<N>.log`).
pub fn run_script(script: &str, args: &[&OsStr], log_name: &str) -> ScriptRun {
    let (mut status, mut run) = try_run_script(script, args, log_name);
    let mut attempt = 1;
    while !status.success() && test_bed_crashed(&run.output) && attempt < runs_allowed(&run.output)
    {
        let kept = run.log.with_extension(format!("run{attempt}.log"));
        std::fs::rename(&run.log, &kept).unwrap();
        eprintln!(
            "scripts/{script}: the test bed crashed (its kernel panicked, reset or went \
             silent, or QEMU died: under TCG with nested KVM, docs/testbed.md); running it \
             again. The log of run {attempt}: {}",
            kept.display()
        );
        (status, run) = try_run_script(script, args, log_name);
        attempt += 1;
    }
    if !status.success() {
        fail(script, status, &run);
    }
    run
}

/// How many times a script runs while the test bed crashes under it.
pub const TEST_BED_RUNS: u32 = 5;

/// How many times a script runs while its test bed goes silent (`--stall`): QEMU 7.2's TCG stops
/// taking the test bed's own interrupts, in 1 to 4 boots of 10 here and in every one of five runs
/// on a CI host on 7 Dec (docs/testbed.md, "A silent test bed"). A silent run ends after 30 s of
/// silence, mostly within a minute of the test bed's start, so these runs cost little.
pub const SILENT_TEST_BED_RUNS: u32 = 12;

/// What `scripts/serial-drive` prints when the console stayed silent past `--stall`.
const SILENCE: &str = "serial-drive: no output for";

/// How many runs a script gets in all when its last run's test bed crashed as `output` shows.
pub fn runs_allowed(output: &str) -> u32 {
    if output.contains(SILENCE) {
        SILENT_TEST_BED_RUNS
    } else {
        TEST_BED_RUNS
    }
}

/// What `scripts/serial-drive` prints when the test bed crashed: its kernel panicked (it boots
/// with `oops=panic`; the stages reword a guest's panic in their reports, so that never
/// matches), QEMU died of a signal, or the console stayed silent past `--stall` (given only for
/// stages whose every wait is bounded and reported, so only a test bed that stopped is silent).
pub const TEST_BED_CRASHES: [&str; 3] = [
    "serial-drive: fail marker 'Kernel panic' seen",
    "serial-drive: command died of signal",
    SILENCE,
];

/// What `scripts/serial-drive` prints when QEMU ended before the pass marker. Unless the stage
/// ended (the test bed's `/init` prints [`STAGE_ENDED`] when it returns), that is the test
/// bed's kernel resetting on its own (`-no-reboot` turns a reset into QEMU's exit): every stage
/// prints a pass or fail marker before its `reboot -f`.
const QEMU_EXITED: &str = "serial-drive: command exited (0) before";
const STAGE_ENDED: &str = "TESTBED-STAGE-EXIT";

/// Whether `output`, the log of a test-bed script, shows the test bed itself crashing.
pub fn test_bed_crashed(output: &str) -> bool {
    TEST_BED_CRASHES.iter().any(|crash| output.contains(crash))
        || (output.contains(QEMU_EXITED) && !output.contains(STAGE_ENDED))
}

fn try_run_script(script: &str, args: &[&OsStr], log_name: &str) -> (ExitStatus, ScriptRun) {
    let dir = target_dir().join("slow-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join(format!("{log_name}.log"));
    let out = File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let start = Instant::now();
    let status = Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .unwrap_or_else(|e| panic!("cannot run scripts/{script}: {e}"));
    let seconds = start.elapsed().as_secs_f64();
    let output = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    (
        status,
        ScriptRun {
            output,
            log,
            seconds,
        },
    )
}

fn fail(script: &str, status: ExitStatus, run: &ScriptRun) -> ! {
    let lines: Vec<&str> = run.output.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    panic!(
        "scripts/{script} failed ({status}) after {:.0} s; full log: {}\n\
         --- last lines ---\n{tail}\n---\n{PREREQUISITES}",
        run.seconds,
        run.log.display()
    );
}

/// The lines of `run` that hold `marker`, for the test's own report.
pub fn report(run: &ScriptRun, marker: &str) {
    eprintln!("{:.1} s in all; log: {}", run.seconds, run.log.display());
    for line in run.output.lines().filter(|l| l.contains(marker)) {
        eprintln!("{line}");
    }
}
