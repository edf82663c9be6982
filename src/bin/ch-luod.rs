//! `ch-luod`: the host's live-update session agent. It owns `/dev/liveupdate` (kernel mode) or a
//! userspace session holder (`--emulate`, restart mode) and serves VMMs over a UNIX socket; see
//! `liveupdate::agent` for the protocol. With a subcommand it acts as a small client instead.

#[path = "../logger.rs"]
mod logger;

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;

use anyhow::Context;
use clap::{Parser, Subcommand};
use liveupdate::agent::kexec::DEFAULT_BARRIER_TIMEOUT;
use liveupdate::agent::{
    self, AgentClient, AgentServer, AgentState, DEFAULT_SOCKET, HandoverMode, KexecImage,
    SystemKexec,
};
use liveupdate::emulated::EmulatedProvider;
use liveupdate::kernel::KernelProvider;
use liveupdate::session::SessionProvider;
use log::info;

/// Live-update session agent for cloud-hypervisor-compatible VMMs.
#[derive(Debug, Parser)]
#[command(name = "ch-luod", version)]
struct Cli {
    /// The agent's UNIX socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Restart mode: hold sessions in userspace instead of `/dev/liveupdate`.
    #[arg(long)]
    emulate: bool,
    /// Permission bits of the socket: 0600 (owner only) or 0660 (owner and group).
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// More logging (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Act as a client of a running agent instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
enum Command {
    /// Check the agent is alive and print its mode.
    Ping,
    /// Print the sessions the agent holds, one JSON object per line.
    List,
    /// Discard an outgoing session (the caller must own it).
    Cancel {
        /// Session name.
        name: String,
    },
    /// Kernel mode, root: load the next kernel, wait until every VMM has frozen its session,
    /// and reboot into it. Returns (with an error) only if the kexec fails; the VMMs then
    /// resume their guests.
    Kexec {
        /// The next kernel (bzImage).
        #[arg(long, value_name = "PATH")]
        kernel: PathBuf,
        /// Its initramfs.
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Its command line (it must include `liveupdate=on` for the sessions to be found).
        #[arg(long, value_name = "TEXT", default_value = "")]
        cmdline: String,
        /// Longest wait, in seconds, for every session to freeze before the kexec is cancelled.
        #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_BARRIER_TIMEOUT.as_secs())]
        timeout: u64,
        /// A session that must exist and be frozen before the reboot (repeatable), for VMMs
        /// that may not have created theirs yet; every existing session is waited for anyway.
        #[arg(long = "session", value_name = "NAME")]
        sessions: Vec<String>,
    },
}

fn parse_mode(text: &str) -> Result<u32, String> {
    match u32::from_str_radix(text.trim_start_matches("0o"), 8) {
        Ok(mode @ (0o600 | 0o660)) => Ok(mode),
        _ => Err("expected 0600 or 0660".to_string()),
    }
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    // The live-update fault injector (a test hook): a bad value stops us before serving.
    if let Some(fault) = liveupdate::fault::from_env()? {
        agent::faults::arm(fault).map_err(anyhow::Error::msg)?;
        log::warn!("Test fault injector armed: {fault:?}");
    }
    // Before any thread starts, so that every thread inherits the blocked mask.
    agent::block_termination_signals()?;
    let (provider, handover): (Box<dyn SessionProvider>, HandoverMode) = if cli.emulate {
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = HandoverMode::Restart(Box::new(move |name: &str| holder.handover(name)));
        (Box::new(provider), handover)
    } else {
        let provider = KernelProvider::open().context("Cannot run in kernel mode")?;
        (
            Box::new(provider),
            HandoverMode::Kexec(std::sync::Arc::new(SystemKexec)),
        )
    };
    info!("{} mode", handover.name());
    let state = AgentState::new(provider, handover, agent::effective_uid());
    let server = AgentServer::bind(&cli.socket, cli.socket_mode, state)?;
    let shutdown = server.shutdown_handle();
    thread::Builder::new()
        .name("ch-luod-signals".into())
        .spawn(move || match agent::wait_for_termination() {
            Ok(signal) => {
                info!("signal {signal}: shutting down");
                shutdown.shutdown();
            }
            Err(e) => log::error!("{e:#}"),
        })
        .context("Cannot start the signal thread")?;
    server.run()?;
    drop(server);
    info!("stopped");
    Ok(())
}

fn client(cli: &Cli, command: &Command) -> anyhow::Result<()> {
    let mut client = AgentClient::connect(&cli.socket)?;
    match command {
        Command::Ping => println!("{}", client.ping()?),
        Command::List => {
            for session in client.list()? {
                println!("{}", serde_json::to_string(&session)?);
            }
        }
        Command::Cancel { name } => client.cancel(name)?,
        Command::Kexec {
            kernel,
            initrd,
            cmdline,
            timeout,
            sessions,
        } => {
            let image = KexecImage {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
            };
            return Err(client
                .kexec(&image, sessions, std::time::Duration::from_secs(*timeout))
                .into());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init("ch-luod", cli.verbose, false);
    let result = match &cli.command {
        Some(command) => client(&cli, command),
        None => serve(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ch-luod: {e:#}");
            ExitCode::FAILURE
        }
    }
}
