//! The VMM control loop: serves API requests and guest events, owns the VM.

use std::path::PathBuf;

use thiserror::Error;

use crate::config::VmConfig;

/// Process-level options of the VMM (not part of the VM configuration).
#[derive(Debug, Clone, Default)]
pub struct VmmOptions {
    /// Where to serve the REST API (`--api-socket path=`).
    pub api_socket: Option<PathBuf>,
    /// Where to write JSON events (`--event-monitor path=`).
    pub event_monitor: Option<PathBuf>,
}

/// Errors that end the VMM process.
#[derive(Debug, Error)]
pub enum VmmError {
    /// Placeholder until the control loop lands.
    #[error("Not implemented yet")]
    NotImplemented,
}

/// Runs the VMM until it is shut down. With `vm`, the VM is created and booted at once.
pub fn run(_options: VmmOptions, _vm: Option<VmConfig>) -> Result<(), VmmError> {
    Err(VmmError::NotImplemented)
}
