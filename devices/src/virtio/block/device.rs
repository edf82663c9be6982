//! The virtio-blk device as the transport sees it: features, config space, queue handling,
//! counters and state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use log::debug;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::disk::{BlockError, Disk, SECTOR_SIZE};
use super::request::handle_chain;
use super::state::{BlockCounters, BlockState};
use crate::virtio::device::{VirtioDevice, VirtioError};

/// Size of the single request queue.
const QUEUE_SIZE: u16 = 256;

/// Data segments per request we announce: the queue size minus header and status (any count
/// works, indirect tables included; this only tells the driver how large to build requests).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Length of the config space we fill: capacity, size_max, seg_max, geometry, blk_size.
const CONFIG_LEN: usize = 24;

/// Device-specific feature bits (0..=23) plus the ring features a device may offer.
const DEVICE_FEATURE_MASK: u64 =
    0x00ff_ffff | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX;

/// How to build a [`Block`] device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image or host block device.
    pub path: PathBuf,
    /// Refuse guest writes (and open the file read-only).
    pub readonly: bool,
    /// GET_ID answer (first 20 bytes); derived from `path` when `None`.
    pub serial: Option<String>,
}

/// A virtio-blk device with one request queue.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    acked_features: u64,
    counters: BlockCounters,
}

impl Block {
    /// Opens the image; errors name the path.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let disk = Disk::open(&config.path, config.readonly, config.serial.as_deref())?;
        Ok(Self {
            disk,
            acked_features: 0,
            counters: BlockCounters::default(),
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// Disk size in 512-byte sectors, as the config space reports it.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors()
    }

    /// Records the negotiated features. A driver without FLUSH assumes there is no write cache
    /// (Linux does), so every write is then synced before it completes.
    fn set_acked_features(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
        self.disk
            .set_writethrough(acked_features & 1 << VIRTIO_BLK_F_FLUSH == 0);
    }

    /// The config space bytes (virtio 1.2, 5.2.4).
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&self.disk.capacity_sectors().to_le_bytes());
        // size_max (8..12) stays 0: not offered, segments may be any size.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        // geometry (16..20) stays 0: not offered.
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }

    /// Pops and completes every available request. The transport suppresses notifications
    /// around this and calls again if the driver added buffers meanwhile (EVENT_IDX included).
    fn process_requests(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = handle_chain(chain, mem, &mut self.disk, &mut self.counters);
            queue
                .add_used(mem, head, used_len)
                .map_err(|source| VirtioError::Queue { queue: 0, source })?;
            used_any = true;
        }
        Ok(used_any)
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        if self.disk.readonly() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            // Past the fields we implement reads as zero.
            *byte = start
                .checked_add(i)
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which we do not offer.
        debug!(
            "virtio-blk {}: ignoring config write at {offset} ({} bytes)",
            self.path().display(),
            data.len()
        );
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.set_acked_features(acked_features);
        Ok(())
    }

    fn ready_fds(&self) -> Vec<(std::os::fd::RawFd, u16)> {
        Vec::new()
    }

    fn needs_notification(&self, _index: u16) -> bool {
        true
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, VirtioError> {
        if index != 0 {
            return Err(VirtioError::Unsupported(format!(
                "virtio-blk queue {index}"
            )));
        }
        self.process_requests(queue, mem)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = self.counters;
        [
            ("read_bytes", c.read_bytes),
            ("write_bytes", c.write_bytes),
            ("read_ops", c.read_ops),
            ("write_ops", c.write_ops),
            ("flush_ops", c.flush_ops),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    fn state(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            counters: self.counters,
        }
    }

    fn set_state(&mut self, state: BlockState) -> Result<(), VirtioError> {
        // A driver that acked what this device does not offer (say RO, now that the disk is
        // writable) was negotiated against another configuration.
        let foreign = state.acked_features & DEVICE_FEATURE_MASK & !self.features();
        if foreign != 0 {
            return Err(VirtioError::Unsupported(format!(
                "acked virtio-blk features {foreign:#x} that this disk does not offer"
            )));
        }
        self.set_acked_features(state.acked_features);
        self.counters = state.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::test_driver::{Desc, TestQueue, guest_memory};

    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    /// A disk image in the temp dir, removed on drop.
    struct TempImage(PathBuf);

    impl TempImage {
        fn new(contents: &[u8]) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "blkcon-test-{}-{}.raw",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }

        fn contents(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A block device on a temp image, driven through a test queue.
    struct Harness {
        mem: GuestMemoryMmap,
        driver: TestQueue,
        queue: Queue,
        block: Block,
        image: TempImage,
    }

    impl Harness {
        fn new(contents: &[u8], readonly: bool) -> Self {
            let image = TempImage::new(contents);
            let config = BlockConfig {
                path: image.0.clone(),
                readonly,
                serial: None,
            };
            let block = Block::new(&config).unwrap();
            let mem = guest_memory(0x10_0000);
            let driver = TestQueue::new(GuestAddress(0x1000), QUEUE_SIZE);
            let queue = driver.create_queue(&mem);
            Self {
                mem,
                driver,
                queue,
                block,
                image,
            }
        }

        /// Pushes `chain`, runs the device; returns (status byte, used length).
        fn run(&mut self, chain: &[Desc]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self.driver.add_chain(&self.mem, chain);
            let used = self
                .block
                .process_queue(0, &mut self.queue, &self.mem)
                .unwrap();
            assert!(used, "the device used no buffer");
            let last = self.driver.used_idx(&self.mem).wrapping_sub(1);
            let (id, len) = self.driver.used_entry(&self.mem, last);
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        /// A request with one data buffer of `data_len` bytes at DATA.
        fn request(&mut self, kind: u32, sector: u64, data_len: u32) -> (u8, u32) {
            self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER + 8))
                .unwrap();
            let mut chain = vec![Desc::readable(HEADER, 16)];
            match kind {
                _ if data_len == 0 => {}
                VIRTIO_BLK_T_OUT => chain.push(Desc::readable(DATA, data_len)),
                _ => chain.push(Desc::writable(DATA, data_len)),
            }
            chain.push(Desc::writable(STATUS, 1));
            self.run(&chain)
        }

        fn guest_bytes(&self, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
            buf
        }
    }

    fn status(value: u32) -> u8 {
        u8::try_from(value).unwrap()
    }

    #[test]
    fn write_then_read_round_trips_through_the_queue() {
        let mut h = Harness::new(&[0; 8 * 512], false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        h.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();

        let written = h.request(VIRTIO_BLK_T_OUT, 2, 1024);
        h.mem.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        let read = h.request(VIRTIO_BLK_T_IN, 2, 1024);

        assert_eq!(written, (status(VIRTIO_BLK_S_OK), 1));
        assert_eq!(read, (status(VIRTIO_BLK_S_OK), 1025));
        assert_eq!(h.guest_bytes(1024), pattern);
        assert_eq!(&h.image.contents()[1024..2048], &pattern[..]);
    }

    #[test]
    fn read_spanning_several_buffers_fills_them_in_order() {
        let contents: Vec<u8> = (0..2048u32).map(|i| (i / 512) as u8 + 1).collect();
        let mut h = Harness::new(&contents, true);
        h.mem
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
            .unwrap();
        h.mem.write_obj(1u64, GuestAddress(HEADER + 8)).unwrap();
        let chain = [
            Desc::readable(HEADER, 16),
            Desc::writable(DATA + 512, 512),
            Desc::writable(DATA, 512),
            Desc::writable(STATUS, 1),
        ];

        let outcome = h.run(&chain);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_OK), 1025));
        assert_eq!(h.guest_bytes(1024), [[3u8; 512], [2u8; 512]].concat());
    }

    #[test]
    fn read_through_indirect_descriptor_table_completes() {
        let mut h = Harness::new(&[0x42; 1024], false);
        h.mem
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
            .unwrap();
        h.mem.write_obj(1u64, GuestAddress(HEADER + 8)).unwrap();
        // Indirect table: header, data, status (flags NEXT = 1, WRITE = 2).
        let table = 0x4_0000;
        let entries: [(u64, u32, u16, u16); 3] =
            [(HEADER, 16, 1, 1), (DATA, 512, 3, 2), (STATUS, 1, 2, 0)];
        for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
            let entry = table + 16 * i as u64;
            h.mem.write_obj(addr, GuestAddress(entry)).unwrap();
            h.mem.write_obj(len, GuestAddress(entry + 8)).unwrap();
            h.mem.write_obj(flags, GuestAddress(entry + 12)).unwrap();
            h.mem.write_obj(next, GuestAddress(entry + 14)).unwrap();
        }
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let head = h.driver.add_chain(&h.mem, &[Desc::readable(table, 48)]);
        let head_flags = h.driver.desc_table() + 16 * u64::from(head) + 12;
        h.mem
            .write_obj(VRING_DESC_F_INDIRECT as u16, GuestAddress(head_flags))
            .unwrap();

        let used = h.block.process_queue(0, &mut h.queue, &h.mem).unwrap();

        assert!(used);
        assert_eq!(h.driver.used_entry(&h.mem, 0), (u32::from(head), 513));
        assert_eq!(
            h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            status(VIRTIO_BLK_S_OK)
        );
        assert_eq!(h.guest_bytes(512), vec![0x42; 512]);
    }

    #[test]
    fn flush_completes_with_ok() {
        let mut h = Harness::new(&[0; 512], false);

        let outcome = h.request(VIRTIO_BLK_T_FLUSH, 0, 0);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_OK), 1));
        assert_eq!(h.block.counters()["flush_ops"], 1);
    }

    #[test]
    fn get_id_returns_configured_serial() {
        let image = TempImage::new(&[0; 512]);
        let config = BlockConfig {
            path: image.0.clone(),
            readonly: true,
            serial: Some("disk-7".into()),
        };
        let mut h = Harness {
            block: Block::new(&config).unwrap(),
            ..Harness::new(&[], true)
        };

        let outcome = h.request(VIRTIO_BLK_T_GET_ID, 0, 20);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_OK), 21));
        assert_eq!(h.guest_bytes(20), b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn write_to_readonly_disk_fails_and_leaves_file_unchanged() {
        let mut h = Harness::new(&[0x5a; 1024], true);
        h.mem.write_slice(&[0xa5; 512], GuestAddress(DATA)).unwrap();

        let outcome = h.request(VIRTIO_BLK_T_OUT, 0, 512);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_IOERR), 1));
        assert_eq!(h.image.contents(), vec![0x5a; 1024]);
        assert_eq!(h.block.counters()["write_ops"], 0);
    }

    #[test]
    fn read_past_end_of_disk_fails_with_ioerr() {
        let mut h = Harness::new(&[0; 4 * 512], false);

        let outcome = h.request(VIRTIO_BLK_T_IN, 3, 1024);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_IOERR), 1));
    }

    #[test]
    fn write_with_huge_sector_fails_with_ioerr() {
        let mut h = Harness::new(&[0; 512], false);

        let outcome = h.request(VIRTIO_BLK_T_OUT, u64::MAX, 512);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_IOERR), 1));
        assert_eq!(h.image.contents(), vec![0; 512]);
    }

    #[test]
    fn partial_sector_read_fails_with_ioerr() {
        let mut h = Harness::new(&[0; 1024], false);

        let outcome = h.request(VIRTIO_BLK_T_IN, 0, 100);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_IOERR), 1));
    }

    #[test]
    fn unknown_request_type_gets_unsupp() {
        let mut h = Harness::new(&[0; 512], false);

        let outcome = h.request(11, 0, 0);

        assert_eq!(outcome, (status(VIRTIO_BLK_S_UNSUPP), 1));
    }

    #[test]
    fn malformed_chain_gets_ioerr_and_next_request_still_runs() {
        let mut h = Harness::new(&[0; 512], false);
        let short_header = [Desc::readable(HEADER, 8), Desc::writable(STATUS, 1)];

        let malformed = h.run(&short_header);
        let flush = h.request(VIRTIO_BLK_T_FLUSH, 0, 0);

        assert_eq!(malformed, (status(VIRTIO_BLK_S_IOERR), 1));
        assert_eq!(flush, (status(VIRTIO_BLK_S_OK), 1));
    }

    #[test]
    fn chain_without_status_byte_is_returned_unused() {
        let mut h = Harness::new(&[0; 512], false);

        let outcome = h.run(&[Desc::readable(HEADER, 16)]);

        assert_eq!(outcome, (0xff, 0));
    }

    #[test]
    fn config_space_reports_capacity_seg_max_and_block_size() {
        let h = Harness::new(&[0; 3 * 512 + 100], false);
        let mut capacity = [0u8; 8];
        let mut seg_max = [0u8; 4];
        let mut blk_size = [0u8; 4];
        let mut past_end = [0xffu8; 4];

        h.block.read_config(0, &mut capacity);
        h.block.read_config(12, &mut seg_max);
        h.block.read_config(20, &mut blk_size);
        h.block.read_config(0x100, &mut past_end);

        assert_eq!(u64::from_le_bytes(capacity), 3);
        assert_eq!(u32::from_le_bytes(seg_max), 254);
        assert_eq!(u32::from_le_bytes(blk_size), 512);
        assert_eq!(past_end, [0; 4]);
    }

    #[test]
    fn readonly_disk_offers_ro_feature() {
        let writable = Harness::new(&[0; 512], false);
        let readonly = Harness::new(&[0; 512], true);

        assert_eq!(writable.block.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(readonly.block.features() & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(readonly.block.features() & 1 << VIRTIO_BLK_F_FLUSH, 0);
    }

    #[test]
    fn counters_count_completed_requests_and_bytes() {
        let mut h = Harness::new(&[0; 4 * 512], false);

        h.request(VIRTIO_BLK_T_OUT, 0, 1024);
        h.request(VIRTIO_BLK_T_IN, 0, 512);
        h.request(VIRTIO_BLK_T_IN, 1, 1024);
        h.request(VIRTIO_BLK_T_IN, 4, 512);

        let expected: BTreeMap<String, u64> = [
            ("flush_ops", 0),
            ("read_bytes", 1536),
            ("read_ops", 2),
            ("write_bytes", 1024),
            ("write_ops", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(h.block.counters(), expected);
    }

    #[test]
    fn state_round_trip_restores_features_and_counters() {
        let mut h = Harness::new(&[0; 512], false);
        h.block.activate(1 << VIRTIO_BLK_F_FLUSH | 1 << 32).unwrap();
        h.request(VIRTIO_BLK_T_FLUSH, 0, 0);
        let saved = h.block.state();
        let mut restored = Harness::new(&[0; 512], false).block;

        restored.set_state(saved.clone()).unwrap();

        assert_eq!(restored.state(), saved);
        assert_eq!(restored.counters()["flush_ops"], 1);
    }

    #[test]
    fn state_acking_ro_is_refused_by_writable_disk() {
        let mut block = Harness::new(&[0; 512], false).block;
        let state = BlockState {
            acked_features: 1 << VIRTIO_BLK_F_RO,
            ..BlockState::default()
        };

        let result = block.set_state(state);

        assert!(
            matches!(result, Err(VirtioError::Unsupported(_))),
            "{result:?}"
        );
    }

    #[test]
    fn reset_forgets_acked_features() {
        let mut block = Harness::new(&[0; 512], false).block;
        block.activate(1 << VIRTIO_BLK_F_FLUSH).unwrap();

        block.reset();

        assert_eq!(block.state().acked_features, 0);
    }
}
