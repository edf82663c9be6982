//! Moving eventfds between `vmm_sys_util`'s `EventFd` (raw fds only) and the owned and borrowed
//! fd types the live-update session speaks.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

/// `eventfd` as a borrowed fd, for as long as it lives.
pub fn borrow_eventfd(eventfd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `eventfd`, which stays open for the borrow's lifetime.
    unsafe { BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}

/// Takes `fd` (an eventfd handed over by the previous VMM) as an `EventFd`. Another kind of
/// file is not detected here: KVM refuses it as an irqfd.
pub fn eventfd_from(fd: OwnedFd) -> EventFd {
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` was just released by an `OwnedFd`, so it is open and owned by no one else.
    unsafe { EventFd::from_raw_fd(raw) }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[test]
    fn eventfd_round_trips_through_an_owned_fd_with_its_count() {
        let eventfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let copy = borrow_eventfd(&eventfd).try_clone_to_owned().unwrap();
        eventfd.write(2).unwrap();

        let adopted = eventfd_from(copy);

        assert_eq!(adopted.read().unwrap(), 2);
    }
}
