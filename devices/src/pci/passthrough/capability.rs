//! The interrupt capabilities of a passed-through function: the walk of its capability list,
//! the MSI and MSI-X layouts, and the guest's view of the MSI capability.

use super::super::msix::MSIX_CAPABILITY_ID;
use crate::interrupt::MsiMessage;

/// PCI capability id of MSI.
pub const MSI_CAPABILITY_ID: u8 = 0x05;
/// Capabilities pointer in the type-0 header.
const CAPABILITY_POINTER: usize = 0x34;
/// Capabilities live after the 64-byte header; a pointer below it ends the list.
const FIRST_CAPABILITY: usize = 0x40;
/// More entries than fit in configuration space: the list loops, so the walk stops.
const MAX_CAPABILITIES: usize = (256 - FIRST_CAPABILITY) / 4;
/// MSI Message Control: MSI enable.
const MSI_ENABLE: u16 = 1;
/// MSI Message Control: 64-bit message address.
const MSI_64BIT: u16 = 1 << 7;
/// MSI Message Control: per-vector masking (mask and pending bits follow the data).
const MSI_PER_VECTOR_MASK: u16 = 1 << 8;
/// MSI-X Message Control: table size minus one.
const MSIX_TABLE_SIZE: u16 = 0x7ff;
/// MSI-X table and PBA registers: the BAR indicator in bits 2:0, the offset above.
const MSIX_BIR: u32 = 0b111;

/// Where a function's interrupt capabilities are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The MSI capability.
    pub msi: Option<MsiCapability>,
    /// The MSI-X capability.
    pub msix: Option<MsixCapability>,
}

/// An MSI capability and its layout (Message Control's read-only bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    /// Offset in configuration space.
    pub offset: usize,
    /// Message Address is 64 bits (the data moves from +0x08 to +0x0c).
    pub is_64bit: bool,
    /// Mask and pending bits follow the data.
    pub per_vector_mask: bool,
}

/// Where an MSI-X structure (table or PBA) is: a BAR and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLocation {
    /// BAR indicator (the BAR index).
    pub bar: u8,
    /// Offset in that BAR (8-byte aligned).
    pub offset: u32,
}

impl MsixLocation {
    fn from_register(register: u32) -> Self {
        Self {
            bar: (register & MSIX_BIR) as u8,
            offset: register & !MSIX_BIR,
        }
    }
}

/// An MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset in configuration space.
    pub offset: usize,
    /// Number of vectors (table entries).
    pub vectors: u16,
    /// The vector table.
    pub table: MsixLocation,
    /// The pending-bit array.
    pub pba: MsixLocation,
}

/// Walks the capability list through `read_dword` (a dword of configuration space at an
/// offset) and finds MSI and MSI-X. The walk stops at a pointer into the header and after as
/// many entries as fit in configuration space, so a looping list cannot hang it.
pub fn find_capabilities<E>(
    mut read_dword: impl FnMut(usize) -> Result<u32, E>,
) -> Result<Capabilities, E> {
    let mut found = Capabilities::default();
    let mut pointer = (read_dword(CAPABILITY_POINTER)? & 0xfc) as usize;
    for _ in 0..MAX_CAPABILITIES {
        if pointer < FIRST_CAPABILITY {
            break;
        }
        let header = read_dword(pointer)?;
        let control = (header >> 16) as u16;
        match header as u8 {
            MSI_CAPABILITY_ID if found.msi.is_none() => {
                found.msi = Some(MsiCapability {
                    offset: pointer,
                    is_64bit: control & MSI_64BIT != 0,
                    per_vector_mask: control & MSI_PER_VECTOR_MASK != 0,
                });
            }
            MSIX_CAPABILITY_ID if found.msix.is_none() => {
                found.msix = Some(MsixCapability {
                    offset: pointer,
                    vectors: (control & MSIX_TABLE_SIZE) + 1,
                    table: MsixLocation::from_register(read_dword(pointer + 4)?),
                    pba: MsixLocation::from_register(read_dword(pointer + 8)?),
                });
            }
            _ => {}
        }
        pointer = ((header >> 8) & 0xfc) as usize;
    }
    Ok(found)
}

/// The guest's view of an MSI capability whose registers stay in the device (the kernel's
/// VFIO config region, a vfio-user server): the VMM forwards every access, keeps the enable
/// bit the guest wrote and, after a write to the message, reads the capability back to route
/// the one vector. The bit is kept because kernel VFIO clears it in its copy until MSI is on
/// through `VFIO_DEVICE_SET_IRQS`, which the VMM only does because the guest set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiShadow {
    offset: usize,
    /// The enable bit the guest last wrote; `None` until it writes one (the device's counts).
    guest_enable: Option<bool>,
}

impl MsiShadow {
    /// Bytes read back to route the vector: through the message data of the longest layout
    /// (64-bit: id, next, control, address low and high, data), whatever the layout is.
    pub const MESSAGE_END: usize = 14;

    /// The capability at `offset`, with the enable bit the guest last wrote if known.
    pub fn new(offset: usize, guest_enable: Option<bool>) -> Self {
        Self {
            offset,
            guest_enable,
        }
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The enable bit as the guest last wrote it, if it wrote one.
    pub fn guest_enable(&self) -> Option<bool> {
        self.guest_enable
    }

    /// Where, in an access of `len` bytes at `offset`, the low byte of Message Control (with
    /// the enable bit, bit 0) is.
    fn control_byte(&self, offset: usize, len: usize) -> Option<usize> {
        let at = self.offset + 2;
        (offset..offset + len).contains(&at).then(|| at - offset)
    }

    /// Takes note of a guest write of `data` at `offset` (before it is forwarded); returns
    /// whether it touches the message, so the caller reads it back ([`Self::message`]).
    pub fn guest_write(&mut self, offset: usize, data: &[u8]) -> bool {
        if let Some(byte) = self.control_byte(offset, data.len()) {
            self.guest_enable = Some(data[byte] & 1 != 0);
        }
        offset < self.offset + Self::MESSAGE_END && offset + data.len() > self.offset
    }

    /// Puts the guest's enable bit into `data`, read from the device at `offset`.
    pub fn guest_read(&self, offset: usize, data: &mut [u8]) {
        if let (Some(byte), Some(enable)) =
            (self.control_byte(offset, data.len()), self.guest_enable)
        {
            data[byte] = (data[byte] & !1) | u8::from(enable);
        }
    }

    /// The message the guest programmed, from the capability's first [`Self::MESSAGE_END`]
    /// bytes as read back from the device; `None` while MSI is off.
    pub fn message(&self, raw: &[u8; Self::MESSAGE_END]) -> Option<MsiMessage> {
        let control = u16::from_le_bytes([raw[2], raw[3]]);
        let enabled = self.guest_enable.unwrap_or(control & MSI_ENABLE != 0);
        let dword =
            |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let (high, data_at) = if control & MSI_64BIT != 0 {
            (dword(8), 12)
        } else {
            (0, 8)
        };
        enabled.then(|| MsiMessage {
            address: u64::from(high) << 32 | u64::from(dword(4)),
            data: u32::from(u16::from_le_bytes([raw[data_at], raw[data_at + 1]])),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    /// Dword reads of `config`, as a device would answer them.
    fn reader(config: &[u8; 256]) -> impl FnMut(usize) -> Result<u32, Infallible> + '_ {
        |at| {
            Ok(u32::from_le_bytes([
                config[at],
                config[at + 1],
                config[at + 2],
                config[at + 3],
            ]))
        }
    }

    /// A header whose capability list is `caps` (offset, bytes), chained in order.
    fn config_space(caps: &[(usize, &[u8])]) -> [u8; 256] {
        let mut config = [0u8; 256];
        config[CAPABILITY_POINTER] = caps.first().map_or(0, |c| c.0 as u8);
        for (i, (offset, body)) in caps.iter().enumerate() {
            config[*offset..offset + body.len()].copy_from_slice(body);
            config[offset + 1] = caps.get(i + 1).map_or(0, |c| c.0 as u8);
        }
        config
    }

    #[test]
    fn the_walk_finds_a_32_bit_msi_capability_behind_another_one() {
        // A power-management capability (id 1), then MSI: control 0x0000.
        let config = config_space(&[(0x40, &[0x01, 0, 0x03, 0]), (0x50, &[0x05, 0, 0, 0])]);

        let caps = find_capabilities(reader(&config)).unwrap();

        assert_eq!(
            caps,
            Capabilities {
                msi: Some(MsiCapability {
                    offset: 0x50,
                    is_64bit: false,
                    per_vector_mask: false,
                }),
                msix: None,
            }
        );
    }

    #[test]
    fn the_walk_reads_the_64_bit_and_per_vector_mask_bits_of_msi() {
        let config = config_space(&[(0x48, &[0x05, 0, 0x80, 0x01])]);

        let msi = find_capabilities(reader(&config)).unwrap().msi;

        assert_eq!(
            msi,
            Some(MsiCapability {
                offset: 0x48,
                is_64bit: true,
                per_vector_mask: true,
            })
        );
    }

    #[test]
    fn the_walk_decodes_the_msix_table_size_and_its_table_and_pba_locations() {
        // 16 vectors (size field 15), table in BAR 2 at 0x2000, PBA in BAR 4 at 0x800.
        let mut msix = [0u8; 12];
        msix[0] = MSIX_CAPABILITY_ID;
        msix[2..4].copy_from_slice(&15u16.to_le_bytes());
        msix[4..8].copy_from_slice(&(0x2000u32 | 2).to_le_bytes());
        msix[8..12].copy_from_slice(&(0x800u32 | 4).to_le_bytes());
        let config = config_space(&[(0x40, &[0x05, 0, 0, 0]), (0x70, &msix)]);

        let caps = find_capabilities(reader(&config)).unwrap();

        assert_eq!(
            caps.msix,
            Some(MsixCapability {
                offset: 0x70,
                vectors: 16,
                table: MsixLocation {
                    bar: 2,
                    offset: 0x2000
                },
                pba: MsixLocation {
                    bar: 4,
                    offset: 0x800
                },
            })
        );
        assert_eq!(caps.msi.map(|m| m.offset), Some(0x40));
    }

    #[test]
    fn a_looping_capability_list_ends_the_walk_without_msi() {
        // A vendor capability pointing at itself.
        let mut config = [0u8; 256];
        config[CAPABILITY_POINTER] = 0x40;
        config[0x40] = 0x09;
        config[0x41] = 0x40;

        let caps = find_capabilities(reader(&config)).unwrap();

        assert_eq!(caps, Capabilities::default());
    }

    #[test]
    fn a_failed_read_ends_the_walk_with_its_error() {
        let result = find_capabilities(|at| if at == 0x34 { Ok(0x40) } else { Err(at) });

        assert_eq!(result, Err(0x40));
    }

    /// The first [`MsiShadow::MESSAGE_END`] bytes of an MSI capability.
    fn msi_bytes(control: u16, address: u64, data: u16) -> [u8; MsiShadow::MESSAGE_END] {
        let mut raw = [0u8; MsiShadow::MESSAGE_END];
        raw[0] = MSI_CAPABILITY_ID;
        raw[2..4].copy_from_slice(&control.to_le_bytes());
        raw[4..8].copy_from_slice(&(address as u32).to_le_bytes());
        if control & MSI_64BIT != 0 {
            raw[8..12].copy_from_slice(&((address >> 32) as u32).to_le_bytes());
            raw[12..14].copy_from_slice(&data.to_le_bytes());
        } else {
            raw[8..10].copy_from_slice(&data.to_le_bytes());
        }
        raw
    }

    #[test]
    fn a_32_bit_message_has_its_data_at_8() {
        let shadow = MsiShadow::new(0x40, None);

        let message = shadow.message(&msi_bytes(MSI_ENABLE, 0xfee0_1000, 0x41));

        assert_eq!(
            message,
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x41
            })
        );
    }

    #[test]
    fn a_64_bit_message_with_per_vector_masking_has_its_data_at_12() {
        let shadow = MsiShadow::new(0x40, None);
        let control = MSI_ENABLE | MSI_64BIT | MSI_PER_VECTOR_MASK;

        let message = shadow.message(&msi_bytes(control, 0x1_fee0_0000, 0x4041));

        assert_eq!(
            message,
            Some(MsiMessage {
                address: 0x1_fee0_0000,
                data: 0x4041
            })
        );
    }

    #[test]
    fn the_guest_enable_bit_wins_over_the_one_read_back() {
        let mut shadow = MsiShadow::new(0x40, None);
        // Bit 0 of Message Control (0x42), written as part of a dword at 0x40.
        let touches = shadow.guest_write(0x40, &[0x05, 0x00, 0x81, 0x00]);
        // The device (like kernel VFIO before SET_IRQS) shows the bit clear.
        let raw = msi_bytes(MSI_64BIT, 0xfee0_0000, 0x30);
        let mut control = [raw[2], raw[3]];
        shadow.guest_read(0x42, &mut control);

        assert!(touches);
        assert_eq!(shadow.guest_enable(), Some(true));
        assert_eq!(control, [0x81, 0x00]);
        assert_eq!(
            shadow.message(&raw),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x30
            })
        );
    }

    #[test]
    fn clearing_the_enable_bit_turns_the_message_off() {
        let mut shadow = MsiShadow::new(0x40, Some(true));

        shadow.guest_write(0x42, &[0x80]);

        assert_eq!(shadow.message(&msi_bytes(MSI_ENABLE, 0xfee0_0000, 1)), None);
    }

    #[test]
    fn writes_past_the_message_data_or_before_the_capability_do_not_touch_it() {
        let mut shadow = MsiShadow::new(0x40, None);

        let mask_bits = shadow.guest_write(0x40 + MsiShadow::MESSAGE_END, &[1, 0]);
        let header = shadow.guest_write(0x3c, &[0; 4]);
        let data = shadow.guest_write(0x4c, &[0x41, 0]);

        assert_eq!((mask_bits, header, data), (false, false, true));
        assert_eq!(shadow.guest_enable(), None);
    }
}
