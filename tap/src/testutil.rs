//! Test helpers: a private network namespace per test, and raw tun opens.
//!
//! Every test that creates interfaces or sends traffic runs inside [`in_netns`], so nothing
//! reaches the host's own namespace. Namespaces are per thread on Linux: the test body runs on a
//! fresh thread that first unshares, and the namespace (with its interfaces) disappears when the
//! thread and its fds are gone.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::panic;
use std::thread;

use crate::ifreq::IfReq;
use crate::sys;

/// Runs `body` on a new thread in a new, empty network namespace, and passes on its panic.
pub(crate) fn in_netns<R: Send + 'static>(body: impl FnOnce() -> R + Send + 'static) -> R {
    let outcome = thread::spawn(move || {
        if let Err(err) = sys::unshare_netns() {
            panic!(
                "unshare(CLONE_NEWNET) failed ({err}): the tap tests need CAP_NET_ADMIN, \
                 run them as root"
            );
        }
        body()
    })
    .join();
    match outcome {
        Ok(value) => value,
        Err(payload) => panic::resume_unwind(payload),
    }
}

/// Opens `/dev/net/tun` and attaches it to `name` with exactly `flags`, bypassing `Tap`.
pub(crate) fn raw_queue(name: &str, flags: u16) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun (needs CAP_NET_ADMIN)");
    let mut req = IfReq::new(name);
    req.set_flags(flags);
    sys::tun_set_iff(&file, &mut req).expect("TUNSETIFF (needs CAP_NET_ADMIN)");
    file
}

/// The flags the kernel reports for the device `file` is attached to.
pub(crate) fn tun_flags(file: &impl std::os::fd::AsFd) -> u16 {
    sys::tun_get_iff(file.as_fd()).expect("TUNGETIFF").flags()
}
