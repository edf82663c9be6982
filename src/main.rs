//! `cloud-hypervisor`: the VMM binary. Parses cloud-hypervisor's flags, validates the VM
//! configuration, then runs the control loop.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{ArgAction, Parser};
use confine::{SeccompMode, ThreadKind};
use vmm::config::{
    LiveUpdateSource, VmCliArgs, parse_api_socket, parse_event_monitor, parse_liveupdate,
    parse_restore,
};
use vmm::control_loop::{VmmOptions, run};
use vmm::live_update::Inherited;

/// A cloud-hypervisor-compatible VMM with host-kernel live update.
#[derive(Debug, Parser)]
#[command(name = "cloud-hypervisor", version)]
struct Cli {
    /// vCPUs: boot=<n>[,max=<n>].
    #[arg(long, value_name = "boot=<n>,max=<n>")]
    cpus: Option<String>,
    /// Guest RAM: size=<bytes|K|M|G>[,shared=on|off][,hugepages=on|off].
    #[arg(long, value_name = "size=<size>")]
    memory: Option<String>,
    /// Kernel image (ELF vmlinux or bzImage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Firmware image.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Disks: path=<image>[,readonly=on|off][,id=<id>] (repeatable, several per flag).
    #[arg(long, value_name = "path=<image>", num_args = 1.., action = ArgAction::Append)]
    disk: Vec<String>,
    /// Network cards: tap=<name>|fd=[<fd>,...][,mac=][,ip=][,mask=][,host_mac=][,mtu=]
    /// [,num_queues=][,queue_size=][,id=][,offload_tso|ufo|csum=on|off]
    /// [,kexec=recreate|fds|refuse] (repeatable, several per flag).
    #[arg(long, value_name = "tap=<name>", num_args = 1.., action = ArgAction::Append)]
    net: Vec<String>,
    /// The vsock device: cid=<cid>,socket=<path>[,id=<id>] (host processes connect to the socket
    /// and write "CONNECT <port>"; guest connections to host port P go to <path>_P).
    #[arg(long, value_name = "cid=<cid>,socket=<path>")]
    vsock: Option<String>,
    /// vfio-user devices: socket=<path>[,persist=on|off] (repeatable).
    #[arg(long, value_name = "socket=<path>", action = ArgAction::Append)]
    user_device: Vec<String>,
    /// Kernel VFIO devices: path=/sys/bus/pci/devices/<BDF>[,id=<id>][,kexec=refuse|detach]
    /// (repeatable; kexec: what a kexec-mode live update does with it, see docs/vfio.md).
    #[arg(long, value_name = "path=<sysfs path>", action = ArgAction::Append)]
    device: Vec<String>,
    /// Serial port: off|null|pty|tty|file=<path>|socket=<path>.
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,
    /// Virtio console: off|null|pty|tty|file=<path>.
    #[arg(long, value_name = "MODE")]
    console: Option<String>,
    /// Entropy source of the virtio-rng device: src=<path>.
    #[arg(long, value_name = "src=<path>")]
    rng: Option<String>,
    /// REST API socket: path=<path>, a bare path, or fd=<fd> (an inherited listening socket).
    #[arg(long, value_name = "path=<path>|fd=<fd>")]
    api_socket: Option<String>,
    /// Event log: path=<path> or fd=<fd> (an inherited fd open for writing).
    #[arg(long, value_name = "path=<path>|fd=<fd>")]
    event_monitor: Option<String>,
    /// The VMM's log goes to this file (created or truncated) instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Seccomp filtering: true (a syscall outside the thread's filter kills the VMM), log (the
    /// kernel logs it and lets it through), errno (it fails with EPERM) or false (no filters).
    #[arg(long, value_name = "true|false|log|errno", default_value = "true")]
    seccomp: String,
    /// Landlock (cloud-hypervisor's flag): not supported, refused.
    #[arg(long)]
    landlock: bool,
    /// Landlock rules path=<path>,access=[rw] (cloud-hypervisor's flag): not supported, refused.
    #[arg(long, value_name = "path=<path>,access=[rw]", action = ArgAction::Append)]
    landlock_rules: Vec<String>,
    /// Live-update sessions: agent=<socket> (default /run/ch-luod.sock), or inherit=<name> for
    /// the session fd passed by the service manager (systemd's LUOSession=, LISTEN_FDS).
    #[arg(long, value_name = "agent=<socket>|inherit=<name>")]
    liveupdate: Option<String>,
    /// Restore a live-updated VM: source_url=luo://<session>[,resume=on|off][,timeout=S]
    /// (resumes by default; waits up to S seconds, default 120, for the handover); or a snapshot: source_url=file:///<dir>[,resume=on|off][,prefault=on|off]
    /// (stays paused by default).
    #[arg(long, value_name = "source_url=luo://<session>|file:///<dir>")]
    restore: Option<String>,
    /// More logging (repeatable: info, debug, trace).
    #[arg(short = 'v', action = ArgAction::Count)]
    verbose: u8,
}

impl Cli {
    fn vm_args(&self) -> VmCliArgs {
        VmCliArgs {
            cpus: self.cpus.clone(),
            memory: self.memory.clone(),
            kernel: self.kernel.clone(),
            firmware: self.firmware.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            disks: self.disk.clone(),
            net: self.net.clone(),
            vsock: self.vsock.clone(),
            user_devices: self.user_device.clone(),
            devices: self.device.clone(),
            serial: self.serial.clone(),
            console: self.console.clone(),
            rng: self.rng.clone(),
        }
    }
}

/// `--landlock` is refused rather than silently not honoured: nothing restricts file access.
fn check_landlock(cli: &Cli) -> anyhow::Result<()> {
    if cli.landlock || !cli.landlock_rules.is_empty() {
        bail!(
            "--landlock and --landlock-rules are not supported by this VMM (docs/security.md); \
             leave them out"
        );
    }
    Ok(())
}

fn try_main(cli: &Cli) -> anyhow::Result<()> {
    let seccomp: SeccompMode = cli.seccomp.parse()?;
    check_landlock(cli)?;
    // The live-update fault injector (a test hook): a bad value stops us before anything runs.
    if let Some(fault) = liveupdate::fault::from_env()? {
        log::warn!("Test fault injector armed: {fault:?}");
    }
    confine::init(seccomp)?;
    log::info!(
        "Seccomp filters: {}",
        match seccomp {
            SeccompMode::Kill => "a syscall outside them kills the VMM",
            SeccompMode::Log => "a syscall outside them is logged by the kernel and allowed",
            SeccompMode::Errno => "a syscall outside them fails with EPERM",
            SeccompMode::Off => "none (--seccomp false)",
        }
    );
    let vm_args = cli.vm_args();
    let has_payload = vm_args.kernel.is_some() || vm_args.firmware.is_some();
    let restore = cli.restore.as_deref().map(parse_restore).transpose()?;
    for (id, fds) in restore.iter().flat_map(|r| r.net_fds()) {
        vmm::device_manager::adopt_inherited_fds_for(id, fds)
            .context("Invalid --restore net_fds")?;
    }
    if restore.is_some() && vm_args != VmCliArgs::default() {
        bail!(
            "--restore takes the VM configuration from the live-update session or the snapshot: drop the VM options"
        );
    }
    let vm = if has_payload {
        let config = vm_args.to_vm_config().context("Invalid VM configuration")?;
        config.validate().context("Invalid VM configuration")?;
        vmm::device_manager::adopt_inherited_tap_fds(&config)
            .context("Invalid VM configuration")?;
        Some(config)
    } else if vm_args != VmCliArgs::default() {
        bail!("VM options need a payload: give --kernel (or --firmware)");
    } else {
        None
    };
    let api_socket = cli
        .api_socket
        .as_deref()
        .map(parse_api_socket)
        .transpose()?;
    if vm.is_none() && restore.is_none() && api_socket.is_none() {
        bail!(
            "Nothing to do: give --kernel to boot a VM, --restore to take one over, or --api-socket to wait for API calls"
        );
    }
    let event_monitor = cli
        .event_monitor
        .as_deref()
        .map(parse_event_monitor)
        .transpose()?;
    let default_agent = || PathBuf::from(liveupdate::agent::DEFAULT_SOCKET);
    let (liveupdate_agent, liveupdate_inherited) = match cli
        .liveupdate
        .as_deref()
        .map(parse_liveupdate)
        .transpose()?
    {
        None => (default_agent(), None),
        Some(LiveUpdateSource::Agent(path)) => (path, None),
        // Still single-threaded here, as taking it (it unsets LISTEN_*) requires.
        Some(LiveUpdateSource::Inherit(name)) => {
            let inherited = Inherited::take(&name).with_context(|| {
                format!("Cannot take the inherited live-update session {name:?}")
            })?;
            (default_agent(), Some(inherited))
        }
    };
    // The main thread becomes the control loop; every other thread is created under this filter.
    confine::confine_thread(ThreadKind::Vmm)?;
    run(
        VmmOptions {
            api_socket,
            event_monitor,
            liveupdate_agent,
            liveupdate_inherited,
            restore,
        },
        vm,
    )
    .context("The VMM failed")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version also arrive here, as "errors" printed to stdout.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let log_file = match cli
        .log_file
        .as_deref()
        .map(std::fs::File::create)
        .transpose()
    {
        Ok(file) => file,
        Err(e) => {
            eprintln!("cloud-hypervisor: Error: Cannot create the log file: {e}");
            return ExitCode::FAILURE;
        }
    };
    logger::init_to("cloud-hypervisor", cli.verbose, true, log_file);
    match try_main(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if cli.log_file.is_some() {
                log::error!("{e:#}");
            }
            eprintln!("cloud-hypervisor: Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
