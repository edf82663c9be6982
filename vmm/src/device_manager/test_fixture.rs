//! What the device manager's unit tests share: a VM with a minimal set of devices, a fake PCI
//! function, and a kernel VFIO device adopted over plain files (no host device needed).

use std::fs::File;
use std::sync::{Arc, RwLock};

use devices::bus::Bus;
use devices::pci::{PciBarInfo, PciConfigurationState, PciDevice, dma_regions};
use vfio::{
    AdoptedFds, VfioBackend, VfioBarState, VfioDeviceState, VfioPciDevice, VfioRegionState,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::tempfile::TempFile;

use super::pci::PciBuilder;
use super::{DeviceContext, DeviceError, DeviceManager};
use crate::config::{ConsoleConfig, ConsoleMode, VmConfig};
use crate::cpu::test_util;
use crate::interrupts::{InterruptManager, MsiGroup};
use crate::layout;
use crate::memory::GuestRam;
use crate::vcpu_thread::VcpuEvent;

/// A PCI function with vendor id 0x1234 and one 4 KiB BAR that reads as 0xab.
pub(super) struct FakeDevice {
    pub(super) bar: u64,
}

impl PciDevice for FakeDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let vendor = if offset == 0 { 0x1234u32 } else { 0 };
        let bytes = vendor.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }
    fn config_write(&mut self, _offset: usize, _data: &[u8]) {}
    fn bars(&self) -> Vec<PciBarInfo> {
        vec![PciBarInfo {
            index: 0,
            address: self.bar,
            size: 0x1000,
            is_64bit: false,
        }]
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xab);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A KVM VM with the devices of a minimal configuration: serial and virtio-rng (slot 1).
pub(super) struct Fixture {
    pub(super) manager: DeviceManager,
    pub(super) interrupts: InterruptManager,
    pub(super) ram: GuestRam,
    pub(super) vm: Arc<kvm_ioctls::VmFd>,
    pub(super) config: VmConfig,
}

impl Fixture {
    pub(super) fn new() -> Self {
        Self::with_events(Arc::new(|_| {}))
    }

    /// As [`Self::new`], with the VM events (guest reset, eject) going to `on_event`.
    pub(super) fn with_events(on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>) -> Self {
        let config = VmConfig {
            console: ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
                socket: None,
            },
            ..VmConfig::default()
        };
        Self::build(config, on_event)
    }

    /// A VM with the devices `config` asks for.
    pub(super) fn with_config(config: VmConfig) -> Self {
        Self::build(config, Arc::new(|_| {}))
    }

    fn build(config: VmConfig, on_event: Arc<dyn Fn(VcpuEvent) + Send + Sync>) -> Self {
        let kvm = test_util::kvm();
        let vm = Arc::new(test_util::vm(&kvm));
        let ram = GuestRam::new(64 << 20).unwrap();
        let interrupts = InterruptManager::new(vm.clone()).unwrap();
        let manager = DeviceManager::build(
            &DeviceContext {
                config: &config,
                memory: ram.memory(),
                vm: &vm,
                interrupts: &interrupts,
                on_event,
                handed_over: None,
            },
            None,
        )
        .unwrap();
        Self {
            manager,
            interrupts,
            ram,
            vm,
            config,
        }
    }

    /// Runs `act` on the manager with this VM's device context, as a running VM's hot-add does.
    pub(super) fn with_context<T>(
        &mut self,
        act: impl FnOnce(&mut DeviceManager, &DeviceContext<'_>) -> T,
    ) -> T {
        let ctx = DeviceContext {
            config: &self.config,
            memory: self.ram.memory(),
            vm: &self.vm,
            interrupts: &self.interrupts,
            on_event: Arc::new(|_| {}),
            handed_over: None,
        };
        act(&mut self.manager, &ctx)
    }

    pub(super) fn hot_add<T>(
        &mut self,
        build: impl FnOnce(&mut PciBuilder<'_, '_, '_>) -> Result<T, DeviceError>,
    ) -> Result<(T, u8), DeviceError> {
        self.with_context(|manager, ctx| manager.hot_add(ctx, build))
    }

    /// Hot-adds an adopted VFIO device as VFIO device 0 (id `vfio/0`); returns its slot and
    /// BAR address.
    pub(super) fn with_vfio_device(&mut self) -> (u8, u64) {
        let ((entry, bar), slot) = self
            .hot_add(|pci| {
                let bar = pci.bars.allocate(1 << 20).map_err(DeviceError::Pci)?;
                let adopted = adopted_vfio(pci.ctx.memory, pci.ctx.interrupts, bar);
                let device = Arc::new(std::sync::Mutex::new(adopted.device));
                let slot = pci.place(
                    "vfio/0",
                    device.clone(),
                    Some(&adopted.msi),
                    vec!["vfio/0".into()],
                )?;
                let entry =
                    super::vfio::VfioDeviceEntry::new("vfio/0".into(), slot, device, adopted.msi);
                Ok((entry, bar))
            })
            .unwrap();
        self.manager
            .vfio_devices
            .push(super::vfio::VfioSlot::Attached(entry));
        (slot, bar)
    }

    pub(super) fn mmio(&self) -> Arc<RwLock<Bus>> {
        self.manager.buses().mmio.clone()
    }

    /// The vendor id of `slot`, read as the guest does (ports 0xcf8/0xcfc).
    pub(super) fn vendor_id(&self, slot: u8) -> u16 {
        let pio = self.manager.buses().pio.clone();
        let address = 0x8000_0000u32 | (u32::from(slot) << 11);
        let bus = pio.read().unwrap();
        assert!(bus.write(layout::PCI_CONFIG_PORT, &address.to_le_bytes()));
        let mut data = [0u8; 2];
        assert!(bus.read(layout::PCI_CONFIG_PORT + 4, &mut data));
        u16::from_le_bytes(data)
    }
}

/// A hot-plug controller register, read as the guest does.
pub(super) fn hotplug_register(fixture: &Fixture, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    let mmio = fixture.mmio();
    assert!(
        mmio.read()
            .unwrap()
            .read(layout::PCI_HOTPLUG_START + offset, &mut data)
    );
    u32::from_le_bytes(data)
}

/// A kernel VFIO device adopted over plain files, with its MSI vector.
pub(super) struct AdoptedVfio {
    pub(super) device: VfioPciDevice,
    pub(super) msi: Arc<MsiGroup>,
    /// The file standing for the vfio cdev (its region 0 is BAR 0).
    pub(super) device_file: File,
}

/// A device with one 1 MiB memory BAR at `bar`, MSI off, adopted as a live update's successor
/// would (nothing is written to it), DMA-mapping all of `memory`.
pub(super) fn adopted_vfio(
    memory: &GuestMemoryMmap,
    interrupts: &InterruptManager,
    bar: u64,
) -> AdoptedVfio {
    let device_file = TempFile::new().unwrap().into_file();
    device_file.set_len(0x2000).unwrap();
    let mut bar_addresses = vec![None; 6];
    bar_addresses[0] = Some(bar);
    let state = VfioDeviceState {
        path: "/sys/bus/pci/devices/0000:00:03.0".into(),
        backend: VfioBackend::Iommufd,
        bar_layout: vec![VfioBarState {
            index: 0,
            size: 1 << 20,
            is_64bit: false,
        }],
        bars: PciConfigurationState {
            command: 6,
            cache_line_size: 0,
            interrupt_line: 0,
            bar_addresses,
        },
        regions: vec![VfioRegionState {
            index: 0,
            offset: 0,
            size: 0x1000,
            flags: 3,
        }],
        msi_cap: Some(0x40),
        msi_guest_enable: false,
        msi_enabled: false,
        dma: dma_regions(memory).unwrap(),
        ioas_id: Some(1),
        handover: None,
    };
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let msi = interrupts
        .msi_vectors_with_fds(vec![irq.try_clone().unwrap()])
        .unwrap();
    let fds = AdoptedFds {
        device: device_file.try_clone().unwrap().into(),
        iommufd: TempFile::new().unwrap().into_file().into(),
    };
    let device = VfioPciDevice::adopt(&state, fds, memory, msi.clone(), irq).unwrap();
    AdoptedVfio {
        device,
        msi,
        device_file,
    }
}
