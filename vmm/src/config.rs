//! Placeholder; filled in by its owner.

/// The VM configuration (cloud-hypervisor's `VmConfig` JSON shape).
#[derive(Debug, Clone, Default)]
pub struct VmConfig {}
