//! `vfio-user-testdev`: serves the reference DMA test device (PCI 1234:5aa5) over vfio-user on
//! a UNIX socket, one client at a time, until killed. See `vfio_user::testdev`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vfio_user::testdev::{TestDevOptions, serve};

/// A vfio-user PCI device with a DMA engine, for tests.
#[derive(Debug, Parser)]
#[command(name = "vfio-user-testdev", version)]
struct Cli {
    /// The UNIX socket to listen on (must not exist).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Records per second until the driver writes RATE_HZ.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Enable DMA at start into ADDR (guest physical, hex with 0x or decimal), LEN bytes:
    /// for tests whose guest does not drive the device.
    #[arg(long, value_name = "ADDR,LEN", value_parser = parse_enable)]
    enable: Option<(u64, u32)>,
    /// Keep running when the client hangs up; the next client takes the device over as it is
    /// (registers, DMA regions, progress) instead of finding it at power-on.
    #[arg(long)]
    persist: bool,
}

fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("bad number {text:?}: {e}"))
}

fn parse_enable(text: &str) -> Result<(u64, u32), String> {
    let (address, len) = text
        .split_once(',')
        .ok_or_else(|| "expected ADDR,LEN".to_string())?;
    let len = u32::try_from(parse_number(len)?).map_err(|e| format!("bad length: {e}"))?;
    Ok((parse_number(address)?, len))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = TestDevOptions {
        enable_at: cli.enable,
        rate_hz: cli.rate,
        persist: cli.persist,
    };
    match serve(&cli.socket, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("vfio-user-testdev: {message}");
            ExitCode::FAILURE
        }
    }
}
