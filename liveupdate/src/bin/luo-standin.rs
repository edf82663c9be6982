//! `luo-standin`: plays systemd's part for `LUOSession=` in the test bed, which has no systemd.
//!
//! It creates (or, after a kexec, retrieves) a LUO session, starts the service with the session
//! fd as fd 3 and `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` set, as PID 1 does, and keeps its
//! own fd of the session open while the service runs and after it exits. With `--kexec-kernel`
//! it loads the next kernel first (as `kexec -l` would) and, once the service has stopped
//! cleanly (exit 0, or SIGTERM as when `systemctl kexec` stops a unit), reboots into it
//! (`systemctl kexec`), so the session crosses the kexec.
//!
//! ```text
//! luo-standin create|retrieve --session KERNEL_NAME --fdname NAME [--pidfile PATH]
//!     [--kexec-kernel PATH [--kexec-initrd PATH] [--kexec-cmdline TEXT]] -- PROGRAM [ARGS...]
//! ```
//! Test tool only: `/dev/liveupdate` is held just long enough to create or retrieve the session.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode, ExitStatus};

use liveupdate::inherited::FIRST_LISTEN_FD;
use liveupdate::kernel::{KernelProvider, KernelSession};
use liveupdate::session::Session;
use liveupdate::sys::{kexec, listen};

const USAGE: &str = "usage: luo-standin create|retrieve --session KERNEL_NAME --fdname NAME \
[--pidfile PATH] [--kexec-kernel PATH [--kexec-initrd PATH] [--kexec-cmdline TEXT]] -- PROGRAM [ARGS...]";

#[derive(Debug, Default)]
struct Args {
    retrieve: bool,
    session: String,
    fd_name: String,
    pidfile: Option<String>,
    kexec_kernel: Option<String>,
    kexec_initrd: Option<String>,
    kexec_cmdline: String,
    program: Vec<String>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let retrieve = match args.next().as_deref() {
        Some("create") => false,
        Some("retrieve") => true,
        _ => return Err(USAGE.to_string()),
    };
    let mut parsed = Args {
        retrieve,
        ..Args::default()
    };
    while let Some(arg) = args.next() {
        if arg == "--" {
            parsed.program = args.by_ref().collect();
            break;
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--session" => parsed.session = value,
            "--fdname" => parsed.fd_name = value,
            "--pidfile" => parsed.pidfile = Some(value),
            "--kexec-kernel" => parsed.kexec_kernel = Some(value),
            "--kexec-initrd" => parsed.kexec_initrd = Some(value),
            "--kexec-cmdline" => parsed.kexec_cmdline = value,
            _ => return Err(format!("unknown option {arg}\n{USAGE}")),
        }
    }
    if parsed.session.is_empty() || parsed.fd_name.is_empty() || parsed.program.is_empty() {
        return Err(USAGE.to_string());
    }
    Ok(parsed)
}

fn open_session(args: &Args) -> Result<KernelSession, String> {
    // The device only for this: sessions do not depend on it, and others may need it.
    let mut provider = KernelProvider::open().map_err(|e| format!("{e}"))?;
    let session = if args.retrieve {
        provider.retrieve(&args.session)
    } else {
        provider.create(&args.session)
    };
    session.map_err(|e| format!("session {:?}: {e}", args.session))
}

fn load_kexec(args: &Args, kernel: &str) -> Result<(), String> {
    let open = |path: &str| File::open(path).map_err(|e| format!("{path}: {e}"));
    let kernel = open(kernel)?;
    let initrd = args.kexec_initrd.as_deref().map(open).transpose()?;
    kexec::kexec_file_load(
        kernel.as_fd(),
        initrd.as_ref().map(AsFd::as_fd),
        &args.kexec_cmdline,
    )
    .map_err(|e| format!("kexec_file_load: {e}"))
}

/// Starts the service as PID 1 would: the session fd at fd 3, the variables set, and
/// `LISTEN_PID` equal to the service's pid (a shell sets it, then execs the program).
fn start_service(args: &Args, session: &KernelSession) -> Result<std::process::Child, String> {
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"", "sh"])
        .args(&args.program)
        .env_remove("LISTEN_PID")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", &args.fd_name);
    listen::pass_fd_at(&mut command, session.as_fd(), FIRST_LISTEN_FD);
    command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.program[0]))
}

/// A clean stop, as systemd counts it by default: exit 0, or SIGTERM.
fn stopped_cleanly(status: ExitStatus) -> bool {
    status.success() || status.signal() == Some(libc::SIGTERM)
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let session = open_session(args)?;
    let name = session.name().unwrap_or_else(|e| format!("? ({e})"));
    eprintln!(
        "luo-standin: session {name:?} {} as fd name {:?}",
        if args.retrieve {
            "retrieved"
        } else {
            "created"
        },
        args.fd_name
    );
    if let Some(kernel) = &args.kexec_kernel {
        load_kexec(args, kernel)?;
        eprintln!("luo-standin: kexec image {kernel} loaded");
    }
    let mut child = start_service(args, &session)?;
    eprintln!(
        "luo-standin: started {} as pid {}",
        args.program[0],
        child.id()
    );
    if let Some(pidfile) = &args.pidfile {
        std::fs::write(pidfile, format!("{}\n", child.id()))
            .map_err(|e| format!("{pidfile}: {e}"))?;
    }
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    eprintln!("luo-standin: service stopped: {status}");
    if args.kexec_kernel.is_none() {
        return Ok(if stopped_cleanly(status) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if !stopped_cleanly(status) {
        if let Err(e) = kexec::kexec_file_unload() {
            eprintln!("luo-standin: cannot unload the kexec image: {e}");
        }
        return Err(format!(
            "the service failed ({status}): no kexec, session {name:?} dropped"
        ));
    }
    // Still holding the session: reboot() serializes it.
    eprintln!("luo-standin: rebooting into the loaded kernel with session {name:?}");
    let error = kexec::reboot_kexec();
    drop(session);
    Err(format!("reboot(LINUX_REBOOT_CMD_KEXEC): {error}"))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("luo-standin: {message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("luo-standin: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Args, String> {
        parse_args(words.iter().map(|w| (*w).to_string()))
    }

    #[test]
    fn create_with_kexec_and_program_parses() {
        let args = parse(&[
            "create",
            "--session",
            "k",
            "--fdname",
            "vm",
            "--kexec-kernel",
            "/bz",
            "--",
            "ch",
            "--flag",
        ])
        .unwrap();

        assert!(!args.retrieve);
        assert_eq!(args.kexec_kernel.as_deref(), Some("/bz"));
        assert_eq!(args.program, ["ch", "--flag"]);
    }

    #[test]
    fn missing_program_or_mode_is_refused() {
        let no_program = parse(&["create", "--session", "k", "--fdname", "vm"]).unwrap_err();
        let bad_mode = parse(&["hold", "--session", "k"]).unwrap_err();
        let no_value = parse(&["retrieve", "--session"]).unwrap_err();

        assert!(no_program.starts_with("usage:"), "{no_program}");
        assert!(bad_mode.starts_with("usage:"), "{bad_mode}");
        assert_eq!(no_value, "--session needs a value");
    }

    #[test]
    fn sigterm_and_exit_0_are_clean_stops() {
        assert!(stopped_cleanly(ExitStatus::from_raw(0)));
        assert!(stopped_cleanly(ExitStatus::from_raw(libc::SIGTERM)));
        assert!(!stopped_cleanly(ExitStatus::from_raw(1 << 8)));
        assert!(!stopped_cleanly(ExitStatus::from_raw(libc::SIGKILL)));
    }
}
