//! The port devices: COM1, the i8042 (reset) and the CMOS RTC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use devices::bus::Bus;
use devices::legacy::{Cmos, CmosState, I8042, Serial, SerialState, system_clock};
use liveupdate::state::StateSet;
use log::info;

use crate::config::ConsoleMode;
use crate::host_console::Port;
use crate::layout;
use crate::vcpu_thread::VcpuEvent;

use super::{DeviceContext, DeviceError, ids, output_for, restore_error, write_bus};

/// Serial (COM1), i8042 and CMOS on the port bus. The i8042 holds no state worth carrying.
pub(super) fn add_legacy(
    ctx: &DeviceContext<'_>,
    pio: &RwLock<Bus>,
    mut restore: Option<&mut StateSet>,
) -> Result<LegacyDevices, DeviceError> {
    let mut pio = write_bus(pio);
    let mut serial = None;
    let mut serial_end = None;
    if ctx.config.serial.mode != ConsoleMode::Off {
        let irq = ctx
            .interrupts
            .legacy_line(layout::COM1_IRQ)
            .map_err(DeviceError::Interrupt)?;
        let (output, end) = output_for(
            ctx,
            &ctx.config.serial,
            Port::Serial,
            restore.as_deref_mut(),
        )?;
        serial_end = end;
        let device = match restore.as_deref_mut() {
            Some(states) => {
                let state: SerialState = states
                    .take(ids::SERIAL)
                    .map_err(restore_error(ids::SERIAL))?;
                Serial::from_state(&state, irq, output).map_err(|e| DeviceError::Restore {
                    id: ids::SERIAL.into(),
                    source: Box::new(e),
                })?
            }
            None => Serial::new(irq, output),
        };
        let device = Arc::new(Mutex::new(device));
        pio.insert(
            device.clone(),
            layout::COM1_PORT,
            devices::legacy::SERIAL_PORT_LEN,
        )
        .map_err(DeviceError::Bus)?;
        serial = Some(device);
    }
    let on_event = ctx.on_event.clone();
    // Linux writes the reset command up to ten times before the VMM has torn the VM down:
    // one reboot per VM, not ten.
    let requested = AtomicBool::new(false);
    let i8042 = I8042::new(Box::new(move || {
        if !requested.swap(true, Ordering::SeqCst) {
            info!("The guest asked the i8042 controller for a reset");
            on_event(VcpuEvent::Reset);
        }
        Ok(())
    }));
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        layout::I8042_PORT,
        devices::legacy::I8042_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;
    let cmos = match restore {
        Some(states) => {
            let state: CmosState = states.take(ids::CMOS).map_err(restore_error(ids::CMOS))?;
            Cmos::from_state(&state, system_clock()).map_err(|e| DeviceError::Restore {
                id: ids::CMOS.into(),
                source: Box::new(e),
            })?
        }
        None => Cmos::new(ctx.config.memory.size, system_clock()),
    };
    let cmos = Arc::new(Mutex::new(cmos));
    pio.insert(
        cmos.clone(),
        layout::CMOS_PORT,
        devices::legacy::CMOS_PORT_LEN,
    )
    .map_err(DeviceError::Bus)?;
    Ok(LegacyDevices {
        serial,
        cmos,
        serial_end,
    })
}

/// The legacy devices that have state.
pub(super) struct LegacyDevices {
    pub(super) serial: Option<Arc<Mutex<Serial>>>,
    pub(super) cmos: Arc<Mutex<Cmos>>,
    /// The serial port's pty or socket, if it has one.
    pub(super) serial_end: Option<Arc<crate::host_console::HostEnd>>,
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::device_manager::test_fixture::Fixture;
    use crate::layout;
    use crate::vcpu_thread::VcpuEvent;

    #[test]
    fn repeated_reset_commands_ask_for_one_reboot() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let fixture = Fixture::with_events(Arc::new(move |e| sink.lock().unwrap().push(e)));
        let pio = fixture.manager.buses().pio.clone();

        for _ in 0..10 {
            assert!(pio.read().unwrap().write(layout::I8042_PORT + 4, &[0xfe]));
        }

        assert_eq!(*events.lock().unwrap(), vec![VcpuEvent::Reset]);
    }
}
