//! What a PCI function passed through from outside the VMM needs of it, the same whether the
//! function is a host device under kernel VFIO (the `vfio` crate) or served by another
//! process over vfio-user (the `vfio_user` crate): the function keeps its own configuration
//! space, except the BAR and expansion ROM registers, which the VMM owns because it places
//! the BARs ([`BarShadow`]); the capability walk that finds MSI and MSI-X
//! ([`find_capabilities`]); and the guest's view of the MSI capability, whose message the VMM
//! routes to the function's one vector ([`MsiShadow`]).
//!
//! Each crate supplies the accesses (a VFIO region, a vfio-user message); nothing here talks
//! to a device.

mod bars;
mod capability;

pub use bars::{BAR0_REGISTER, BarShadow, DeviceBar};
pub use capability::{
    Capabilities, MSI_CAPABILITY_ID, MsiCapability, MsiShadow, MsixCapability, MsixLocation,
    find_capabilities,
};
