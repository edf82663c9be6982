//! `cloud-hypervisor`: the VMM binary.

fn main() {}
