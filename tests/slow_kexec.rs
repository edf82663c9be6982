//! The slow group, kexec: `scripts/e2e-kexec` live-updates the probe guest across real kexecs
//! of the LUO test kernels inside QEMU (TCG, nested KVM): from the default kernel version
//! (7.2) to the newest one the Debian suites offer (7.3 today, built once and cached) and back
//! (a rollback), with the same guest; targets the agent must refuse before the guest is
//! paused, and a kexec into a kernel without LUO; a kernel booted without `liveupdate=on`; the
//! session inherited the systemd way; and a kernel-mode agent upgraded in place while it holds
//! a LUO session, before and after the kexec. Ignored by default; run it with
//! `cargo test --test slow_kexec -- --ignored`. It fails, never skips, when QEMU, a kernel or
//! any tool is missing (the script installs what it can and names the rest).
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod slow;

use std::path::PathBuf;
use std::process::Command;

use slow::{release_bins, run_script};

/// The release binaries plus a test tool of the liveupdate crate: `luo-standin` (the stand-in
/// for systemd's `LUOSession=`, case inherited) or `agent-holder` (case agent-upgrade).
fn release_bins_with_tool(tool: &str) -> PathBuf {
    let bins = release_bins();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "liveupdate", "--bin", tool])
        .arg("--target-dir")
        .arg(slow::target_dir())
        .current_dir(slow::repo_root())
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cargo build of {tool} failed: {status}");
    assert!(
        bins.join(tool).is_file(),
        "{tool} is missing from {}",
        bins.display()
    );
    bins
}

/// Runs `scripts/e2e-kexec --case <case> <extra>` and asserts it passed; returns its output.
fn run_e2e(case: &str, extra: &[&str]) -> String {
    let bins = match case {
        "inherited" => release_bins_with_tool("luo-standin"),
        "agent-upgrade" => release_bins_with_tool("agent-holder"),
        _ => release_bins(),
    };
    let serial = slow::target_dir()
        .join("slow-tests")
        .join(format!("e2e-kexec-{case}.serial.log"));
    let args = [
        bins.as_os_str(),
        "--case".as_ref(),
        case.as_ref(),
        "--log".as_ref(),
        serial.as_os_str(),
    ];
    let args: Vec<&std::ffi::OsStr> = args
        .into_iter()
        .chain(extra.iter().map(|arg| arg.as_ref()))
        .collect();

    let run = run_script("e2e-kexec", &args, &format!("e2e-kexec-{case}"));

    assert!(
        run.output.contains("E2E-KEXEC-PASS"),
        "no E2E-KEXEC-PASS in {}",
        run.log.display()
    );
    eprintln!(
        "{case}: {:.1} s in all; log: {}",
        run.seconds,
        run.log.display()
    );
    run.output
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn probe_guest_survives_a_kernel_update_and_its_rollback_across_real_kexecs() {
    let output = run_e2e("kexec", &["--next-version", "newest", "--kexecs", "2"]);

    // Two hops, each into the other kernel version, each verifying all guest RAM.
    let hops: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("E2E-KEXEC-HOP ") && l.contains("errors=0"))
        .collect();
    let version = |hop: &str, side: usize| -> String {
        hop.split(": ")
            .nth(1)
            .and_then(|arrow| arrow.split(" -> ").nth(side))
            .unwrap_or_default()
            .to_string()
    };
    assert!(hops.len() >= 2, "not two verified hops: {hops:?}");
    let (first, second) = (hops[0], hops[hops.len() - 1]);
    assert_ne!(
        version(first, 0),
        version(first, 1),
        "the first kexec kept the kernel version: {first}"
    );
    assert_eq!(version(first, 1), version(second, 0), "{first} / {second}");
    assert_eq!(
        version(second, 1),
        version(first, 0),
        "the second kexec is no rollback: {second}"
    );
    for line in output
        .lines()
        .skip_while(|l| !l.starts_with("E2E-KEXEC timings"))
    {
        eprintln!("{line}");
    }
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn unfit_targets_are_refused_before_the_guest_pauses_and_a_kernel_without_luo_loses_it() {
    let output = run_e2e("bad-target", &[]);

    for needle in [
        "kexec of a file that is no kernel said",
        "kexec with a command line lacking liveupdate=on said",
        "live-update after a file that is no kernel said",
        "live-update after a command line without liveupdate=on said",
        "the kernel without LUO booted; no /dev/liveupdate",
    ] {
        assert!(output.contains(needle), "no '{needle}' in the output");
    }
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn without_liveupdate_on_the_agent_refuses_to_start_clearly() {
    run_e2e("no-luo", &[]);
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn session_inherited_the_systemd_way_carries_the_guest_across_a_real_kexec() {
    let output = run_e2e("inherited", &[]);

    assert!(
        output.contains("not the inherited session"),
        "no 400 for an update into another session"
    );
    assert!(
        output.contains("takes no further live update"),
        "no 409 for a second update into the inherited session"
    );
    assert!(
        output.contains("probe verified") && output.contains("errors=0"),
        "the probe did not verify its RAM after the restore"
    );
}

#[test]
#[ignore = "slow group: run with cargo test --test slow_kexec -- --ignored"]
fn a_kernel_mode_agent_upgraded_in_place_keeps_its_luo_session_across_the_kexec() {
    let output = run_e2e("agent-upgrade", &[]);

    for needle in [
        "agent upgraded in place",
        "the kernel still holds \"held\"",
        "all 1048576 bytes as preserved; finished",
        "errors=0",
    ] {
        assert!(output.contains(needle), "no {needle:?} in the output");
    }
    // One upgrade before the kexec (while "held" is outgoing), one after it (before anything
    // is retrieved).
    let at = |marker: &str| {
        output
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker:?} in the output"))
    };
    let stage2 = at("E2E-KEXEC-STAGE2");
    assert!(at("E2E-KEXEC agent upgraded in place") < stage2);
    assert!(output[stage2..].contains("E2E-KEXEC agent upgraded in place"));
}
