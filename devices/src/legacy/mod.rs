//! Legacy PC devices on the port-I/O bus: the COM1 16550A UART, the i8042 (reset only) and
//! the CMOS RTC.

pub mod cmos;
pub mod i8042;
pub mod serial;

pub use cmos::{
    CMOS_PORT_LEN, CMOS_RAM_SIZE, Cmos, CmosDateTime, CmosError, CmosState, HostClock, system_clock,
};
pub use i8042::{I8042, I8042_PORT_LEN, ResetRequest};
pub use serial::{
    SERIAL_FIFO_CAPACITY, SERIAL_PORT_LEN, Serial, SerialCounters, SerialError, SerialOutput,
    SerialState,
};
