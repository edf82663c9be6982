//! The device across a live update: its saved state, the hand-over of its connection, and
//! the two ways a successor takes it over (see the crate docs).

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use devices::interrupt::MsiVectors;
use devices::pci::dma_regions;
use devices::pci::passthrough::{BarShadow, MsiShadow};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{UserDeviceError, VfioUserPciDevice, bar0, open};
use crate::proto::Connection;
use crate::state::VfioUserDeviceState;

impl VfioUserPciDevice {
    /// Takes over a device that kept running while no VMM was attached (a server in persist
    /// mode, after a VMM replacement): no reset, the same DMA regions mapped again, a new
    /// eventfd, and the BAR registers from `state`. The guest RAM must be laid out as in
    /// `state`.
    pub fn reattach(
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
        state: &VfioUserDeviceState,
    ) -> Result<Self, UserDeviceError> {
        let path = state.socket.as_path();
        let (client, dma, size) = open(path, memory, &irq, false)?;
        if dma != state.dma {
            return Err(UserDeviceError::RamLayoutChanged);
        }
        let bars = BarShadow::restore(&[bar0(size)], &state.bars).map_err(UserDeviceError::Bar)?;
        Self::finish(client, path, dma, bars, msi, irq)
    }

    /// Takes over a device whose connection the previous VMM handed over (`stream`, with the
    /// eventfd `irq` the server signals, to be registered by the caller as the irqfd behind
    /// `msi`): nothing is sent, so the server sees nothing change; the DMA mappings it holds
    /// are the same memfds. The guest RAM must be laid out as in `state`.
    pub fn adopt(
        stream: UnixStream,
        memory: &GuestMemoryMmap,
        msi: Arc<dyn MsiVectors>,
        irq: EventFd,
        state: &VfioUserDeviceState,
    ) -> Result<Self, UserDeviceError> {
        if dma_regions(memory)? != state.dma {
            return Err(UserDeviceError::RamLayoutChanged);
        }
        let client = Connection::adopt(stream).map_err(|source| UserDeviceError::Connect {
            path: state.socket.clone(),
            source,
        })?;
        let bars = BarShadow::restore(&[bar0(state.bar_size)], &state.bars)
            .map_err(UserDeviceError::Bar)?;
        Ok(Self {
            client,
            socket: state.socket.clone(),
            lost: false,
            handed_over: false,
            server_persists: false,
            dma: state.dma.clone(),
            bars,
            msi_cap: state.msi_cap.map(|offset| MsiShadow::new(offset, None)),
            msi,
            _irq: irq,
        })
    }

    /// The connected socket, to hand to the next VMM (it takes a copy).
    pub fn connection_fd(&self) -> BorrowedFd<'_> {
        self.client.stream().as_fd()
    }

    /// Stops (or, on a cancelled update, resumes) all traffic on the connection: while it is
    /// handed over, the next VMM owns the conversation, so accesses read all ones and writes
    /// are dropped without a message.
    pub fn set_handed_over(&mut self, handed_over: bool) {
        self.handed_over = handed_over;
    }

    /// Says whether the server keeps the device as it is for its next client (`persist=on`):
    /// only then can another VMM take it over by connecting again ([`Self::reattach`]).
    pub fn set_server_persists(&mut self, persists: bool) {
        self.server_persists = persists;
    }

    /// The server's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the server keeps the device for its next client (see
    /// [`Self::set_server_persists`]).
    pub fn server_persists(&self) -> bool {
        self.server_persists
    }

    /// The VMM-side state of the device.
    pub fn state(&self) -> VfioUserDeviceState {
        VfioUserDeviceState {
            socket: self.socket.clone(),
            bars: self.bars.state(),
            msi_cap: self.msi_cap.map(|cap| cap.offset()),
            dma: self.dma.clone(),
            bar_size: self.bars.bars().first().map_or(0, |bar| bar.size),
            handover: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use devices::pci::PciDevice;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::DmaRegionState;
    use crate::client::tests::{RecordingMsi, bar_reg, connected, file_backed_memory, serving};
    use crate::testdev::TestDevOptions;
    use crate::testdev::regs::{BAR0_SIZE, MSI_CAP, reg};

    #[test]
    fn persistent_device_keeps_running_across_a_reattach_without_reset() {
        let options = TestDevOptions {
            rate_hz: 1000,
            persist: true,
            ..TestDevOptions::default()
        };
        let (dir, socket) = serving("persist", options);
        let memory = file_backed_memory(&dir);
        let old_irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut old = VfioUserPciDevice::connect(
            &socket,
            &memory,
            Arc::new(RecordingMsi::default()),
            old_irq.try_clone().unwrap(),
            &mut |_| Ok(0xc000_0000),
        )
        .unwrap();
        old.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        old.config_write(MSI_CAP + 2, &[0x81]);
        old.bar_write(0, reg::DMA_ADDR_LO, &0x8000u32.to_le_bytes());
        old.bar_write(0, reg::DMA_LEN, &16u32.to_le_bytes());
        old.bar_write(0, reg::CONTROL, &1u32.to_le_bytes());
        std::thread::sleep(Duration::from_millis(50));
        let at_detach = bar_reg(&mut old, reg::COUNTER_LO);
        let state = old.state();

        drop(old);
        std::thread::sleep(Duration::from_millis(100));
        let while_detached: u64 = memory.read_obj(GuestAddress(0x8000)).unwrap();
        let new_irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut new = VfioUserPciDevice::reattach(
            &memory,
            Arc::new(RecordingMsi::default()),
            new_irq.try_clone().unwrap(),
            &state,
        )
        .unwrap();
        let control = bar_reg(&mut new, reg::CONTROL);

        assert!(at_detach > 0);
        assert!(
            while_detached > u64::from(at_detach) + 20,
            "DMA stopped while detached: {at_detach} -> {while_detached}"
        );
        assert_eq!(control, 1, "the re-attach reset the device");
        assert_eq!(new.bars()[0].address, 0xd000_0000);
        assert!(
            new_irq.read().unwrap() >= 1,
            "no interrupt on the new eventfd"
        );
    }

    #[test]
    fn adopted_connection_carries_on_without_a_reconnect_or_a_lost_interrupt() {
        // A server that resets on reconnect: only a hand-over keeps its device running.
        let (mut old, memory, _msi, irq) = connected("adopt");
        old.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        old.config_write(MSI_CAP + 2, &[0x81]);
        old.bar_write(0, reg::DMA_ADDR_LO, &0x8000u32.to_le_bytes());
        old.bar_write(0, reg::DMA_LEN, &16u32.to_le_bytes());
        old.bar_write(0, reg::CONTROL, &3u32.to_le_bytes());
        std::thread::sleep(Duration::from_millis(30));
        let stream = UnixStream::from(old.connection_fd().try_clone_to_owned().unwrap());
        let waiting_irq = EventFd::new(0).unwrap();
        let state = old.state();
        old.set_handed_over(true);
        let silent = bar_reg(&mut old, reg::COUNTER_LO);

        drop(old);
        std::thread::sleep(Duration::from_millis(50));
        let mut new = VfioUserPciDevice::adopt(
            stream,
            &memory,
            Arc::new(RecordingMsi::default()),
            waiting_irq,
            &state,
        )
        .unwrap();
        let pending = irq.read().unwrap();
        let raised = bar_reg(&mut new, reg::IRQ_COUNT);
        let client = bar_reg(&mut new, reg::CLIENT_SEQ);
        let control = bar_reg(&mut new, reg::CONTROL);

        assert_eq!(
            silent,
            u32::MAX,
            "the old side sent a message after the handover"
        );
        assert_eq!(client, 1, "the server saw a reconnect");
        assert_eq!(control, 3, "the device was reset");
        assert_eq!(raised, 1, "ack mode: one interrupt, waiting for its ack");
        assert_eq!(pending, 1, "the interrupt waits in the same eventfd");
        assert_eq!(new.bars()[0].address, 0xd000_0000);
        assert_eq!(new.bars()[0].size, BAR0_SIZE);
    }

    #[test]
    fn adopt_refuses_a_different_ram_layout() {
        let (old, memory, _msi, _irq) = connected("adopt-layout");
        let stream = UnixStream::from(old.connection_fd().try_clone_to_owned().unwrap());
        let mut state = old.state();
        state.dma[0].size *= 2;

        let result = VfioUserPciDevice::adopt(
            stream,
            &memory,
            Arc::new(RecordingMsi::default()),
            EventFd::new(0).unwrap(),
            &state,
        );

        assert!(
            matches!(result, Err(UserDeviceError::RamLayoutChanged)),
            "{result:?}"
        );
    }

    #[test]
    fn state_follows_a_guest_bar_move_and_lists_shared_ram() {
        let (mut device, _memory, _msi, _irq) = connected("state");

        device.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        let state = device.state();

        assert_eq!(device.bars()[0].address, 0xd000_0000);
        assert_eq!(state.msi_cap, Some(MSI_CAP));
        assert_eq!(
            state.dma,
            [DmaRegionState {
                address: 0,
                size: 1 << 20,
                file_offset: 0
            }]
        );
    }
}
