//! The MSI routes a successor started ahead gives its VM before the pause.
//!
//! `KVM_SET_GSI_ROUTING` waits for an SRCU grace period (0.1-0.7 ms on the test hosts) on a
//! thread of its own; inside the pause that thread competed with the vCPU loads for the host's
//! CPUs and often held up the resume. The routes change only when the guest programs a
//! device's MSI, so the old VMM puts those it has as it prepares into a small file of the
//! session (restart mode only: across a kexec no successor runs ahead), and a successor started
//! ahead reads it and sets them on its VM while the guest still runs. The saved state decides:
//! if its routes differ (the guest changed them meanwhile), the restore sets them again.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use liveupdate::session::Token;
use liveupdate::state::{self, Envelope};

use super::participants::ids;
use crate::interrupts::InterruptState;
use crate::sys;

/// The routes file's token in a session (one of the reserved ones, as the RAM's).
pub const ROUTES_TOKEN: Token = 2;

/// The most a routes file may hold: 2048 groups of 2048 vectors would be far more than KVM's
/// 4096 GSIs take; this bounds what a successor reads from a session.
const MAX_ROUTES_FILE: u64 = 1 << 20;

/// A memfd holding `routes` as a state blob of one envelope (the format and checks of the
/// state file).
pub fn routes_file(routes: &InterruptState) -> Result<File, String> {
    let envelope = Envelope::wrap(ids::INTERRUPTS, routes).map_err(|e| e.to_string())?;
    let blob = state::encode(vec![envelope]).map_err(|e| e.to_string())?;
    let mut file = sys::memfd_create(c"liveupdate-routes").map_err(|e| e.to_string())?;
    file.write_all(&blob).map_err(|e| e.to_string())?;
    Ok(file)
}

/// The routes in `file` (one of [`routes_file`]: read from its start, as the agent's copy
/// shares the old VMM's file offset); the reason if it holds none.
pub fn read_routes(file: &File) -> Result<InterruptState, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len > MAX_ROUTES_FILE {
        return Err(format!("{len} bytes, more than a routes file holds"));
    }
    let mut blob = vec![0; usize::try_from(len).map_err(|e| e.to_string())?];
    file.read_exact_at(&mut blob, 0)
        .map_err(|e| e.to_string())?;
    let mut states = state::decode(&blob).map_err(|e| e.to_string())?;
    states
        .take::<InterruptState>(ids::INTERRUPTS)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use devices::interrupt::MsiMessage;

    use super::*;
    use crate::interrupts::MsiGroupState;

    #[test]
    fn routes_read_back_from_their_file_as_written_whatever_its_offset() {
        let routes = InterruptState {
            msi_groups: vec![MsiGroupState {
                first_gsi: 24,
                routes: vec![
                    Some(MsiMessage {
                        address: 0xfee0_0000,
                        data: 0x41,
                    }),
                    None,
                ],
            }],
        };

        let file = routes_file(&routes).unwrap();

        assert_eq!(read_routes(&file).unwrap(), routes);
    }

    #[test]
    fn a_file_that_holds_no_routes_is_refused_with_a_reason() {
        let mut file = sys::memfd_create(c"not-routes").unwrap();
        file.write_all(b"guest RAM, say").unwrap();

        let reason = read_routes(&file).unwrap_err();

        assert!(!reason.is_empty());
    }
}
