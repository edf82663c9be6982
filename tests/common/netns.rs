//! Network namespaces the network tests create: the tap, its host-side address and every peer
//! (ping, the UDP stream, the VMM itself) live inside one, so no test traffic ever leaves it.
//! Namespaces are per thread on Linux: [`NetNs::run`] enters one on a scoped thread, and
//! whatever that thread creates (a socket) or starts (a process) belongs to it.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("network tests need iproute2 (apt-get install iproute2)");
    assert!(
        output.status.success(),
        "ip {args:?} failed (network tests run as root): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl NetNs {
    /// Creates `chv-<tag>-<pid>` with its loopback up.
    pub fn create(tag: &str) -> Self {
        let name = format!("chv-{tag}-{}", std::process::id());
        // A namespace left by a killed earlier run of this pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    /// Runs `f` on a thread inside the namespace and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter_this_thread();
                    f()
                })
                .join()
                .expect("thread inside the network namespace panicked")
        })
    }

    /// Moves the calling thread into the namespace (for threads that stay there).
    pub fn enter_this_thread(&self) {
        let ns = File::open(format!("/run/netns/{}", self.name)).unwrap();
        // SAFETY: setns on an fd we opened, for the calling thread only; the return value is
        // checked.
        let result = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            result,
            0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// `program` run inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
