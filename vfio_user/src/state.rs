//! What the VMM saves of an attached device for a live update; the device's own registers stay
//! in the server.

use std::path::PathBuf;

pub use devices::pci::DmaRegionState;
use devices::pci::PciConfigurationState;
use liveupdate::state::{DecodeError, Versioned, upgrade};
use serde::{Deserialize, Serialize};

/// Where the connection and the MSI eventfd wait for the successor: the tokens of the session
/// attachments (restart mode) holding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverTokens {
    /// The connected socket to the server.
    pub socket: u64,
    /// The eventfd the server signals for MSI vector 0.
    pub msi_eventfd: u64,
}

/// What the VMM side knows of an attached device (version 2 of the participant's state).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioUserDeviceState {
    /// The server's socket.
    pub socket: PathBuf,
    /// BAR registers as the guest programmed them.
    pub bars: PciConfigurationState,
    /// Offset of the MSI capability, if the device has one.
    pub msi_cap: Option<usize>,
    /// The DMA regions shared with the server.
    pub dma: Vec<DmaRegionState>,
    /// Size of BAR 0 as the server reported it at attach.
    pub bar_size: u64,
    /// The handed-over connection; `None` when the successor must re-attach (a state saved by
    /// a VMM that could not hand the connection over).
    pub handover: Option<HandoverTokens>,
}

/// Version 1 of [`VfioUserDeviceState`] (no handover: the successor re-attaches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioUserDeviceStateV1 {
    /// The server's socket.
    pub socket: PathBuf,
    /// BAR registers as the guest programmed them.
    pub bars: PciConfigurationState,
    /// Offset of the MSI capability, if the device has one.
    pub msi_cap: Option<usize>,
    /// The DMA regions shared with the server.
    pub dma: Vec<DmaRegionState>,
}

impl Versioned for VfioUserDeviceState {
    const VERSION: u16 = 2;

    fn read_older(version: u16, bytes: &[u8]) -> Option<Result<Self, DecodeError>> {
        match version {
            1 => Some(upgrade::<VfioUserDeviceStateV1, Self>(bytes)),
            _ => None,
        }
    }
}

/// Frozen: what builds before the handover wrote.
impl Versioned for VfioUserDeviceStateV1 {
    const VERSION: u16 = 1;
}

impl From<VfioUserDeviceStateV1> for VfioUserDeviceState {
    fn from(old: VfioUserDeviceStateV1) -> Self {
        Self {
            socket: old.socket,
            bars: old.bars,
            msi_cap: old.msi_cap,
            dma: old.dma,
            // A re-attach asks the server again.
            bar_size: 0,
            handover: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_state_upgrades_to_a_re_attach() {
        let old = VfioUserDeviceStateV1 {
            socket: "/run/dev.sock".into(),
            bars: PciConfigurationState::default(),
            msi_cap: Some(0x40),
            dma: vec![DmaRegionState {
                address: 0,
                size: 0x1000,
                file_offset: 0,
            }],
        };

        let state = VfioUserDeviceState::from(old.clone());

        assert_eq!(state.socket, old.socket);
        assert_eq!(state.msi_cap, old.msi_cap);
        assert_eq!(state.dma, old.dma);
        assert_eq!(state.handover, None);
    }

    #[test]
    fn a_version_1_envelope_is_taken_as_the_current_state() {
        let old = VfioUserDeviceStateV1 {
            socket: "/run/dev.sock".into(),
            bars: PciConfigurationState::default(),
            msi_cap: None,
            dma: Vec::new(),
        };
        let envelope = liveupdate::state::Envelope::wrap("user/0", &old).unwrap();
        let blob = liveupdate::state::encode(vec![envelope]).unwrap();
        let mut states = liveupdate::state::decode(&blob).unwrap();

        let state: VfioUserDeviceState = states.take("user/0").unwrap();

        assert_eq!(state, VfioUserDeviceState::from(old));
    }
}
