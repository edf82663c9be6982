//! virtio-vsock (type 19) with cloud-hypervisor's hybrid host side: guest streams end in host
//! UNIX sockets (`device`), each with the virtio credit protocol (`conn`), over 44-byte packet
//! headers (`packet`). Stream sockets only; no datagrams, no seqpacket.

mod conn;
mod device;
mod packet;
mod state;

pub use conn::{BUF_ALLOC, ConnState, Phase};
pub use device::{HostSockets, VIRTIO_ID_VSOCK, Vsock, VsockParams};
pub use packet::{HEADER_LEN, HOST_CID, Header, Op};
pub use state::{PendingConnectState, VsockCounters, VsockState};
