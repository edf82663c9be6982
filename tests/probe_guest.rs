//! The VMM core on real KVM, proved with the probe guest: vCPUs run, RAM keeps its contents,
//! pause/resume stops and restarts the guest, serial input reaches it, reboots work, and events
//! are logged.
// Integration tests are their own crate: no `cfg(test)` module to hold them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::tests_outside_test_module
)]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    ProbeStatus, VmmProcess, assert_events_in_order, parse_probe_number, pattern_ranges,
    probe_fields, read_events, require_kvm, scratch_dir,
};

const BOOT: Duration = Duration::from_secs(30);
const LINE: Duration = Duration::from_secs(10);
/// Small RAM and pattern: guest memory work is slow on this host's paravirtualised KVM.
const QUICK: &str = "fill=1 status_ms=300";

/// Boots `cpus` vCPUs and asserts the banner and three advancing, error-free status lines.
fn assert_boots_and_advances(name: &str, cpus: u8) {
    require_kvm();
    let dir = scratch_dir(name);
    let vmm = VmmProcess::probe(cpus, "128M", QUICK, &dir, &[]);

    let (mut next, banner) = vmm.next_banner(0, BOOT);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (after, status) = vmm.next_status(next, LINE);
        next = after;
        statuses.push(status);
    }

    assert_eq!(banner["cpus"], cpus.to_string(), "{banner:?}");
    for pair in statuses.windows(2) {
        assert!(pair[1].get("seq") > pair[0].get("seq"), "{pair:?}");
        assert!(pair[1].get("pages") > pair[0].get("pages"), "{pair:?}");
    }
    for status in &statuses {
        assert_eq!(status.get("errors"), 0, "{status:?}");
        assert_eq!(status.get("cpus"), u64::from(cpus), "{status:?}");
    }
}

#[test]
fn one_vcpu_boots_and_keeps_verifying_memory() {
    assert_boots_and_advances("one-vcpu", 1);
}

#[test]
fn four_vcpus_boot_and_keep_verifying_memory() {
    assert_boots_and_advances("four-vcpus", 4);
}

#[test]
fn pause_stops_the_guest_and_resume_shows_the_stall() {
    require_kvm();
    let dir = scratch_dir("pause-resume");
    let vmm = VmmProcess::probe(2, "128M", QUICK, &dir, &[]);
    let (next, _) = vmm.next_banner(0, BOOT);
    let (next, _) = vmm.next_status(next, LINE);

    let paused = vmm.ch_remote(&["pause"]);
    let paused_at = Instant::now();
    assert!(paused.status.success(), "{paused:?}");
    // A line the guest wrote just before the pause may still be in the pipe.
    std::thread::sleep(Duration::from_millis(100));
    let lines_when_paused = vmm.lines().len().max(next);
    std::thread::sleep(Duration::from_millis(1100));
    let info = vmm.ch_remote(&["info"]);
    // Read before the resume: the guest's first line after it must not count as "while paused".
    let lines_before_resume = vmm.lines();
    let resume_at = Instant::now();
    let resumed = vmm.ch_remote(&["resume"]);
    let pause_length = resume_at - paused_at;

    let quiet: Vec<String> = lines_before_resume
        [lines_when_paused.min(lines_before_resume.len())..]
        .iter()
        .filter(|line| ProbeStatus::parse(line).is_some())
        .cloned()
        .collect();
    assert!(quiet.is_empty(), "status lines while paused: {quiet:?}");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["state"], "Paused");
    assert!(resumed.status.success(), "{resumed:?}");
    let (next, first) = vmm.next_status(lines_when_paused, LINE);
    let (_, second) = vmm.next_status(next, LINE);
    assert!(
        u128::from(first.get("stall_us")) >= pause_length.as_micros(),
        "stall_us={} but paused for {pause_length:?}",
        first.get("stall_us")
    );
    assert!(second.get("seq") > first.get("seq"));
    assert!(second.get("pages") > first.get("pages"));
}

#[test]
fn the_heartbeat_guest_shows_a_pause_as_a_time_no_vcpu_ran() {
    require_kvm();
    let dir = scratch_dir("heartbeat-pause");
    let vmm = VmmProcess::probe(
        2,
        "128M",
        "heartbeat=1 heartbeat_us=500 status_ms=100",
        &dir,
        &[],
    );
    let (next, banner) = vmm.next_banner(0, BOOT);
    let (next, before) = vmm.next_status(next, LINE);

    let paused = vmm.ch_remote(&["pause"]);
    let paused_at = Instant::now();
    // A line the guest wrote just before the pause may still be in the pipe.
    std::thread::sleep(Duration::from_millis(100));
    let lines_when_paused = vmm.lines().len().max(next);
    std::thread::sleep(Duration::from_millis(600));
    let resume_at = Instant::now();
    let resumed = vmm.ch_remote(&["resume"]);
    let (_, after) = vmm.next_status(lines_when_paused, LINE);

    assert!(paused.status.success() && resumed.status.success());
    assert_eq!(
        (
            banner["heartbeat"].as_str(),
            banner["heartbeat_us"].as_str()
        ),
        ("1", "500")
    );
    assert_eq!(banner["fill"], "0", "the heartbeat writes no pattern");
    assert_eq!(before.get("pages"), 0);
    // Both vCPUs stopped for the whole pause: the shared stamp did not move meanwhile.
    assert!(
        u128::from(after.get("hb_gap_us")) >= (resume_at - paused_at).as_micros(),
        "hb_gap_us={} but paused for {:?}",
        after.get("hb_gap_us"),
        resume_at - paused_at
    );
}

/// The VMM's guest RAM memfd, as a path under /proc that can be opened.
fn guest_ram_memfd(pid: u32) -> PathBuf {
    let fds = PathBuf::from(format!("/proc/{pid}/fd"));
    std::fs::read_dir(&fds)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|fd| {
            std::fs::read_link(fd)
                .is_ok_and(|target| target.to_string_lossy().starts_with("/memfd:guest-ram"))
        })
        .unwrap_or_else(|| panic!("no /memfd:guest-ram link in {}", fds.display()))
}

#[test]
fn host_write_into_guest_ram_is_reported_as_a_mismatch() {
    require_kvm();
    let dir = scratch_dir("corruption");
    let vmm = VmmProcess::probe(2, "128M", QUICK, &dir, &[]);
    let (next, banner) = vmm.next_banner(0, BOOT);
    let (next, before) = vmm.next_status(next, LINE);
    let (start, end) = pattern_ranges(&banner)[0];
    // Below 3 GiB the memfd offset is the guest physical address. A page in the middle of the
    // first range, word-aligned, so the mismatch report names exactly this address.
    let addr = (start + (end - start) / 2) & !0xfff;
    assert!(addr + 8 <= end && addr >= start);

    let ram = OpenOptions::new()
        .read(true)
        .write(true)
        .open(guest_ram_memfd(vmm.pid()))
        .unwrap();
    let mut word = [0u8; 8];
    ram.read_exact_at(&mut word, addr).unwrap();
    let flipped = (!u64::from_le_bytes(word)).to_le_bytes();
    ram.write_all_at(&flipped, addr).unwrap();

    let mut index = next;
    let mismatch = vmm.wait_for(next, Duration::from_secs(30), |line| {
        index += 1;
        probe_fields(line, "mismatch")
    });
    // Another vCPU may print a status line counted before the mismatch: wait for the count.
    let after = vmm.wait_for(index, Duration::from_secs(30), |line| {
        ProbeStatus::parse(line).filter(|status| status.get("errors") > 0)
    });
    assert_eq!(before.get("errors"), 0);
    assert_eq!(parse_probe_number(&mismatch["addr"]), addr, "{mismatch:?}");
    assert!(after.get("seq") > before.get("seq"), "{before:?} {after:?}");
}

#[test]
fn typed_bytes_reach_the_guest_in_order() {
    require_kvm();
    let dir = scratch_dir("serial-input");
    let mut vmm = VmmProcess::probe(1, "64M", QUICK, &dir, &[]);
    let (next, _) = vmm.next_banner(0, BOOT);

    vmm.type_input(b"hi!");

    let mut index = next;
    let mut echoed = Vec::new();
    while echoed.len() < 3 {
        let byte = vmm.wait_for(index, LINE, |line| {
            index += 1;
            let (_, rest) = line.split_once("probe: input ")?;
            Some(parse_probe_number(rest.trim()))
        });
        echoed.push(byte);
    }
    assert_eq!(echoed, [u64::from(b'h'), u64::from(b'i'), u64::from(b'!')]);
}

#[test]
fn guest_requested_reboot_boots_again_and_the_vmm_keeps_running() {
    require_kvm();
    let dir = scratch_dir("guest-reboot");
    let events = dir.join("events.json");
    let event_arg = format!("path={}", events.display());
    let mut vmm = VmmProcess::probe(
        2,
        "64M",
        "fill=1 status_ms=300 reboot_after=2",
        &dir,
        &["--event-monitor", &event_arg],
    );

    let (next, first) = vmm.next_banner(0, BOOT);
    let mut index = next;
    vmm.wait_for(next, LINE, |line| {
        index += 1;
        line.contains("probe: reboot").then_some(())
    });
    let (next, second) = vmm.next_banner(index, BOOT);
    let (_, status) = vmm.next_status(next, LINE);

    assert_eq!(first["cpus"], "2");
    assert_eq!(second["cpus"], "2");
    assert_eq!(status.get("seq"), 1, "status after reboot: {status:?}");
    assert!(vmm.is_running(), "VMM exited; stderr:\n{}", vmm.stderr());
    assert_events_in_order(
        &read_events(&events),
        &[
            ("vm", "booted"),
            ("vm", "rebooting"),
            ("vm", "booting"),
            ("vm", "booted"),
            ("vm", "rebooted"),
        ],
    );
}

/// Boots with `mib` MiB of RAM; returns the banner and asserts that status lines advance.
fn boot_with_ram(name: &str, mib: u64) -> std::collections::BTreeMap<String, String> {
    require_kvm();
    let dir = scratch_dir(name);
    let vmm = VmmProcess::probe(2, &format!("{mib}M"), QUICK, &dir, &[]);

    let (next, banner) = vmm.next_banner(0, BOOT);
    let (next, first) = vmm.next_status(next, LINE);
    let (_, second) = vmm.next_status(next, LINE);

    // The probe counts type-1 RAM, which misses the legacy hole below 1 MiB.
    let ram_mib: u64 = banner["ram_mib"].parse().unwrap();
    assert!(
        (mib - 1..=mib).contains(&ram_mib),
        "{mib} MiB VM: {banner:?}"
    );
    assert!(
        second.get("pages") > first.get("pages"),
        "{first:?} {second:?}"
    );
    assert_eq!(second.get("errors"), 0);
    banner
}

#[test]
fn sixty_four_mib_of_ram_boots() {
    boot_with_ram("ram-64m", 64);
}

#[test]
fn sixteen_gib_of_ram_boots_with_pattern_above_4_gib() {
    let banner = boot_with_ram("ram-16g", 16 << 10);

    let ranges = pattern_ranges(&banner);
    assert!(
        ranges.iter().any(|&(start, _)| start >= 1 << 32),
        "no pattern range above 4 GiB: {banner:?}"
    );
}

#[test]
fn event_monitor_logs_the_lifecycle_in_order() {
    require_kvm();
    let dir = scratch_dir("event-monitor");
    let events = dir.join("events.json");
    let event_arg = format!("path={}", events.display());
    let mut vmm = VmmProcess::probe(1, "64M", QUICK, &dir, &["--event-monitor", &event_arg]);
    let (next, _) = vmm.next_banner(0, BOOT);
    vmm.next_status(next, LINE);

    for command in ["pause", "resume"] {
        let output = vmm.ch_remote(&[command]);
        assert!(output.status.success(), "{command}: {output:?}");
    }
    // Only the exit matters here; whether shutdown-vmm gets its answer is api_lifecycle's test.
    let _ = vmm.ch_remote(&["shutdown-vmm"]);
    let code = vmm.wait_exit(Duration::from_secs(10));

    assert_eq!(code, Some(0));
    assert_events_in_order(
        &read_events(&events),
        &[
            ("vmm", "starting"),
            ("vm", "booting"),
            ("vm", "booted"),
            ("vm", "pausing"),
            ("vm", "paused"),
            ("vm", "resuming"),
            ("vm", "resumed"),
            ("vm", "shutdown"),
            ("vmm", "shutdown"),
        ],
    );
}
