//! BAR 0 dispatch and PCI configuration space of the transport.

use super::{
    COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET, NOTIFY_OFF_MULTIPLIER, NOTIFY_OFFSET, REGION_LEN, VirtioPciDevice,
};
use crate::pci::config::{merge_bytes, read_bytes};
use crate::pci::{PciBarInfo, PciDevice};
use crate::virtio::device::VirtioDevice;

impl<D: VirtioDevice> VirtioPciDevice<D> {
    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_LEN => self.common_read(o, data),
            ISR_OFFSET => {
                // Reading the ISR acknowledges it.
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = std::mem::take(&mut self.isr);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_LEN).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + REGION_LEN).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => data.fill(0),
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + COMMON_CFG_LEN => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_LEN).contains(&o) => {
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.process_queue(queue as u16);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_LEN).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => log::debug!("Virtio-pci BAR 0 write at {offset:#x} ignored"),
        }
    }

    /// Whether a config access at `offset` of `len` bytes touches MSI-X message control.
    fn touches_msix_control(&self, offset: usize, len: usize) -> bool {
        let control = self.msix_cap_offset + 2;
        offset < control + 2 && control < offset + len
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        if self.touches_msix_control(offset, data.len()) {
            let reg = offset & !3;
            let dword = self.config.read_reg(reg / 4);
            let control_shift = (self.msix_cap_offset + 2 - reg) * 8;
            let dword = (dword & !(0xffff << control_shift))
                | (u32::from(self.msix.control()) << control_shift);
            read_bytes(dword, offset % 4, data);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        if self.touches_msix_control(offset, data.len()) {
            let reg = offset & !3;
            let control_shift = (self.msix_cap_offset + 2 - reg) * 8;
            let current = u32::from(self.msix.control()) << control_shift;
            let merged = merge_bytes(current, offset % 4, data);
            self.msix.set_control((merged >> control_shift) as u16);
            return;
        }
        self.config.write(offset, data);
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.config.bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.bar0_read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.bar0_write(offset, data);
        }
    }
}
