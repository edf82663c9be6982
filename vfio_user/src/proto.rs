//! A small vfio-user client for the messages the VMM uses, over a stream it may adopt.
//!
//! The `vfio_user` crate's `Client` connects only by path, keeps its stream private, and trusts
//! the server's sizes (a short or oversized reply makes it panic or allocate without bound).
//! This one checks every reply (id, command, size, error flag) before using it, bounds every
//! call with a timeout, and can take over an already connected stream, which a live update needs.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long one call may wait for the server.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest reply accepted: one region access of 1 MiB plus its header.
const MAX_REPLY: usize = (1 << 20) + 64;
const HEADER_LEN: usize = 16;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
/// DMA_MAP flags: readable and writable.
const DMA_READ_WRITE: u32 = 3;

/// vfio-user commands used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Command {
    Version = 1,
    DmaMap = 2,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DeviceReset = 13,
}

/// Errors of the vfio-user protocol.
#[derive(Debug, Error)]
pub enum ProtoError {
    /// The socket could not be reached.
    #[error("Cannot connect")]
    Connect(#[source] io::Error),
    /// Sending or receiving failed (including a timeout or the server hanging up).
    #[error("Connection failed")]
    Io(#[source] io::Error),
    /// The server answered with an error.
    #[error("The server refused the request (errno {errno})")]
    Refused {
        /// The server's errno.
        errno: u32,
    },
    /// The reply does not fit the request.
    #[error("Malformed reply: {0}")]
    Malformed(&'static str),
}

/// What `DEVICE_GET_REGION_INFO` says about one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
}

/// One vfio-user connection, client side.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    next_id: u16,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(slice) = bytes.get(at..at + 4) {
        word.copy_from_slice(slice);
    }
    u32::from_le_bytes(word)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u32_at(bytes, at)) | u64::from(u32_at(bytes, at + 4)) << 32
}

fn len_u32(len: usize) -> Result<u32, ProtoError> {
    u32::try_from(len).map_err(|_| ProtoError::Malformed("message too large"))
}

impl Connection {
    /// Connects to the server at `path` and negotiates the protocol version.
    pub fn connect(path: &Path) -> Result<Self, ProtoError> {
        let stream = UnixStream::connect(path).map_err(ProtoError::Connect)?;
        let mut connection = Self::adopt(stream)?;
        connection.negotiate()?;
        Ok(connection)
    }

    /// Takes over a connected stream whose version was already negotiated (e.g. handed over
    /// by the previous VMM): no message is sent, so the server sees nothing change.
    pub fn adopt(stream: UnixStream) -> Result<Self, ProtoError> {
        stream
            .set_read_timeout(Some(CALL_TIMEOUT))
            .map_err(ProtoError::Io)?;
        stream
            .set_write_timeout(Some(CALL_TIMEOUT))
            .map_err(ProtoError::Io)?;
        Ok(Self { stream, next_id: 0 })
    }

    /// The connected stream (to hand over).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one command and returns the reply's body (what follows the header).
    fn call(
        &mut self,
        command: Command,
        body: &[u8],
        fds: &[RawFd],
    ) -> Result<Vec<u8>, ProtoError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut message = Vec::with_capacity(HEADER_LEN + body.len());
        message.extend_from_slice(&id.to_le_bytes());
        message.extend_from_slice(&(command as u16).to_le_bytes());
        message.extend_from_slice(&len_u32(HEADER_LEN + body.len())?.to_le_bytes());
        message.extend_from_slice(&0u32.to_le_bytes());
        message.extend_from_slice(&0u32.to_le_bytes());
        message.extend_from_slice(body);
        if fds.is_empty() {
            self.stream.write_all(&message).map_err(ProtoError::Io)?;
        } else {
            let sent = self
                .stream
                .send_with_fds(&[&message[..]], fds)
                .map_err(|e| ProtoError::Io(io::Error::from_raw_os_error(e.errno())))?;
            if sent != message.len() {
                return Err(ProtoError::Io(io::ErrorKind::WriteZero.into()));
            }
        }
        let mut header = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut header)
            .map_err(ProtoError::Io)?;
        let reply_id = u16::from_le_bytes([header[0], header[1]]);
        let reply_command = u16::from_le_bytes([header[2], header[3]]);
        let size = usize::try_from(u32_at(&header, 4)).unwrap_or(usize::MAX);
        let flags = u32_at(&header, 8);
        if reply_id != id || reply_command != command as u16 {
            return Err(ProtoError::Malformed("reply to another request"));
        }
        if !(HEADER_LEN..=MAX_REPLY).contains(&size) {
            return Err(ProtoError::Malformed("reply size out of range"));
        }
        let mut reply = vec![0u8; size - HEADER_LEN];
        self.stream.read_exact(&mut reply).map_err(ProtoError::Io)?;
        if flags & FLAG_ERROR != 0 {
            return Err(ProtoError::Refused {
                errno: u32_at(&header, 12),
            });
        }
        if flags & FLAG_REPLY == 0 {
            return Err(ProtoError::Malformed("not a reply"));
        }
        Ok(reply)
    }

    fn negotiate(&mut self) -> Result<(), ProtoError> {
        let mut body = Vec::new();
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(br#"{"capabilities":{"max_msg_fds":16}}"#);
        body.push(0);
        let reply = self.call(Command::Version, &body, &[])?;
        match reply.get(..2) {
            Some([0, 0]) => Ok(()),
            Some(_) => Err(ProtoError::Malformed("unsupported major version")),
            None => Err(ProtoError::Malformed("short version reply")),
        }
    }

    /// `DEVICE_GET_INFO`: (flags, number of regions, number of IRQ types).
    pub fn device_info(&mut self) -> Result<(u32, u32, u32), ProtoError> {
        let mut body = [0u8; 16];
        body[..4].copy_from_slice(&32u32.to_le_bytes());
        let reply = self.call(Command::DeviceGetInfo, &body, &[])?;
        if reply.len() < 16 {
            return Err(ProtoError::Malformed("short device info"));
        }
        Ok((u32_at(&reply, 4), u32_at(&reply, 8), u32_at(&reply, 12)))
    }

    /// `DEVICE_GET_REGION_INFO` for region `index` (capabilities are not asked for).
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, ProtoError> {
        let mut body = [0u8; 32];
        body[..4].copy_from_slice(&32u32.to_le_bytes());
        body[8..12].copy_from_slice(&index.to_le_bytes());
        let reply = self.call(Command::DeviceGetRegionInfo, &body, &[])?;
        if reply.len() < 32 || u32_at(&reply, 8) != index {
            return Err(ProtoError::Malformed("bad region info"));
        }
        Ok(RegionInfo {
            flags: u32_at(&reply, 4),
            size: u64_at(&reply, 16),
        })
    }

    fn access(region: u32, offset: u64, count: usize) -> Result<[u8; 16], ProtoError> {
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&offset.to_le_bytes());
        body[8..12].copy_from_slice(&region.to_le_bytes());
        body[12..].copy_from_slice(&len_u32(count)?.to_le_bytes());
        Ok(body)
    }

    /// `REGION_READ`: fills `data` from `region` at `offset`.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), ProtoError> {
        let body = Self::access(region, offset, data.len())?;
        let reply = self.call(Command::RegionRead, &body, &[])?;
        match reply.get(16..) {
            Some(bytes)
                if bytes.len() == data.len() && u32_at(&reply, 12) as usize == data.len() =>
            {
                data.copy_from_slice(bytes);
                Ok(())
            }
            _ => Err(ProtoError::Malformed("read returned another length")),
        }
    }

    /// `REGION_WRITE`: writes `data` into `region` at `offset`.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ProtoError> {
        let mut body = Self::access(region, offset, data.len())?.to_vec();
        body.extend_from_slice(data);
        self.call(Command::RegionWrite, &body, &[])?;
        Ok(())
    }

    /// `DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<(), ProtoError> {
        self.call(Command::DeviceReset, &[], &[])?;
        Ok(())
    }

    /// `DMA_MAP`: shares `size` bytes of `fd` from `offset` at DMA address `address`.
    pub fn dma_map(
        &mut self,
        offset: u64,
        address: u64,
        size: u64,
        fd: RawFd,
    ) -> Result<(), ProtoError> {
        let mut body = [0u8; 32];
        body[..4].copy_from_slice(&32u32.to_le_bytes());
        body[4..8].copy_from_slice(&DMA_READ_WRITE.to_le_bytes());
        body[8..16].copy_from_slice(&offset.to_le_bytes());
        body[16..24].copy_from_slice(&address.to_le_bytes());
        body[24..].copy_from_slice(&size.to_le_bytes());
        self.call(Command::DmaMap, &body, &[fd])?;
        Ok(())
    }

    /// `SET_IRQS`: gives the server one eventfd per interrupt `start..start + fds.len()` of
    /// IRQ type `index`.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        fds: &[RawFd],
    ) -> Result<(), ProtoError> {
        let mut body = [0u8; 20];
        body[..4].copy_from_slice(&20u32.to_le_bytes());
        body[4..8].copy_from_slice(&flags.to_le_bytes());
        body[8..12].copy_from_slice(&index.to_le_bytes());
        body[12..16].copy_from_slice(&start.to_le_bytes());
        body[16..].copy_from_slice(&len_u32(fds.len())?.to_le_bytes());
        self.call(Command::SetIrqs, &body, fds)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use super::*;
    use crate::testdev::regs::VENDOR_ID;
    use crate::testdev::{TestDevOptions, serve};
    use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

    fn socket_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfio-proto-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    /// A server that reads one request and answers with `reply(request_header)`.
    fn scripted(name: &str, reply: fn([u8; 16]) -> Vec<u8>) -> PathBuf {
        let path = socket_path(name);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut header = [0u8; 16];
            stream.read_exact(&mut header).unwrap();
            let mut body = vec![0u8; u32_at(&header, 4) as usize - 16];
            stream.read_exact(&mut body).unwrap();
            stream.write_all(&reply(header)).unwrap();
            // Keep the stream open until the client is done.
            let _ = stream.read(&mut [0u8; 1]);
        });
        path
    }

    fn reply_header(request: [u8; 16], size: u32, flags: u32, error: u32) -> Vec<u8> {
        let mut reply = request[..4].to_vec();
        reply.extend_from_slice(&size.to_le_bytes());
        reply.extend_from_slice(&flags.to_le_bytes());
        reply.extend_from_slice(&error.to_le_bytes());
        reply
    }

    #[test]
    fn version_reply_shorter_than_its_header_is_malformed() {
        let path = scripted("short", |request| reply_header(request, 0, FLAG_REPLY, 0));

        let result = Connection::connect(&path);

        assert!(
            matches!(result, Err(ProtoError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn reply_claiming_four_gib_is_malformed_not_allocated() {
        let path = scripted("huge", |request| {
            reply_header(request, u32::MAX, FLAG_REPLY, 0)
        });

        let result = Connection::connect(&path);

        assert!(
            matches!(result, Err(ProtoError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn reply_to_another_message_id_is_malformed() {
        let path = scripted("other-id", |mut request| {
            request[0] ^= 0xff;
            let mut reply = reply_header(request, 20, FLAG_REPLY, 0);
            reply.extend_from_slice(&[0; 4]);
            reply
        });

        let result = Connection::connect(&path);

        assert!(
            matches!(result, Err(ProtoError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn error_reply_carries_the_servers_errno() {
        let path = scripted("errno", |request| {
            reply_header(request, 16, FLAG_REPLY | FLAG_ERROR, 22)
        });

        let result = Connection::connect(&path);

        assert!(
            matches!(result, Err(ProtoError::Refused { errno: 22 })),
            "{result:?}"
        );
    }

    #[test]
    fn adopted_stream_keeps_talking_to_the_same_server() {
        let path = socket_path("adopt");
        let server_path = path.clone();
        std::thread::spawn(move || serve(&server_path, &TestDevOptions::default()));
        while !path.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let first = Connection::connect(&path).unwrap();

        let mut adopted = Connection::adopt(first.stream().try_clone().unwrap()).unwrap();
        drop(first);
        let mut ids = [0u8; 2];
        adopted
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut ids)
            .unwrap();

        assert_eq!(u16::from_le_bytes(ids), VENDOR_ID);
    }
}
