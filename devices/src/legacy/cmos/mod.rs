//! The CMOS real-time clock and its 128 bytes of battery-backed RAM (an MC146818-style part on
//! ports 0x70 index and 0x71 data).
//!
//! The clock registers are computed on each read from the host's wall clock plus an offset the
//! guest sets by writing the time, so guest time keeps advancing while the VMM is paused or
//! replaced. No RTC interrupt (IRQ 8) is ever raised: periodic, alarm and update-ended
//! interrupts are not emulated, so register C always reads back 0 after the first read.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusDevice;

mod civil;

pub use civil::CmosDateTime;
use civil::{date_time_from_unix, unix_from_date_time};

/// Number of ports covered from base 0x70: offset 0 is the index port, offset 1 the data port.
pub const CMOS_PORT_LEN: u64 = 2;
/// Bytes of CMOS RAM, clock registers included.
pub const CMOS_RAM_SIZE: usize = 128;

const INDEX_MASK: u8 = 0x7f; // bit 7 of the index port is the NMI mask, which we ignore

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

const REG_A_UIP: u8 = 0x80;
const REG_A_POWER_ON: u8 = 0x26; // 32.768 kHz time base, 1024 Hz rate
const REG_B_SET: u8 = 0x80;
const REG_B_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;
const REG_B_POWER_ON: u8 = REG_B_24H; // BCD, 24-hour
const REG_D_VALID_RAM: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

// Memory-size registers read by firmware-like guests.
const REG_BASE_KIB: u8 = 0x15;
const REG_EXT_KIB: u8 = 0x17;
const REG_EXT_KIB_COPY: u8 = 0x30;
const REG_ABOVE_16M: u8 = 0x34;
const REG_ABOVE_4G: u8 = 0x5b;
const REG_CHECKSUM: u8 = 0x2e; // big-endian sum of 0x10..=0x2d
const BASE_MEMORY_KIB: u16 = 640;
const MIB: u64 = 1 << 20;
const UNIT_64K: u64 = 64 << 10;
/// Where low RAM ends: the start of the 32-bit MMIO hole in our guest address map (3 GiB).
const MMIO_HOLE_START: u64 = 0xc000_0000;

/// Errors from the CMOS device.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmosError {
    /// The saved RAM does not have 128 bytes.
    #[error("Saved CMOS RAM has {len} bytes, expected {CMOS_RAM_SIZE}")]
    RamSize {
        /// Length of the saved RAM.
        len: usize,
    },
    /// The saved index is outside the RAM.
    #[error("Saved CMOS index {index:#x} is out of range")]
    Index {
        /// The saved index.
        index: u8,
    },
}

/// The host's wall clock, in seconds since the Unix epoch (tests pass a fake).
pub type HostClock = Box<dyn Fn() -> i64 + Send>;

/// The host's real wall clock.
pub fn system_clock() -> HostClock {
    Box::new(|| match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |secs| -secs),
    })
}

/// Everything the guest can observe of the CMOS, to carry across a live update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    /// The 128 RAM bytes (the clock registers in it are unused: they are computed).
    pub ram: Vec<u8>,
    /// The selected register, 0..=0x7f.
    pub index: u8,
    /// Guest time minus host time, in seconds.
    pub time_offset_secs: i64,
    /// The time the guest is writing while register B's SET bit is on (the clock is frozen).
    pub pending_time: Option<CmosDateTime>,
}

impl liveupdate::state::Versioned for CmosState {
    const VERSION: u16 = 1;
}

/// The CMOS RTC and RAM as a port-I/O bus device.
pub struct Cmos {
    ram: [u8; CMOS_RAM_SIZE],
    index: u8,
    time_offset_secs: i64,
    pending_time: Option<CmosDateTime>,
    clock: HostClock,
}

impl fmt::Debug for Cmos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cmos")
            .field("index", &self.index)
            .field("time_offset_secs", &self.time_offset_secs)
            .field("pending_time", &self.pending_time)
            .finish_non_exhaustive()
    }
}

impl Cmos {
    /// A CMOS at power-on for a guest with `ram_size` bytes of RAM, keeping time with `clock`
    /// (normally [`system_clock`]).
    pub fn new(ram_size: u64, clock: HostClock) -> Self {
        let mut ram = [0u8; CMOS_RAM_SIZE];
        ram[usize::from(REG_A)] = REG_A_POWER_ON;
        ram[usize::from(REG_B)] = REG_B_POWER_ON;
        ram[usize::from(REG_D)] = REG_D_VALID_RAM;
        fill_memory_size(&mut ram, ram_size);
        Self {
            ram,
            index: 0,
            time_offset_secs: 0,
            pending_time: None,
            clock,
        }
    }

    /// Rebuilds a CMOS from a saved state.
    pub fn from_state(state: &CmosState, clock: HostClock) -> Result<Self, CmosError> {
        let ram = <[u8; CMOS_RAM_SIZE]>::try_from(state.ram.as_slice()).map_err(|_| {
            CmosError::RamSize {
                len: state.ram.len(),
            }
        })?;
        if state.index > INDEX_MASK {
            return Err(CmosError::Index { index: state.index });
        }
        Ok(Self {
            ram,
            index: state.index,
            time_offset_secs: state.time_offset_secs,
            pending_time: state.pending_time,
            clock,
        })
    }

    /// Captures RAM, index and the guest's time offset.
    pub fn state(&self) -> CmosState {
        CmosState {
            ram: self.ram.to_vec(),
            index: self.index,
            time_offset_secs: self.time_offset_secs,
            pending_time: self.pending_time,
        }
    }

    fn reg(&self, index: u8) -> u8 {
        self.ram[usize::from(index & INDEX_MASK)]
    }

    fn reg_mut(&mut self, index: u8) -> &mut u8 {
        &mut self.ram[usize::from(index & INDEX_MASK)]
    }

    /// The guest's current time: frozen while the guest sets it, else host time plus offset.
    fn guest_time(&self) -> CmosDateTime {
        self.pending_time.unwrap_or_else(|| {
            date_time_from_unix((self.clock)().saturating_add(self.time_offset_secs))
        })
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let mode = Mode::from_reg_b(self.reg(REG_B));
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => read_time_field(&self.guest_time(), index, mode),
            // The update cycle is instantaneous here, so update-in-progress is never seen.
            REG_A => self.reg(REG_A) & !REG_A_UIP,
            REG_C => std::mem::take(self.reg_mut(REG_C)),
            REG_D => self.reg(REG_D) | REG_D_VALID_RAM,
            _ => self.reg(index),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        match index {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => {
                let mode = Mode::from_reg_b(self.reg(REG_B));
                let mut time = self.guest_time();
                write_time_field(&mut time, index, value, mode);
                if self.pending_time.is_some() {
                    self.pending_time = Some(time);
                } else {
                    self.set_guest_time(&time);
                }
            }
            REG_A => *self.reg_mut(REG_A) = value & !REG_A_UIP,
            REG_B => self.write_reg_b(value),
            REG_C | REG_D => log::debug!("cmos: ignored write to read-only register {index:#x}"),
            _ => *self.reg_mut(index) = value,
        }
    }

    /// SET on freezes the clock for the guest to write it; SET off starts it from there.
    fn write_reg_b(&mut self, value: u8) {
        let was_set = self.reg(REG_B) & REG_B_SET != 0;
        let is_set = value & REG_B_SET != 0;
        if is_set && !was_set {
            self.pending_time = Some(self.guest_time());
        } else if was_set
            && !is_set
            && let Some(time) = self.pending_time.take()
        {
            self.set_guest_time(&time);
        }
        *self.reg_mut(REG_B) = value;
    }

    fn set_guest_time(&mut self, time: &CmosDateTime) {
        match unix_from_date_time(time) {
            Some(secs) => self.time_offset_secs = secs.saturating_sub((self.clock)()),
            None => log::debug!("cmos: ignored invalid guest time {time:?}"),
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (1, [byte]) => *byte = self.read_register(self.index),
            // The index port is write-only.
            (0, [byte]) => *byte = 0xff,
            (_, data) => {
                log::debug!("cmos: ignored {}-byte read at offset {offset}", data.len());
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [value]) => self.index = value & INDEX_MASK,
            (1, [value]) => self.write_register(self.index, *value),
            _ => log::debug!("cmos: ignored {}-byte write at offset {offset}", data.len()),
        }
    }
}

/// Data mode and hour format selected by register B.
#[derive(Clone, Copy)]
struct Mode {
    binary: bool,
    hours_24: bool,
}

impl Mode {
    fn from_reg_b(reg_b: u8) -> Self {
        Self {
            binary: reg_b & REG_B_BINARY != 0,
            hours_24: reg_b & REG_B_24H != 0,
        }
    }

    fn encode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    /// Never fails: a bad BCD digit from the guest just yields an out-of-range value.
    fn decode(self, raw: u8) -> u8 {
        if self.binary {
            raw
        } else {
            (raw >> 4) * 10 + (raw & 0x0f)
        }
    }

    fn encode_hour(self, hour: u8) -> u8 {
        if self.hours_24 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let hour_12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour_12) | pm
    }

    fn decode_hour(self, raw: u8) -> u8 {
        if self.hours_24 {
            return self.decode(raw);
        }
        let pm = if raw & HOUR_PM != 0 { 12 } else { 0 };
        self.decode(raw & !HOUR_PM) % 12 + pm
    }
}

fn read_time_field(time: &CmosDateTime, index: u8, mode: Mode) -> u8 {
    // Two-digit fields; years outside 0..=9999 cannot come from the registers.
    let year_in_century = u8::try_from(time.year.rem_euclid(100)).unwrap_or(0);
    let century = u8::try_from(time.year.div_euclid(100).clamp(0, 99)).unwrap_or(0);
    match index {
        REG_SECONDS => mode.encode(time.second),
        REG_MINUTES => mode.encode(time.minute),
        REG_HOURS => mode.encode_hour(time.hour),
        REG_WEEKDAY => mode.encode(time.weekday),
        REG_DAY => mode.encode(time.day),
        REG_MONTH => mode.encode(time.month),
        REG_YEAR => mode.encode(year_in_century),
        _ => mode.encode(century),
    }
}

fn write_time_field(time: &mut CmosDateTime, index: u8, raw: u8, mode: Mode) {
    let value = mode.decode(raw);
    match index {
        REG_SECONDS => time.second = value,
        REG_MINUTES => time.minute = value,
        REG_HOURS => time.hour = mode.decode_hour(raw),
        REG_WEEKDAY => time.weekday = value,
        REG_DAY => time.day = value,
        REG_MONTH => time.month = value,
        REG_YEAR => time.year = time.year.div_euclid(100) * 100 + i64::from(value),
        _ => time.year = i64::from(value) * 100 + time.year.rem_euclid(100),
    }
}

/// Fills the memory-size registers and the checksum over 0x10..=0x2d.
fn fill_memory_size(ram: &mut [u8; CMOS_RAM_SIZE], ram_size: u64) {
    let put_u16 = |ram: &mut [u8; CMOS_RAM_SIZE], reg: u8, value: u64| {
        let value = u16::try_from(value).unwrap_or(u16::MAX).to_le_bytes();
        ram[usize::from(reg)..usize::from(reg) + 2].copy_from_slice(&value);
    };
    let low_ram = ram_size.min(MMIO_HOLE_START);
    let extended_kib = low_ram.saturating_sub(MIB) / 1024;
    put_u16(ram, REG_BASE_KIB, u64::from(BASE_MEMORY_KIB));
    put_u16(ram, REG_EXT_KIB, extended_kib);
    put_u16(ram, REG_EXT_KIB_COPY, extended_kib);
    put_u16(
        ram,
        REG_ABOVE_16M,
        low_ram.saturating_sub(16 * MIB) / UNIT_64K,
    );
    let above_4g = (ram_size.saturating_sub(MMIO_HOLE_START) / UNIT_64K).min(0xff_ffff);
    let start = usize::from(REG_ABOVE_4G);
    ram[start..start + 3].copy_from_slice(&above_4g.to_le_bytes()[..3]);
    let checksum: u16 = ram[0x10..usize::from(REG_CHECKSUM)]
        .iter()
        .map(|&b| u16::from(b))
        .sum();
    let start = usize::from(REG_CHECKSUM);
    ram[start..start + 2].copy_from_slice(&checksum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::civil::SECS_PER_DAY;
    use super::*;

    const GIB: u64 = 1 << 30;
    /// 2024-02-29 13:45:59 UTC, a Thursday.
    const LEAP_DAY_AFTERNOON: i64 = 1_709_214_359;

    fn fake_clock(start: i64) -> (HostClock, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(start));
        let reader = now.clone();
        (Box::new(move || reader.load(Ordering::SeqCst)), now)
    }

    fn cmos_at(secs: i64) -> (Cmos, Arc<AtomicI64>) {
        let (clock, now) = fake_clock(secs);
        (Cmos::new(64 * MIB, clock), now)
    }

    fn read(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(0, &[index]);
        let mut data = [0u8];
        cmos.read(1, &mut data);
        data[0]
    }

    fn write(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(0, &[index]);
        cmos.write(1, &[value]);
    }

    fn read_many(cmos: &mut Cmos, indexes: &[u8]) -> Vec<u8> {
        indexes.iter().map(|&i| read(cmos, i)).collect()
    }

    const CLOCK_REGS: [u8; 8] = [
        REG_SECONDS,
        REG_MINUTES,
        REG_HOURS,
        REG_WEEKDAY,
        REG_DAY,
        REG_MONTH,
        REG_YEAR,
        REG_CENTURY,
    ];

    #[test]
    fn time_reads_in_bcd_by_default() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);

        let regs = read_many(&mut cmos, &CLOCK_REGS);

        assert_eq!(regs, [0x59, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
    }

    #[test]
    fn time_reads_in_binary_when_register_b_asks() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);
        write(&mut cmos, REG_B, REG_B_24H | REG_B_BINARY);

        let regs = read_many(&mut cmos, &CLOCK_REGS);

        assert_eq!(regs, [59, 45, 13, 5, 29, 2, 24, 20]);
    }

    #[test]
    fn hours_read_in_12_hour_format_with_pm_bit() {
        let (mut cmos, now) = cmos_at(LEAP_DAY_AFTERNOON);
        write(&mut cmos, REG_B, 0); // BCD, 12-hour

        let afternoon = read(&mut cmos, REG_HOURS);
        now.store(1_709_164_800, Ordering::SeqCst); // 2024-02-29 00:00:00
        let midnight = read(&mut cmos, REG_HOURS);
        now.store(1_709_164_800 + 12 * 3600, Ordering::SeqCst);
        let noon = read(&mut cmos, REG_HOURS);

        assert_eq!(afternoon, HOUR_PM | 0x01);
        assert_eq!(midnight, 0x12);
        assert_eq!(noon, HOUR_PM | 0x12);
    }

    #[test]
    fn guest_set_time_keeps_advancing_with_host_time() {
        let (mut cmos, now) = cmos_at(LEAP_DAY_AFTERNOON);

        write(&mut cmos, REG_B, REG_B_SET | REG_B_24H);
        for (reg, value) in [
            (REG_CENTURY, 0x20),
            (REG_YEAR, 0x30),
            (REG_MONTH, 0x06),
            (REG_DAY, 0x15),
            (REG_HOURS, 0x08),
            (REG_MINUTES, 0x00),
            (REG_SECONDS, 0x00),
        ] {
            write(&mut cmos, reg, value);
        }
        write(&mut cmos, REG_B, REG_B_24H);
        now.fetch_add(65, Ordering::SeqCst);

        let regs = read_many(&mut cmos, &CLOCK_REGS);

        // 2030-06-15 08:01:05, a Saturday.
        assert_eq!(regs, [0x05, 0x01, 0x08, 0x07, 0x15, 0x06, 0x30, 0x20]);
        assert_eq!(
            cmos.state().time_offset_secs,
            1_907_740_800 - LEAP_DAY_AFTERNOON
        );
    }

    #[test]
    fn clock_is_frozen_while_set_bit_is_on() {
        let (mut cmos, now) = cmos_at(LEAP_DAY_AFTERNOON);
        write(&mut cmos, REG_B, REG_B_SET | REG_B_24H);

        now.fetch_add(10, Ordering::SeqCst);

        assert_eq!(read(&mut cmos, REG_SECONDS), 0x59);
    }

    #[test]
    fn single_field_write_without_set_bit_applies_at_once() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);

        write(&mut cmos, REG_MINUTES, 0x10);

        assert_eq!(
            read_many(&mut cmos, &[REG_MINUTES, REG_HOURS]),
            [0x10, 0x13]
        );
        assert_eq!(cmos.state().time_offset_secs, -35 * 60);
    }

    #[test]
    fn invalid_guest_time_is_ignored() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);

        write(&mut cmos, REG_MONTH, 0x13);
        write(&mut cmos, REG_SECONDS, 0x9a);

        assert_eq!(cmos.state().time_offset_secs, 0);
        assert_eq!(read(&mut cmos, REG_MONTH), 0x02);
    }

    #[test]
    fn register_a_never_reports_update_in_progress_and_keeps_divider() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);

        write(&mut cmos, REG_A, REG_A_UIP | 0x2f);

        assert_eq!(read(&mut cmos, REG_A), 0x2f);
    }

    #[test]
    fn register_c_clears_on_read_and_d_reports_valid_ram() {
        let mut state = Cmos::new(64 * MIB, fake_clock(0).0).state();
        state.ram[usize::from(REG_C)] = 0x90;
        state.ram[usize::from(REG_D)] = 0;
        let mut cmos = Cmos::from_state(&state, fake_clock(0).0).unwrap();

        let first = read(&mut cmos, REG_C);
        let second = read(&mut cmos, REG_C);
        write(&mut cmos, REG_D, 0);

        assert_eq!((first, second), (0x90, 0));
        assert_eq!(read(&mut cmos, REG_D), REG_D_VALID_RAM);
    }

    #[test]
    fn index_port_ignores_nmi_mask_bit() {
        let (mut cmos, _now) = cmos_at(0);
        write(&mut cmos, 0x40, 0x5a);

        cmos.write(0, &[0x80 | 0x40]);
        let mut data = [0u8];
        cmos.read(1, &mut data);

        assert_eq!(data, [0x5a]);
        assert_eq!(cmos.state().index, 0x40);
    }

    #[test]
    fn memory_size_registers_for_64_mib() {
        let (mut cmos, _now) = cmos_at(0);

        let regs = read_many(&mut cmos, &[0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35]);
        let above_4g = read_many(&mut cmos, &[0x5b, 0x5c, 0x5d]);

        // 640 KiB base; 63 MiB = 0xfc00 KiB extended; 48 MiB = 0x300 x 64 KiB above 16 MiB.
        assert_eq!(regs, [0x80, 0x02, 0x00, 0xfc, 0x00, 0xfc, 0x00, 0x03]);
        assert_eq!(above_4g, [0, 0, 0]);
    }

    #[test]
    fn memory_size_registers_for_16_gib() {
        let mut cmos = Cmos::new(16 * GIB, fake_clock(0).0);

        let regs = read_many(&mut cmos, &[0x17, 0x18, 0x30, 0x31, 0x34, 0x35]);
        let above_4g = read_many(&mut cmos, &[0x5b, 0x5c, 0x5d]);

        // Extended KiB capped; 3 GiB - 16 MiB = 0xbf00 x 64 KiB; 13 GiB = 0x34000 x 64 KiB.
        assert_eq!(regs, [0xff, 0xff, 0xff, 0xff, 0x00, 0xbf]);
        assert_eq!(above_4g, [0x00, 0x40, 0x03]);
    }

    #[test]
    fn checksum_covers_bytes_0x10_to_0x2d() {
        let (mut cmos, _now) = cmos_at(0);

        let sum: u16 = (0x10..=0x2d).map(|i| u16::from(read(&mut cmos, i))).sum();
        let stored = u16::from_be_bytes([read(&mut cmos, 0x2e), read(&mut cmos, 0x2f)]);

        assert_eq!(stored, sum);
        assert_ne!(sum, 0);
    }

    #[test]
    fn state_round_trips_and_restored_device_behaves_the_same() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);
        write(&mut cmos, REG_B, REG_B_24H | REG_B_BINARY);
        write(&mut cmos, REG_YEAR, 28); // 2028 is a leap year too: Feb 29 stays valid
        write(&mut cmos, 0x40, 0x5a);
        let state = cmos.state();

        let json = serde_json::to_string(&state).unwrap();
        let decoded: CmosState = serde_json::from_str(&json).unwrap();
        let mut restored = Cmos::from_state(&decoded, fake_clock(LEAP_DAY_AFTERNOON).0).unwrap();

        assert_eq!(restored.state(), state);
        assert_eq!(
            read_many(&mut restored, &[REG_YEAR, REG_SECONDS, 0x40]),
            [28, 59, 0x5a]
        );
    }

    #[test]
    fn state_captured_while_guest_sets_time_round_trips() {
        let (mut cmos, _now) = cmos_at(LEAP_DAY_AFTERNOON);
        write(&mut cmos, REG_B, REG_B_SET | REG_B_24H);
        write(&mut cmos, REG_DAY, 0x01);
        let state = cmos.state();

        let mut restored = Cmos::from_state(&state, fake_clock(0).0).unwrap();
        write(&mut restored, REG_B, REG_B_24H);

        assert_eq!(state.pending_time.map(|t| t.day), Some(1));
        assert_eq!(
            restored.state().time_offset_secs,
            LEAP_DAY_AFTERNOON - 28 * SECS_PER_DAY
        );
    }

    #[test]
    fn restore_with_wrong_ram_size_or_index_is_refused() {
        let mut short = Cmos::new(64 * MIB, fake_clock(0).0).state();
        short.ram.truncate(100);
        let mut bad_index = Cmos::new(64 * MIB, fake_clock(0).0).state();
        bad_index.index = 0x80;

        let short_result = Cmos::from_state(&short, fake_clock(0).0);
        let index_result = Cmos::from_state(&bad_index, fake_clock(0).0);

        assert_eq!(short_result.err(), Some(CmosError::RamSize { len: 100 }));
        assert_eq!(index_result.err(), Some(CmosError::Index { index: 0x80 }));
    }

    #[test]
    fn extreme_host_clock_does_not_panic() {
        let mut cmos = Cmos::new(64 * MIB, Box::new(|| i64::MAX));
        let mut early = Cmos::new(64 * MIB, Box::new(|| i64::MIN));

        let late_year = read(&mut cmos, REG_CENTURY);
        let early_year = read(&mut early, REG_CENTURY);

        assert_eq!((late_year, early_year), (0x99, 0x00));
    }
}
