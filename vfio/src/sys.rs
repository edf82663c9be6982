//! The unsafe operations of this crate: mapping guest RAM by host address for the legacy VFIO
//! container (the iommufd path maps the RAM memfds by file and needs none), borrowing fds that
//! vfio-ioctls and vmm-sys-util expose only as raw fds, and `VFIO_DEVICE_SET_IRQS` on an
//! adopted device fd (vfio-ioctls cannot wrap a handed-over cdev without a new IOAS).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioError};
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, u32::from(VFIO_TYPE), VFIO_BASE + 10);

/// `struct vfio_irq_set` with room for one eventfd.
#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// `eventfd`'s fd, borrowed for as long as `eventfd` is.
pub(crate) fn borrow_eventfd(eventfd: &EventFd) -> BorrowedFd<'_> {
    borrow_raw(eventfd)
}

/// The fd of `owner`, which owns it and keeps it open while borrowed.
pub(crate) fn borrow_raw<T: AsRawFd + ?Sized>(owner: &T) -> BorrowedFd<'_> {
    // SAFETY: `owner` owns the fd (an EventFd, a VfioDevice, an IommuFd) and closes it only
    // when dropped, which the borrow's lifetime (tied to `owner`) rules out while it lives.
    unsafe { BorrowedFd::borrow_raw(owner.as_raw_fd()) }
}

/// Hands `eventfd` to the kernel for MSI vector 0 of `device` (`Some`), or disables MSI.
pub(crate) fn set_msi_eventfd(device: &File, eventfd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let (flags, count, fd) = match eventfd {
        Some(fd) => (VFIO_IRQ_SET_DATA_EVENTFD, 1, fd.as_raw_fd()),
        None => (VFIO_IRQ_SET_DATA_NONE, 0, -1),
    };
    let set = IrqSetOne {
        argsz: std::mem::size_of::<IrqSetOne>() as u32,
        flags: flags | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: VFIO_PCI_MSI_IRQ_INDEX,
        start: 0,
        count,
        fd,
    };
    // SAFETY: `set` is a complete vfio_irq_set with `count` eventfds after it, argsz says how
    // long it is, and the kernel only reads it; `device` is an open file.
    let ret = unsafe { ioctl_with_ref(device, VFIO_DEVICE_SET_IRQS(), &set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Maps `region` (guest RAM) into the container's IOMMU domain at `iova`.
pub(crate) fn container_dma_map(
    container: &VfioContainer,
    iova: u64,
    region: &GuestRegionMmap,
) -> Result<(), VfioError> {
    let size = usize::try_from(region.len()).map_err(|_| VfioError::InvalidDmaUnmapSize)?;
    // SAFETY: the range is guest RAM: the VMM only touches it through vm-memory's volatile
    // accessors and the guest and devices share it by design, which is what the contract asks.
    // The caller keeps the mapping (a clone of the guest memory) alive as long as the container,
    // so the IOMMU never points at an unmapped range.
    unsafe { container.vfio_dma_map(iova, size, region.as_ptr()) }
}
