//! The 16550A UART on COM1, a thin wrapper around `vm_superio::Serial`.
//!
//! vm-superio does the register model; this module adapts it to our [`BusDevice`] and
//! [`IrqLine`] seams, counts traffic, and makes its state serde-serialisable.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial as Uart, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::IrqLine;

/// Number of ports the UART decodes (THR/RBR at offset 0 up to the scratch register at 7).
pub const SERIAL_PORT_LEN: u64 = 8;

/// Size of the receive FIFO (the 16550A's, and vm-superio's: a test checks they agree).
pub const SERIAL_FIFO_CAPACITY: usize = 64;

/// Where the guest's serial output goes: stdout, a file or a sink.
pub type SerialOutput = Box<dyn io::Write + Send>;

/// Errors from the serial device.
#[derive(Debug, Error)]
pub enum SerialError {
    /// Raising the serial interrupt failed.
    #[error("Failed to raise the serial interrupt")]
    Interrupt(#[source] io::Error),
    /// A saved state holds more input than the receive FIFO can.
    #[error("Saved receive FIFO holds {len} bytes, more than the UART's {capacity}")]
    FifoOverflow {
        /// Bytes in the saved FIFO.
        len: usize,
        /// Capacity of the FIFO.
        capacity: usize,
    },
}

/// Snapshot of the UART registers and its receive FIFO.
///
/// Wraps vm-superio's own state type so a new field there is a compile error here rather
/// than a silently dropped register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// The UART registers and pending input, as vm-superio defines them.
    #[serde(with = "UartStateDef")]
    pub uart: vm_superio::SerialState,
}

impl liveupdate::state::Versioned for SerialState {
    const VERSION: u16 = 1;
}

impl Default for SerialState {
    /// The power-on state.
    fn default() -> Self {
        Self {
            uart: vm_superio::SerialState::default(),
        }
    }
}

// Serde's remote derive for vm-superio's state: the generated code constructs and
// destructures `vm_superio::SerialState` field by field, so the compiler checks that this list
// matches it. (vm-superio-ser would do the same, but it pins vm-superio to 0.8.1.)
#[derive(Serialize, Deserialize)]
#[serde(remote = "vm_superio::SerialState")]
struct UartStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Traffic counters, cheap to read at any time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialCounters {
    /// Bytes the guest wrote that reached the output.
    pub bytes_out: u64,
    /// Bytes the guest wrote that the output refused (lost).
    pub bytes_lost: u64,
    /// Bytes the host queued as guest input.
    pub bytes_in: u64,
    /// Reads of the receive buffer register by the guest.
    pub rbr_reads: u64,
}

#[derive(Default)]
struct AtomicCounters {
    bytes_out: AtomicU64,
    bytes_lost: AtomicU64,
    bytes_in: AtomicU64,
    rbr_reads: AtomicU64,
}

impl AtomicCounters {
    fn snapshot(&self) -> SerialCounters {
        SerialCounters {
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_lost: self.bytes_lost.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            rbr_reads: self.rbr_reads.load(Ordering::Relaxed),
        }
    }
}

impl SerialEvents for AtomicCounters {
    fn buffer_read(&self) {
        self.rbr_reads.fetch_add(1, Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.bytes_out.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// Adapts our interrupt line to vm-superio's trigger.
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// The COM1 UART as a port-I/O bus device.
///
/// vm-superio writes and flushes the output after every byte, so a file output is readable
/// while the guest runs.
pub struct Serial {
    uart: Uart<IrqTrigger, Arc<AtomicCounters>, SerialOutput>,
    counters: Arc<AtomicCounters>,
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.uart.state())
            .field("counters", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART in its power-on state raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn IrqLine>, out: SerialOutput) -> Self {
        let counters = Arc::new(AtomicCounters::default());
        let uart = Uart::with_events(IrqTrigger(irq), counters.clone(), out);
        Self { uart, counters }
    }

    /// Rebuilds a UART from a saved state. An interrupt that was pending when the state was
    /// captured is raised again.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn IrqLine>,
        out: SerialOutput,
    ) -> Result<Self, SerialError> {
        let counters = Arc::new(AtomicCounters::default());
        let uart =
            Uart::from_state(&state.uart, IrqTrigger(irq), counters.clone(), out).map_err(|e| {
                match e {
                    vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
                    // Building from a state writes nothing, so the FIFO check is all that is left.
                    _ => SerialError::FifoOverflow {
                        len: state.uart.in_buffer.len(),
                        capacity: SERIAL_FIFO_CAPACITY,
                    },
                }
            })?;
        Ok(Self { uart, counters })
    }

    /// Captures the registers and the pending input.
    pub fn state(&self) -> SerialState {
        SerialState {
            uart: self.uart.state(),
        }
    }

    /// Traffic counters since this device was built (they are not part of the state).
    pub fn counters(&self) -> SerialCounters {
        self.counters.snapshot()
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest and raises the receive interrupt if the guest enabled
    /// it. Takes at most [`Serial::fifo_capacity`] bytes and returns how many it took: 0 when
    /// the FIFO is full or the UART is in loopback mode. On an interrupt error the bytes are
    /// already queued.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        let take = bytes.len().min(self.uart.fifo_capacity());
        if take == 0 {
            return Ok(0);
        }
        let accepted = self
            .uart
            .enqueue_raw_bytes(&bytes[..take])
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) => SerialError::Interrupt(e),
                // Not reachable: we never offer more than the free space.
                _ => SerialError::FifoOverflow {
                    len: take,
                    capacity: SERIAL_FIFO_CAPACITY,
                },
            })?;
        self.counters
            .bytes_in
            .fetch_add(accepted as u64, Ordering::Relaxed);
        Ok(accepted)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if u64::from(offset) < SERIAL_PORT_LEN => {
                *byte = self.uart.read(offset);
            }
            (_, data) => {
                log::debug!(
                    "serial: ignored {}-byte read at offset {offset}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            log::debug!(
                "serial: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        if u64::from(offset) >= SERIAL_PORT_LEN {
            log::debug!("serial: ignored write at offset {offset}");
            return;
        }
        match self.uart.write(offset, *value) {
            Ok(()) => {}
            Err(vm_superio::serial::Error::Trigger(e)) => {
                log::warn!("serial: failed to raise the interrupt: {e}");
            }
            // Counted as a lost byte; the guest cannot be told.
            Err(e) => log::debug!("serial: output failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IIR_RDA: u8 = 0x04;
    const LCR_DLAB: u8 = 0x80;
    const LSR_DATA_READY: u8 = 0x01;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl CountingIrq {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial_with_buffer() -> (Serial, Arc<CountingIrq>, SharedBuf) {
        let irq = Arc::new(CountingIrq::default());
        let out = SharedBuf::default();
        let serial = Serial::new(irq.clone(), Box::new(out.clone()));
        (serial, irq, out)
    }

    fn read_reg(serial: &mut Serial, offset: u64) -> u8 {
        let mut data = [0u8];
        serial.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn guest_output_reaches_writer() {
        let (mut serial, _irq, out) = serial_with_buffer();

        for byte in b"hello" {
            serial.write(DATA, &[*byte]);
        }

        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello");
        assert_eq!(serial.counters().bytes_out, 5);
    }

    #[test]
    fn guest_output_to_file_is_readable_while_device_runs() {
        let file = TempFile::new().unwrap();
        let out = file.as_file().try_clone().unwrap();
        let mut serial = Serial::new(Arc::new(CountingIrq::default()), Box::new(out));

        serial.write(DATA, b"A");
        serial.write(DATA, b"B");

        assert_eq!(std::fs::read(file.as_path()).unwrap(), b"AB");
    }

    #[test]
    fn input_raises_irq_and_is_read_back_in_order() {
        let (mut serial, irq, _out) = serial_with_buffer();
        serial.write(IER, &[IER_RDA]);

        let accepted = serial.enqueue_input(b"abc").unwrap();

        assert_eq!(accepted, 3);
        assert_eq!(irq.count(), 1);
        assert_ne!(read_reg(&mut serial, IIR) & IIR_RDA, 0);
        assert_ne!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        let read: Vec<u8> = (0..3).map(|_| read_reg(&mut serial, DATA)).collect();
        assert_eq!(read, b"abc");
        assert_eq!(read_reg(&mut serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(serial.counters().bytes_in, 3);
    }

    #[test]
    fn input_beyond_fifo_capacity_is_partly_accepted() {
        let (mut serial, _irq, _out) = serial_with_buffer();

        let first = serial.enqueue_input(&[b'x'; 100]).unwrap();
        let second = serial.enqueue_input(b"y").unwrap();

        assert_eq!(first, SERIAL_FIFO_CAPACITY);
        assert_eq!(second, 0);
        assert_eq!(serial.fifo_capacity(), 0);
    }

    #[test]
    fn fifo_capacity_constant_matches_vm_superio() {
        let (serial, _irq, _out) = serial_with_buffer();

        assert_eq!(serial.fifo_capacity(), SERIAL_FIFO_CAPACITY);
    }

    #[test]
    fn state_round_trips_through_serde_and_restore() {
        let (mut serial, _irq, _out) = serial_with_buffer();
        serial.write(LCR, &[LCR_DLAB]);
        serial.write(DATA, &[0x01]); // divisor low: 115200 baud
        serial.write(LCR, &[0x03]);
        serial.write(SCR, &[0x5a]);
        serial.write(IER, &[IER_RDA]);
        serial.enqueue_input(b"xy").unwrap();
        let state = serial.state();

        let json = serde_json::to_string(&state).unwrap();
        let decoded: SerialState = serde_json::from_str(&json).unwrap();
        let mut restored = Serial::from_state(
            &decoded,
            Arc::new(CountingIrq::default()),
            Box::new(io::sink()),
        )
        .unwrap();

        assert_eq!(restored.state(), state);
        assert_eq!(read_reg(&mut restored, SCR), 0x5a);
        assert_eq!(read_reg(&mut restored, DATA), b'x');
        assert_eq!(read_reg(&mut restored, DATA), b'y');
        restored.write(LCR, &[LCR_DLAB | 0x03]);
        assert_eq!(read_reg(&mut restored, DATA), 0x01);
    }

    #[test]
    fn restore_raises_pending_receive_interrupt_again() {
        let (mut serial, _irq, _out) = serial_with_buffer();
        serial.write(IER, &[IER_RDA]);
        serial.enqueue_input(b"z").unwrap();
        let state = serial.state();
        let irq = Arc::new(CountingIrq::default());

        let _restored = Serial::from_state(&state, irq.clone(), Box::new(io::sink())).unwrap();

        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn restore_with_oversized_fifo_is_refused() {
        let mut state = SerialState::default();
        state.uart.in_buffer = vec![0; SERIAL_FIFO_CAPACITY + 1];

        let result = Serial::from_state(
            &state,
            Arc::new(CountingIrq::default()),
            Box::new(io::sink()),
        );

        assert!(matches!(
            result,
            Err(SerialError::FifoOverflow {
                len: 65,
                capacity: SERIAL_FIFO_CAPACITY
            })
        ));
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let (mut serial, _irq, out) = serial_with_buffer();
        let mut wide = [0u8; 2];

        serial.read(DATA, &mut wide);
        serial.write(DATA, b"ab");
        serial.write(SERIAL_PORT_LEN, b"c");

        assert_eq!(wide, [0xff, 0xff]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
