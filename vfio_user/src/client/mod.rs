//! The VMM side: a remote PCI function on our PCI bus.
//!
//! The BAR and expansion ROM registers live here, in the shared [`BarShadow`] (the VMM places
//! BARs; the server never sees guest addresses of its BARs), every other configuration byte
//! and every BAR access goes to the server. The MSI capability is forwarded too, and after each
//! write to it the VMM reads it back ([`MsiShadow`]) and points its one MSI vector (a KVM irqfd
//! whose eventfd the server signals) at the programmed message.
//!
//! `update` holds what a live update needs: the saved state, the hand-over and the two ways
//! a successor takes the device (adopting the connection, or re-attaching).

mod update;

use std::fmt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::interrupt::MsiVectors;
use devices::pci::passthrough::{BarShadow, DeviceBar, MsiShadow, find_capabilities};
use devices::pci::{PciBarInfo, PciDevice, PciError, dma_regions};
use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::proto::{Connection, ProtoError};
use crate::state::DmaRegionState;

/// Errors from attaching a vfio-user device.
#[derive(Debug, Error)]
pub enum UserDeviceError {
    /// The server could not be reached or refused the handshake.
    #[error("Cannot connect to the vfio-user server at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: ProtoError,
    },
    /// The server's device is not a PCI device.
    #[error("The vfio-user device is not a PCI device")]
    NotPci,
    /// A protocol exchange failed.
    #[error("vfio-user {what} failed")]
    Protocol {
        /// The request.
        what: &'static str,
        /// Why.
        #[source]
        source: ProtoError,
    },
    /// A guest RAM region has no file behind it, so it cannot be shared.
    #[error("Guest RAM at {address:#x} is not file-backed")]
    RamNotShareable {
        /// Region start.
        address: u64,
    },
    /// Guest RAM is not laid out as when the device was attached.
    #[error("Guest RAM differs from the device's DMA regions")]
    RamLayoutChanged,
    /// BAR 0 is missing.
    #[error("The device has no BAR 0")]
    NoBar,
    /// BAR 0 has a size the guest cannot be given, could not be placed, or its saved
    /// registers do not fit.
    #[error("Cannot place BAR 0")]
    Bar(#[source] PciError),
}

impl From<devices::pci::NotFileBacked> for UserDeviceError {
    fn from(error: devices::pci::NotFileBacked) -> Self {
        Self::RamNotShareable {
            address: error.address,
        }
    }
}

/// A PCI function served by a vfio-user server.
pub struct VfioUserPciDevice {
    client: Connection,
    socket: PathBuf,
    /// A protocol call failed: the server is treated as gone, accesses read all ones.
    lost: bool,
    /// The connection is being handed to another VMM: nothing may be sent on it.
    handed_over: bool,
    /// The server keeps the device as it is for its next client (`persist=on`), so another
    /// VMM may connect again without a reset ([`Self::reattach`]).
    server_persists: bool,
    dma: Vec<DmaRegionState>,
    /// The BAR and ROM registers (sizing, guest moves).
    bars: BarShadow,
    msi_cap: Option<MsiShadow>,
    msi: Arc<dyn MsiVectors>,
    /// The eventfd the server signals; kept so it outlives the connection setup.
    _irq: EventFd,
}

impl fmt::Debug for VfioUserPciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioUserPciDevice")
            .field("bars", &self.bars.bars())
            .field("msi_cap", &self.msi_cap.map(|cap| cap.offset()))
            .finish_non_exhaustive()
    }
}

fn protocol(what: &'static str) -> impl FnOnce(ProtoError) -> UserDeviceError {
    move |source| UserDeviceError::Protocol { what, source }
}

/// Connects (resetting the device if `reset`), shares guest RAM and the MSI eventfd; returns
/// the connection, the DMA regions and the size of BAR 0.
fn open(
    path: &Path,
    memory: &GuestMemoryMmap,
    irq: &EventFd,
    reset: bool,
) -> Result<(Connection, Vec<DmaRegionState>, u64), UserDeviceError> {
    let mut client = Connection::connect(path).map_err(|source| UserDeviceError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let (flags, _regions, _irqs) = client.device_info().map_err(protocol("DEVICE_GET_INFO"))?;
    if flags & VFIO_DEVICE_FLAGS_PCI == 0 {
        return Err(UserDeviceError::NotPci);
    }
    if reset && flags & VFIO_DEVICE_FLAGS_RESET != 0 {
        // A server that kept the device running for an earlier client must not hand its
        // DMA engine, still programmed, to a guest that has just booted.
        client.reset().map_err(protocol("DEVICE_RESET"))?;
    }
    let dma = dma_regions(memory)?;
    for (region, shared) in memory.iter().zip(&dma) {
        let file = region
            .file_offset()
            .ok_or(UserDeviceError::RamNotShareable {
                address: shared.address,
            })?;
        client
            .dma_map(
                shared.file_offset,
                shared.address,
                shared.size,
                file.file().as_raw_fd(),
            )
            .map_err(protocol("DMA map"))?;
    }
    client
        .set_irqs(
            VFIO_PCI_MSI_IRQ_INDEX,
            VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            0,
            &[irq.as_raw_fd()],
        )
        .map_err(protocol("SET_IRQS"))?;
    let size = client
        .region_info(VFIO_PCI_BAR0_REGION_INDEX)
        .map_err(protocol("DEVICE_GET_REGION_INFO"))?
        .size;
    if size == 0 {
        return Err(UserDeviceError::NoBar);
    }
    Ok((client, dma, size))
}

/// BAR 0 as the guest sees it: a 32-bit memory BAR of `size` bytes, whatever the server's
/// register says (the saved state records only its size).
fn bar0(size: u64) -> PciBarInfo {
    PciBarInfo {
        index: 0,
        address: 0,
        size,
        is_64bit: false,
    }
}

impl VfioUserPciDevice {
    /// Connects to the server at `path`, resets the device, shares every region of `memory`
    /// for DMA, gives the server `irq` (registered by the caller as the irqfd behind `msi` vector 0) and places
    /// BAR 0 where `place_bar(size)` says.
    pub fn connect(
        path: &Path,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
        place_bar: &mut dyn FnMut(u64) -> Result<u64, PciError>,
    ) -> Result<Self, UserDeviceError> {
        let (client, dma, size) = open(path, memory, &irq, true)?;
        // BAR 0 only, shown as a 32-bit memory BAR (see `bar0`).
        let probe = &mut |index| match index {
            0 => DeviceBar { register: 0, size },
            _ => DeviceBar::default(),
        };
        let bars = BarShadow::place(probe, place_bar).map_err(UserDeviceError::Bar)?;
        Self::finish(client, path, dma, bars, msi, irq)
    }

    fn finish(
        client: Connection,
        path: &Path,
        dma: Vec<DmaRegionState>,
        bars: BarShadow,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
    ) -> Result<Self, UserDeviceError> {
        let mut device = Self {
            client,
            socket: path.to_path_buf(),
            lost: false,
            handed_over: false,
            server_persists: false,
            dma,
            bars,
            msi_cap: None,
            msi,
            _irq: irq,
        };
        device.msi_cap = device.find_msi_cap()?;
        Ok(device)
    }

    /// Whether the server still answers (one configuration read); false once the connection
    /// is lost.
    pub fn is_alive(&mut self) -> bool {
        let mut ids = [0u8; 4];
        self.guest_call(|dev| dev.read_config(0, &mut ids))
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) -> Result<(), UserDeviceError> {
        self.client
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, data)
            .map_err(protocol("config read"))
    }

    /// The MSI capability, if the device has one (the enable bit as the device shows it
    /// until the guest writes one).
    fn find_msi_cap(&mut self) -> Result<Option<MsiShadow>, UserDeviceError> {
        let caps = find_capabilities(|offset| {
            let mut dword = [0u8; 4];
            self.read_config(offset, &mut dword)
                .map(|()| u32::from_le_bytes(dword))
        })?;
        Ok(caps.msi.map(|msi| MsiShadow::new(msi.offset, None)))
    }

    /// Reads the MSI capability back and points the vector at what the guest programmed.
    fn update_msi(&mut self, cap: MsiShadow) -> Result<(), UserDeviceError> {
        let mut raw = [0u8; MsiShadow::MESSAGE_END];
        self.read_config(cap.offset(), &mut raw)?;
        let message = cap.message(&raw);
        if let Err(e) = self.msi.configure(0, message) {
            log::warn!("vfio-user: cannot route the MSI vector: {e}");
        }
        Ok(())
    }
}

impl VfioUserPciDevice {
    /// Runs one guest-triggered protocol call, unless the connection was already lost; the
    /// first failure is logged once and marks it lost (a dead server must not flood the log).
    fn guest_call(&mut self, call: impl FnOnce(&mut Self) -> Result<(), UserDeviceError>) -> bool {
        if self.lost || self.handed_over {
            return false;
        }
        match call(self) {
            Ok(()) => true,
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|source| format!(" ({source})"))
                    .unwrap_or_default();
                log::error!(
                    "vfio-user device {}: {e}{cause}: connection lost, its registers now read all ones",
                    self.socket.display()
                );
                self.lost = true;
                false
            }
        }
    }
}

impl PciDevice for VfioUserPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.bars.read(offset, data) {
            return;
        }
        if !self.guest_call(|dev| dev.read_config(offset, data)) {
            data.fill(0xff);
        } else if let Some(cap) = &self.msi_cap {
            cap.guest_read(offset, data);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.bars.write(offset, data) {
            return;
        }
        let written = self.guest_call(|dev| {
            dev.client
                .region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, data)
                .map_err(protocol("config write"))
        });
        if written
            && let Some(cap) = self.msi_cap.as_mut()
            && cap.guest_write(offset, data)
        {
            let cap = *cap;
            self.guest_call(|dev| dev.update_msi(cap));
        }
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let region = u32::try_from(bar).unwrap_or(u32::MAX);
        let read = self.guest_call(|dev| {
            dev.client
                .region_read(region, offset, data)
                .map_err(protocol("BAR read"))
        });
        if !read {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let region = u32::try_from(bar).unwrap_or(u32::MAX);
        self.guest_call(|dev| {
            dev.client
                .region_write(region, offset, data)
                .map_err(protocol("BAR write"))
        });
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::fs::OpenOptions;
    use std::io;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use devices::interrupt::MsiMessage;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    use super::*;
    use crate::testdev::regs::{BAR0_SIZE, DEVICE_ID, DEVICE_MAGIC, MSI_CAP, VENDOR_ID, reg};
    use crate::testdev::{TestDevOptions, serve};

    #[derive(Default)]
    pub(super) struct RecordingMsi(Mutex<Vec<Option<MsiMessage>>>);

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

    /// 1 MiB of file-backed "guest RAM", as the VMM's memfd would be.
    pub(super) fn file_backed_memory(dir: &Path) -> GuestMemoryMmap {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("ram"))
            .unwrap();
        file.set_len(1 << 20).unwrap();
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), 1 << 20).unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    /// A scratch directory and the socket of a test device served from it on a thread.
    pub(super) fn serving(name: &str, options: TestDevOptions) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vfio-user-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dev.sock");
        let server_socket = socket.clone();
        std::thread::spawn(move || serve(&server_socket, &options));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "server did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        (dir, socket)
    }

    pub(super) fn connected(
        name: &str,
    ) -> (
        VfioUserPciDevice,
        GuestMemoryMmap,
        Arc<RecordingMsi>,
        EventFd,
    ) {
        let options = TestDevOptions {
            rate_hz: 1000,
            ..TestDevOptions::default()
        };
        let (dir, socket) = serving(name, options);
        let memory = file_backed_memory(&dir);
        let msi = Arc::new(RecordingMsi::default());
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let device = VfioUserPciDevice::connect(
            &socket,
            &memory,
            msi.clone(),
            irq.try_clone().unwrap(),
            &mut |size| Ok(0xc000_0000 + size),
        )
        .unwrap();
        (device, memory, msi, irq)
    }

    pub(super) fn bar_reg(device: &mut VfioUserPciDevice, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        device.bar_read(0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn config_space_shows_server_ids_and_vmm_placed_bar() {
        let (mut device, _memory, _msi, _irq) = connected("ids");

        let mut ids = [0u8; 4];
        device.config_read(0, &mut ids);
        let mut bar = [0u8; 4];
        device.config_read(0x10, &mut bar);

        assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), VENDOR_ID);
        assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), DEVICE_ID);
        assert_eq!(u64::from(u32::from_le_bytes(bar)), 0xc000_0000 + BAR0_SIZE);
    }

    /// A server that answers the version handshake with `reply` and hangs up.
    fn bogus_server(name: &str, reply: Vec<u8>) -> PathBuf {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("vfio-user-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("bogus.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 16];
            stream.read_exact(&mut request).unwrap();
            let _ = stream.write_all(&reply);
        });
        socket
    }

    fn connect_to(socket: &Path) -> Result<VfioUserPciDevice, UserDeviceError> {
        let dir = socket.parent().unwrap();
        VfioUserPciDevice::connect(
            socket,
            &file_backed_memory(dir),
            Arc::new(RecordingMsi::default()),
            EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
            &mut |_| Ok(0xc000_0000),
        )
    }

    #[test]
    fn garbage_handshake_reply_is_a_connect_error() {
        // A header claiming a reply of 64 bytes, followed by bytes that are not JSON.
        let mut reply = vec![0u8; 16];
        reply[2..4].copy_from_slice(&1u16.to_le_bytes());
        reply[4..8].copy_from_slice(&64u32.to_le_bytes());
        reply[8..12].copy_from_slice(&1u32.to_le_bytes());
        reply.extend_from_slice(&[0xa5; 48]);
        let socket = bogus_server("garbage", reply);

        let result = connect_to(&socket);

        assert!(
            matches!(result, Err(UserDeviceError::Connect { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn server_hanging_up_mid_handshake_is_a_connect_error() {
        let socket = bogus_server("hangup", vec![0u8; 5]);

        let result = connect_to(&socket);

        assert!(
            matches!(result, Err(UserDeviceError::Connect { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn fresh_connect_resets_a_device_left_running() {
        let options = TestDevOptions {
            persist: true,
            ..TestDevOptions::default()
        };
        let (dir, socket) = serving("fresh", options);
        let memory = file_backed_memory(&dir);
        let attach = || {
            VfioUserPciDevice::connect(
                &socket,
                &memory,
                Arc::new(RecordingMsi::default()),
                EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
                &mut |_| Ok(0xc000_0000),
            )
            .unwrap()
        };
        let mut first = attach();
        first.bar_write(0, reg::DMA_LEN, &16u32.to_le_bytes());
        first.bar_write(0, reg::CONTROL, &1u32.to_le_bytes());
        drop(first);

        let mut second = attach();

        assert_eq!(bar_reg(&mut second, reg::CONTROL), 0);
    }

    #[test]
    fn guest_program_runs_dma_into_shared_ram_and_signals_msi() {
        let (mut device, memory, msi, irq) = connected("dma");
        let msi_data = MSI_CAP + 12;

        device.config_write(MSI_CAP + 4, &0xfee0_0000u32.to_le_bytes());
        device.config_write(msi_data, &0x41u16.to_le_bytes());
        device.config_write(MSI_CAP + 2, &[0x81]);
        device.bar_write(0, reg::DMA_ADDR_LO, &0x8000u32.to_le_bytes());
        device.bar_write(0, reg::DMA_LEN, &16u32.to_le_bytes());
        device.bar_write(0, reg::CONTROL, &1u32.to_le_bytes());
        let deadline = Instant::now() + Duration::from_secs(5);
        while bar_reg(&mut device, reg::COUNTER_LO) < 20 {
            assert!(Instant::now() < deadline, "DMA engine did not advance");
            std::thread::sleep(Duration::from_millis(10));
        }
        device.bar_write(0, reg::CONTROL, &0u32.to_le_bytes());

        let in_ram: u64 = memory.read_obj(GuestAddress(0x8000)).unwrap();
        assert!(in_ram >= 20, "counter in RAM: {in_ram}");
        assert_eq!(bar_reg(&mut device, reg::ID), DEVICE_MAGIC);
        assert!(irq.read().unwrap() >= 20);
        let last = msi.0.lock().unwrap().last().copied().flatten();
        assert_eq!(
            last,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
    }
}
