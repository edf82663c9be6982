//! virtio-console: one port (no MULTIPORT), receiveq 0 and transmitq 1.
//!
//! Guest output (transmitq) goes straight to a host writer (tty, file or sink). Host input is
//! pushed with [`Console::push_input`] into a bounded buffer; the VMM then kicks queue 0 through
//! the transport and `process_queue(0, ..)` copies what fits into the driver's receive buffers.
//! Input not yet delivered is part of [`ConsoleState`], so nothing typed is lost across a live
//! update.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::virtio::device::{VirtioDevice, VirtioError};

/// The device offers `cols`/`rows` in its config space (virtio 1.2, 5.3.3).
const VIRTIO_CONSOLE_F_SIZE: u32 = 0;

/// Receive queue: host to guest.
const RECEIVEQ: u16 = 0;
/// Transmit queue: guest to host.
const TRANSMITQ: u16 = 1;
/// Size of each queue.
const QUEUE_SIZE: u16 = 256;

/// Terminal size reported to the guest.
const COLS: u16 = 80;
/// Terminal size reported to the guest.
const ROWS: u16 = 25;

/// Most host input held while the guest is not reading; later input is dropped.
pub const INPUT_CAPACITY: usize = 64 * 1024;

/// Counters, reported by `vm.counters` and kept across a live update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleCounters {
    /// Guest output bytes handed to the writer.
    pub tx_bytes: u64,
    /// Host input bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Host input bytes dropped because the pending buffer was full.
    pub rx_dropped_bytes: u64,
}

/// The device's own state; the transport saves queues, status and its feature words itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Features the driver acknowledged at activation (0 before).
    pub acked_features: u64,
    /// Host input not yet delivered to the guest, oldest first (at most [`INPUT_CAPACITY`]).
    pub pending_input: Vec<u8>,
    /// Counters so far.
    pub counters: ConsoleCounters,
}

impl liveupdate::state::Versioned for ConsoleState {
    const VERSION: u16 = 1;
}

/// A virtio console with a single port.
pub struct Console {
    output: Box<dyn Write + Send>,
    pending_input: VecDeque<u8>,
    acked_features: u64,
    counters: ConsoleCounters,
    /// The last output write failed (logged once).
    output_broken: bool,
}

impl Console {
    /// A console writing guest output to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        Self {
            output,
            pending_input: VecDeque::new(),
            acked_features: 0,
            counters: ConsoleCounters::default(),
            output_broken: false,
        }
    }

    /// Queues host input for the guest; returns how many bytes were dropped because the buffer
    /// was full (the newest ones). Kick queue 0 afterwards to deliver it.
    pub fn push_input(&mut self, input: &[u8]) -> usize {
        let room = INPUT_CAPACITY.saturating_sub(self.pending_input.len());
        let accepted = input.len().min(room);
        self.pending_input.extend(&input[..accepted]);
        let dropped = input.len() - accepted;
        if dropped > 0 {
            warn!("virtio-console: input buffer full, dropped {dropped} bytes");
            self.counters.rx_dropped_bytes += dropped as u64;
        }
        dropped
    }

    /// Bytes waiting for receive buffers.
    pub fn pending_input_len(&self) -> usize {
        self.pending_input.len()
    }

    /// Copies pending input into receive buffers until either runs out; buffers stay available
    /// while there is nothing to deliver.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let mut used_any = false;
        while !self.pending_input.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut written = 0u32;
            for desc in chain.writable() {
                let n = self.fill(mem, desc.addr(), desc.len());
                written += n;
                if n < desc.len() {
                    break;
                }
            }
            self.counters.rx_bytes += u64::from(written);
            queue
                .add_used(mem, head, written)
                .map_err(|source| VirtioError::Queue {
                    queue: RECEIVEQ,
                    source,
                })?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Moves up to `len` pending bytes to guest address `addr`; returns how many.
    fn fill(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> u32 {
        let n = self.pending_input.len().min(len as usize);
        let bytes = &self.pending_input.make_contiguous()[..n];
        if !mem.check_range(addr, n) || mem.write_slice(bytes, addr).is_err() {
            debug!(
                "virtio-console: receive buffer at {:#x} outside guest memory",
                addr.0
            );
            return 0;
        }
        self.pending_input.drain(..n);
        // n <= len, a u32.
        u32::try_from(n).unwrap_or(len)
    }

    /// Writes every transmit buffer to the output.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, VirtioError> {
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for desc in chain.readable() {
                if !mem.check_range(desc.addr(), desc.len() as usize) {
                    debug!(
                        "virtio-console: transmit buffer at {:#x} unreadable",
                        desc.addr().0
                    );
                    break;
                }
                self.emit(mem, desc.addr(), desc.len() as usize);
            }
            queue
                .add_used(mem, head, 0)
                .map_err(|source| VirtioError::Queue {
                    queue: TRANSMITQ,
                    source,
                })?;
            used_any = true;
        }
        if let Err(err) = self.output.flush() {
            self.output_failed(&err);
        }
        Ok(used_any)
    }

    /// Hands `len` bytes of guest output at `addr` (checked to be in guest memory) to the
    /// writer, a small chunk at a time so a huge descriptor costs no huge allocation. A failing
    /// writer loses the output, not the device.
    fn emit(&mut self, mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
        const CHUNK: usize = 4096;
        let mut chunk = [0u8; CHUNK];
        for (at, n) in (0..len).step_by(CHUNK).map(|at| (at, CHUNK.min(len - at))) {
            let data = &mut chunk[..n];
            let result = mem
                .read_slice(data, addr.unchecked_add(at as u64))
                .map_err(std::io::Error::other)
                .and_then(|()| self.output.write_all(data));
            if let Err(err) = result {
                self.output_failed(&err);
                return;
            }
            self.output_broken = false;
            self.counters.tx_bytes += n as u64;
        }
    }

    /// Logs an output failure: a warning the first time, then debug until a write succeeds,
    /// so a guest printing into a closed terminal cannot flood the log.
    fn output_failed(&mut self, err: &std::io::Error) {
        if self.output_broken {
            debug!("virtio-console: output still failing: {err}");
        } else {
            warn!("virtio-console: output failed, guest output is lost until it recovers: {err}");
            self.output_broken = true;
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending_input", &self.pending_input.len())
            .field("acked_features", &self.acked_features)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl VirtioDevice for Console {
    type State = ConsoleState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_CONSOLE_F_SIZE | 1 << VIRTIO_RING_F_INDIRECT_DESC | 1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows; max_nr_ports and emerg_wr need features we do not offer.
        let [c0, c1] = COLS.to_le_bytes();
        let [r0, r1] = ROWS.to_le_bytes();
        let config = [c0, c1, r0, r1];
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = start
                .checked_add(i)
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr (offset 8) needs VIRTIO_CONSOLE_F_EMERG_WRITE, which we do not offer.
        debug!(
            "virtio-console: ignoring config write at {offset} ({} bytes)",
            data.len()
        );
    }

    fn activate(&mut self, acked_features: u64) -> Result<(), VirtioError> {
        self.acked_features = acked_features;
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
        match index {
            RECEIVEQ => self.receive(queue, mem),
            TRANSMITQ => self.transmit(queue, mem),
            _ => Err(VirtioError::Unsupported(format!(
                "virtio-console queue {index}"
            ))),
        }
    }

    fn reset(&mut self) {
        // Pending input stays: it was typed for the guest and goes out once a driver is back.
        self.acked_features = 0;
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let c = self.counters;
        [
            ("tx_bytes", c.tx_bytes),
            ("rx_bytes", c.rx_bytes),
            ("rx_dropped_bytes", c.rx_dropped_bytes),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect()
    }

    fn state(&self) -> ConsoleState {
        ConsoleState {
            acked_features: self.acked_features,
            pending_input: self.pending_input.iter().copied().collect(),
            counters: self.counters,
        }
    }

    fn set_state(&mut self, state: ConsoleState) -> Result<(), VirtioError> {
        if state.pending_input.len() > INPUT_CAPACITY {
            return Err(VirtioError::Unsupported(format!(
                "{} bytes of pending console input, more than {INPUT_CAPACITY}",
                state.pending_input.len()
            )));
        }
        self.acked_features = state.acked_features;
        self.pending_input = state.pending_input.into();
        self.counters = state.counters;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::virtio::test_driver::{Desc, TestQueue, guest_memory};

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct SharedOutput(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOutput {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        rx_driver: TestQueue,
        rx: Queue,
        tx_driver: TestQueue,
        tx: Queue,
        console: Console,
        output: SharedOutput,
    }

    impl Harness {
        fn new() -> Self {
            let mem = guest_memory(0x10_0000);
            let rx_driver = TestQueue::new(GuestAddress(0x1000), 16);
            let tx_driver = TestQueue::new(GuestAddress(0x2000), 16);
            let rx = rx_driver.create_queue(&mem);
            let tx = tx_driver.create_queue(&mem);
            let output = SharedOutput::default();
            let console = Console::new(Box::new(output.clone()));
            Self {
                mem,
                rx_driver,
                rx,
                tx_driver,
                tx,
                console,
                output,
            }
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_in_order() {
        let mut h = Harness::new();
        h.mem
            .write_slice(b"hello ", GuestAddress(0x1_0000))
            .unwrap();
        h.mem
            .write_slice(b"world\n", GuestAddress(0x1_1000))
            .unwrap();
        h.tx_driver
            .add_chain(&h.mem, &[Desc::readable(0x1_0000, 6)]);
        h.tx_driver
            .add_chain(&h.mem, &[Desc::readable(0x1_1000, 6)]);

        let used = h
            .console
            .process_queue(TRANSMITQ, &mut h.tx, &h.mem)
            .unwrap();

        assert!(used);
        assert_eq!(*h.output.0.lock().unwrap(), b"hello world\n");
        assert_eq!(h.tx_driver.used_idx(&h.mem), 2);
        assert_eq!(h.tx_driver.used_entry(&h.mem, 1), (1, 0));
        assert_eq!(h.console.counters()["tx_bytes"], 12);
    }

    #[test]
    fn transmit_buffer_outside_memory_is_returned_without_output() {
        let mut h = Harness::new();
        h.tx_driver
            .add_chain(&h.mem, &[Desc::readable(0xff_f000, 0x2000)]);

        let used = h
            .console
            .process_queue(TRANSMITQ, &mut h.tx, &h.mem)
            .unwrap();

        assert!(used);
        assert!(h.output.0.lock().unwrap().is_empty());
        assert_eq!(h.tx_driver.used_idx(&h.mem), 1);
    }

    #[test]
    fn failing_writer_still_returns_transmit_buffers() {
        struct BrokenPipe;
        impl Write for BrokenPipe {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
        }
        let mut h = Harness::new();
        h.console = Console::new(Box::new(BrokenPipe));
        h.tx_driver
            .add_chain(&h.mem, &[Desc::readable(0x1_0000, 6)]);
        h.tx_driver
            .add_chain(&h.mem, &[Desc::readable(0x1_1000, 6)]);

        let used = h
            .console
            .process_queue(TRANSMITQ, &mut h.tx, &h.mem)
            .unwrap();

        assert!(used);
        assert_eq!(h.tx_driver.used_idx(&h.mem), 2);
        assert_eq!(h.console.counters()["tx_bytes"], 0);
    }

    #[test]
    fn pushed_input_fills_small_receive_buffers_in_order() {
        let mut h = Harness::new();
        h.rx_driver
            .add_chain(&h.mem, &[Desc::writable(0x1_0000, 4)]);
        h.rx_driver.add_chain(
            &h.mem,
            &[Desc::writable(0x1_1000, 2), Desc::writable(0x1_2000, 3)],
        );
        h.rx_driver
            .add_chain(&h.mem, &[Desc::writable(0x1_3000, 8)]);
        h.console.push_input(b"abcdefghijk");

        let used = h
            .console
            .process_queue(RECEIVEQ, &mut h.rx, &h.mem)
            .unwrap();

        assert!(used);
        assert_eq!(h.rx_driver.used_idx(&h.mem), 3);
        assert_eq!(h.rx_driver.used_entry(&h.mem, 0), (0, 4));
        assert_eq!(h.rx_driver.used_entry(&h.mem, 1), (1, 5));
        assert_eq!(h.rx_driver.used_entry(&h.mem, 2), (3, 2));
        assert_eq!(h.guest_bytes(0x1_0000, 4), b"abcd");
        assert_eq!(h.guest_bytes(0x1_1000, 2), b"ef");
        assert_eq!(h.guest_bytes(0x1_2000, 3), b"ghi");
        assert_eq!(h.guest_bytes(0x1_3000, 2), b"jk");
        assert_eq!(h.console.counters()["rx_bytes"], 11);
    }

    #[test]
    fn input_beyond_buffers_waits_for_the_next_buffer() {
        let mut h = Harness::new();
        h.rx_driver
            .add_chain(&h.mem, &[Desc::writable(0x1_0000, 3)]);
        h.console.push_input(b"12345");
        h.console
            .process_queue(RECEIVEQ, &mut h.rx, &h.mem)
            .unwrap();
        h.rx_driver
            .add_chain(&h.mem, &[Desc::writable(0x1_1000, 8)]);

        h.console
            .process_queue(RECEIVEQ, &mut h.rx, &h.mem)
            .unwrap();

        assert_eq!(h.guest_bytes(0x1_0000, 3), b"123");
        assert_eq!(h.guest_bytes(0x1_1000, 2), b"45");
        assert_eq!(h.rx_driver.used_entry(&h.mem, 1), (1, 2));
        assert_eq!(h.console.pending_input_len(), 0);
    }

    #[test]
    fn receive_without_input_leaves_buffers_available() {
        let mut h = Harness::new();
        h.rx_driver
            .add_chain(&h.mem, &[Desc::writable(0x1_0000, 8)]);

        let used = h
            .console
            .process_queue(RECEIVEQ, &mut h.rx, &h.mem)
            .unwrap();

        assert!(!used);
        assert_eq!(h.rx_driver.used_idx(&h.mem), 0);
    }

    #[test]
    fn input_past_capacity_is_dropped_and_reported() {
        let mut console = Console::new(Box::new(std::io::sink()));
        console.push_input(&vec![b'x'; INPUT_CAPACITY - 10]);

        let dropped = console.push_input(&[b'y'; 25]);

        assert_eq!(dropped, 15);
        assert_eq!(console.pending_input_len(), INPUT_CAPACITY);
        assert_eq!(console.counters()["rx_dropped_bytes"], 15);
    }

    #[test]
    fn state_round_trip_keeps_pending_input() {
        let mut h = Harness::new();
        h.console.activate(1 << VIRTIO_CONSOLE_F_SIZE).unwrap();
        h.console.push_input(b"typed before the update");
        let json = serde_json::to_string(&h.console.state()).unwrap();
        let mut restored = Harness::new();

        restored
            .console
            .set_state(serde_json::from_str(&json).unwrap())
            .unwrap();
        restored
            .rx_driver
            .add_chain(&restored.mem, &[Desc::writable(0x1_0000, 64)]);
        restored
            .console
            .process_queue(RECEIVEQ, &mut restored.rx, &restored.mem)
            .unwrap();

        assert_eq!(
            restored.console.state().acked_features,
            1 << VIRTIO_CONSOLE_F_SIZE
        );
        assert_eq!(
            restored.guest_bytes(0x1_0000, 23),
            b"typed before the update"
        );
    }

    #[test]
    fn state_with_oversized_pending_input_is_refused() {
        let mut console = Console::new(Box::new(std::io::sink()));
        let state = ConsoleState {
            pending_input: vec![0; INPUT_CAPACITY + 1],
            ..ConsoleState::default()
        };

        let result = console.set_state(state);

        assert!(
            matches!(result, Err(VirtioError::Unsupported(_))),
            "{result:?}"
        );
    }

    #[test]
    fn config_space_reports_80_by_25() {
        let console = Console::new(Box::new(std::io::sink()));
        let mut config = [0xffu8; 8];

        console.read_config(0, &mut config);

        assert_eq!(config, [80, 0, 25, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn unknown_queue_index_is_an_error() {
        let mut h = Harness::new();

        let result = h.console.process_queue(2, &mut h.rx, &h.mem);

        assert!(
            matches!(result, Err(VirtioError::Unsupported(_))),
            "{result:?}"
        );
    }
}
