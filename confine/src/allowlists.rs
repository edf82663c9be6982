//! The allow-lists, one per thread kind (x86_64 syscall numbers).
//!
//! Each entry is a syscall and, for a few, a condition on its arguments: `ioctl` is allowed
//! only for the request families the kind uses (the type byte of the request number: KVM,
//! VFIO and iommufd, LUO, tty and tun, socket), `prctl` only to name a thread. Everything not
//! listed is refused as `--seccomp` says.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

/// An allowed syscall, with or without a condition on its arguments.
#[derive(Clone, Copy, Debug)]
enum Allow {
    /// Any arguments.
    Any(i64),
    /// `ioctl` whose request belongs to one of these families (`_IOC_TYPE`, bits 8-15).
    Ioctl(&'static [IoctlFamily]),
    /// `prctl(PR_SET_NAME, ...)` only: a new thread naming itself.
    PrctlSetName,
}

/// An ioctl family: the type byte of its request numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum IoctlFamily {
    /// `/dev/kvm`, VM, vCPU and KVM device fds (`KVMIO`, 0xAE).
    Kvm = 0xAE,
    /// VFIO containers, groups and devices, and iommufd (both `';'`).
    Vfio = b';',
    /// `/dev/liveupdate` and its session fds (`LIVEUPDATE_IOCTL_TYPE`, 0xBA).
    LiveUpdate = 0xBA,
    /// Terminals, ptys, tun/tap and the generic `FIONBIO`/`FIOCLEX` (`'T'`).
    TtyTun = b'T',
    /// Socket interface requests, `SIOC*` (0x89): a tap's host side.
    Socket = 0x89,
}

use Allow::{Any, Ioctl, PrctlSetName};
use IoctlFamily::{Kvm, LiveUpdate, Socket, TtyTun, Vfio};

/// What every thread does by merely running Rust code: memory, locks, time, signals' return,
/// logging (write to stderr or the log file), its end.
const EVERY_THREAD: &[Allow] = &[
    Any(libc::SYS_read),
    Any(libc::SYS_write),
    Any(libc::SYS_readv),
    Any(libc::SYS_writev),
    Any(libc::SYS_close),
    Any(libc::SYS_futex),
    Any(libc::SYS_mmap),
    Any(libc::SYS_munmap),
    Any(libc::SYS_mprotect),
    Any(libc::SYS_mremap),
    Any(libc::SYS_madvise),
    Any(libc::SYS_brk),
    Any(libc::SYS_rt_sigprocmask),
    Any(libc::SYS_rt_sigreturn),
    Any(libc::SYS_sigaltstack),
    Any(libc::SYS_sched_yield),
    Any(libc::SYS_clock_gettime),
    Any(libc::SYS_clock_nanosleep),
    Any(libc::SYS_nanosleep),
    Any(libc::SYS_gettid),
    Any(libc::SYS_getpid),
    Any(libc::SYS_getrandom),
    Any(libc::SYS_fcntl),
    Any(libc::SYS_poll),
    Any(libc::SYS_ppoll),
    Any(libc::SYS_epoll_wait),
    Any(libc::SYS_epoll_pwait),
    Any(libc::SYS_epoll_ctl),
    // abort() on a fatal error signals the thread itself.
    Any(libc::SYS_tgkill),
    Any(libc::SYS_rseq),
    Any(libc::SYS_set_robust_list),
    // A new thread reads its own attributes (stack, CPU set) when it starts.
    Any(libc::SYS_sched_getaffinity),
    Any(libc::SYS_exit),
    Any(libc::SYS_exit_group),
];

/// A vCPU: `KVM_RUN` and the register work of pause and save; device emulation on its exits,
/// which reads and writes disks' and VFIO regions' fds, talks to vfio-user servers over their
/// sockets, sets up VFIO interrupts when the guest enables MSI, and sets a tap's offloads when
/// the guest's net driver accepts its features.
const VCPU: &[Allow] = &[
    Ioctl(&[Kvm, Vfio, TtyTun]),
    Any(libc::SYS_pread64),
    Any(libc::SYS_pwrite64),
    Any(libc::SYS_preadv),
    Any(libc::SYS_pwritev),
    Any(libc::SYS_lseek),
    Any(libc::SYS_sendto),
    Any(libc::SYS_recvfrom),
    Any(libc::SYS_sendmsg),
    Any(libc::SYS_recvmsg),
    Any(libc::SYS_dup),
    // A VM handed over to a successor is torn down at the lowest priority, its ending vCPU
    // threads too, beside the successor's restore (the control loop's list takes this one).
    Any(libc::SYS_setpriority),
    // A successor's vCPU thread loads its vCPU off the restoring thread's CPU, then takes back
    // its own CPU set (the control loop's list takes this one to move them).
    Any(libc::SYS_sched_setaffinity),
];

/// The API server: accepts clients (with fds as `SCM_RIGHTS`), starts a thread per connection,
/// reads requests and writes answers; the control loop does the work.
const API: &[Allow] = &[
    Ioctl(&[TtyTun]),
    Any(libc::SYS_accept4),
    Any(libc::SYS_recvfrom),
    Any(libc::SYS_recvmsg),
    Any(libc::SYS_sendto),
    Any(libc::SYS_sendmsg),
    Any(libc::SYS_shutdown),
    Any(libc::SYS_setsockopt),
    Any(libc::SYS_getsockopt),
    Any(libc::SYS_dup),
    Any(libc::SYS_fstat),
    Any(libc::SYS_statx),
    Any(libc::SYS_clone),
    Any(libc::SYS_clone3),
    PrctlSetName,
];

/// A device's host side: queue workers move data between the guest's buffers and disks, taps,
/// vsock and console streams; input threads read ptys, sockets and the terminal.
const WORKER: &[Allow] = &[
    Ioctl(&[TtyTun]),
    Any(libc::SYS_pread64),
    Any(libc::SYS_pwrite64),
    Any(libc::SYS_preadv),
    Any(libc::SYS_pwritev),
    Any(libc::SYS_lseek),
    Any(libc::SYS_fsync),
    Any(libc::SYS_fdatasync),
    Any(libc::SYS_fallocate),
    Any(libc::SYS_fstat),
    Any(libc::SYS_statx),
    Any(libc::SYS_socket),
    Any(libc::SYS_connect),
    Any(libc::SYS_accept4),
    Any(libc::SYS_shutdown),
    Any(libc::SYS_setsockopt),
    Any(libc::SYS_getsockopt),
    Any(libc::SYS_sendto),
    Any(libc::SYS_recvfrom),
    Any(libc::SYS_sendmsg),
    Any(libc::SYS_recvmsg),
    Any(libc::SYS_dup),
    // vsock arms its timer (a stalled host connection).
    Any(libc::SYS_timerfd_settime),
    Any(libc::SYS_timerfd_gettime),
];

/// The control loop and its background threads, beyond what the other kinds do (which it must
/// allow too, as their creator): opening the VM's files and devices, building and tearing down
/// VMs (KVM, VFIO, iommufd), guest RAM memfds, sockets for the API, consoles, vsock, vfio-user
/// and the live-update agent (fds passed both ways), the LUO sessions, snapshot files, starting
/// threads and kicking vCPUs out of `KVM_RUN` with a signal.
const VMM: &[Allow] = &[
    Ioctl(&[Kvm, Vfio, LiveUpdate, TtyTun, Socket]),
    // A live update's pause runs at a raised priority (vmm's `pause_priority`), which threads
    // started meanwhile do not inherit.
    Any(libc::SYS_getpriority),
    Any(libc::SYS_sched_setscheduler),
    // Which CPU the restoring thread is on, to keep the vCPU loads off it.
    Any(libc::SYS_getcpu),
    Any(libc::SYS_open),
    Any(libc::SYS_openat),
    Any(libc::SYS_stat),
    Any(libc::SYS_lstat),
    Any(libc::SYS_newfstatat),
    Any(libc::SYS_access),
    Any(libc::SYS_faccessat2),
    Any(libc::SYS_readlink),
    Any(libc::SYS_readlinkat),
    Any(libc::SYS_getdents64),
    Any(libc::SYS_getcwd),
    Any(libc::SYS_mkdir),
    Any(libc::SYS_mkdirat),
    Any(libc::SYS_unlink),
    Any(libc::SYS_unlinkat),
    Any(libc::SYS_rmdir),
    Any(libc::SYS_rename),
    Any(libc::SYS_renameat2),
    Any(libc::SYS_chmod),
    Any(libc::SYS_fchmod),
    Any(libc::SYS_fchmodat),
    Any(libc::SYS_ftruncate),
    Any(libc::SYS_fstatfs),
    Any(libc::SYS_flock),
    Any(libc::SYS_copy_file_range),
    Any(libc::SYS_sendfile),
    Any(libc::SYS_memfd_create),
    Any(libc::SYS_eventfd2),
    Any(libc::SYS_timerfd_create),
    Any(libc::SYS_timerfd_settime),
    Any(libc::SYS_timerfd_gettime),
    Any(libc::SYS_epoll_create1),
    Any(libc::SYS_pipe2),
    Any(libc::SYS_dup2),
    Any(libc::SYS_dup3),
    Any(libc::SYS_socketpair),
    Any(libc::SYS_bind),
    Any(libc::SYS_listen),
    Any(libc::SYS_getsockname),
    Any(libc::SYS_getpeername),
    Any(libc::SYS_umask),
    Any(libc::SYS_geteuid),
    Any(libc::SYS_getuid),
    // The in-process session agent of `receive-migration` watches the sending VMM's exit.
    Any(libc::SYS_pidfd_open),
    Any(libc::SYS_getegid),
    Any(libc::SYS_getgid),
    Any(libc::SYS_uname),
    Any(libc::SYS_rt_sigaction),
    Any(libc::SYS_msync),
    Any(libc::SYS_prctl),
    // Threads it creates install their own filter on top of this one.
    Any(libc::SYS_seccomp),
];

fn list(kind: crate::ThreadKind) -> Vec<Allow> {
    use crate::ThreadKind;
    let own = match kind {
        ThreadKind::Vmm => [VMM, VCPU, API, WORKER].concat(),
        ThreadKind::Vcpu => VCPU.to_vec(),
        ThreadKind::Api => API.to_vec(),
        ThreadKind::Worker => WORKER.to_vec(),
    };
    [EVERY_THREAD, &own].concat()
}

/// The number of distinct syscalls `kind` may make.
pub fn syscall_count(kind: crate::ThreadKind) -> usize {
    let mut numbers: Vec<i64> = list(kind).iter().map(|allow| allow.number()).collect();
    numbers.sort_unstable();
    numbers.dedup();
    numbers.len()
}

impl Allow {
    fn number(self) -> i64 {
        match self {
            Any(number) => number,
            Ioctl(_) => libc::SYS_ioctl,
            PrctlSetName => libc::SYS_prctl,
        }
    }
}

/// The conditions gathered for one syscall.
#[derive(Default)]
struct Conditions {
    unconditional: bool,
    ioctl_families: Vec<IoctlFamily>,
    prctl_set_name: bool,
}

impl Conditions {
    /// The seccompiler rules: none means any arguments; several mean any of them.
    fn rules(mut self) -> Result<Vec<SeccompRule>, BackendError> {
        if self.unconditional {
            return Ok(Vec::new());
        }
        self.ioctl_families
            .sort_unstable_by_key(|family| *family as u8);
        self.ioctl_families.dedup();
        let mut rules = Vec::new();
        for family in self.ioctl_families {
            rules.push(SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                u64::from(family as u8) << 8,
            )?])?);
        }
        if self.prctl_set_name {
            rules.push(SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                u64::from(libc::PR_SET_NAME.unsigned_abs()),
            )?])?);
        }
        Ok(rules)
    }
}

/// `kind`'s allow-list as seccompiler rules: a syscall allowed with any arguments by one entry
/// stays unconditional; the conditions of several entries for one syscall add up.
pub(crate) fn rules(
    kind: crate::ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut gathered: BTreeMap<i64, Conditions> = BTreeMap::new();
    for allow in list(kind) {
        let conditions = gathered.entry(allow.number()).or_default();
        match allow {
            Any(_) => conditions.unconditional = true,
            Ioctl(families) => conditions.ioctl_families.extend_from_slice(families),
            PrctlSetName => conditions.prctl_set_name = true,
        }
    }
    gathered
        .into_iter()
        .map(|(number, conditions)| Ok((number, conditions.rules()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadKind;

    #[test]
    fn the_control_loop_allows_everything_the_threads_it_creates_need() {
        let vmm = rules(ThreadKind::Vmm).unwrap();

        for kind in [ThreadKind::Vcpu, ThreadKind::Api, ThreadKind::Worker] {
            for (number, _) in rules(kind).unwrap() {
                assert!(vmm.contains_key(&number), "{kind}: syscall {number}");
            }
        }
    }

    #[test]
    fn an_unconditional_entry_wins_over_conditions_on_the_same_syscall() {
        let vmm = rules(ThreadKind::Vmm).unwrap();
        let api = rules(ThreadKind::Api).unwrap();

        // The control loop may prctl anything; the API thread only names threads.
        assert_eq!(vmm.get(&libc::SYS_prctl).map(Vec::len), Some(0));
        assert_eq!(api.get(&libc::SYS_prctl).map(Vec::len), Some(1));
        // Ioctl families add up, each once: the control loop's 5 include the others'.
        assert_eq!(vmm.get(&libc::SYS_ioctl).map(Vec::len), Some(5));
    }

    #[test]
    fn no_kind_may_chroot_which_the_test_hook_relies_on() {
        for kind in ThreadKind::ALL {
            assert!(
                !rules(kind).unwrap().contains_key(&libc::SYS_chroot),
                "{kind}"
            );
        }
    }
}
