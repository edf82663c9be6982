//! The i8042 keyboard controller, reduced to what guests use it for here: the CPU reset
//! command (0xFE written to the command port 0x64). Built on `vm_superio::I8042Device`.
//!
//! It has no state to carry across a live update: vm-superio's model holds only the reset
//! callback, every read returns 0 (no keyboard, empty buffers) and no command but reset has an
//! effect. So there is no `I8042State`; a restored VMM builds a fresh device.

use std::fmt;
use std::io;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;

/// Number of ports covered from base 0x60: offset 0 is the data port (0x60), offset 4 the
/// command/status port (0x64). Offsets 1..=3 read as 0 and ignore writes.
pub const I8042_PORT_LEN: u64 = 5;

/// What the guest's reset request calls. It runs on the vCPU thread that made the port write,
/// so it should only signal (write an eventfd, set a flag) and return; an error is logged.
pub type ResetRequest = Box<dyn Fn() -> io::Result<()> + Send>;

/// Adapts the VMM's callback to vm-superio's trigger.
struct ResetTrigger(ResetRequest);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        (self.0)()
    }
}

/// The i8042 controller as a port-I/O bus device.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// A controller that calls `on_reset` each time the guest asks for a CPU reset.
    pub fn new(on_reset: ResetRequest) -> Self {
        Self {
            device: I8042Device::new(ResetTrigger(on_reset)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if u64::from(offset) < I8042_PORT_LEN => {
                *byte = self.device.read(offset);
            }
            (_, data) => {
                log::debug!("i8042: ignored {}-byte read at offset {offset}", data.len());
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [value]) if u64::from(offset) < I8042_PORT_LEN => {
                if let Err(e) = self.device.write(offset, *value) {
                    log::warn!("i8042: reset request failed: {e}");
                }
            }
            _ => log::debug!(
                "i8042: ignored {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const DATA_PORT: u64 = 0;
    const COMMAND_PORT: u64 = 4;
    const CMD_RESET: u8 = 0xfe;

    fn counting_i8042() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let i8042 = I8042::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }));
        (i8042, resets)
    }

    #[test]
    fn reset_command_fires_reset_request() {
        let (mut i8042, resets) = counting_i8042();

        i8042.write(COMMAND_PORT, &[CMD_RESET]);

        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn other_commands_and_data_writes_do_not_reset() {
        let (mut i8042, resets) = counting_i8042();

        i8042.write(COMMAND_PORT, &[0xaa]); // controller self-test
        i8042.write(COMMAND_PORT, &[0xd1]); // write output port
        i8042.write(DATA_PORT, &[CMD_RESET]);
        i8042.write(COMMAND_PORT, &[CMD_RESET, 0]); // not a byte access

        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn failing_reset_request_does_not_panic() {
        let mut i8042 = I8042::new(Box::new(|| Err(io::Error::other("eventfd full"))));

        i8042.write(COMMAND_PORT, &[CMD_RESET]);
        let mut status = [0xffu8];
        i8042.read(COMMAND_PORT, &mut status);

        assert_eq!(status, [0]);
    }

    #[test]
    fn status_reads_report_empty_buffers() {
        let (mut i8042, _resets) = counting_i8042();
        let mut status = [0xffu8];

        i8042.read(COMMAND_PORT, &mut status);

        assert_eq!(status, [0]);
    }
}
