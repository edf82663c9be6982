//! The test device as a vfio-user server: protocol through the `vfio_user` crate, a DMA engine
//! thread, guest memory mapped from the client's fds.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info,
};
use vfio_user_proto::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::regs::{BAR0_SIZE, RECORD_LEN, TestDevConfig, TestDevRegs, reg};

/// Errors of the test device server.
#[derive(Debug, Error)]
pub enum TestDevError {
    /// The socket could not be created.
    #[error("Cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: vfio_user_proto::Error,
    },
    /// The listening socket could not be moved to its path.
    #[error("Cannot publish the socket at {path}")]
    Publish {
        /// Socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection failed.
    #[error("vfio-user connection failed")]
    Connection(#[source] vfio_user_proto::Error),
    /// The DMA engine thread could not start.
    #[error("Cannot start the DMA engine")]
    Engine(#[source] io::Error),
}

/// How to run the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestDevOptions {
    /// Program and enable DMA at start (`(address, length)`), for tests whose guest does not
    /// drive the device: records start once the client maps RAM covering the buffer.
    pub enable_at: Option<(u64, u32)>,
    /// Records per second.
    pub rate_hz: u32,
    /// Keep running when the client hangs up, and let the next client take the device over
    /// as it is (registers, DMA regions, progress): the re-attach of a VMM replacement.
    pub persist: bool,
}

/// The device state shared by the protocol thread and the DMA engine.
#[derive(Debug, Default)]
pub struct TestDev {
    /// BAR 0 registers.
    pub regs: TestDevRegs,
    /// Configuration space.
    pub config: TestDevConfig,
    memory: GuestMemoryMmap,
    msi: Option<File>,
    /// Interrupts due while no client eventfd was set; one is raised on the next `SET_IRQS`.
    missed_irqs: u32,
    /// What power-on (and `DEVICE_RESET`) means for this device.
    options: TestDevOptions,
}

fn lock(dev: &Mutex<TestDev>) -> MutexGuard<'_, TestDev> {
    dev.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl TestDev {
    /// One DMA engine step: writes the next record if running and raises the batch interrupt.
    /// Returns how long to wait before the next step.
    pub fn tick(&mut self) -> Duration {
        if !self.regs.running() {
            return Duration::from_millis(1);
        }
        let next = TestDevRegs {
            counter: self.regs.counter.wrapping_add(1),
            ..self.regs.clone()
        };
        let record = next.record(now_ns());
        let written = self
            .memory
            .write_slice(&record, GuestAddress(self.regs.dma_addr));
        if written.is_err() {
            // No shared region holds the buffer (yet): try again later, count nothing.
            self.regs.dma_error = true;
            return self.regs.period();
        }
        if self.regs.record_written() && self.config.msi_enabled() {
            self.interrupt_due();
        }
        self.regs.period()
    }

    /// A batch is complete: raises its interrupt, unless (ack mode) one still awaits its
    /// acknowledgement, in which case it is raised on the acknowledgement.
    fn interrupt_due(&mut self) {
        if self.regs.ack_irqs && self.regs.awaiting_ack {
            self.regs.irq_due = true;
            return;
        }
        self.raise();
    }

    /// Writes BAR 0 register `offset`; an acknowledgement raises the interrupt that waited.
    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.regs.write(offset, value);
        if offset == reg::IRQ_ACK && self.regs.irq_due && self.config.msi_enabled() {
            self.regs.irq_due = false;
            self.raise();
        }
    }

    /// Signals the MSI eventfd, or remembers the interrupt if there is none.
    fn raise(&mut self) {
        let Some(msi) = &self.msi else {
            self.missed_irqs = self.missed_irqs.saturating_add(1);
            return;
        };
        // An eventfd takes an 8-byte native-endian increment.
        match (&*msi).write_all(&1u64.to_ne_bytes()) {
            Ok(()) => {
                self.regs.irq_count = self.regs.irq_count.wrapping_add(1);
                self.regs.awaiting_ack = self.regs.ack_irqs;
            }
            Err(e) => log::warn!("testdev: cannot signal the MSI eventfd: {e}"),
        }
    }

    /// The client left but the device keeps running (persist mode): DMA goes on into the
    /// mappings it holds, interrupts are remembered until a client gives a new eventfd.
    pub fn detach(&mut self) {
        self.msi = None;
    }

    /// Whether a region already mapped at `address` is this very range of this very file
    /// (a re-attaching client mapping the same RAM again).
    fn already_mapped(&self, offset: u64, address: u64, size: u64, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(new) = file.metadata() else {
            return false;
        };
        self.memory.iter().any(|region| {
            region.start_addr().0 == address
                && region.len() == size
                && region.file_offset().is_some_and(|existing| {
                    existing.start() == offset
                        && existing
                            .file()
                            .metadata()
                            .is_ok_and(|old| old.dev() == new.dev() && old.ino() == new.ino())
                })
        })
    }

    fn map(&mut self, offset: u64, address: u64, size: u64, file: File) -> io::Result<()> {
        if self.already_mapped(offset, address, size, &file) {
            return Ok(());
        }
        // The same range from another file: a client that took the device over with RAM of
        // its own (a VMM restored from a snapshot, whose guest RAM is a new memfd). DMA goes
        // there from now on.
        if let Ok((rest, _old)) = self.memory.remove_region(GuestAddress(address), size) {
            log::info!("testdev: DMA region {address:#x}+{size:#x} replaced by another file");
            self.memory = rest;
        }
        let size =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mapping =
            MmapRegion::from_file(FileOffset::new(file, offset), size).map_err(io::Error::other)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(address))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.memory = self
            .memory
            .insert_region(Arc::new(region))
            .map_err(io::Error::other)?;
        Ok(())
    }
}

/// The `ServerBackend` over the shared device.
struct Backend(Arc<Mutex<TestDev>>);

const RECORD_ACCESS_MAX: usize = 8;

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let dev = lock(&self.0);
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => dev.config.read(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX if data.len() <= RECORD_ACCESS_MAX => {
                // Registers are 32-bit; a 64-bit read returns two of them.
                let base = offset & !3;
                let mut bytes = [0u8; 12];
                bytes[..4].copy_from_slice(&dev.regs.read(base).to_le_bytes());
                bytes[4..8].copy_from_slice(&dev.regs.read(base + 4).to_le_bytes());
                bytes[8..].copy_from_slice(&dev.regs.read(base + 8).to_le_bytes());
                let shift = (offset & 3) as usize;
                data.copy_from_slice(&bytes[shift..shift + data.len()]);
            }
            _ => data.fill(0xff),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut dev = lock(&self.0);
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => dev.config.write(offset, data),
            VFIO_PCI_BAR0_REGION_INDEX
                if offset.is_multiple_of(4) && data.len().is_multiple_of(4) =>
            {
                for (i, chunk) in data.chunks_exact(4).enumerate() {
                    let mut value = [0u8; 4];
                    value.copy_from_slice(chunk);
                    dev.write_reg(offset + 4 * i as u64, u32::from_le_bytes(value));
                }
            }
            _ => log::debug!("testdev: ignored write to region {region} at {offset:#x}"),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let file = fd.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        log::info!("testdev: DMA region {address:#x}+{size:#x} (fd offset {offset:#x})");
        lock(&self.0).map(offset, address, size, file)
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        // Unmapping is not needed by the tests: the whole memory stays until the client leaves.
        log::info!("testdev: ignoring DMA unmap of {address:#x}+{size:#x}");
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        let mut dev = lock(&self.0);
        let client_seq = dev.regs.client_seq;
        dev.regs = TestDevRegs {
            client_seq,
            ..power_on_regs(&dev.options)
        };
        dev.config = TestDevConfig::default();
        dev.missed_irqs = 0;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        _flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        if index != VFIO_PCI_MSI_IRQ_INDEX || start != 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut dev = lock(&self.0);
        dev.msi = match (count, fds.into_iter().next()) {
            (0, _) | (_, None) => None,
            (_, Some(file)) => Some(file),
        };
        if dev.msi.is_some() && dev.missed_irqs > 0 {
            // Interrupts that fell due with no eventfd merge into one, as a pending MSI would.
            dev.missed_irqs = 0;
            dev.raise();
        }
        Ok(())
    }
}

fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_CONFIG_REGION_INDEX => 256,
                VFIO_PCI_BAR0_REGION_INDEX => BAR0_SIZE,
                _ => 0,
            };
            let flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: u32::try_from(size_of::<vfio_region_info>()).unwrap_or(0),
                    flags,
                    index,
                    size,
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| IrqInfo {
            index,
            flags: if index == VFIO_PCI_MSI_IRQ_INDEX {
                VFIO_IRQ_INFO_EVENTFD
            } else {
                0
            },
            count: u32::from(index == VFIO_PCI_MSI_IRQ_INDEX),
        })
        .collect()
}

/// Power-on registers: the configured rate, and DMA already on with `enable_at`.
fn power_on_regs(options: &TestDevOptions) -> TestDevRegs {
    let mut regs = TestDevRegs {
        rate_hz: options.rate_hz,
        ..TestDevRegs::default()
    };
    if let Some((address, len)) = options.enable_at {
        regs.dma_addr = address;
        regs.dma_len = len.max(RECORD_LEN as u32);
        regs.enabled = true;
    }
    regs
}

/// The device as a new client finds it: power-on registers, nothing mapped, no interrupt.
fn power_on(options: &TestDevOptions) -> TestDev {
    TestDev {
        regs: power_on_regs(options),
        options: options.clone(),
        ..TestDev::default()
    }
}

/// Serves clients on `path` one after another, forever (a VMM reconnects when its guest
/// reboots). Each connection is a new client: the device starts from power-on and forgets the
/// previous client's DMA regions and eventfd when it leaves; with `persist`, it keeps running
/// instead and the next client takes it over as it is.
pub fn serve(path: &Path, options: &TestDevOptions) -> Result<(), TestDevError> {
    // Bound and listening under a staging name, then renamed: whoever sees the socket at
    // `path` can connect (a bound socket that does not listen yet refuses connections).
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.staging", std::process::id()));
    let staging = PathBuf::from(staging);
    let server =
        Server::new(&staging, true, irqs(), regions()).map_err(|source| TestDevError::Listen {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::rename(&staging, path).map_err(|source| TestDevError::Publish {
        path: path.to_path_buf(),
        source,
    })?;
    let dev = Arc::new(Mutex::new(TestDev::default()));
    let engine = Arc::clone(&dev);
    thread::Builder::new()
        .name("testdev-dma".into())
        .spawn(move || {
            loop {
                let wait = lock(&engine).tick();
                thread::sleep(wait);
            }
        })
        .map_err(TestDevError::Engine)?;
    let mut backend = Backend(dev);
    let mut client_seq = 0u32;
    loop {
        client_seq = client_seq.wrapping_add(1);
        {
            let mut dev = lock(&backend.0);
            if client_seq == 1 || !options.persist {
                *dev = power_on(options);
            }
            dev.regs.client_seq = client_seq;
        }
        let result = server.run(&mut backend);
        if options.persist {
            // The memory stays mapped here, so DMA goes on safely while nobody is attached.
            lock(&backend.0).detach();
        } else {
            // Stop DMA into memory the client may be about to free.
            *lock(&backend.0) = TestDev::default();
        }
        match result {
            Ok(()) => log::info!("testdev: client {client_seq} left"),
            Err(e) => {
                log::warn!("testdev: client {client_seq} dropped: {e}");
                // Do not spin if accepting itself keeps failing.
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn dev_with_ram(size: usize) -> TestDev {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        TestDev {
            memory,
            ..TestDev::default()
        }
    }

    #[test]
    fn tick_writes_counter_and_timestamp_into_guest_memory() {
        let mut dev = dev_with_ram(0x2000);
        dev.regs.write(reg::DMA_ADDR_LO, 0x1000);
        dev.regs.write(reg::DMA_LEN, 16);
        dev.regs.write(reg::CONTROL, 1);
        let before = now_ns();

        dev.tick();
        dev.tick();

        let counter: u64 = dev.memory.read_obj(GuestAddress(0x1000)).unwrap();
        let stamp: u64 = dev.memory.read_obj(GuestAddress(0x1008)).unwrap();
        assert_eq!(counter, 2);
        assert!(stamp >= before);
        assert_eq!(dev.regs.counter, 2);
    }

    #[test]
    fn tick_outside_shared_memory_sets_dma_error_and_keeps_counter() {
        let mut dev = dev_with_ram(0x1000);
        dev.regs.write(reg::DMA_ADDR_LO, 0x8000);
        dev.regs.write(reg::DMA_LEN, 16);
        dev.regs.write(reg::CONTROL, 1);

        dev.tick();

        assert_eq!(dev.regs.counter, 0);
        assert!(dev.regs.dma_error);
    }

    #[test]
    fn tick_signals_msi_only_when_enabled() {
        let mut dev = dev_with_ram(0x1000);
        // A plain file stands in for the eventfd: each signal appends 8 bytes.
        let path = std::env::temp_dir().join(format!("testdev-msi-{}", std::process::id()));
        dev.msi = Some(File::create(&path).unwrap());
        dev.regs.write(reg::DMA_LEN, 16);
        dev.regs.write(reg::CONTROL, 1);

        dev.tick();
        let without = std::fs::metadata(&path).unwrap().len();
        dev.config
            .write(crate::testdev::regs::MSI_CAP as u64 + 2, &[1]);
        dev.tick();
        let with = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();

        assert_eq!(without, 0);
        assert_eq!(with, 8);
        assert_eq!(dev.regs.irq_count, 1);
    }

    #[test]
    fn interrupts_due_while_detached_raise_one_on_the_next_eventfd() {
        let mut dev = dev_with_ram(0x1000);
        dev.config
            .write(crate::testdev::regs::MSI_CAP as u64 + 2, &[1]);
        dev.regs.write(reg::DMA_LEN, 16);
        dev.regs.write(reg::CONTROL, 1);
        dev.detach();
        dev.tick();
        dev.tick();
        let missed = dev.missed_irqs;
        let path = std::env::temp_dir().join(format!("testdev-missed-{}", std::process::id()));
        let eventfd = File::create(&path).unwrap();
        let mut backend = Backend(Arc::new(Mutex::new(dev)));

        backend
            .set_irqs(VFIO_PCI_MSI_IRQ_INDEX, 0, 0, 1, vec![eventfd])
            .unwrap();

        let signalled = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(missed, 2);
        assert_eq!(signalled, 8, "exactly one merged interrupt");
        assert_eq!(lock(&backend.0).missed_irqs, 0);
    }

    #[test]
    fn ack_mode_holds_the_next_interrupt_until_acknowledged() {
        let mut dev = dev_with_ram(0x1000);
        let path = std::env::temp_dir().join(format!("testdev-ack-{}", std::process::id()));
        dev.msi = Some(File::create(&path).unwrap());
        dev.config
            .write(crate::testdev::regs::MSI_CAP as u64 + 2, &[1]);
        dev.regs.write(reg::DMA_LEN, 16);
        dev.write_reg(reg::CONTROL, 3);

        dev.tick();
        dev.tick();
        dev.tick();
        let held = (dev.regs.irq_count, dev.regs.irq_due);
        dev.write_reg(reg::IRQ_ACK, 1);
        let after_ack = dev.regs.irq_count;
        dev.write_reg(reg::IRQ_ACK, 1);
        let signalled = std::fs::metadata(&path).unwrap().len();
        std::fs::remove_file(&path).unwrap();

        assert_eq!(held, (1, true), "one raised, the rest held");
        assert_eq!(after_ack, 2, "the held interrupt is raised on the ack");
        assert_eq!(dev.regs.irq_count, 2, "nothing was due at the second ack");
        assert_eq!(signalled, 16);
    }

    /// A file of `len` bytes `byte` (standing in for guest RAM), removed from its directory.
    fn ram_file(name: &str, byte: u8, len: usize) -> File {
        let path = std::env::temp_dir().join(format!("testdev-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![byte; len]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn a_mapping_of_the_same_range_from_another_file_replaces_the_old_one() {
        let mut dev = TestDev::default();
        let old = ram_file("old-ram", 1, 0x1000);
        let new = ram_file("new-ram", 2, 0x1000);
        dev.map(0, 0x1000, 0x1000, old.try_clone().unwrap())
            .unwrap();

        dev.map(0, 0x1000, 0x1000, new.try_clone().unwrap())
            .unwrap();
        dev.memory.write_obj(0xabu8, GuestAddress(0x1000)).unwrap();

        let mut byte = [0u8; 1];
        new.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte, [0xab], "DMA goes into the new file");
        old.read_exact_at(&mut byte, 0).unwrap();
        assert_eq!(byte, [1], "the old file is left alone");
        assert_eq!(dev.memory.num_regions(), 1);
    }

    #[test]
    fn backend_bar_read_returns_the_id_register() {
        let mut backend = Backend(Arc::new(Mutex::new(TestDev::default())));
        let mut data = [0u8; 4];

        backend
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, reg::ID, &mut data)
            .unwrap();

        assert_eq!(u32::from_le_bytes(data), crate::testdev::regs::DEVICE_MAGIC);
    }
}
