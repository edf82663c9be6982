//! The VMM: a KVM virtual machine behind cloud-hypervisor's interfaces.
//!
//! It owns guest RAM (memfds, so live update can preserve it), the vCPUs, the in-kernel irqchip
//! and PIT, the devices of the `devices` crate, the REST API on a UNIX socket and the control
//! loop that serves it. It targets KVM on x86-64 only.

mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod control_loop;
pub mod cpu;
pub mod device_manager;
pub mod event_monitor;
pub mod host_console;
pub mod interrupts;
pub mod layout;
pub mod live_update;
pub mod memory;
pub mod platform;
pub mod snapshot;
pub mod state_format;
pub(crate) mod sys;
pub mod vcpu_thread;
pub mod vm;

#[cfg(test)]
mod state_schemas;
