//! Restart-mode live update of a VFIO device: the old VMM hands its fds to the successor
//! through the session, the successor adopts them. The device is never reset, re-opened,
//! re-bound or re-mapped: its DMA into guest RAM and its interrupts go on through the pause.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use devices::interrupt::MsiVectors;
use devices::pci::passthrough::{BarShadow, MsiShadow};
use devices::pci::{PciBarInfo, dma_regions};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::VfioDeviceError;
use crate::access::{Adopted, HandoverFds};
use crate::device::VfioPciDevice;
use crate::open::VfioBackend;
use crate::state::VfioDeviceState;

/// The fds a previous VMM attached for a device, taken from the session.
#[derive(Debug)]
pub struct AdoptedFds {
    /// The vfio cdev, bound to `iommufd` and attached to the IOAS.
    pub device: OwnedFd,
    /// The iommufd holding the IOAS and its mappings.
    pub iommufd: OwnedFd,
}

impl VfioPciDevice {
    /// The fds the successor needs to keep the device and its DMA mappings: `None` on the
    /// group and container fallback, whose fds vfio-ioctls does not expose.
    pub fn handover_fds(&self) -> Option<HandoverFds<'_>> {
        self.access.handover_fds()
    }

    /// Stops (or, on a cancelled update, resumes) every access of this VMM to the device:
    /// while handed over, configuration and BAR reads return all ones and writes are dropped,
    /// and dropping the device leaves the kernel objects alone.
    pub fn set_handed_over(&mut self, handed_over: bool) {
        self.handed_over = handed_over;
    }

    /// Rebuilds the device a previous VMM handed over, from its `state` and the fds it
    /// attached, without a single call to the device or the IOMMU: the cdev stays bound and
    /// attached, the IOAS keeps its mappings of the RAM memfds (which `memory` must map at the
    /// same addresses), the guest's BAR and MSI programming stays in the device. `irq` is the
    /// handed-over eventfd behind vector 0 of `msi`, which the kernel still signals.
    pub fn adopt(
        state: &VfioDeviceState,
        fds: AdoptedFds,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
    ) -> Result<Self, VfioDeviceError> {
        if state.backend != VfioBackend::Iommufd {
            return Err(VfioDeviceError::NotCarried {
                backend: state.backend,
            });
        }
        if dma_regions(memory)? != state.dma {
            return Err(VfioDeviceError::RamLayoutChanged);
        }
        let layout: Vec<PciBarInfo> = state
            .bar_layout
            .iter()
            .map(|bar| PciBarInfo {
                index: bar.index,
                address: 0,
                size: bar.size,
                is_64bit: bar.is_64bit,
            })
            .collect();
        let bars = BarShadow::restore(&layout, &state.bars).map_err(VfioDeviceError::Bar)?;
        if bars.bars().is_empty() {
            return Err(VfioDeviceError::NoBar);
        }
        let msi_cap = state.msi_cap.ok_or(VfioDeviceError::NoMsi)?;
        let access = Box::new(Adopted {
            device: File::from(fds.device),
            iommufd: fds.iommufd,
            regions: state.regions.clone(),
            ioas_id: state.ioas_id,
        });
        log::info!(
            "VFIO device {} adopted (IOAS {:?}, MSI {}), BARs {:x?}",
            state.path.display(),
            state.ioas_id,
            if state.msi_enabled { "on" } else { "off" },
            bars.bars()
        );
        Ok(Self {
            access,
            path: state.path.clone(),
            backend: state.backend,
            dma: state.dma.clone(),
            bars,
            regions: state.regions.clone(),
            ioas_id: state.ioas_id,
            msi_cap: MsiShadow::new(msi_cap, Some(state.msi_guest_enable)),
            msi_enabled: state.msi_enabled,
            msi,
            irq,
            handed_over: false,
            _memory: memory.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::unix::fs::FileExt;

    use devices::interrupt::MsiMessage;
    use devices::pci::{PciConfigurationState, PciDevice};
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::state::{VfioBarState, VfioHandoverTokens, VfioRegionState};

    /// Configuration space sits at this offset of the fake device file, BAR 0 at 0.
    const CONFIG_AT: u64 = 0x1000;
    const BAR0: u64 = 0xd000_0000;

    struct NoMsi;
    impl MsiVectors for NoMsi {
        fn configure(&self, _vector: u16, _message: Option<MsiMessage>) -> io::Result<()> {
            Ok(())
        }
        fn trigger(&self, _vector: u16) -> io::Result<()> {
            Ok(())
        }
    }

    fn ram(size: u64) -> GuestMemoryMmap {
        let file = TempFile::new().unwrap().into_file();
        file.set_len(size).unwrap();
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size as usize).unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    /// A "device fd": a file with BAR 0 at 0 and configuration space at `CONFIG_AT`.
    fn device_file() -> File {
        let file = TempFile::new().unwrap().into_file();
        file.set_len(CONFIG_AT + 0x100).unwrap();
        file.write_all_at(&0x11e8_1234u32.to_le_bytes(), CONFIG_AT)
            .unwrap();
        file.write_all_at(&0x0000_00edu32.to_le_bytes(), 0).unwrap();
        file
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut data = vec![0u8; (CONFIG_AT + 0x100) as usize];
        file.read_exact_at(&mut data, 0).unwrap();
        data
    }

    fn saved(memory: &GuestMemoryMmap) -> VfioDeviceState {
        let mut bar_addresses = vec![None; 6];
        bar_addresses[0] = Some(BAR0);
        VfioDeviceState {
            path: "/sys/bus/pci/devices/0000:00:03.0".into(),
            backend: VfioBackend::Iommufd,
            bar_layout: vec![VfioBarState {
                index: 0,
                size: 1 << 20,
                is_64bit: false,
            }],
            bars: PciConfigurationState {
                command: 0x6,
                cache_line_size: 0,
                interrupt_line: 0,
                bar_addresses,
            },
            regions: vec![
                VfioRegionState {
                    index: 0,
                    offset: 0,
                    size: 0x100,
                    flags: 3,
                },
                VfioRegionState {
                    index: 7,
                    offset: CONFIG_AT,
                    size: 0x100,
                    flags: 3,
                },
            ],
            msi_cap: Some(0x40),
            msi_guest_enable: true,
            msi_enabled: true,
            dma: dma_regions(memory).unwrap(),
            ioas_id: Some(2),
            handover: Some(VfioHandoverTokens {
                device: 1,
                iommufd: 2,
                msi_eventfd: 3,
            }),
        }
    }

    fn adopt(state: &VfioDeviceState, memory: &GuestMemoryMmap, device: &File) -> VfioPciDevice {
        let fds = AdoptedFds {
            device: device.try_clone().unwrap().into(),
            iommufd: TempFile::new().unwrap().into_file().into(),
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        VfioPciDevice::adopt(state, fds, memory, Arc::new(NoMsi), irq).unwrap()
    }

    fn read_dword(device: &mut VfioPciDevice, offset: usize) -> u32 {
        let mut raw = [0u8; 4];
        device.config_read(offset, &mut raw);
        u32::from_le_bytes(raw)
    }

    #[test]
    fn adopting_touches_nothing_and_serves_the_saved_layout() {
        let memory = ram(1 << 20);
        let state = saved(&memory);
        let file = device_file();
        let before = contents(&file);

        let mut device = adopt(&state, &memory, &file);

        assert_eq!(contents(&file), before, "the device was written to");
        assert_eq!(device.bars()[0].address, BAR0);
        assert_eq!(read_dword(&mut device, 0x10), BAR0 as u32);
        assert_eq!(read_dword(&mut device, 0), 0x11e8_1234);
        let mut bar = [0u8; 4];
        device.bar_read(0, 0, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), 0xed);
        let mut control = [0u8; 2];
        device.config_read(0x42, &mut control);
        assert_eq!(control[0] & 1, 1, "the guest's MSI enable bit is kept");
        assert_eq!(
            device.state(),
            VfioDeviceState {
                handover: None,
                ..state
            }
        );
    }

    #[test]
    fn an_adopted_device_forwards_accesses_to_the_handed_over_fd() {
        let memory = ram(1 << 20);
        let file = device_file();
        let mut device = adopt(&saved(&memory), &memory, &file);

        device.bar_write(0, 0x04, &0x1234_5678u32.to_le_bytes());
        device.config_write(0x3c, &[0x0b]);

        let mut data = [0u8; 4];
        file.read_exact_at(&mut data, 0x04).unwrap();
        assert_eq!(u32::from_le_bytes(data), 0x1234_5678);
        file.read_exact_at(&mut data[..1], CONFIG_AT + 0x3c)
            .unwrap();
        assert_eq!(data[0], 0x0b);
    }

    #[test]
    fn while_handed_over_the_device_is_not_touched() {
        let memory = ram(1 << 20);
        let file = device_file();
        let mut device = adopt(&saved(&memory), &memory, &file);
        let before = contents(&file);

        device.set_handed_over(true);
        device.bar_write(0, 0x04, &[0xaa; 4]);
        device.config_write(0x04, &[0; 2]);
        let mut bar = [0u8; 4];
        device.bar_read(0, 0, &mut bar);

        assert_eq!(contents(&file), before);
        assert_eq!(bar, [0xff; 4]);
        assert_eq!(read_dword(&mut device, 0), u32::MAX);
        assert!(device.handover_fds().is_some());
    }

    #[test]
    fn a_container_device_is_not_adopted() {
        let memory = ram(1 << 20);
        let state = VfioDeviceState {
            backend: VfioBackend::Container,
            ..saved(&memory)
        };
        let fds = AdoptedFds {
            device: device_file().into(),
            iommufd: TempFile::new().unwrap().into_file().into(),
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();

        let result = VfioPciDevice::adopt(&state, fds, &memory, Arc::new(NoMsi), irq);

        assert!(matches!(
            result,
            Err(VfioDeviceError::NotCarried {
                backend: VfioBackend::Container
            })
        ));
    }

    #[test]
    fn guest_ram_laid_out_differently_is_refused() {
        let state = saved(&ram(1 << 20));
        let memory = ram(2 << 20);
        let fds = AdoptedFds {
            device: device_file().into(),
            iommufd: TempFile::new().unwrap().into_file().into(),
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();

        let result = VfioPciDevice::adopt(&state, fds, &memory, Arc::new(NoMsi), irq);

        assert!(matches!(result, Err(VfioDeviceError::RamLayoutChanged)));
    }
}
