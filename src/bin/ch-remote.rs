//! `ch-remote`: drives a running VMM over its REST API socket, as cloud-hypervisor's tool.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vmm::api::client::request_with_fds;

/// Remote control for a cloud-hypervisor-compatible VMM.
#[derive(Debug, Parser)]
#[command(name = "ch-remote", version)]
struct Cli {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
enum Command {
    /// Ping the VMM (prints version, pid and features).
    Ping,
    /// Print the VM's configuration and state.
    Info,
    /// Print the devices' counters.
    Counters,
    /// Pause the VM.
    Pause,
    /// Resume the paused VM.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Reboot the VM.
    Reboot,
    /// Delete the VM (shutting it down first).
    Delete,
    /// Boot the created VM.
    Boot,
    /// Shut the VMM process down.
    ShutdownVmm,
    /// Create a VM from a VmConfig JSON file ("-" or nothing: standard input).
    Create {
        /// The VmConfig JSON file.
        path: Option<PathBuf>,
    },
    /// Live-update the VM into a session; the VMM then exits and a successor started with
    /// `--restore source_url=luo://<session>` resumes the guest.
    LiveUpdate {
        /// Name of the live-update session (1 to 63 bytes).
        #[arg(long)]
        session: String,
        /// Write the state as this earlier release reads it (e.g. 0.1.0), so that release's
        /// VMM can restore the VM.
        #[arg(long, value_name = "RELEASE")]
        state_format: Option<String>,
    },
    /// Add a vfio-user device: to the configuration before boot, or hot-added to the running
    /// VM (prints its id and BDF; the guest is told through ACPI).
    AddUserDevice {
        /// `socket=<path>[,id=<id>][,persist=on|off]`.
        device: String,
    },
    /// Add a kernel VFIO device (a host PCI function bound to vfio-pci): to the configuration
    /// before boot, or hot-added to the running VM (prints its id and BDF; the guest is told
    /// through ACPI).
    AddDevice {
        /// `path=/sys/bus/pci/devices/<BDF>[,id=<id>][,kexec=refuse|detach]`.
        device: String,
    },
    /// Add a network card: to the configuration before boot, or hot-added to the running VM
    /// (prints its id and BDF; the guest is told through ACPI). `fd=[...]` names tap fds this
    /// process holds; they are sent with the request (SCM_RIGHTS).
    AddNet {
        /// `tap=<name>|fd=[<fd>,...][,mac=][,ip=][,mask=][,host_mac=][,mtu=][,num_queues=]
        /// [,queue_size=][,id=][,offload_tso|ufo|csum=on|off][,kexec=recreate|fds|refuse]`.
        net: String,
    },
    /// Add the vsock device: to the configuration before boot, or hot-added to the running VM
    /// (prints its id and BDF).
    AddVsock {
        /// `cid=<cid>,socket=<path>[,id=<id>]`.
        vsock: String,
    },
    /// Move the VM to the VMM waiting in `receive-migration` on the same host (local
    /// migration: guest RAM and device fds pass over the socket, nothing is copied); this VMM
    /// exits once the VM has moved.
    SendMigration {
        /// `destination_url=unix:<path>,local=on[,downtime_ms=][,timeout_s=]...`, or a bare URL
        /// with `--local` (older cloud-hypervisor releases).
        migration: String,
        /// With a bare URL: local migration.
        #[arg(long)]
        local: bool,
    },
    /// Wait, in a VMM without a VM, for a VM sent with `send-migration ...,local=on`; returns
    /// once it runs here.
    ReceiveMigration {
        /// `receiver_url=unix:<path>`, or a bare URL.
        migration: String,
    },
    /// Snapshot the VM into an existing directory (`file:///<dir>`); the guest runs on (a
    /// paused VM stays paused).
    Snapshot {
        /// `file:///<directory>`.
        destination_url: String,
    },
    /// Restore a snapshot, in a VMM without a VM.
    Restore {
        /// `source_url=file:///<dir>[,prefault=on|off][,memory_restore_mode=copy|ondemand]
        /// [,resume=true|false]`.
        restore: String,
    },
    /// Remove a kernel VFIO device, a network card or the vsock device: from the configuration before boot, or
    /// from the running VM (the guest is asked to release it; it leaves when the guest ejects
    /// it).
    RemoveDevice {
        /// The device's id.
        id: String,
    },
}

/// One REST call: method, endpoint, optional JSON body and fds to send with it.
#[derive(Debug, PartialEq, Eq)]
struct Call {
    method: &'static str,
    endpoint: &'static str,
    body: Option<Vec<u8>>,
    fds: Vec<i32>,
}

impl Call {
    fn new(method: &'static str, endpoint: &'static str) -> Self {
        Self {
            method,
            endpoint,
            body: None,
            fds: Vec::new(),
        }
    }
}

fn read_config(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    match path {
        Some(path) if path != Path::new("-") => {
            body = std::fs::read(path)
                .with_context(|| format!("Cannot read the VM config {}", path.display()))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut body)
                .context("Cannot read the VM config from standard input")?;
        }
    }
    Ok(body)
}

fn call_for(command: &Command) -> anyhow::Result<Call> {
    Ok(match command {
        Command::Ping => Call::new("GET", "vmm.ping"),
        Command::Info => Call::new("GET", "vm.info"),
        Command::Counters => Call::new("GET", "vm.counters"),
        Command::Pause => Call::new("PUT", "vm.pause"),
        Command::Resume => Call::new("PUT", "vm.resume"),
        Command::Shutdown => Call::new("PUT", "vm.shutdown"),
        Command::Reboot => Call::new("PUT", "vm.reboot"),
        Command::Delete => Call::new("PUT", "vm.delete"),
        Command::Boot => Call::new("PUT", "vm.boot"),
        Command::ShutdownVmm => Call::new("PUT", "vmm.shutdown"),
        Command::Create { path } => Call {
            body: Some(read_config(path.as_deref())?),
            ..Call::new("PUT", "vm.create")
        },
        Command::LiveUpdate {
            session,
            state_format,
        } => Call {
            body: Some(serde_json::to_vec(&vmm::api::LiveUpdateConfig {
                session: session.clone(),
                state_format: state_format.clone(),
            })?),
            ..Call::new("PUT", "vm.live-update")
        },
        Command::AddUserDevice { device } => {
            let device = vmm::config::parse_user_device(device)
                .context("Invalid add-user-device argument")?;
            Call {
                body: Some(serde_json::to_vec(&device)?),
                ..Call::new("PUT", "vm.add-user-device")
            }
        }
        Command::RemoveDevice { id } => Call {
            body: Some(serde_json::to_vec(&serde_json::json!({ "id": id }))?),
            ..Call::new("PUT", "vm.remove-device")
        },
        Command::AddNet { net } => {
            let net = vmm::config::parse_net(net).context("Invalid add-net argument")?;
            Call {
                body: Some(serde_json::to_vec(&net)?),
                fds: net.fds.clone().unwrap_or_default(),
                ..Call::new("PUT", "vm.add-net")
            }
        }
        Command::AddVsock { vsock } => {
            let vsock = vmm::config::parse_vsock(vsock).context("Invalid add-vsock argument")?;
            Call {
                body: Some(serde_json::to_vec(&vsock)?),
                ..Call::new("PUT", "vm.add-vsock")
            }
        }
        Command::SendMigration { migration, local } => {
            let data = if migration.contains('=') {
                vmm::config::parse_send_migration(migration)
                    .context("Invalid send-migration argument")?
            } else {
                vmm::config::SendMigrationData {
                    destination_url: migration.clone(),
                    local: *local,
                    ..Default::default()
                }
            };
            Call {
                body: Some(serde_json::to_vec(&data)?),
                ..Call::new("PUT", "vm.send-migration")
            }
        }
        Command::ReceiveMigration { migration } => {
            let data = vmm::config::parse_receive_migration(migration)
                .context("Invalid receive-migration argument")?;
            Call {
                body: Some(serde_json::to_vec(&data)?),
                ..Call::new("PUT", "vm.receive-migration")
            }
        }
        Command::Snapshot { destination_url } => Call {
            body: Some(serde_json::to_vec(&vmm::config::VmSnapshotConfig {
                destination_url: destination_url.clone(),
            })?),
            ..Call::new("PUT", "vm.snapshot")
        },
        Command::Restore { restore } => {
            let restore =
                vmm::config::parse_vm_restore(restore).context("Invalid restore argument")?;
            Call {
                body: Some(serde_json::to_vec(&restore)?),
                ..Call::new("PUT", "vm.restore")
            }
        }
        Command::AddDevice { device } => {
            let device =
                vmm::config::parse_device(device).context("Invalid add-device argument")?;
            Call {
                body: Some(serde_json::to_vec(&device)?),
                ..Call::new("PUT", "vm.add-device")
            }
        }
    })
}

fn try_main(cli: &Cli) -> anyhow::Result<bool> {
    let call = call_for(&cli.command)?;
    let response = request_with_fds(
        &cli.api_socket,
        call.method,
        call.endpoint,
        call.body.as_deref(),
        &call.fds,
    )?;
    if response.is_success() {
        if !response.body.is_empty() {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&response.body)?;
            stdout.write_all(b"\n")?;
        }
        return Ok(true);
    }
    eprintln!(
        "ch-remote: {} failed with HTTP status {}:",
        call.endpoint, response.status
    );
    for message in response.error_messages() {
        eprintln!("  {message}");
    }
    Ok(false)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version also arrive here, printed to stdout.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match try_main(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ch-remote: Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn shutdown_vmm_maps_to_put_vmm_shutdown() {
        let cli = parse(&["ch-remote", "--api-socket", "/tmp/s", "shutdown-vmm"]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!(cli.api_socket, PathBuf::from("/tmp/s"));
        assert_eq!(call, Call::new("PUT", "vmm.shutdown"));
    }

    #[test]
    fn queries_map_to_get() {
        let info = parse(&["ch-remote", "--api-socket", "s", "info"]);
        let ping = parse(&["ch-remote", "--api-socket", "s", "ping"]);
        let counters = parse(&["ch-remote", "--api-socket", "s", "counters"]);

        assert_eq!(
            call_for(&info.command).unwrap(),
            Call::new("GET", "vm.info")
        );
        assert_eq!(
            call_for(&ping.command).unwrap(),
            Call::new("GET", "vmm.ping")
        );
        assert_eq!(
            call_for(&counters.command).unwrap(),
            Call::new("GET", "vm.counters")
        );
    }

    #[test]
    fn lifecycle_commands_map_to_put_of_the_same_name() {
        let names = ["pause", "resume", "shutdown", "reboot", "delete", "boot"];

        let calls: Vec<Call> = names
            .iter()
            .map(|name| call_for(&parse(&["ch-remote", "--api-socket", "s", name]).command))
            .collect::<Result<_, _>>()
            .unwrap();

        let endpoints: Vec<String> = calls
            .iter()
            .map(|c| format!("{} {}", c.method, c.endpoint))
            .collect();
        assert_eq!(
            endpoints,
            [
                "PUT vm.pause",
                "PUT vm.resume",
                "PUT vm.shutdown",
                "PUT vm.reboot",
                "PUT vm.delete",
                "PUT vm.boot"
            ]
        );
    }

    #[test]
    fn create_reads_the_config_file_as_the_body() {
        let path = std::env::temp_dir().join(format!("ch-remote-create-{}", std::process::id()));
        std::fs::write(&path, br#"{"payload":{"kernel":"/k"}}"#).unwrap();
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "create",
            path.to_str().unwrap(),
        ]);

        let call = call_for(&cli.command).unwrap();

        std::fs::remove_file(&path).unwrap();
        assert_eq!(call.method, "PUT");
        assert_eq!(call.endpoint, "vm.create");
        assert_eq!(call.body.unwrap(), br#"{"payload":{"kernel":"/k"}}"#);
    }

    #[test]
    fn create_with_a_missing_file_names_the_file() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "create",
            "/nonexistent.json",
        ]);

        let error = call_for(&cli.command).unwrap_err();

        assert!(format!("{error:#}").contains("/nonexistent.json"));
    }

    #[test]
    fn live_update_sends_the_session_and_the_state_format_only_when_given() {
        let plain = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "live-update",
            "--session",
            "vm1",
        ]);
        let back = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "live-update",
            "--session",
            "vm1",
            "--state-format",
            "0.1.0",
        ]);

        let plain = call_for(&plain.command).unwrap();
        let back = call_for(&back.command).unwrap();

        assert_eq!((plain.method, plain.endpoint), ("PUT", "vm.live-update"));
        let body = |call: Call| -> serde_json::Value {
            serde_json::from_slice(&call.body.unwrap()).unwrap()
        };
        assert_eq!(body(plain), serde_json::json!({"session": "vm1"}));
        assert_eq!(
            body(back),
            serde_json::json!({"session": "vm1", "state_format": "0.1.0"})
        );
    }

    #[test]
    fn add_user_device_sends_its_options_as_user_device_config() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-user-device",
            "socket=/run/dev.sock,id=dev0,persist=on",
        ]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.add-user-device"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"socket": "/run/dev.sock", "id": "dev0", "persist": true})
        );
    }

    #[test]
    fn add_user_device_without_id_sends_no_id() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-user-device",
            "socket=/run/dev.sock",
        ]);

        let call = call_for(&cli.command).unwrap();

        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"socket": "/run/dev.sock", "persist": false})
        );
    }

    #[test]
    fn add_user_device_with_unknown_key_or_no_socket_is_refused_before_sending() {
        let unknown = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-user-device",
            "path=/x",
        ]);
        let no_socket = parse(&["ch-remote", "--api-socket", "s", "add-user-device", "id=a"]);

        let unknown = format!("{:#}", call_for(&unknown.command).unwrap_err());
        let no_socket = format!("{:#}", call_for(&no_socket.command).unwrap_err());

        assert!(unknown.contains("Unknown key 'path'"), "{unknown}");
        assert!(no_socket.contains("Missing key 'socket'"), "{no_socket}");
    }

    #[test]
    fn add_user_device_without_argument_is_rejected() {
        let error =
            Cli::try_parse_from(["ch-remote", "--api-socket", "s", "add-user-device"]).unwrap_err();

        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn add_device_sends_its_options_as_device_config() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-device",
            "path=/sys/bus/pci/devices/0000:00:03.0,id=edu,kexec=detach",
        ]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.add-device"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "path": "/sys/bus/pci/devices/0000:00:03.0",
                "id": "edu",
                "kexec": "detach"
            })
        );
    }

    #[test]
    fn remove_device_sends_the_id() {
        let cli = parse(&["ch-remote", "--api-socket", "s", "remove-device", "edu"]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.remove-device"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(body, serde_json::json!({"id": "edu"}));
    }

    #[test]
    fn add_device_without_id_sends_only_the_path() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-device",
            "path=/sys/bus/pci/devices/0000:00:03.0",
        ]);

        let call = call_for(&cli.command).unwrap();

        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"path": "/sys/bus/pci/devices/0000:00:03.0"})
        );
    }

    #[test]
    fn add_device_with_unknown_key_no_path_or_empty_id_is_refused_before_sending() {
        let arguments = [
            "socket=/x",
            "id=a",
            "path=/sys/x,id=",
            "path=/sys/x,iommu=on",
        ];

        let errors: Vec<String> = arguments
            .iter()
            .map(|argument| {
                let cli = parse(&["ch-remote", "--api-socket", "s", "add-device", argument]);
                format!("{:#}", call_for(&cli.command).unwrap_err())
            })
            .collect();

        assert!(errors[0].contains("Unknown key 'socket'"), "{}", errors[0]);
        assert!(errors[1].contains("Missing key 'path'"), "{}", errors[1]);
        assert!(errors[2].contains("non-empty id"), "{}", errors[2]);
        assert!(errors[3].contains("Unknown key 'iommu'"), "{}", errors[3]);
        assert!(
            errors
                .iter()
                .all(|e| e.contains("Invalid add-device argument")),
            "{errors:?}"
        );
    }

    #[test]
    fn add_net_sends_its_config_and_names_the_fds_to_pass() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "add-net",
            "fd=[3,4],mac=12:34:56:78:9a:bc,id=n1",
        ]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.add-net"));
        assert_eq!(call.fds, vec![3, 4]);
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(body["mac"], "12:34:56:78:9a:bc");
        assert_eq!(body["num_queues"], 4);
        assert_eq!(body["id"], "n1");
    }

    #[test]
    fn add_net_with_a_bad_mac_is_refused_before_sending() {
        let cli = parse(&["ch-remote", "--api-socket", "s", "add-net", "tap=t0,mac=zz"]);

        let error = call_for(&cli.command).unwrap_err();

        assert!(
            format!("{error:#}").contains("Invalid add-net argument"),
            "{error:#}"
        );
    }

    #[test]
    fn send_migration_sends_send_migration_data() {
        // Arrange
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "/tmp/s",
            "send-migration",
            "destination_url=unix:/run/d.sock,local=on",
        ]);

        // Act
        let call = call_for(&cli.command).unwrap();

        // Assert
        assert_eq!((call.method, call.endpoint), ("PUT", "vm.send-migration"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"destination_url": "unix:/run/d.sock", "local": true})
        );
    }

    #[test]
    fn send_migration_takes_the_older_local_flag_and_bare_url() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "/tmp/s",
            "send-migration",
            "--local",
            "unix:/run/d.sock",
        ]);

        let call = call_for(&cli.command).unwrap();

        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"destination_url": "unix:/run/d.sock", "local": true})
        );
    }

    #[test]
    fn receive_migration_takes_a_key_or_a_bare_url() {
        for argument in ["receiver_url=unix:/run/r.sock", "unix:/run/r.sock"] {
            let cli = parse(&[
                "ch-remote",
                "--api-socket",
                "/tmp/s",
                "receive-migration",
                argument,
            ]);

            let call = call_for(&cli.command).unwrap();

            assert_eq!(
                (call.method, call.endpoint),
                ("PUT", "vm.receive-migration")
            );
            let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
            assert_eq!(
                body,
                serde_json::json!({"receiver_url": "unix:/run/r.sock"})
            );
        }
    }

    #[test]
    fn send_migration_with_an_unknown_key_is_refused_before_sending() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "/tmp/s",
            "send-migration",
            "destination_url=unix:/d,lokal=on",
        ]);

        let error = call_for(&cli.command).unwrap_err();

        assert!(format!("{error:#}").contains("lokal"), "{error:#}");
    }

    #[test]
    fn add_device_without_argument_is_rejected() {
        let error =
            Cli::try_parse_from(["ch-remote", "--api-socket", "s", "add-device"]).unwrap_err();

        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn missing_api_socket_is_rejected() {
        let error = Cli::try_parse_from(["ch-remote", "ping"]).unwrap_err();

        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }

    #[test]
    fn unknown_command_is_rejected() {
        let error =
            Cli::try_parse_from(["ch-remote", "--api-socket", "s", "frobnicate"]).unwrap_err();

        assert_eq!(error.kind(), clap::error::ErrorKind::InvalidSubcommand);
    }

    #[test]
    fn snapshot_sends_the_url_as_destination_url() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "snapshot",
            "file:///var/snap",
        ]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.snapshot"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"destination_url": "file:///var/snap"})
        );
    }

    #[test]
    fn restore_sends_its_options_as_restore_config() {
        let cli = parse(&[
            "ch-remote",
            "--api-socket",
            "s",
            "restore",
            "source_url=file:///var/snap,prefault=on,resume=true",
        ]);

        let call = call_for(&cli.command).unwrap();

        assert_eq!((call.method, call.endpoint), ("PUT", "vm.restore"));
        let body: serde_json::Value = serde_json::from_slice(&call.body.unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"source_url": "file:///var/snap", "prefault": true, "resume": true})
        );
    }

    #[test]
    fn restore_without_source_url_is_refused_before_any_call() {
        let cli = parse(&["ch-remote", "--api-socket", "s", "restore", "resume=true"]);

        let error = call_for(&cli.command).unwrap_err();

        assert!(format!("{error:#}").contains("source_url"), "{error:#}");
    }
}
