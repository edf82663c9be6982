//! vfio-user: attach PCI devices served by another process.
//!
//! Reserved for the vfio-user issue; it holds no code yet.
