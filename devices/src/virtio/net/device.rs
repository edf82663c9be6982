//! The virtio-net device: feature offer, configuration space, and the receive, transmit and
//! control queues.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::os::fd::RawFd;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::state::{NetCounters, NetState};
use super::{VIRTIO_ID_NET, VNET_HDR_LEN, tun_offload};
use crate::virtio::device::{VirtioDevice, VirtioError, read_config_bytes};

/// Largest frame with its header: a 64 KiB GSO frame plus Ethernet and VLAN headers.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_536 + 64;
/// Offset of `num_buffers` in the vnet header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// One queue of a host tap, as the device uses it.
pub trait TapQueue: Send + Debug {
    /// Reads one frame, vnet header first; `WouldBlock` when none waits.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame, vnet header first.
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// Tells the tap which offloads the guest takes on receive (`tun_offload` bits).
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// The fd that becomes readable when a frame waits.
    fn raw_fd(&self) -> RawFd;
}

/// What the guest sees of the card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// MTU announced to the guest (VIRTIO_NET_F_MTU), if set.
    pub mtu: Option<u16>,
    /// Maximum size of every queue.
    pub queue_size: u16,
    /// Offer checksum offload both ways.
    pub offload_csum: bool,
    /// Offer TCP segmentation offload both ways (needs checksum offload).
    pub offload_tso: bool,
    /// Offer UDP fragmentation offload both ways (needs checksum offload).
    pub offload_ufo: bool,
}

/// A virtio-net device with one tap queue per queue pair.
#[derive(Debug)]
pub struct Net {
    taps: Vec<Box<dyn TapQueue>>,
    params: NetParams,
    queue_max_sizes: Vec<u16>,
    state: NetState,
    scratch: Vec<u8>,
    /// Per pair: the receive queue ran out of buffers, so the driver must say when it adds some.
    rx_starved: Vec<bool>,
}

const fn bit(feature: u32) -> u64 {
    1 << feature
}

impl Net {
    /// A card on `taps` (one per queue pair, at least one).
    pub fn new(taps: Vec<Box<dyn TapQueue>>, params: NetParams) -> Result<Self, VirtioError> {
        if taps.is_empty() {
            return Err(VirtioError::Unsupported(
                "a network card needs at least one tap queue".into(),
            ));
        }
        let mut queues = 2 * taps.len();
        if taps.len() > 1 {
            queues += 1;
        }
        Ok(Self {
            queue_max_sizes: vec![params.queue_size; queues],
            rx_starved: vec![true; taps.len()],
            taps,
            params,
            state: NetState::default(),
            scratch: vec![0; MAX_FRAME],
        })
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    fn ctrl_queue(&self) -> Option<u16> {
        (self.pairs() > 1).then(|| (2 * self.pairs()) as u16)
    }

    fn config_space(&self) -> [u8; 12] {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.params.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
        config[10..12].copy_from_slice(&self.params.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    /// Moves waiting frames from tap `pair` into the guest's receive buffers, until either
    /// runs out. A frame too big for its buffer is dropped and the buffer kept.
    fn receive(
        &mut self,
        pair: usize,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        // Starved unless the loop ends with buffers left (the tap ran dry).
        self.rx_starved[pair] = true;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let len = match self.taps[pair].read_frame(&mut self.scratch) {
                Ok(len) => len,
                Err(e) => {
                    // Nothing waits (or the tap failed): the buffer stays for the next frame.
                    queue.go_to_previous_position();
                    if e.kind() == io::ErrorKind::WouldBlock {
                        self.rx_starved[pair] = false;
                        break;
                    }
                    return Err(VirtioError::Backend(e));
                }
            };
            if len < VNET_HDR_LEN {
                self.state.counters.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            // Without mergeable buffers every frame takes exactly one chain.
            self.scratch[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    return Err(VirtioError::MalformedChain {
                        queue: index,
                        reason: "device-readable buffer in a receive chain".into(),
                    });
                }
                let take = (desc.len() as usize).min(len - written);
                mem.write_slice(&self.scratch[written..written + take], desc.addr())
                    .map_err(VirtioError::Memory)?;
                written += take;
                if written == len {
                    break;
                }
            }
            if written < len {
                self.state.counters.rx_dropped += 1;
                queue.go_to_previous_position();
                log::debug!("virtio-net: {len}-byte frame dropped, the receive buffer is smaller");
                continue;
            }
            queue
                .add_used(mem, head, len as u32)
                .map_err(|source| VirtioError::Queue {
                    queue: index,
                    source,
                })?;
            self.state.counters.rx_frames += 1;
            self.state.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
            used = true;
        }
        Ok(used)
    }

    /// Sends every frame the guest queued on transmit queue `index` through tap `pair`.
    fn transmit(
        &mut self,
        pair: usize,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut len = 0usize;
            let mut malformed = None;
            for desc in chain {
                if desc.is_write_only() {
                    malformed = Some("device-writable buffer in a transmit chain");
                    break;
                }
                let take = desc.len() as usize;
                if len + take > MAX_FRAME {
                    malformed = Some("frame larger than 64 KiB");
                    break;
                }
                mem.read_slice(&mut self.scratch[len..len + take], desc.addr())
                    .map_err(VirtioError::Memory)?;
                len += take;
            }
            if malformed.is_none() && len < VNET_HDR_LEN {
                malformed = Some("frame shorter than its vnet header");
            }
            if malformed.is_none() {
                match self.taps[pair].write_frame(&self.scratch[..len]) {
                    Ok(_) => {
                        self.state.counters.tx_frames += 1;
                        self.state.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                    }
                    // Like a frame lost on the wire: the guest's buffer comes back all the same.
                    Err(e) => {
                        self.state.counters.tx_dropped += 1;
                        log::debug!("virtio-net: the tap refused a frame: {e}");
                    }
                }
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|source| VirtioError::Queue {
                    queue: index,
                    source,
                })?;
            used = true;
            if let Some(reason) = malformed {
                return Err(VirtioError::MalformedChain {
                    queue: index,
                    reason: reason.into(),
                });
            }
        }
        Ok(used)
    }

    /// Answers control commands: only the number of queue pairs (all are always served).
    fn control(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut command = Vec::new();
            let mut ack = None;
            for desc in chain {
                if desc.is_write_only() {
                    ack = Some(desc.addr());
                    break;
                }
                let start = command.len();
                let take = (desc.len() as usize).min(64usize.saturating_sub(start));
                command.resize(start + take, 0);
                mem.read_slice(&mut command[start..], desc.addr())
                    .map_err(VirtioError::Memory)?;
            }
            let Some(ack) = ack else {
                queue
                    .add_used(mem, head, 0)
                    .map_err(|source| VirtioError::Queue {
                        queue: index,
                        source,
                    })?;
                return Err(VirtioError::MalformedChain {
                    queue: index,
                    reason: "control command without a status byte".into(),
                });
            };
            let status = match command.as_slice() {
                [class, cmd, lo, hi, ..]
                    if u32::from(*class) == VIRTIO_NET_CTRL_MQ
                        && u32::from(*cmd) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET =>
                {
                    let pairs = u16::from_le_bytes([*lo, *hi]);
                    if pairs >= 1 && usize::from(pairs) <= self.pairs() {
                        self.state.active_pairs = pairs;
                        VIRTIO_NET_OK
                    } else {
                        VIRTIO_NET_ERR
                    }
                }
                _ => VIRTIO_NET_ERR,
            };
            mem.write_obj(status as u8, ack)
                .map_err(VirtioError::Memory)?;
            queue
                .add_used(mem, head, 1)
                .map_err(|source| VirtioError::Queue {
                    queue: index,
                    source,
                })?;
            used = true;
        }
        Ok(used)
    }

    /// The tap offloads for what the driver accepted on receive.
    fn tap_offload(acked: u64) -> u32 {
        let mut flags = 0;
        if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
            flags |= tun_offload::CSUM;
            for (feature, offload) in [
                (VIRTIO_NET_F_GUEST_TSO4, tun_offload::TSO4),
                (VIRTIO_NET_F_GUEST_TSO6, tun_offload::TSO6),
                (VIRTIO_NET_F_GUEST_ECN, tun_offload::TSO_ECN),
                (VIRTIO_NET_F_GUEST_UFO, tun_offload::UFO),
            ] {
                if acked & bit(feature) != 0 {
                    flags |= offload;
                }
            }
        }
        flags
    }
}

impl VirtioDevice for Net {
    type State = NetState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        let mut features = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS);
        if self.params.mtu.is_some() {
            features |= bit(VIRTIO_NET_F_MTU);
        }
        if self.pairs() > 1 {
            features |= bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
        }
        // Segmentation offloads build on checksum offload, as the virtio spec requires.
        if self.params.offload_csum {
            features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
            if self.params.offload_tso {
                features |= bit(VIRTIO_NET_F_HOST_TSO4)
                    | bit(VIRTIO_NET_F_HOST_TSO6)
                    | bit(VIRTIO_NET_F_HOST_ECN)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
                    | bit(VIRTIO_NET_F_GUEST_ECN);
            }
            if self.params.offload_ufo {
                features |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
            }
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-net config is read-only; write at {offset:#x} ignored");
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.state.acked_features = acked_features;
        let offload = Self::tap_offload(acked_features);
        for tap in &self.taps {
            tap.set_offload(offload).map_err(VirtioError::Backend)?;
        }
        Ok(())
    }

    fn ready_fds(&self) -> Vec<(RawFd, u16)> {
        self.taps
            .iter()
            .enumerate()
            .map(|(pair, tap)| (tap.raw_fd(), 2 * pair as u16))
            .collect()
    }

    fn needs_notification(&self, index: u16) -> bool {
        // A receive queue with buffers left is filled on its tap's readiness alone.
        let pair = usize::from(index / 2);
        Some(index) == self.ctrl_queue()
            || index % 2 == 1
            || self.rx_starved.get(pair).copied().unwrap_or(true)
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        if Some(index) == self.ctrl_queue() {
            return self.control(index, queue, mem);
        }
        let pair = usize::from(index / 2);
        if pair >= self.pairs() {
            return Ok(false);
        }
        if index.is_multiple_of(2) {
            self.receive(pair, index, queue, mem)
        } else {
            self.transmit(pair, index, queue, mem)
        }
    }

    fn reset(&mut self) {
        self.state.acked_features = 0;
        self.state.active_pairs = 0;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let NetCounters {
            rx_bytes,
            rx_frames,
            tx_bytes,
            tx_frames,
            rx_dropped,
            tx_dropped,
        } = self.state.counters;
        [
            ("rx_bytes", rx_bytes),
            ("rx_frames", rx_frames),
            ("tx_bytes", tx_bytes),
            ("tx_frames", tx_frames),
            ("rx_dropped", rx_dropped),
            ("tx_dropped", tx_dropped),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    fn state(&self) -> NetState {
        self.state.clone()
    }

    fn set_state(&mut self, state: NetState) -> Result<(), VirtioError> {
        if usize::from(state.active_pairs) > self.pairs() {
            return Err(VirtioError::Unsupported(format!(
                "saved state uses {} queue pairs, the card has {}",
                state.active_pairs,
                self.pairs()
            )));
        }
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::test_driver::{Desc, TestQueue, guest_memory};

    /// A tap that holds frames to receive and records what was sent.
    #[derive(Debug, Default)]
    struct FakeTap {
        incoming: Mutex<VecDeque<Vec<u8>>>,
        sent: Mutex<Vec<Vec<u8>>>,
        offload: Mutex<Option<u32>>,
        refuse_writes: bool,
    }

    impl TapQueue for Arc<FakeTap> {
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self.incoming.lock().unwrap().pop_front();
            let frame = frame.ok_or(io::ErrorKind::WouldBlock)?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
        fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
            if self.refuse_writes {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.sent.lock().unwrap().push(frame.to_vec());
            Ok(frame.len())
        }
        fn set_offload(&self, flags: u32) -> io::Result<()> {
            *self.offload.lock().unwrap() = Some(flags);
            Ok(())
        }
        fn raw_fd(&self) -> RawFd {
            -1
        }
    }

    fn params() -> NetParams {
        NetParams {
            mac: [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc],
            mtu: Some(1400),
            queue_size: 256,
            offload_csum: true,
            offload_tso: true,
            offload_ufo: true,
        }
    }

    fn net_with(taps: &[Arc<FakeTap>], params: NetParams) -> Net {
        let taps = taps
            .iter()
            .map(|t| Box::new(t.clone()) as Box<dyn TapQueue>)
            .collect();
        Net::new(taps, params).unwrap()
    }

    /// A frame with a vnet header of `hdr_byte` and `payload` after it.
    fn frame(hdr_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![hdr_byte; VNET_HDR_LEN];
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn waiting_frame_lands_in_a_receive_buffer_with_num_buffers_one() {
        let tap = Arc::new(FakeTap::default());
        tap.incoming.lock().unwrap().push_back(frame(0, b"hello"));
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        let head = tq.add_chain(&mem, &[Desc::writable(0x8000, 2048)]);

        let used = net.process_queue(0, &mut queue, &mem).unwrap();
        let mut got = [0u8; VNET_HDR_LEN + 5];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();

        assert!(used);
        assert_eq!(tq.used_entry(&mem, 0), (u32::from(head), 17));
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..], b"hello");
        assert_eq!(net.counters()["rx_frames"], 1);
        assert_eq!(net.counters()["rx_bytes"], 5);
    }

    #[test]
    fn frames_wait_in_the_tap_while_the_guest_has_no_buffer() {
        let tap = Arc::new(FakeTap::default());
        tap.incoming.lock().unwrap().push_back(frame(0, b"one"));
        tap.incoming.lock().unwrap().push_back(frame(0, b"two"));
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::writable(0x8000, 2048)]);

        net.process_queue(0, &mut queue, &mem).unwrap();

        assert_eq!(
            tap.incoming.lock().unwrap().len(),
            1,
            "the second frame waits"
        );
        assert_eq!(tq.used_idx(&mem), 1);
    }

    #[test]
    fn empty_tap_leaves_the_receive_buffer_available() {
        let tap = Arc::new(FakeTap::default());
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::writable(0x8000, 2048)]);

        let used = net.process_queue(0, &mut queue, &mem).unwrap();
        tap.incoming.lock().unwrap().push_back(frame(0, b"late"));
        let used_later = net.process_queue(0, &mut queue, &mem).unwrap();

        assert!(!used);
        assert!(used_later, "the kept buffer takes the next frame");
        assert_eq!(tq.used_idx(&mem), 1);
    }

    #[test]
    fn frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
        let tap = Arc::new(FakeTap::default());
        tap.incoming.lock().unwrap().push_back(frame(0, &[7; 100]));
        tap.incoming.lock().unwrap().push_back(frame(0, b"fits"));
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::writable(0x8000, 64)]);

        net.process_queue(0, &mut queue, &mem).unwrap();

        assert_eq!(net.counters()["rx_dropped"], 1);
        assert_eq!(tq.used_entry(&mem, 0).1, (VNET_HDR_LEN + 4) as u32);
    }

    #[test]
    fn transmitted_chain_reaches_the_tap_whole_with_its_header() {
        let tap = Arc::new(FakeTap::default());
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        mem.write_slice(&[5; VNET_HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        mem.write_slice(b"payload", GuestAddress(0x9000)).unwrap();
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(
            &mem,
            &[
                Desc::readable(0x8000, VNET_HDR_LEN as u32),
                Desc::readable(0x9000, 7),
            ],
        );

        let used = net.process_queue(1, &mut queue, &mem).unwrap();

        assert!(used);
        assert_eq!(tap.sent.lock().unwrap().as_slice(), &[frame(5, b"payload")]);
        assert_eq!(net.counters()["tx_frames"], 1);
        assert_eq!(net.counters()["tx_bytes"], 7);
    }

    #[test]
    fn frame_the_tap_refuses_is_counted_and_its_buffer_returned() {
        let tap = Arc::new(FakeTap {
            refuse_writes: true,
            ..FakeTap::default()
        });
        let mut net = net_with(std::slice::from_ref(&tap), params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::readable(0x8000, 64)]);

        net.process_queue(1, &mut queue, &mem).unwrap();

        assert_eq!(net.counters()["tx_dropped"], 1);
        assert_eq!(tq.used_idx(&mem), 1);
    }

    #[test]
    fn second_pair_uses_the_second_tap_queue() {
        let taps = [Arc::new(FakeTap::default()), Arc::new(FakeTap::default())];
        taps[1].incoming.lock().unwrap().push_back(frame(0, b"q1"));
        let mut net = net_with(&taps, params());
        let mem = guest_memory(0x10000);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(&mem, &[Desc::writable(0x8000, 2048)]);

        let used = net.process_queue(2, &mut queue, &mem).unwrap();

        assert!(used);
        assert_eq!(
            net.queue_max_sizes().len(),
            5,
            "two pairs and a control queue"
        );
        assert_eq!(
            net.ready_fds().iter().map(|r| r.1).collect::<Vec<_>>(),
            [0, 2]
        );
    }

    #[test]
    fn control_queue_accepts_pair_counts_the_card_has() {
        let taps = [Arc::new(FakeTap::default()), Arc::new(FakeTap::default())];
        let mut net = net_with(&taps, params());
        let mem = guest_memory(0x10000);
        mem.write_slice(&[4, 0, 2, 0], GuestAddress(0x8000))
            .unwrap();
        mem.write_slice(&[4, 0, 3, 0], GuestAddress(0x8100))
            .unwrap();
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        let mut queue = tq.create_queue(&mem);
        tq.add_chain(
            &mem,
            &[Desc::readable(0x8000, 4), Desc::writable(0x9000, 1)],
        );
        tq.add_chain(
            &mem,
            &[Desc::readable(0x8100, 4), Desc::writable(0x9001, 1)],
        );

        net.process_queue(4, &mut queue, &mem).unwrap();

        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(),
            0,
            "2 pairs: OK"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x9001)).unwrap(),
            1,
            "3 pairs: ERR"
        );
        assert_eq!(net.state().active_pairs, 2);
    }

    #[test]
    fn activation_sets_the_receive_offloads_the_guest_accepted() {
        let tap = Arc::new(FakeTap::default());
        let mut net = net_with(std::slice::from_ref(&tap), params());

        net.activate(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4))
            .unwrap();

        assert_eq!(
            *tap.offload.lock().unwrap(),
            Some(tun_offload::CSUM | tun_offload::TSO4)
        );
    }

    #[test]
    fn offloads_switched_off_are_not_offered_and_tso_needs_csum() {
        let tap = Arc::new(FakeTap::default());
        let net = net_with(
            &[tap],
            NetParams {
                offload_csum: false,
                mtu: None,
                ..params()
            },
        );

        let features = net.features();

        assert_eq!(
            features,
            bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS),
            "{features:#x}"
        );
    }

    #[test]
    fn config_space_holds_mac_link_up_pairs_and_mtu() {
        let tap = Arc::new(FakeTap::default());
        let net = net_with(&[tap], params());
        let mut config = [0u8; 12];

        net.read_config(0, &mut config);

        assert_eq!(
            config,
            [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 1, 0, 1, 0, 0x78, 0x05]
        );
    }

    #[test]
    fn saved_state_with_more_pairs_than_the_card_is_refused() {
        let tap = Arc::new(FakeTap::default());
        let mut net = net_with(&[tap], params());

        let result = net.set_state(NetState {
            active_pairs: 2,
            ..NetState::default()
        });

        assert!(matches!(result, Err(VirtioError::Unsupported(_))));
    }
}
