//! The LUO uAPI (merged interface, Linux 6.19+; see `../shared/reference/luo.md` §1) and the few
//! unsafe libc calls the providers need, each one behind a small safe function.
//!
//! Only the merged ioctls are here; the pre-merge RFC API (FD_PRESERVE, PREPARE, FREEZE, ...)
//! never reached mainline.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem::{MaybeUninit, offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub mod kexec;
pub mod listen;
#[cfg(test)]
pub(crate) mod mapping;

/// `LIVEUPDATE_IOCTL_TYPE`.
pub const LIVEUPDATE_IOCTL_TYPE: u32 = 0xBA;
/// `LIVEUPDATE_SESSION_NAME_LENGTH`: the name buffer, terminating NUL included.
pub const SESSION_NAME_LENGTH: usize = 64;

/// `_IO(type, nr)`: LUO encodes neither direction nor size (luo.md §1.2).
const fn io(nr: u32) -> libc::c_ulong {
    // _IOC_NONE (0) << 30 | size 0 << 16 | type << 8 | nr
    ((LIVEUPDATE_IOCTL_TYPE << 8) | nr) as libc::c_ulong
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION` (on `/dev/liveupdate`).
pub const IOCTL_CREATE_SESSION: libc::c_ulong = io(0x00);
/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION` (on `/dev/liveupdate`).
pub const IOCTL_RETRIEVE_SESSION: libc::c_ulong = io(0x01);
/// `LIVEUPDATE_SESSION_PRESERVE_FD` (on a session fd).
pub const IOCTL_PRESERVE_FD: libc::c_ulong = io(0x40);
/// `LIVEUPDATE_SESSION_RETRIEVE_FD` (on a session fd).
pub const IOCTL_RETRIEVE_FD: libc::c_ulong = io(0x41);
/// `LIVEUPDATE_SESSION_FINISH` (on a session fd).
pub const IOCTL_FINISH: libc::c_ulong = io(0x42);
/// `LIVEUPDATE_SESSION_GET_NAME` (on a session fd; Linux 7.2+).
pub const IOCTL_GET_NAME: libc::c_ulong = io(0x43);

/// `struct liveupdate_ioctl_create_session` (also the layout of retrieve_session).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SessionByName {
    /// `sizeof` the struct.
    pub size: u32,
    /// Out: the session fd.
    pub fd: i32,
    /// In: the NUL-terminated name.
    pub name: [u8; SESSION_NAME_LENGTH],
}

/// `struct liveupdate_session_preserve_fd` and `struct liveupdate_session_retrieve_fd`.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
pub struct FdToken {
    /// `sizeof` the struct.
    pub size: u32,
    /// In (preserve) or out (retrieve): the file.
    pub fd: i32,
    /// In: the caller's key for the file (`__aligned_u64`).
    pub token: u64,
}

/// `struct liveupdate_session_finish`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Finish {
    /// `sizeof` the struct.
    pub size: u32,
    /// Must be 0.
    pub reserved: u32,
}

/// `struct liveupdate_session_get_name`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GetName {
    /// `sizeof` the struct.
    pub size: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Out: the NUL-terminated name.
    pub name: [u8; SESSION_NAME_LENGTH],
}

/// `struct liveupdate_ioctl_create_session`.
pub type CreateSession = SessionByName;
/// `struct liveupdate_ioctl_retrieve_session`.
pub type RetrieveSession = SessionByName;
/// `struct liveupdate_session_preserve_fd`.
pub type PreserveFd = FdToken;
/// `struct liveupdate_session_retrieve_fd`.
pub type RetrieveFd = FdToken;

// The kernel checks `size` against these (luo.md §1.3); a wrong layout would be EINVAL or E2BIG.
const _: () = assert!(size_of::<SessionByName>() == 72);
const _: () = assert!(offset_of!(SessionByName, size) == 0);
const _: () = assert!(offset_of!(SessionByName, fd) == 4);
const _: () = assert!(offset_of!(SessionByName, name) == 8);
const _: () = assert!(size_of::<FdToken>() == 16);
const _: () = assert!(offset_of!(FdToken, size) == 0);
const _: () = assert!(offset_of!(FdToken, fd) == 4);
const _: () = assert!(offset_of!(FdToken, token) == 8);
const _: () = assert!(size_of::<Finish>() == 8);
const _: () = assert!(offset_of!(Finish, size) == 0);
const _: () = assert!(offset_of!(Finish, reserved) == 4);
const _: () = assert!(size_of::<GetName>() == 72);
const _: () = assert!(offset_of!(GetName, size) == 0);
const _: () = assert!(offset_of!(GetName, reserved) == 4);
const _: () = assert!(offset_of!(GetName, name) == 8);

/// `size_of::<T>()` as the `u32` the structs carry (every struct here is under 100 bytes).
const fn size_u32<T>() -> u32 {
    size_of::<T>() as u32
}

impl SessionByName {
    /// A request for `name`; the caller has checked it (1 to 63 bytes, no NUL).
    pub fn new(name: &str) -> Self {
        let mut buf = [0u8; SESSION_NAME_LENGTH];
        let len = name.len().min(SESSION_NAME_LENGTH - 1);
        buf[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            size: size_u32::<Self>(),
            fd: -1,
            name: buf,
        }
    }
}

/// The text before the first NUL of a name buffer (lossy: the kernel does not require UTF-8).
pub fn name_from_buf(buf: &[u8; SESSION_NAME_LENGTH]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Issues `req` on `fd` with `arg`; `Ok` on a non-negative return.
///
/// # Safety
/// `req` must be a LUO ioctl whose argument has the type `T`, so the kernel reads and writes
/// only within `*arg`.
unsafe fn luo_ioctl<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` is the struct `req` expects; it lives across the call.
    let ret = unsafe { ioctl_with_mut_ref(&fd, req, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of an fd the kernel just returned.
fn owned_fd_from_kernel(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::other("the kernel returned no fd"));
    }
    // SAFETY: the ioctl succeeded, so `fd` is a new descriptor (O_CLOEXEC) nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `LIVEUPDATE_IOCTL_CREATE_SESSION`: a new outgoing session fd.
pub fn create_session(device: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let mut arg = SessionByName::new(name);
    // SAFETY: CREATE_SESSION takes a `liveupdate_ioctl_create_session`, which `arg` is.
    unsafe { luo_ioctl(device, IOCTL_CREATE_SESSION, &mut arg) }?;
    owned_fd_from_kernel(arg.fd)
}

/// `LIVEUPDATE_IOCTL_RETRIEVE_SESSION`: the fd of an incoming session.
pub fn retrieve_session(device: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let mut arg = SessionByName::new(name);
    // SAFETY: RETRIEVE_SESSION takes a `liveupdate_ioctl_retrieve_session`, which `arg` is.
    unsafe { luo_ioctl(device, IOCTL_RETRIEVE_SESSION, &mut arg) }?;
    owned_fd_from_kernel(arg.fd)
}

/// `LIVEUPDATE_SESSION_PRESERVE_FD`: the kernel takes its own reference to `file`.
pub fn preserve_fd(session: BorrowedFd<'_>, file: BorrowedFd<'_>, token: u64) -> io::Result<()> {
    let mut arg = FdToken {
        size: size_u32::<FdToken>(),
        fd: file.as_raw_fd(),
        token,
    };
    // SAFETY: PRESERVE_FD takes a `liveupdate_session_preserve_fd`, which `arg` is.
    unsafe { luo_ioctl(session, IOCTL_PRESERVE_FD, &mut arg) }
}

/// `LIVEUPDATE_SESSION_RETRIEVE_FD`: a new fd for the file under `token`.
pub fn retrieve_fd(session: BorrowedFd<'_>, token: u64) -> io::Result<OwnedFd> {
    let mut arg = FdToken {
        size: size_u32::<FdToken>(),
        fd: -1,
        token,
    };
    // SAFETY: RETRIEVE_FD takes a `liveupdate_session_retrieve_fd`, which `arg` is.
    unsafe { luo_ioctl(session, IOCTL_RETRIEVE_FD, &mut arg) }?;
    owned_fd_from_kernel(arg.fd)
}

/// `LIVEUPDATE_SESSION_FINISH`.
pub fn finish(session: BorrowedFd<'_>) -> io::Result<()> {
    let mut arg = Finish {
        size: size_u32::<Finish>(),
        reserved: 0,
    };
    // SAFETY: FINISH takes a `liveupdate_session_finish`, which `arg` is.
    unsafe { luo_ioctl(session, IOCTL_FINISH, &mut arg) }
}

/// `LIVEUPDATE_SESSION_GET_NAME` (Linux 7.2+; older kernels answer EINVAL).
pub fn get_name(session: BorrowedFd<'_>) -> io::Result<String> {
    let mut arg = GetName {
        size: size_u32::<GetName>(),
        reserved: 0,
        name: [0; SESSION_NAME_LENGTH],
    };
    // SAFETY: GET_NAME takes a `liveupdate_session_get_name`, which `arg` is (full 72 bytes).
    unsafe { luo_ioctl(session, IOCTL_GET_NAME, &mut arg) }?;
    Ok(name_from_buf(&arg.name))
}

/// `memfd_create(name, MFD_CLOEXEC | extra_flags)`.
pub fn memfd_create(name: &str, extra_flags: libc::c_uint) -> io::Result<OwnedFd> {
    let c_name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c_name` is a valid C string for the duration of the call.
    let fd = unsafe { libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC | extra_flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create succeeded, so `fd` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Seals a memfd (made with `MFD_ALLOW_SEALING`) against any further change of size or bytes.
pub fn seal_memfd(fd: BorrowedFd<'_>) -> io::Result<()> {
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS only changes the file's seals; no memory is involved.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The file status flags of the open file `fd` (`F_GETFL`: access mode, `O_APPEND`, ...).
pub fn file_status_flags(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL only reads the open file's flags; no memory is involved.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// The `f_type` magic of the filesystem `fd` lives on (`fstatfs`).
pub fn fs_magic(fd: impl AsFd) -> io::Result<i64> {
    let mut buf = MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `buf` is a writable `statfs` and `fd` a valid descriptor.
    let ret = unsafe { libc::fstatfs(fd.as_fd().as_raw_fd(), buf.as_mut_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded and filled the struct (and it was zeroed before).
    let stat = unsafe { buf.assume_init() };
    // `f_type` is i64 on x86-64 and arm64 but narrower on some other targets.
    #[allow(clippy::useless_conversion)]
    Ok(i64::from(stat.f_type))
}

/// Receives into `buf` with up to `max_fds` descriptors; more are closed and reported as
/// `ENOBUFS` (by vmm-sys-util, when the control data was truncated).
pub fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw_fds: Vec<RawFd> = vec![-1; max_fds];
    let mut iovecs = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec covers `buf`, which is mutably borrowed for the call, so the kernel may
    // write any bytes into it.
    let received = unsafe { stream.recv_with_fds(&mut iovecs, &mut raw_fds) };
    let (count, fd_count) = received.map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw_fds[..fd_count]
        .iter()
        .map(|&raw| {
            // SAFETY: recv_with_fds returned `fd_count` new descriptors that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(raw) }
        })
        .collect();
    Ok((count, fds))
}

/// Sets the calling thread's nice value; the threads it starts afterwards inherit it. Below 0
/// needs `CAP_SYS_NICE`.
pub fn set_own_nice(nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours; 0 is the caller.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kills this process with SIGKILL at once (the fault injector's `kill@STEP`, see
/// [`crate::fault`]): no destructor, no flush, as the OOM killer would.
/// It signals the calling thread (`tgkill`, which every seccomp allow-list has for `abort`)
/// rather than the process (`kill`, which none has): SIGKILL to any thread ends the process.
pub fn kill_self() -> ! {
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() };
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: tgkill touches no memory of ours; SIGKILL to our own thread cannot be caught.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGKILL) };
    // SIGKILL to ourselves is delivered before tgkill returns; abort if it somehow was not.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_equal_the_luo_reference_values() {
        assert_eq!(IOCTL_CREATE_SESSION, 0xBA00);
        assert_eq!(IOCTL_RETRIEVE_SESSION, 0xBA01);
        assert_eq!(IOCTL_PRESERVE_FD, 0xBA40);
        assert_eq!(IOCTL_RETRIEVE_FD, 0xBA41);
        assert_eq!(IOCTL_FINISH, 0xBA42);
        assert_eq!(IOCTL_GET_NAME, 0xBA43);
    }

    #[test]
    fn ioctl_numbers_match_vmm_sys_util_io_encoding() {
        use vmm_sys_util::ioctl::{_IOC_NONE, ioctl_expr};

        assert_eq!(IOCTL_CREATE_SESSION, ioctl_expr(_IOC_NONE, 0xBA, 0x00, 0));
        assert_eq!(IOCTL_GET_NAME, ioctl_expr(_IOC_NONE, 0xBA, 0x43, 0));
    }

    #[test]
    fn struct_sizes_are_72_72_16_16_8_72() {
        assert_eq!(size_of::<CreateSession>(), 72);
        assert_eq!(size_of::<RetrieveSession>(), 72);
        assert_eq!(size_of::<PreserveFd>(), 16);
        assert_eq!(size_of::<RetrieveFd>(), 16);
        assert_eq!(size_of::<Finish>(), 8);
        assert_eq!(size_of::<GetName>(), 72);
        assert_eq!(std::mem::align_of::<FdToken>(), 8);
    }

    #[test]
    fn size_fields_are_set_to_the_struct_size() {
        assert_eq!(SessionByName::new("vm").size, 72);
        assert_eq!(size_u32::<FdToken>(), 16);
        assert_eq!(size_u32::<Finish>(), 8);
        assert_eq!(size_u32::<GetName>(), 72);
    }

    #[test]
    fn session_name_is_nul_terminated_in_the_buffer() {
        let arg = SessionByName::new(&"n".repeat(63));

        assert_eq!(arg.name[62], b'n');
        assert_eq!(arg.name[63], 0);
        assert_eq!(name_from_buf(&arg.name), "n".repeat(63));
    }

    #[test]
    fn name_from_buf_stops_at_the_first_nul() {
        let mut buf = [0u8; SESSION_NAME_LENGTH];
        buf[..3].copy_from_slice(b"vm1");
        buf[5] = b'x';

        assert_eq!(name_from_buf(&buf), "vm1");
    }

    #[test]
    fn memfd_lives_on_tmpfs_and_hugetlb_memfd_on_hugetlbfs() {
        let memfd = memfd_create("t", 0).unwrap();
        let huge = memfd_create("t", libc::MFD_HUGETLB).unwrap();

        assert_eq!(fs_magic(&memfd).unwrap(), 0x0102_1994);
        assert_eq!(fs_magic(&huge).unwrap(), 0x9584_58f6);
    }

    #[test]
    fn session_ioctl_on_a_non_luo_fd_fails_with_an_os_error() {
        let memfd = memfd_create("t", 0).unwrap();

        let err = finish(memfd.as_fd()).unwrap_err();

        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
