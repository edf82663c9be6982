//! virtio-net (type 1): an Ethernet card whose wire is a host tap.
//!
//! Queue pair `i` is receiveq `2i` and transmitq `2i + 1`, each pair served by its own tap queue
//! (a multiqueue tap has one fd per queue); with more than one pair a control queue follows,
//! which only needs to accept the driver's `VQ_PAIRS_SET`. Frames travel with the 12-byte
//! `virtio_net_hdr_v1` in front, which the tap reads and writes as its vnet header, so the
//! checksum and segmentation offloads the guest negotiates pass straight through to the host
//! stack. No mergeable receive buffers: each receive chain takes one whole frame.
//!
//! Frames the guest has no buffers for stay in the tap's queue (the tap is only read when a
//! receive buffer is there), which is also where they wait while the VM is paused for a live
//! update. The device never owns a tap: it reaches it through [`TapQueue`], so the VMM decides
//! how taps are opened, handed over or re-created, and the logic here is tested with fakes.

mod device;
mod state;

pub use device::{Net, NetParams, TapQueue};
pub use state::{NetCounters, NetState};

/// Virtio device type of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Length of the vnet header in front of every frame (`virtio_net_hdr_v1`, with
/// `num_buffers`, as VIRTIO_F_VERSION_1 requires).
pub const VNET_HDR_LEN: usize = 12;

/// The tap offload bits (`TUNSETOFFLOAD`) for what the guest accepts on receive.
pub mod tun_offload {
    /// The guest takes frames with a partial checksum.
    pub const CSUM: u32 = 0x01;
    /// The guest takes TCP/IPv4 segmentation offload frames.
    pub const TSO4: u32 = 0x02;
    /// The guest takes TCP/IPv6 segmentation offload frames.
    pub const TSO6: u32 = 0x04;
    /// The guest takes TSO frames with ECN.
    pub const TSO_ECN: u32 = 0x08;
    /// The guest takes UDP fragmentation offload frames.
    pub const UFO: u32 = 0x10;
}
