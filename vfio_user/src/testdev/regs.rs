//! The test device's guest-visible registers: PCI configuration space and BAR 0, without I/O.

/// Vendor id: 0x1234 is the unassigned vendor id QEMU's test devices use (`edu` is 1234:11e8).
pub const VENDOR_ID: u16 = 0x1234;
/// Device id: not used by any QEMU device.
pub const DEVICE_ID: u16 = 0x5aa5;
/// Size of BAR 0 (a 32-bit memory BAR).
pub const BAR0_SIZE: u64 = 0x1000;
/// Offset of the MSI capability in configuration space.
pub const MSI_CAP: usize = 0x40;

/// BAR 0 register offsets (32-bit registers; 64-bit values are split low/high).
pub mod reg {
    /// Read-only magic, [`super::DEVICE_MAGIC`].
    pub const ID: u64 = 0x00;
    /// Bit 0: DMA enabled; bit 1: hold each interrupt until the driver writes [`IRQ_ACK`]
    /// (so none merges with the next: the driver can count them one by one).
    pub const CONTROL: u64 = 0x04;
    /// Guest physical address of the DMA buffer, low half.
    pub const DMA_ADDR_LO: u64 = 0x08;
    /// Guest physical address of the DMA buffer, high half.
    pub const DMA_ADDR_HI: u64 = 0x0c;
    /// Length of the DMA buffer in bytes (at least [`super::RECORD_LEN`]).
    pub const DMA_LEN: u64 = 0x10;
    /// Records written per second (0 counts as 1).
    pub const RATE_HZ: u64 = 0x14;
    /// Records written so far, low half (read-only).
    pub const COUNTER_LO: u64 = 0x18;
    /// Records written so far, high half (read-only).
    pub const COUNTER_HI: u64 = 0x1c;
    /// Interrupts signalled so far (read-only).
    pub const IRQ_COUNT: u64 = 0x20;
    /// Records per interrupt (0 counts as 1).
    pub const BATCH: u64 = 0x24;
    /// Bit 0: running; bit 1: the last DMA failed (buffer not in a shared region).
    pub const STATUS: u64 = 0x28;
    /// Which client this is (read-only): 1 for the first, one more after each disconnect. A
    /// VMM replaced with its connection handed over keeps the number.
    pub const CLIENT_SEQ: u64 = 0x2c;
    /// Write: the driver handled the last interrupt (see CONTROL bit 1).
    pub const IRQ_ACK: u64 = 0x30;
}

/// CONTROL bit: DMA enabled.
pub const CONTROL_ENABLE: u32 = 1;
/// CONTROL bit: interrupts wait for [`reg::IRQ_ACK`].
pub const CONTROL_ACK_IRQS: u32 = 2;

/// Value of the ID register ("UDEV").
pub const DEVICE_MAGIC: u32 = 0x5544_4556;
/// Bytes of one record: the counter then a timestamp (ns since the Unix epoch), both u64 LE.
pub const RECORD_LEN: u64 = 16;
/// STATUS bit: DMA is enabled and programmed.
pub const STATUS_RUNNING: u32 = 1;
/// STATUS bit: the last DMA write failed.
pub const STATUS_DMA_ERROR: u32 = 2;

/// BAR 0 registers and DMA progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestDevRegs {
    /// DMA enabled by the driver.
    pub enabled: bool,
    /// DMA buffer address.
    pub dma_addr: u64,
    /// DMA buffer length.
    pub dma_len: u32,
    /// Records per second as programmed.
    pub rate_hz: u32,
    /// Records per interrupt as programmed.
    pub batch: u32,
    /// Records written.
    pub counter: u64,
    /// Interrupts signalled.
    pub irq_count: u32,
    /// The last DMA write failed.
    pub dma_error: bool,
    /// Interrupts wait for an acknowledgement (CONTROL bit 1).
    pub ack_irqs: bool,
    /// An interrupt was raised and not yet acknowledged.
    pub awaiting_ack: bool,
    /// An interrupt fell due while one awaited its acknowledgement.
    pub irq_due: bool,
    /// Which client this is (see [`reg::CLIENT_SEQ`]).
    pub client_seq: u32,
}

fn set_low(value: u64, low: u32) -> u64 {
    (value & !0xffff_ffff) | u64::from(low)
}

fn set_high(value: u64, high: u32) -> u64 {
    (value & 0xffff_ffff) | (u64::from(high) << 32)
}

impl TestDevRegs {
    /// Reads the 32-bit register at `offset`; unknown offsets read 0.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            reg::ID => DEVICE_MAGIC,
            reg::CONTROL => {
                let ack = if self.ack_irqs { CONTROL_ACK_IRQS } else { 0 };
                u32::from(self.enabled) | ack
            }
            reg::DMA_ADDR_LO => self.dma_addr as u32,
            reg::DMA_ADDR_HI => (self.dma_addr >> 32) as u32,
            reg::DMA_LEN => self.dma_len,
            reg::RATE_HZ => self.rate_hz,
            reg::COUNTER_LO => self.counter as u32,
            reg::COUNTER_HI => (self.counter >> 32) as u32,
            reg::IRQ_COUNT => self.irq_count,
            reg::BATCH => self.batch,
            reg::CLIENT_SEQ => self.client_seq,
            reg::STATUS => {
                let mut status = 0;
                if self.running() {
                    status |= STATUS_RUNNING;
                }
                if self.dma_error {
                    status |= STATUS_DMA_ERROR;
                }
                status
            }
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset`; read-only and unknown offsets ignore writes.
    pub fn write(&mut self, offset: u64, value: u32) {
        match offset {
            reg::CONTROL => {
                self.enabled = value & CONTROL_ENABLE != 0;
                self.ack_irqs = value & CONTROL_ACK_IRQS != 0;
                self.dma_error = false;
            }
            reg::IRQ_ACK => self.awaiting_ack = false,
            reg::DMA_ADDR_LO => self.dma_addr = set_low(self.dma_addr, value),
            reg::DMA_ADDR_HI => self.dma_addr = set_high(self.dma_addr, value),
            reg::DMA_LEN => self.dma_len = value,
            reg::RATE_HZ => self.rate_hz = value,
            reg::BATCH => self.batch = value,
            _ => log::debug!("testdev: ignored write of {value:#x} at BAR 0 + {offset:#x}"),
        }
    }

    /// DMA is enabled and the buffer can hold a record.
    pub fn running(&self) -> bool {
        self.enabled && u64::from(self.dma_len) >= RECORD_LEN
    }

    /// Time between records.
    pub fn period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1) / self.rate_hz.max(1)
    }

    /// Counts one record written; returns whether it completes a batch (raise an interrupt).
    pub fn record_written(&mut self) -> bool {
        self.counter = self.counter.wrapping_add(1);
        self.dma_error = false;
        self.counter.is_multiple_of(u64::from(self.batch.max(1)))
    }

    /// The record to DMA for the current counter value.
    pub fn record(&self, timestamp_ns: u64) -> [u8; RECORD_LEN as usize] {
        let mut record = [0u8; RECORD_LEN as usize];
        record[..8].copy_from_slice(&self.counter.to_le_bytes());
        record[8..].copy_from_slice(&timestamp_ns.to_le_bytes());
        record
    }
}

/// The device's 256-byte configuration space with its writable bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestDevConfig {
    bytes: [u8; 256],
    writable: [u8; 256],
}

impl Default for TestDevConfig {
    fn default() -> Self {
        let mut bytes = [0u8; 256];
        let mut writable = [0u8; 256];
        bytes[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        bytes[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        // Status: capability list present.
        bytes[6] = 0x10;
        // Class ff/00: unassigned class.
        bytes[0x0b] = 0xff;
        bytes[0x34] = MSI_CAP as u8;
        // MSI: id 5, last in the list, 64-bit address, one vector.
        bytes[MSI_CAP] = 0x05;
        bytes[MSI_CAP + 2] = 0x80;
        // Command: memory space and bus master.
        writable[4] = 0x06;
        // MSI enable bit, then address (dword aligned) and data.
        writable[MSI_CAP + 2] = 0x01;
        writable[MSI_CAP + 4] = 0xfc;
        writable[MSI_CAP + 5..MSI_CAP + 12].fill(0xff);
        writable[MSI_CAP + 12..MSI_CAP + 14].fill(0xff);
        Self { bytes, writable }
    }
}

impl TestDevConfig {
    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| self.bytes.get(o + i))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Writes the writable bits of `data` at `offset`; the rest is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        for (i, value) in data.iter().enumerate() {
            let Some(mask) = self.writable.get(offset + i).copied() else {
                return;
            };
            let byte = &mut self.bytes[offset + i];
            *byte = (*byte & !mask) | (value & mask);
        }
    }

    /// The MSI message if the driver enabled MSI.
    pub fn msi_enabled(&self) -> bool {
        self.bytes[MSI_CAP + 2] & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_address_registers_combine_into_one_address() {
        let mut regs = TestDevRegs::default();

        regs.write(reg::DMA_ADDR_LO, 0x8000_1000);
        regs.write(reg::DMA_ADDR_HI, 0x1);

        assert_eq!(regs.dma_addr, 0x1_8000_1000);
        assert_eq!(regs.read(reg::DMA_ADDR_LO), 0x8000_1000);
        assert_eq!(regs.read(reg::DMA_ADDR_HI), 1);
    }

    #[test]
    fn counter_and_id_ignore_guest_writes() {
        let mut regs = TestDevRegs {
            counter: 7,
            ..TestDevRegs::default()
        };

        regs.write(reg::COUNTER_LO, 0);
        regs.write(reg::ID, 0);

        assert_eq!(regs.read(reg::COUNTER_LO), 7);
        assert_eq!(regs.read(reg::ID), DEVICE_MAGIC);
    }

    #[test]
    fn running_needs_enable_and_room_for_a_record() {
        let mut regs = TestDevRegs::default();
        regs.write(reg::CONTROL, 1);
        regs.write(reg::DMA_LEN, 8);
        assert!(!regs.running());

        regs.write(reg::DMA_LEN, 16);

        assert!(regs.running());
        assert_eq!(regs.read(reg::STATUS) & STATUS_RUNNING, STATUS_RUNNING);
    }

    #[test]
    fn batch_of_three_raises_every_third_record() {
        let mut regs = TestDevRegs::default();
        regs.write(reg::BATCH, 3);

        let raised: Vec<bool> = (0..6).map(|_| regs.record_written()).collect();

        assert_eq!(raised, [false, false, true, false, false, true]);
        assert_eq!(regs.counter, 6);
    }

    #[test]
    fn record_holds_counter_then_timestamp() {
        let regs = TestDevRegs {
            counter: 0x0102,
            ..TestDevRegs::default()
        };

        let record = regs.record(0x0a0b);

        assert_eq!(u64::from_le_bytes(record[..8].try_into().unwrap()), 0x0102);
        assert_eq!(u64::from_le_bytes(record[8..].try_into().unwrap()), 0x0a0b);
    }

    #[test]
    fn control_keeps_the_ack_mode_and_ack_clears_the_wait() {
        let mut regs = TestDevRegs {
            awaiting_ack: true,
            ..TestDevRegs::default()
        };

        regs.write(reg::CONTROL, CONTROL_ENABLE | CONTROL_ACK_IRQS);
        regs.write(reg::IRQ_ACK, 1);

        assert!(regs.ack_irqs && regs.enabled);
        assert_eq!(regs.read(reg::CONTROL), 3);
        assert!(!regs.awaiting_ack);
    }

    #[test]
    fn rate_zero_counts_as_one_per_second() {
        let regs = TestDevRegs::default();

        assert_eq!(regs.period(), std::time::Duration::from_secs(1));
    }

    #[test]
    fn config_space_keeps_ids_and_takes_msi_enable() {
        let mut config = TestDevConfig::default();

        config.write(0, &[0, 0, 0, 0]);
        config.write(MSI_CAP as u64 + 2, &[0xff, 0xff]);

        let mut ids = [0u8; 4];
        config.read(0, &mut ids);
        assert_eq!(ids, [0x34, 0x12, 0xa5, 0x5a]);
        assert!(config.msi_enabled());
        let mut control = [0u8; 2];
        config.read(MSI_CAP as u64 + 2, &mut control);
        assert_eq!(control, [0x81, 0x00]);
    }

    #[test]
    fn config_read_past_the_end_returns_ones() {
        let config = TestDevConfig::default();
        let mut data = [0u8; 4];

        config.read(254, &mut data);

        assert_eq!(data[2..], [0xff, 0xff]);
    }
}
