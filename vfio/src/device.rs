//! The VMM side of a kernel VFIO PCI function on our PCI bus.
//!
//! Configuration space goes to the VFIO config region (the kernel virtualizes what must not
//! reach the hardware), except the BAR and expansion ROM registers, which the shared
//! [`BarShadow`] serves because the VMM places the BARs. After each write to the MSI
//! capability the VMM reads it back ([`MsiShadow`]): enabling MSI hands the kernel the eventfd
//! of our one MSI vector (`VFIO_DEVICE_SET_IRQS`), which the VMM registered as a KVM irqfd
//! routed to the message the guest programmed, so the device's interrupt reaches the guest
//! without passing through the VMM. BAR accesses trap and go to the BAR's VFIO region.

use std::convert::Infallible;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::interrupt::MsiVectors;
use devices::pci::passthrough::{
    BAR0_REGISTER, BarShadow, DeviceBar, MsiShadow, find_capabilities,
};
use devices::pci::{DmaRegionState, PciBarInfo, PciDevice, PciError};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::VfioDeviceError;
use crate::access::{DeviceAccess, Released};
use crate::open::{Opened, VfioBackend, open};
use crate::state::{VfioBarState, VfioDeviceState, VfioRegionState};

/// A host PCI function assigned to the guest through kernel VFIO.
pub struct VfioPciDevice {
    pub(crate) access: Box<dyn DeviceAccess>,
    pub(crate) path: PathBuf,
    pub(crate) backend: VfioBackend,
    pub(crate) dma: Vec<DmaRegionState>,
    pub(crate) bars: BarShadow,
    pub(crate) regions: Vec<VfioRegionState>,
    pub(crate) ioas_id: Option<u32>,
    /// The MSI capability, with the enable bit as the guest last wrote it (ours, not the
    /// kernel's: VFIO clears the bit in its copy until MSI is on through `SET_IRQS`).
    pub(crate) msi_cap: MsiShadow,
    /// MSI is on in the kernel (the eventfd is with it).
    pub(crate) msi_enabled: bool,
    pub(crate) msi: Arc<dyn MsiVectors>,
    pub(crate) irq: EventFd,
    /// Restart mode, from the pause on: the next VMM owns the device; this one must not touch
    /// it, and must not close it the vfio-ioctls way (see [`Drop`]).
    pub(crate) handed_over: bool,
    /// Guest RAM, kept mapped as long as the IOMMU may point at it.
    pub(crate) _memory: GuestMemoryMmap,
}

impl fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("path", &self.path)
            .field("backend", &self.backend)
            .field("bars", &self.bars.bars())
            .field("msi_cap", &self.msi_cap.offset())
            .finish_non_exhaustive()
    }
}

impl VfioPciDevice {
    /// Opens the device at `path` (`/sys/bus/pci/devices/<BDF>`, bound to vfio-pci), resets
    /// it, maps every region of `memory` for its DMA at the guest addresses, and places each
    /// memory BAR where `place_bar(size)` says. `irq` is the eventfd behind vector 0 of `msi`
    /// (registered by the caller as a KVM irqfd); the kernel gets it when the guest enables
    /// MSI.
    pub fn attach(
        path: &Path,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
        place_bar: &mut dyn FnMut(u64) -> Result<u64, PciError>,
    ) -> Result<Self, VfioDeviceError> {
        let Opened {
            device,
            backend,
            dma,
            iommu,
        } = open(path, memory)?;
        // A device the host or an earlier guest left programmed must not DMA into this guest.
        device.reset();
        let access = Box::new(crate::access::Kernel { device, iommu });
        let mut device = Self::with_access(access, memory, msi, irq, place_bar)?;
        device.path = path.to_path_buf();
        device.backend = backend;
        device.dma = dma;
        device.regions = device.access.regions();
        device.ioas_id = device.access.ioas_id();
        log::info!(
            "VFIO device {} attached ({backend:?}), BARs {:x?}, MSI capability at {:#x}",
            path.display(),
            device.bars.bars(),
            device.msi_cap.offset()
        );
        Ok(device)
    }

    /// Builds the device over `access` (the kernel's device, or a fake in tests).
    pub(crate) fn with_access(
        access: Box<dyn DeviceAccess>,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
        place_bar: &mut dyn FnMut(u64) -> Result<u64, PciError>,
    ) -> Result<Self, VfioDeviceError> {
        let bars = BarShadow::place(
            &mut |index| {
                let region = u32::try_from(index).unwrap_or(u32::MAX);
                DeviceBar {
                    register: config_dword(access.as_ref(), BAR0_REGISTER + 4 * index),
                    size: access.region_size(region),
                }
            },
            place_bar,
        )
        .map_err(VfioDeviceError::Bar)?;
        if bars.bars().is_empty() {
            return Err(VfioDeviceError::NoBar);
        }
        let Ok(caps) =
            find_capabilities(|offset| Ok::<_, Infallible>(config_dword(access.as_ref(), offset)));
        // A device whose interrupts would go nowhere is refused, not attached silently dead.
        let Some(msi_cap) = caps.msi else {
            if let Some(msix) = caps.msix {
                log::warn!(
                    "VFIO: the device has MSI-X only ({} vectors, table in BAR {}), which is \
                     not passed through yet",
                    msix.vectors,
                    msix.table.bar
                );
            }
            return Err(VfioDeviceError::NoMsi);
        };
        log::debug!("VFIO: {msi_cap:x?}");
        Ok(Self {
            access,
            path: PathBuf::new(),
            backend: VfioBackend::Iommufd,
            dma: Vec::new(),
            bars,
            regions: Vec::new(),
            ioas_id: None,
            // The device was just reset: MSI is off.
            msi_cap: MsiShadow::new(msi_cap.offset, Some(false)),
            msi_enabled: false,
            msi,
            irq,
            handed_over: false,
            _memory: memory.clone(),
        })
    }

    /// The device's sysfs path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the device reaches the IOMMU.
    pub fn backend(&self) -> VfioBackend {
        self.backend
    }

    /// The eventfd the kernel signals for the MSI vector (restart mode hands it over).
    pub fn msi_eventfd(&self) -> BorrowedFd<'_> {
        crate::sys::borrow_eventfd(&self.irq)
    }

    /// The VMM-side state of the device (no attachment tokens: the caller adds them).
    pub fn state(&self) -> VfioDeviceState {
        VfioDeviceState {
            path: self.path.clone(),
            backend: self.backend,
            bar_layout: self
                .bars
                .bars()
                .iter()
                .map(|bar| VfioBarState {
                    index: bar.index,
                    size: bar.size,
                    is_64bit: bar.is_64bit,
                })
                .collect(),
            bars: self.bars.state(),
            regions: self.regions.clone(),
            msi_cap: Some(self.msi_cap.offset()),
            msi_guest_enable: self.msi_cap.guest_enable().unwrap_or(false),
            msi_enabled: self.msi_enabled,
            dma: self.dma.clone(),
            ioas_id: self.ioas_id,
            handover: None,
        }
    }

    /// Reads the MSI capability back; on enable hands the kernel the eventfd, on disable takes
    /// it back, and keeps the vector's route at the message the guest programmed.
    fn update_msi(&mut self) {
        let mut raw = [0u8; MsiShadow::MESSAGE_END];
        let cap = self.msi_cap.offset();
        for (i, chunk) in raw.chunks_mut(2).enumerate() {
            self.access
                .read(VFIO_PCI_CONFIG_REGION_INDEX, (cap + 2 * i) as u64, chunk);
        }
        let message = self.msi_cap.message(&raw);
        let enabled = message.is_some();
        // Route before the kernel may signal, unroute after it stopped.
        if enabled && let Err(e) = self.msi.configure(0, message) {
            log::warn!(
                "VFIO {}: cannot route the MSI vector: {e}",
                self.path.display()
            );
        }
        if enabled != self.msi_enabled {
            let irq = enabled.then_some(&self.irq);
            match self.access.set_msi(irq) {
                Ok(()) => self.msi_enabled = enabled,
                Err(e) => log::warn!(
                    "VFIO {}: cannot {} MSI: {e}",
                    self.path.display(),
                    if enabled { "enable" } else { "disable" }
                ),
            }
        }
        if !enabled && let Err(e) = self.msi.configure(0, None) {
            log::warn!(
                "VFIO {}: cannot unroute the MSI vector: {e}",
                self.path.display()
            );
        }
    }
}

fn config_dword(access: &dyn DeviceAccess, offset: usize) -> u32 {
    let mut raw = [0xffu8; 4];
    access.read(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, &mut raw);
    u32::from_le_bytes(raw)
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        if self.handed_over {
            // vfio-ioctls' drop would detach the device from its IOAS and destroy the IOAS,
            // through fds the successor shares: leave the kernel objects to it (this process
            // is about to exit).
            std::mem::forget(std::mem::replace(&mut self.access, Box::new(Released)));
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.handed_over {
            data.fill(0xff);
            return;
        }
        if !self.bars.read(offset, data) {
            data.fill(0xff);
            self.access
                .read(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, data);
            self.msi_cap.guest_read(offset, data);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.handed_over {
            log::debug!("VFIO: config write at {offset:#x} after the handover dropped");
            return;
        }
        if self.bars.write(offset, data) {
            return;
        }
        let touches_msi = self.msi_cap.guest_write(offset, data);
        self.access
            .write(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, data);
        if touches_msi {
            self.update_msi();
        }
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if self.handed_over {
            return;
        }
        self.access
            .read(u32::try_from(bar).unwrap_or(u32::MAX), offset, data);
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.handed_over {
            log::debug!("VFIO: BAR {bar} write after the handover dropped");
            return;
        }
        self.access
            .write(u32::try_from(bar).unwrap_or(u32::MAX), offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use devices::interrupt::MsiMessage;
    use devices::pci::passthrough::MSI_CAPABILITY_ID;
    use vfio_ioctls::VfioError;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    /// Capabilities pointer.
    const CAP_POINTER: usize = 0x34;

    /// A device like QEMU's edu: 32-bit memory BAR 0 of 1 MiB, a 64-bit MSI capability at 0x40.
    #[derive(Default)]
    struct FakeState {
        config: Vec<u8>,
        bar0: Vec<u8>,
        msi: Vec<bool>,
        fail_msi: bool,
        /// Like VFIO: the enable bit written to the MSI control register is dropped while MSI
        /// is off in the kernel.
        drop_msi_enable: bool,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<Mutex<FakeState>>);

    const MSI_AT: usize = 0x40;

    impl Fake {
        fn edu() -> Self {
            let mut config = vec![0u8; 256];
            config[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
            config[CAP_POINTER] = MSI_AT as u8;
            config[MSI_AT] = MSI_CAPABILITY_ID;
            config[MSI_AT + 2] = 0x80;
            let fake = Self::default();
            let mut state = fake.0.lock().unwrap();
            state.config = config;
            state.bar0 = vec![0u8; 0x100];
            drop(state);
            fake
        }
    }

    impl DeviceAccess for Fake {
        fn read(&self, region: u32, offset: u64, data: &mut [u8]) {
            let state = self.0.lock().unwrap();
            let bytes = match region {
                VFIO_PCI_CONFIG_REGION_INDEX => &state.config,
                0 => &state.bar0,
                _ => return,
            };
            let at = offset as usize;
            data.copy_from_slice(&bytes[at..at + data.len()]);
        }
        fn write(&self, region: u32, offset: u64, data: &[u8]) {
            let mut state = self.0.lock().unwrap();
            let bytes = match region {
                VFIO_PCI_CONFIG_REGION_INDEX => &mut state.config,
                0 => &mut state.bar0,
                _ => return,
            };
            let at = offset as usize;
            bytes[at..at + data.len()].copy_from_slice(data);
            let control = MSI_AT + 2;
            let msi_off = state.msi.last() != Some(&true);
            if region == VFIO_PCI_CONFIG_REGION_INDEX
                && state.drop_msi_enable
                && msi_off
                && (at..at + data.len()).contains(&control)
            {
                state.config[control] &= !1;
            }
        }
        fn region_size(&self, region: u32) -> u64 {
            if region == 0 { 1 << 20 } else { 0 }
        }
        fn set_msi(&self, irq: Option<&EventFd>) -> Result<(), VfioError> {
            let mut state = self.0.lock().unwrap();
            if state.fail_msi {
                return Err(VfioError::VfioDeviceEnableIrq);
            }
            state.msi.push(irq.is_some());
            Ok(())
        }
    }

    #[derive(Default)]
    struct RecordingMsi(Mutex<Vec<Option<MsiMessage>>>);

    impl MsiVectors for RecordingMsi {
        fn configure(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
            assert_eq!(vector, 0);
            self.0.lock().unwrap().push(message);
            Ok(())
        }
        fn trigger(&self, _vector: u16) -> io::Result<()> {
            Ok(())
        }
    }

    fn attach(fake: &Fake, msi: Arc<RecordingMsi>) -> VfioPciDevice {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        VfioPciDevice::with_access(Box::new(fake.clone()), &memory, msi, irq, &mut |size| {
            assert_eq!(size, 1 << 20);
            Ok(0xc000_0000)
        })
        .unwrap()
    }

    fn write_dword(device: &mut VfioPciDevice, offset: usize, value: u32) {
        device.config_write(offset, &value.to_le_bytes());
    }

    fn read_dword(device: &mut VfioPciDevice, offset: usize) -> u32 {
        let mut raw = [0u8; 4];
        device.config_read(offset, &mut raw);
        u32::from_le_bytes(raw)
    }

    #[test]
    fn memory_bars_are_placed_with_the_sizes_vfio_reports() {
        let fake = Fake::edu();

        let device = attach(&fake, Arc::default());

        assert_eq!(
            device.bars(),
            [PciBarInfo {
                index: 0,
                address: 0xc000_0000,
                size: 1 << 20,
                is_64bit: false,
            }]
        );
        assert_eq!(device.state().msi_cap, Some(MSI_AT));
    }

    #[test]
    fn bar_registers_are_emulated_and_never_reach_the_device() {
        let fake = Fake::edu();
        let mut device = attach(&fake, Arc::default());

        write_dword(&mut device, 0x10, u32::MAX);
        let sized = read_dword(&mut device, 0x10);
        write_dword(&mut device, 0x10, 0xd000_0000);

        assert_eq!(sized, !((1u32 << 20) - 1));
        assert_eq!(read_dword(&mut device, 0x10), 0xd000_0000);
        assert_eq!(device.bars()[0].address, 0xd000_0000);
        assert_eq!(fake.0.lock().unwrap().config[0x10..0x14], [0; 4]);
    }

    #[test]
    fn other_config_registers_and_bar_accesses_go_to_the_device() {
        let fake = Fake::edu();
        let mut device = attach(&fake, Arc::default());

        write_dword(&mut device, 0x04, 0x0006);
        device.bar_write(0, 0x04, &0x1234_5678u32.to_le_bytes());
        let mut bar = [0u8; 4];
        device.bar_read(0, 0x04, &mut bar);

        assert_eq!(read_dword(&mut device, 0), 0x11e8_1234);
        assert_eq!(fake.0.lock().unwrap().config[4], 0x06);
        assert_eq!(u32::from_le_bytes(bar), 0x1234_5678);
    }

    #[test]
    fn the_rom_bar_reads_as_absent_and_ignores_writes() {
        let fake = Fake::edu();
        fake.0.lock().unwrap().config[0x30..0x34].copy_from_slice(&[0xff; 4]);
        let mut device = attach(&fake, Arc::default());

        write_dword(&mut device, 0x30, 0xffff_f800);

        assert_eq!(read_dword(&mut device, 0x30), 0);
    }

    #[test]
    fn enabling_msi_routes_the_vector_then_hands_the_eventfd_to_the_kernel() {
        let fake = Fake::edu();
        let msi = Arc::new(RecordingMsi::default());
        let mut device = attach(&fake, msi.clone());

        write_dword(&mut device, MSI_AT + 4, 0xfee0_0000);
        write_dword(&mut device, MSI_AT + 8, 0);
        write_dword(&mut device, MSI_AT + 12, 0x0041);
        device.config_write(MSI_AT + 2, &0x0081u16.to_le_bytes());

        let expected = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(msi.0.lock().unwrap().last(), Some(&Some(expected)));
        assert_eq!(fake.0.lock().unwrap().msi, [true]);
        assert!(device.state().msi_enabled);
    }

    #[test]
    fn msi_enable_is_kept_although_the_kernel_drops_the_bit_before_set_irqs() {
        let fake = Fake::edu();
        fake.0.lock().unwrap().drop_msi_enable = true;
        let mut device = attach(&fake, Arc::default());

        device.config_write(MSI_AT + 2, &0x0081u16.to_le_bytes());
        let mut control = [0u8; 2];
        device.config_read(MSI_AT + 2, &mut control);

        assert_eq!(fake.0.lock().unwrap().msi, [true]);
        assert_eq!(u16::from_le_bytes(control) & 1, 1);
        assert!(device.state().msi_enabled);
    }

    #[test]
    fn disabling_msi_takes_the_eventfd_back_and_unroutes_the_vector() {
        let fake = Fake::edu();
        let msi = Arc::new(RecordingMsi::default());
        let mut device = attach(&fake, msi.clone());
        device.config_write(MSI_AT + 2, &0x0081u16.to_le_bytes());

        device.config_write(MSI_AT + 2, &0x0080u16.to_le_bytes());

        assert_eq!(fake.0.lock().unwrap().msi, [true, false]);
        assert_eq!(msi.0.lock().unwrap().last(), Some(&None));
        assert!(!device.state().msi_enabled);
    }

    #[test]
    fn a_refused_msi_enable_leaves_msi_disabled_and_the_guest_running() {
        let fake = Fake::edu();
        fake.0.lock().unwrap().fail_msi = true;
        let mut device = attach(&fake, Arc::default());

        device.config_write(MSI_AT + 2, &0x0081u16.to_le_bytes());

        assert!(!device.state().msi_enabled);
    }

    #[test]
    fn a_handed_over_device_leaves_the_kernel_objects_to_the_successor() {
        let fake = Fake::edu();
        let handed_over = attach(&fake, Arc::default());
        let kept = attach(&fake, Arc::default());
        let mut handed_over = handed_over;
        handed_over.set_handed_over(true);

        drop(handed_over);
        let after_handover = Arc::strong_count(&fake.0);
        drop(kept);

        // The fake's clones: ours, the leaked one; the normally dropped one is gone.
        assert_eq!(after_handover, 3);
        assert_eq!(Arc::strong_count(&fake.0), 2);
    }

    #[test]
    fn state_carries_the_bar_layout_and_the_guest_msi_enable() {
        let fake = Fake::edu();
        fake.0.lock().unwrap().drop_msi_enable = true;
        fake.0.lock().unwrap().fail_msi = true;
        let mut device = attach(&fake, Arc::default());

        device.config_write(MSI_AT + 2, &0x0081u16.to_le_bytes());
        let state = device.state();

        assert_eq!(
            state.bar_layout,
            [VfioBarState {
                index: 0,
                size: 1 << 20,
                is_64bit: false
            }]
        );
        assert!(state.msi_guest_enable);
        assert!(!state.msi_enabled);
        assert_eq!(state.handover, None);
    }

    #[test]
    fn a_device_without_memory_bars_is_refused() {
        #[derive(Clone)]
        struct NoBars(Fake);
        impl DeviceAccess for NoBars {
            fn read(&self, region: u32, offset: u64, data: &mut [u8]) {
                self.0.read(region, offset, data);
            }
            fn write(&self, region: u32, offset: u64, data: &[u8]) {
                self.0.write(region, offset, data);
            }
            fn region_size(&self, _region: u32) -> u64 {
                0
            }
            fn set_msi(&self, irq: Option<&EventFd>) -> Result<(), VfioError> {
                self.0.set_msi(irq)
            }
        }
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();

        let result = VfioPciDevice::with_access(
            Box::new(NoBars(Fake::edu())),
            &memory,
            Arc::new(RecordingMsi::default()),
            irq,
            &mut |_| Ok(0),
        );

        assert!(matches!(result, Err(VfioDeviceError::NoBar)));
    }

    #[test]
    fn device_without_msi_is_refused_rather_than_left_without_interrupts() {
        let fake = Fake::edu();
        // An MSI-X capability (id 0x11) where edu has its MSI one.
        fake.0.lock().unwrap().config[MSI_AT] = 0x11;
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();

        let result = VfioPciDevice::with_access(
            Box::new(fake),
            &memory,
            Arc::new(RecordingMsi::default()),
            irq,
            &mut |_| Ok(0xc000_0000),
        );

        match result {
            Err(error @ VfioDeviceError::NoMsi) => {
                assert!(error.to_string().contains("MSI-X"), "{error}");
            }
            other => panic!("expected NoMsi, got {:?}", other.map(|d| d.msi_cap)),
        }
    }
}
