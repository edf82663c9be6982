//! `ch-luod`: the host's live-update session agent. It owns `/dev/liveupdate` (kernel mode) or a
//! userspace session holder (`--emulate`, restart mode) and serves VMMs over a UNIX socket; see
//! `liveupdate::agent` for the protocol. With a subcommand it acts as a small client instead.

#[path = "../logger.rs"]
mod logger;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use liveupdate::agent::fdstore::{self, Systemd};
use liveupdate::agent::kexec::DEFAULT_BARRIER_TIMEOUT;
use liveupdate::agent::pause_slots::{DEFAULT_LEASE, PauseSlots};
use liveupdate::agent::upgrade::{Handoff, LOCK_WAIT, UPGRADE_WAIT};
use liveupdate::agent::{
    self, AgentClient, AgentServer, AgentState, DEFAULT_SOCKET, HandoverMode, KexecImage,
    SystemKexec,
};
use liveupdate::emulated::EmulatedProvider;
use liveupdate::inherited::{self, ListenEnv};
use liveupdate::kernel::KernelProvider;
use liveupdate::session::SessionProvider;
use liveupdate::sys::listen;
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
    /// Upgrade in place: take every session, and the listening socket, over from the agent
    /// running on --socket (same mode); it exits once this one holds them. Refused while an
    /// update is in flight on one of its connections (tried again for 10 s).
    #[arg(long)]
    upgrade: bool,
    /// Restart mode: how many guests may be paused for an update at once; the others run on
    /// until a slot is free (0: no limit). Default: half the host's CPUs, at least 1.
    #[arg(long, value_name = "N")]
    pause_slots: Option<usize>,
    /// Restart mode: longest a guest holds its pause slot, in milliseconds, before the next one
    /// may pause beside it (a stuck update holds the others up no longer).
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_LEASE.as_millis() as u64)]
    pause_slot_lease_ms: u64,
    /// The agent's nice value: it answers inside every live update's pause, which on a busy
    /// host would otherwise wait for a CPU at each request. Below 0 needs CAP_SYS_NICE; without
    /// it the agent runs at the priority it was started with.
    #[arg(long, value_name = "N", default_value_t = -10, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: i32,
    /// With --upgrade: how long, in seconds, to try again while the running agent is busy.
    #[arg(long, value_name = "SECONDS", default_value_t = UPGRADE_WAIT.as_secs(), requires = "upgrade")]
    upgrade_wait: u64,
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

/// The fds systemd passed (its fd store, after a restart), by name; the variables are removed.
fn inherited_entries() -> anyhow::Result<Vec<(String, OwnedFd)>> {
    let env = ListenEnv::from_process();
    let listed = inherited::listed(&env, std::process::id())
        .context("Cannot take the fds passed by the service manager")?;
    listen::unset_listen_env();
    listed
        .into_iter()
        .map(|(fd, name)| {
            let fd = listen::claim_inherited_fd(fd)
                .with_context(|| format!("Cannot take inherited fd {fd} ({name})"))?;
            Ok((name, fd))
        })
        .collect()
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    // The live-update fault injector (a test hook): a bad value stops us before serving.
    if let Some(fault) = liveupdate::fault::from_env()? {
        agent::faults::arm(fault).map_err(anyhow::Error::msg)?;
        log::warn!("Test fault injector armed: {fault:?}");
    }
    // Before any thread starts, so that every thread inherits the blocked mask and the nice
    // value.
    agent::block_termination_signals()?;
    if let Err(e) = liveupdate::sys::set_own_nice(cli.nice) {
        info!(
            "Running at the nice value ch-luod was started with, not {}: {e}",
            cli.nice
        );
    }
    let mode = if cli.emulate { "restart" } else { "kernel" };
    // What an earlier agent left: systemd's fd store after a restart, or a running agent.
    let inherited = inherited_entries()?;
    let from_store = !inherited.is_empty();
    let mut handoff = None;
    let entries = if cli.upgrade {
        anyhow::ensure!(
            !from_store,
            "--upgrade takes the sessions from a running agent, but the service manager passed fds"
        );
        let mut taken = Handoff::request(&cli.socket, mode, Duration::from_secs(cli.upgrade_wait))
            .context("Cannot take the sessions over from the running agent")?;
        let entries = taken.take_entries();
        handoff = Some(taken);
        entries
    } else {
        inherited
    };
    let mut rebuilt = fdstore::rebuild(entries).context("Cannot take the sessions back")?;
    fdstore::check_mode(&rebuilt, mode)?;
    let (provider, handover): (Box<dyn SessionProvider>, HandoverMode) = if cli.emulate {
        let provider = EmulatedProvider::new();
        let holder = provider.clone();
        let handover = HandoverMode::Restart(Box::new(move |name: &str| holder.handover(name)));
        (Box::new(provider), handover)
    } else {
        let provider = match rebuilt.device.take() {
            Some(device) => KernelProvider::from_device_fd(device),
            None => KernelProvider::open().context("Cannot run in kernel mode")?,
        };
        (
            Box::new(provider),
            HandoverMode::Kexec(std::sync::Arc::new(SystemKexec)),
        )
    };
    info!("{} mode", handover.name());
    let mut state = AgentState::new(provider, handover, agent::effective_uid());
    let slots = cli.pause_slots.unwrap_or_else(PauseSlots::default_limit);
    state = state.with_pause_slots(slots, Duration::from_millis(cli.pause_slot_lease_ms));
    let taken_back = rebuilt.session_count();
    state
        .import(std::mem::take(&mut rebuilt.sessions))
        .context("Cannot take the sessions back")?;
    // After a kexec: the sessions the last kernel's agent named, for their owners.
    let ahead = if cli.emulate {
        Vec::new()
    } else {
        state.take_manifest()
    };
    if let Some(handoff) = handoff {
        handoff
            .confirm()
            .context("The running agent did not let go of its sessions")?;
    }
    let server = match rebuilt.listener.take() {
        Some(listener) => AgentServer::adopt(&cli.socket, listener, state, LOCK_WAIT)?,
        None => AgentServer::bind(&cli.socket, cli.socket_mode, state)?,
    };
    if taken_back > 0 {
        info!("{taken_back} session(s) taken back");
    }
    if let Some(systemd) = Systemd::from_env().context("Cannot reach the service manager")? {
        let resumed = from_store.then_some(&rebuilt);
        server.keep_in_store(Box::new(systemd), resumed)?;
        if let Some(systemd) = Systemd::from_env()? {
            systemd
                .notify("READY=1", None)
                .context("Cannot tell the service manager the agent is ready")?;
        }
    }
    // Its copies of the fds would keep finished sessions' memory alive.
    drop(rebuilt);
    server.retrieve_ahead(ahead);
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
    if server.handed_off() {
        // The new agent holds every session: drop nothing on the way out.
        info!("handed over to the new agent");
        std::process::exit(0);
    }
    if server.in_store() {
        // systemd keeps them until it starts the agent again (or the unit stops for good).
        info!("stopped; the sessions stay in the service manager's fd store");
        std::process::exit(0);
    }
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
