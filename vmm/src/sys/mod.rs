//! Thin wrappers over the few syscalls and ioctls that the safe crates do not cover.
//!
//! Every `unsafe` block of the `vmm` crate lives here, each with its invariant.
#![allow(unsafe_code)]

pub mod pty;

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Creates an anonymous shmem file (`memfd_create(2)`) with close-on-exec set.
///
/// Never `MFD_HUGETLB`: the kernel's live-update code only preserves shmem memfds.
pub fn memfd_create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid; the return value
    // is checked before it is used.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, so it is an open descriptor we own alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(File::from(owned))
}

/// Gives `file` (a shmem file) its pages for the first `len` bytes ahead of a write, without
/// changing its size (`fallocate(2)` with `FALLOC_FL_KEEP_SIZE`).
pub fn reserve_pages(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `file` is an open descriptor for the call's length; fallocate reads no memory of
    // ours, and its return value is checked.
    let ret = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers every region of `mem` as a KVM memory slot, slot `i` for region `i`.
pub fn register_memory_slots(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let memory_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem` for `memory_size` bytes, and
        // the caller keeps `mem` alive for as long as the VM (the `Vm` holds both).
        unsafe { vm.set_user_memory_region(memory_region) }?;
    }
    Ok(())
}

/// Asks for transparent huge pages behind every region of `mem` (`MADV_HUGEPAGE`): on a host
/// whose shmem huge pages are `advise` (or `within_size`), guest RAM the guest touches is then
/// held in 2 MiB folios. Fails with `EINVAL` on a kernel without transparent huge pages.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: the range is a live mapping owned by `mem`; MADV_HUGEPAGE only changes how
        // the kernel backs it, never its contents or whether it is mapped.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives the calling thread (only it: Linux sets a thread's nice value by its tid, and 0 is
/// the caller) the lowest priority, nice 19: it then runs when nothing else wants the CPU.
pub fn lowest_thread_priority() -> io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's id of the calling thread, which [`thread_nice`] and [`set_thread_nice`] take.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() }
}

/// Maps every page of the program's code and read-only data into the page tables now
/// (`MADV_POPULATE_READ` over each mapping of its file that is not writable), so code run for
/// the first time later takes no page fault for it. Its libraries are left as they are: what
/// the process has run so far mapped the parts it uses. Returns the bytes populated.
pub fn populate_code() -> io::Result<u64> {
    let program = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut populated = 0;
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let path = fields.nth(3).unwrap_or("");
        if std::path::Path::new(path) != program || perms.as_bytes().get(1) == Some(&b'w') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        // SAFETY: the range is one of this process's mappings as the kernel lists it;
        // MADV_POPULATE_READ only faults its pages in, changing no contents. A range unmapped
        // meanwhile gives ENOMEM, which is skipped.
        let rc = unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end.saturating_sub(start),
                libc::MADV_POPULATE_READ,
            )
        };
        if rc == 0 {
            populated += (end - start) as u64;
        }
    }
    Ok(populated)
}

/// How much freed heap the allocator keeps rather than giving it back to the kernel (glibc's
/// default is 128 KiB).
const HEAP_KEPT: libc::c_int = 8 << 20;

/// Has the calling thread's heap touch `bytes` and free them, and keeps freed heap memory (up
/// to [`HEAP_KEPT`]) instead of giving it back to the kernel: the thread's later allocations up
/// to that much take no page fault.
pub fn warm_heap(bytes: usize) {
    // SAFETY: mallopt takes two integers; an unknown parameter is refused with 0.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, HEAP_KEPT) };
    let chunks: Vec<Vec<u8>> = (0..bytes / 4096).map(|_| vec![1u8; 4000]).collect();
    drop(std::hint::black_box(chunks));
}

/// A set of CPUs a thread may run on (`cpu_set_t`).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl std::fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.cpus()).finish()
    }
}

impl CpuSet {
    /// The CPUs in the set.
    pub fn cpus(&self) -> impl Iterator<Item = usize> + '_ {
        // SAFETY: CPU_ISSET only reads the set, for indices below its capacity.
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &self.0) })
    }

    /// The set without `cpu`; `None` when nothing would be left.
    pub fn without(&self, cpu: usize) -> Option<Self> {
        let mut rest = *self;
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: CPU_CLR writes one bit of the set, below its capacity (checked).
            unsafe { libc::CPU_CLR(cpu, &mut rest.0) };
        }
        rest.cpus().next().is_some().then_some(rest)
    }
}

/// The CPUs thread `tid` (0: the caller) may run on.
pub fn thread_cpus(tid: i32) -> io::Result<CpuSet> {
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid for writes of its size, which the call is given.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CpuSet(set))
}

/// Lets thread `tid` (0: the caller) run on `cpus` only.
pub fn set_thread_cpus(tid: i32, cpus: &CpuSet) -> io::Result<()> {
    // SAFETY: the set is a live cpu_set_t the call only reads, for its size.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&cpus.0), &cpus.0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU the calling thread runs on (it may move at any time after).
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu has no preconditions; -1 is its error.
    usize::try_from(unsafe { libc::sched_getcpu() }).ok()
}

/// Thread `tid`'s nice value.
pub fn thread_nice(tid: i32) -> io::Result<i32> {
    // The raw system call answers 20 - nice (1 to 40) and -1 only on an error, where the libc
    // wrapper's -1 is also a nice value.
    // SAFETY: getpriority takes plain integers and touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getpriority,
            libc::PRIO_PROCESS,
            libc::c_long::from(tid),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(20 - rc).map_err(|_| io::Error::other("getpriority out of range"))
}

/// Sets thread `tid`'s nice value (below 0 needs `CAP_SYS_NICE`). With `reset_on_fork`, the
/// threads it starts from now on begin at nice 0 instead of inheriting a raised priority
/// (`SCHED_RESET_ON_FORK`); without, that flag is cleared. A refused nice value changes nothing.
pub fn set_thread_nice(tid: i32, nice: i32, reset_on_fork: bool) -> io::Result<()> {
    let id = libc::id_t::try_from(tid).map_err(|_| io::Error::other("negative thread id"))?;
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, id, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let policy = if reset_on_fork {
        libc::SCHED_OTHER | libc::SCHED_RESET_ON_FORK
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a live sched_param the call only reads; the rest are integers.
    // SCHED_OTHER keeps the thread's nice value.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A close-on-exec copy of `fd`, an fd this process inherited by number (e.g. `--net fd=[3]`).
/// The number itself stays open and unowned: nothing here claims it, so nothing closes it twice.
pub fn dup_inherited_fd(fd: std::os::fd::RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; an fd that is not open gives
    // EBADF, which is checked.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` was just created by fcntl, so this process owns it alone.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Whether `fd` is a socket listening for connections (`SO_ACCEPTCONN`); `ENOTSOCK` when it is
/// no socket at all.
pub fn is_listening_socket(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).map_err(io::Error::other)?;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the size of `value`;
    // getsockopt writes at most that many bytes. The result is checked.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value != 0)
}

/// Whether `fd` was opened for writing (its access mode, `F_GETFL`).
pub fn is_writable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL only reads the open file's flags; the result is checked.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(matches!(
        flags & libc::O_ACCMODE,
        libc::O_WRONLY | libc::O_RDWR
    ))
}

/// Shuts a listening socket down, which wakes a thread blocked in `accept` on it (Linux).
pub fn shutdown_socket(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown only acts on the open socket; the result is checked.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on the open file description of `fd` (every copy of it sees it).
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL only reads the open file's flags; the result is checked.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL only changes the status flags of the open file; the result is checked.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where data (`whence` = `SEEK_DATA`) or a hole (`SEEK_HOLE`) next starts at or after
/// `offset` in `fd` (lseek(2)); None when no data follows `offset` (ENXIO). It moves the file
/// offset, so callers read and write at explicit offsets.
fn seek_extent(
    fd: std::os::fd::BorrowedFd<'_>,
    offset: u64,
    whence: libc::c_int,
) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek only moves the offset of the open file; the result is checked.
    let found = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if found < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(error),
        };
    }
    u64::try_from(found)
        .map(Some)
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// The start of the next data extent at or after `offset` (`SEEK_DATA`), None past the last.
pub fn seek_data(fd: std::os::fd::BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek_extent(fd, offset, libc::SEEK_DATA)
}

/// The start of the next hole at or after `offset` (`SEEK_HOLE`; the end of the file counts
/// as one), None when `offset` is past the end.
pub fn seek_hole(fd: std::os::fd::BorrowedFd<'_>, offset: u64) -> io::Result<Option<u64>> {
    seek_extent(fd, offset, libc::SEEK_HOLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_read_only_mapping_of_the_program_is_populated() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let exe_bytes: u64 = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|line| line.ends_with(exe) && line.split(' ').nth(1).unwrap().starts_with("r-"))
            .map(|line| {
                let (start, end) = line.split(' ').next().unwrap().split_once('-').unwrap();
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap()
            })
            .sum();

        let populated = populate_code().unwrap();

        assert!(exe_bytes > 0);
        assert!(populated >= exe_bytes, "{populated} of {exe_bytes} bytes");
    }

    #[test]
    fn a_cpu_set_without_its_only_cpu_is_none() {
        let own = thread_cpus(0).unwrap();
        let first = own.cpus().next().unwrap();
        let only_first = own
            .cpus()
            .skip(1)
            .fold(own, |set, other| set.without(other).unwrap());

        assert_eq!(only_first.cpus().collect::<Vec<_>>(), [first]);
        assert!(only_first.without(first).is_none());
    }
}
