//! MSI-X: the capability's message control, the vector table and the pending-bit array.
//!
//! Every change that alters where a vector goes (entry written, entry masked or unmasked,
//! MSI-X enabled or disabled, function mask) is pushed to [`MsiVectors::configure`] so the
//! VMM can update its GSI routing; [`MsixConfig::trigger`] delivers or marks pending.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::{merge_bytes, read_bytes};
use crate::interrupt::{MsiMessage, MsiVectors};

/// PCI capability id of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors one function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;

/// One MSI-X table entry as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    /// Message address, low dword.
    pub address_low: u32,
    /// Message address, high dword.
    pub address_high: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub vector_control: u32,
}

impl Default for MsixTableEntry {
    /// Entries start masked (PCI spec).
    fn default() -> Self {
        Self {
            address_low: 0,
            address_high: 0,
            data: 0,
            vector_control: VECTOR_CONTROL_MASKED,
        }
    }
}

impl MsixTableEntry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_CONTROL_MASKED != 0
    }

    fn dword(&self, index: usize) -> u32 {
        [
            self.address_low,
            self.address_high,
            self.data,
            self.vector_control,
        ][index]
    }

    fn set_dword(&mut self, index: usize, value: u32) {
        match index {
            0 => self.address_low = value,
            1 => self.address_high = value,
            2 => self.data = value,
            // Only the mask bit of vector control is writable.
            _ => self.vector_control = value & VECTOR_CONTROL_MASKED,
        }
    }
}

/// MSI-X state saved across a live update.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The vector table.
    pub table: Vec<MsixTableEntry>,
    /// Pending bits, one per vector.
    pub pending: Vec<bool>,
    /// MSI-X enable bit of message control.
    pub enabled: bool,
    /// Function mask bit of message control.
    pub function_masked: bool,
}

/// MSI-X of one PCI function.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    msi: Arc<dyn MsiVectors>,
}

impl fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixConfig")
            .field("state", &self.state())
            .finish()
    }
}

impl MsixConfig {
    /// `num_vectors` masked vectors (1..=2048), MSI-X disabled.
    pub fn new(num_vectors: u16, msi: Arc<dyn MsiVectors>) -> Self {
        let count = usize::from(num_vectors.clamp(1, MSIX_MAX_VECTORS));
        Self {
            table: vec![MsixTableEntry::default(); count],
            pending: vec![false; count],
            enabled: false,
            function_masked: false,
            msi,
        }
    }

    /// Rebuilds from a saved state and pushes every live vector to `msi`. `None` when the
    /// state's table is empty, too large or inconsistent with its pending bits.
    pub fn from_state(state: &MsixState, msi: Arc<dyn MsiVectors>) -> Option<Self> {
        let count = state.table.len();
        if count == 0 || count > usize::from(MSIX_MAX_VECTORS) || state.pending.len() != count {
            return None;
        }
        let config = Self {
            table: state.table.clone(),
            pending: state.pending.clone(),
            enabled: state.enabled,
            function_masked: state.function_masked,
            msi,
        };
        for vector in 0..count {
            if let Some(message) = config.route(vector) {
                config.configure(vector, Some(message));
            }
        }
        Some(config)
    }

    /// The state to save.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The capability bytes (id first) for a table at `table_offset` in BAR `table_bar` and a
    /// PBA at `pba_offset` in BAR `pba_bar`; offsets must be 8-byte aligned.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Vec<u8> {
        let mut body = vec![MSIX_CAPABILITY_ID, 0];
        body.extend_from_slice(&self.control().to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        body
    }

    /// Message control register.
    pub fn control(&self) -> u16 {
        let mut control = self.num_vectors() - 1;
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// The guest wrote message control.
    pub fn set_control(&mut self, control: u16) {
        let before: Vec<Option<MsiMessage>> =
            (0..self.table.len()).map(|v| self.route(v)).collect();
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        for (vector, old) in before.into_iter().enumerate() {
            self.update(vector, old);
        }
    }

    /// Where `vector` goes now, or `None` when it cannot fire.
    fn route(&self, vector: usize) -> Option<MsiMessage> {
        let entry = self.table.get(vector)?;
        (self.enabled && !self.function_masked && !entry.masked()).then(|| MsiMessage {
            address: u64::from(entry.address_low) | (u64::from(entry.address_high) << 32),
            data: entry.data,
        })
    }

    fn configure(&self, vector: usize, message: Option<MsiMessage>) {
        if let Err(e) = self.msi.configure(vector as u16, message) {
            log::warn!("MSI-X vector {vector} configure failed: {e}");
        }
    }

    fn deliver(&self, vector: usize) {
        if let Err(e) = self.msi.trigger(vector as u16) {
            log::warn!("MSI-X vector {vector} trigger failed: {e}");
        }
    }

    /// After a change: tell the VMM if the route moved, deliver a pending vector that can fire.
    fn update(&mut self, vector: usize, old: Option<MsiMessage>) {
        let new = self.route(vector);
        if new != old {
            self.configure(vector, new);
        }
        if new.is_some() && self.pending[vector] {
            self.pending[vector] = false;
            self.deliver(vector);
        }
    }

    /// Reads the table at `offset` (within the table, any width up to 8, dword aligned).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (chunk_index, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * chunk_index as u64;
            let value = self.table_dword(at).unwrap_or(0);
            read_bytes(value, (at % 4) as usize, chunk);
        }
    }

    fn table_dword(&self, offset: u64) -> Option<u32> {
        let entry = self
            .table
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        Some(entry.dword(((offset % MSIX_ENTRY_SIZE) / 4) as usize))
    }

    /// Writes the table at `offset` (within the table, any width up to 8).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        for (chunk_index, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * chunk_index as u64;
            let Some(current) = self.table_dword(at) else {
                log::debug!("MSI-X table write at {at:#x} out of range ignored");
                continue;
            };
            let vector = (at / MSIX_ENTRY_SIZE) as usize;
            let old = self.route(vector);
            let value = merge_bytes(current, (at % 4) as usize, chunk);
            self.table[vector].set_dword(((at % MSIX_ENTRY_SIZE) / 4) as usize, value);
            self.update(vector, old);
        }
    }

    /// Reads the pending-bit array at `offset`; writes to it are ignored (read-only).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let first_bit = (offset + i as u64) * 8;
            let mut byte = 0u8;
            for bit in 0..8u64 {
                let pending = usize::try_from(first_bit + bit)
                    .ok()
                    .and_then(|v| self.pending.get(v).copied())
                    .unwrap_or(false);
                byte |= u8::from(pending) << bit;
            }
            *out = byte;
        }
    }

    /// Signals `vector`: delivered if it can fire, otherwise its pending bit is set. Out of
    /// range vectors are ignored.
    pub fn trigger(&mut self, vector: u16) {
        let vector = usize::from(vector);
        if vector >= self.table.len() {
            log::debug!("MSI-X trigger of unknown vector {vector} ignored");
            return;
        }
        if self.route(vector).is_some() {
            self.deliver(vector);
        } else {
            self.pending[vector] = true;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io;
    use std::sync::Mutex;

    use super::*;

    /// What a fake `MsiVectors` saw.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum MsiEvent {
        Configure(u16, Option<MsiMessage>),
        Trigger(u16),
    }

    /// Records every call, for tests here and in the virtio transport.
    #[derive(Debug, Default)]
    pub(crate) struct RecordingMsi {
        pub(crate) events: Mutex<Vec<MsiEvent>>,
    }

    impl RecordingMsi {
        pub(crate) fn take(&self) -> Vec<MsiEvent> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }

        pub(crate) fn triggers(&self) -> Vec<u16> {
            let events = self.events.lock().unwrap();
            events
                .iter()
                .filter_map(|e| match e {
                    MsiEvent::Trigger(v) => Some(*v),
                    MsiEvent::Configure(..) => None,
                })
                .collect()
        }
    }

    impl MsiVectors for RecordingMsi {
        fn configure(&self, vector: u16, message: Option<MsiMessage>) -> io::Result<()> {
            self.events
                .lock()
                .unwrap()
                .push(MsiEvent::Configure(vector, message));
            Ok(())
        }
        fn trigger(&self, vector: u16) -> io::Result<()> {
            self.events.lock().unwrap().push(MsiEvent::Trigger(vector));
            Ok(())
        }
    }

    const MESSAGE: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };

    fn program_entry(msix: &mut MsixConfig, vector: u64, masked: bool) {
        let base = vector * MSIX_ENTRY_SIZE;
        msix.write_table(base, &MESSAGE.address.to_le_bytes());
        msix.write_table(base + 8, &MESSAGE.data.to_le_bytes());
        msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    fn enabled_msix() -> (Arc<RecordingMsi>, MsixConfig) {
        let msi = Arc::new(RecordingMsi::default());
        let mut msix = MsixConfig::new(2, msi.clone());
        msix.set_control(CONTROL_ENABLE);
        (msi, msix)
    }

    #[test]
    fn masked_vector_trigger_sets_pending_bit_without_delivery() {
        let (msi, mut msix) = enabled_msix();
        program_entry(&mut msix, 1, true);
        msi.take();

        msix.trigger(1);
        let mut pba = [0u8; 8];
        msix.read_pba(0, &mut pba);

        assert_eq!(msi.take(), vec![]);
        assert_eq!(pba[0], 0b10);
    }

    #[test]
    fn unmasking_pending_vector_configures_delivers_and_clears_bit() {
        let (msi, mut msix) = enabled_msix();
        program_entry(&mut msix, 1, true);
        msix.trigger(1);
        msi.take();

        msix.write_table(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
        let mut pba = [0u8; 1];
        msix.read_pba(0, &mut pba);

        assert_eq!(
            msi.take(),
            vec![MsiEvent::Configure(1, Some(MESSAGE)), MsiEvent::Trigger(1)]
        );
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn unmasked_vector_trigger_delivers_at_once() {
        let (msi, mut msix) = enabled_msix();
        program_entry(&mut msix, 0, false);
        msi.take();

        msix.trigger(0);

        assert_eq!(msi.take(), vec![MsiEvent::Trigger(0)]);
    }

    #[test]
    fn function_mask_disconnects_then_reconnects_and_delivers_pending() {
        let (msi, mut msix) = enabled_msix();
        program_entry(&mut msix, 0, false);
        msi.take();

        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        msix.trigger(0);
        let while_masked = msi.take();
        msix.set_control(CONTROL_ENABLE);

        assert_eq!(while_masked, vec![MsiEvent::Configure(0, None)]);
        assert_eq!(
            msi.take(),
            vec![MsiEvent::Configure(0, Some(MESSAGE)), MsiEvent::Trigger(0)]
        );
    }

    #[test]
    fn entries_start_masked_and_control_reports_table_size() {
        let msi = Arc::new(RecordingMsi::default());
        let msix = MsixConfig::new(3, msi);
        let mut control = [0u8; 4];

        msix.read_table(12, &mut control);

        assert_eq!(u32::from_le_bytes(control), 1);
        assert_eq!(msix.control(), 2);
    }

    #[test]
    fn state_round_trip_reconfigures_live_vectors() {
        let (_, mut msix) = enabled_msix();
        program_entry(&mut msix, 1, false);
        let state = msix.state();
        let msi = Arc::new(RecordingMsi::default());

        let restored = MsixConfig::from_state(&state, msi.clone()).unwrap();

        assert_eq!(restored.state(), state);
        assert_eq!(msi.take(), vec![MsiEvent::Configure(1, Some(MESSAGE))]);
    }
}
