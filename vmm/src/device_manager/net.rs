//! Network cards: each card's taps (opened by name with the host side set up, or adopted from
//! fds), the virtio-net device on them, and the participant that carries the taps across a
//! live update.
//!
//! - **Restart mode**: the tap fds are attached to the session in prepare and the successor
//!   adopts the very same taps: no frame the tap queue holds is lost, and the guest's link
//!   never goes down.
//! - **Kexec mode**: no kernel can carry a tap across a kexec. A tap the VMM opened by name is
//!   created again by the restoring VMM (same name, MAC, MTU, queues, address), which reports
//!   it (`vm/net-recreated`) so the host can attach it to its bridge again. A card built on fds
//!   refuses the update in prepare, unless it has `kexec=fds`: then the operator passes new
//!   fds to the restoring VMM (`--restore ...,net_fds=[id@[fd,...]]`).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use devices::virtio::net::{Net, NetParams, TapQueue};
use liveupdate::participant::{AnyParticipant, FileSink, ParticipantError};
use liveupdate::session::{SessionError, Token};
use liveupdate::state::Envelope;
use serde::{Deserialize, Serialize};
use tap::{MacAddr, Tap};

use super::handover::handed_over;
use super::participants::envelope;
use super::pci::PciBuilder;
use super::{DeviceError, ids, restore_error};
use crate::config::{NetConfig, NetKexecPolicy};

/// How a card's taps reach the VMM that restores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TapHandover {
    /// Restart mode: the same tap fds, attached to the session under these tokens.
    Attached(Vec<Token>),
    /// Kexec mode: the restoring VMM creates the tap again by name.
    Recreate,
    /// Kexec mode: the operator passes new tap fds to the restoring VMM.
    OperatorFds,
}

/// What a card's tap participant saves (the device itself saves as `virtio/<id>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetTapState {
    /// The tap's interface name when saved.
    pub tap: String,
    /// How the taps come back.
    pub handover: TapHandover,
    /// The tap's host-side MAC when saved: a tap created again keeps it, so the guest's
    /// neighbour entry for its gateway stays right (the kernel would pick a random one).
    pub host_mac: Option<MacAddr>,
    /// The tap's MTU when saved, for the same reason.
    pub mtu: Option<u32>,
}

impl liveupdate::state::Versioned for NetTapState {
    const VERSION: u16 = 1;
}

/// One queue of a host tap, as the virtio-net device uses it.
#[derive(Debug)]
struct TapHandle(Arc<Tap>);

impl TapQueue for TapHandle {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.0.write(frame)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.0.set_offload(flags).map_err(io::Error::other)
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Tap fds the VMM got rather than opened (command line, API, the operator on a restore), by
/// card id: kept for the VM's lifetime, so a reboot builds the card on them again. A
/// process-wide slot: a VMM process runs one VM.
static GIVEN_TAP_FDS: Mutex<BTreeMap<String, Vec<OwnedFd>>> = Mutex::new(BTreeMap::new());

fn given_tap_fds() -> MutexGuard<'static, BTreeMap<String, Vec<OwnedFd>>> {
    GIVEN_TAP_FDS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records the tap fds card `id` was given (one per queue pair), replacing earlier ones.
pub fn give_tap_fds(id: &str, fds: Vec<OwnedFd>) {
    given_tap_fds().insert(id.to_string(), fds);
}

/// Takes the tap fds the command line names (`--net fd=[...]`), inherited by number, for
/// every card built on fds. A number that is not open is refused.
pub fn adopt_inherited_tap_fds(config: &crate::config::VmConfig) -> Result<(), DeviceError> {
    for (index, net) in config.net.iter().enumerate() {
        if let Some(numbers) = net.fds.as_ref().filter(|fds| !fds.is_empty()) {
            adopt_inherited_fds_for(&config.net_id(index), numbers)?;
        }
    }
    Ok(())
}

/// Takes inherited fds `numbers` as the taps of card `id` (`--restore net_fds=[id@[...]]`).
pub fn adopt_inherited_fds_for(id: &str, numbers: &[i32]) -> Result<(), DeviceError> {
    let fds = numbers
        .iter()
        .map(|&fd| {
            crate::sys::dup_inherited_fd(fd)
                .map_err(|e| net_error(id, &format!("fd {fd} is not open: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    give_tap_fds(id, fds);
    Ok(())
}

/// Forgets the fds card `id` was given (closing them): it is gone, or its hot-add failed.
pub fn forget_tap_fds(id: &str) {
    given_tap_fds().remove(id);
}

/// Copies of the fds card `id` was given.
fn copies_of_given(id: &str) -> Result<Vec<OwnedFd>, DeviceError> {
    let fds = given_tap_fds();
    let Some(fds) = fds.get(id) else {
        return Err(net_error(
            id,
            "the card is configured with tap fds, but none were passed (over the API they \
             travel as SCM_RIGHTS; on a restore after a kexec, with --restore net_fds=)",
        ));
    };
    copies(id, fds)
}

/// Copies of `fds`, tap fds of card `id`.
fn copies(id: &str, fds: &[OwnedFd]) -> Result<Vec<OwnedFd>, DeviceError> {
    fds.iter()
        .map(|fd| fd.try_clone())
        .collect::<io::Result<_>>()
        .map_err(|e| net_error(id, &format!("cannot copy a tap fd: {e}")))
}

fn net_error(id: &str, reason: &str) -> DeviceError {
    DeviceError::Net {
        id: id.to_string(),
        source: reason.to_string().into(),
    }
}

fn tap_error(id: &str) -> impl FnOnce(tap::TapError) -> DeviceError + '_ {
    move |e| DeviceError::Net {
        id: id.to_string(),
        source: Box::new(e),
    }
}

/// Frames a tap the VMM opens queues for the guest at least: room for what arrives during a
/// live update's pause at moderate rates (the kernel's default is 1000).
const TAP_QUEUE_FRAMES: u32 = 4096;

/// Opens (or creates) the card's tap by name, one queue per pair, and sets up its host side
/// as configured.
fn open_by_name(id: &str, config: &NetConfig, name: &str) -> Result<Vec<Tap>, DeviceError> {
    let taps = Tap::open(name, config.queue_pairs()).map_err(tap_error(id))?;
    let name = taps
        .first()
        .map(|t| t.name().to_string())
        .unwrap_or_default();
    if tap::tx_queue_len(&name).map_err(tap_error(id))? < TAP_QUEUE_FRAMES {
        tap::set_tx_queue_len(&name, TAP_QUEUE_FRAMES).map_err(tap_error(id))?;
    }
    if let Some(mac) = config.host_mac {
        tap::set_mac(&name, mac).map_err(tap_error(id))?;
    }
    if let Some(mtu) = config.mtu {
        tap::set_mtu(&name, mtu).map_err(tap_error(id))?;
    }
    if let Some(ip) = config.ip {
        let mask = config
            .mask
            .unwrap_or(std::net::Ipv4Addr::new(255, 255, 255, 0));
        tap::set_ipv4(&name, ip, mask).map_err(tap_error(id))?;
    }
    tap::set_up(&name).map_err(tap_error(id))?;
    Ok(taps)
}

/// Gives a tap created again the host-side MAC and MTU it had (unless the configuration
/// sets them, which `open_by_name` applied).
fn restore_host_side(id: &str, config: &NetConfig, saved: &NetTapState) -> Result<(), DeviceError> {
    if config.host_mac.is_none()
        && let Some(mac) = saved.host_mac
    {
        tap::set_mac(&saved.tap, mac).map_err(tap_error(id))?;
    }
    if config.mtu.is_none()
        && let Some(mtu) = saved.mtu.and_then(|mtu| u16::try_from(mtu).ok())
    {
        tap::set_mtu(&saved.tap, mtu).map_err(tap_error(id))?;
    }
    Ok(())
}

fn adopt(id: &str, fds: Vec<OwnedFd>) -> Result<Vec<Tap>, DeviceError> {
    fds.into_iter()
        .map(|fd| Tap::from_fd(fd).map_err(tap_error(id)))
        .collect()
}

/// A card's place in the configuration's list: attached, or removed from the running VM.
pub(super) enum NetSlot {
    /// In use by the guest.
    Attached(NetEntry),
    /// Gone (its index stays, as the configuration keeps the card).
    Removed,
}

/// A card as the device manager keeps it.
pub(super) struct NetEntry {
    /// API id.
    pub(super) id: String,
    /// Its PCI slot on bus 0.
    pub(super) slot: u8,
    taps: Vec<Arc<Tap>>,
    by_name: bool,
    kexec: NetKexecPolicy,
    /// What prepare arranged, until save records it.
    handover: Mutex<Option<TapHandover>>,
    /// Created again by this VMM after a kexec: the host must attach it again.
    pub(super) recreated: bool,
}

impl NetEntry {
    /// The tap's interface name.
    pub(super) fn tap_name(&self) -> &str {
        self.taps.first().map_or("", |t| t.name())
    }
}

impl PciBuilder<'_, '_, '_> {
    /// Builds network card `index` of the configuration: its taps (from the saved handover on
    /// a restore), the virtio-net device and its PCI placement. A card removed from the
    /// running VM stays removed.
    pub(super) fn add_net(&mut self, index: usize) -> Result<NetSlot, DeviceError> {
        let config = self
            .ctx
            .config
            .net
            .get(index)
            .ok_or(DeviceError::NoSuchNet { index })?;
        if config.removed {
            // Placed by id: no slot or vectors are held for it.
            return Ok(NetSlot::Removed);
        }
        let id = self.ctx.config.net_id(index);
        let key = ids::net_tap(&id);
        let mut recreated = false;
        let taps = match self.restore.as_deref_mut() {
            Some(states) => {
                let state: NetTapState = states.take(&key).map_err(restore_error(&key))?;
                match state.handover {
                    TapHandover::Attached(tokens) => {
                        let fds = tokens
                            .iter()
                            .map(|token| handed_over(self.ctx.handed_over, &key, *token, "tap fd"))
                            .collect::<Result<Vec<_>, _>>()?;
                        if config.uses_fds() {
                            // Kept for a reboot of the restored VM, as at boot.
                            give_tap_fds(&id, copies(&id, &fds)?);
                        }
                        adopt(&id, fds)?
                    }
                    TapHandover::Recreate => {
                        recreated = true;
                        let taps = open_by_name(&id, config, &state.tap)?;
                        restore_host_side(&id, config, &state)?;
                        taps
                    }
                    TapHandover::OperatorFds => adopt(&id, copies_of_given(&id)?)?,
                }
            }
            None if config.uses_fds() => adopt(&id, copies_of_given(&id)?)?,
            None => open_by_name(&id, config, config.tap_name().unwrap_or(""))?,
        };
        if taps.len() != config.queue_pairs() {
            return Err(net_error(
                &id,
                &format!(
                    "{} tap fds for {} queue pairs",
                    taps.len(),
                    config.queue_pairs()
                ),
            ));
        }
        let taps: Vec<Arc<Tap>> = taps.into_iter().map(Arc::new).collect();
        let params = NetParams {
            mac: config.mac.bytes(),
            mtu: config.mtu,
            queue_size: config.queue_size,
            offload_csum: config.offload_csum,
            offload_tso: config.offload_tso,
            offload_ufo: config.offload_ufo,
        };
        let queues = taps
            .iter()
            .map(|t| Box::new(TapHandle(t.clone())) as Box<dyn TapQueue>)
            .collect();
        let device = Net::new(queues, params).map_err(|e| DeviceError::Net {
            id: id.clone(),
            source: Box::new(e),
        })?;
        self.add(device, &id, vec![key])?;
        let slot = self.root.added().last().map_or(0, |(slot, _)| *slot);
        Ok(NetSlot::Attached(NetEntry {
            id,
            slot,
            taps,
            by_name: !config.uses_fds(),
            kexec: config.kexec,
            handover: Mutex::new(None),
            recreated,
        }))
    }
}

/// The participant carrying one card's taps (`net/<id>`).
pub(super) struct NetTapParticipant<'a> {
    pub(super) entry: &'a NetEntry,
}

impl NetTapParticipant<'_> {
    fn id(&self) -> String {
        ids::net_tap(&self.entry.id)
    }

    fn set_handover(&self, handover: Option<TapHandover>) {
        *self
            .entry
            .handover
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = handover;
    }

    /// What a kexec does with the card, or why it cannot cross one.
    fn across_kexec(&self) -> Result<TapHandover, ParticipantError> {
        let entry = self.entry;
        kexec_handover(entry.kexec, entry.by_name, entry.tap_name(), &entry.id).map_err(|reason| {
            ParticipantError::Unsupported {
                id: self.id(),
                reason,
            }
        })
    }
}

/// How card `id` on tap `tap` crosses a kexec under `policy`, or why it cannot.
fn kexec_handover(
    policy: NetKexecPolicy,
    by_name: bool,
    tap: &str,
    id: &str,
) -> Result<TapHandover, String> {
    match (policy, by_name) {
        (NetKexecPolicy::Refuse, _) => Err(format!(
            "tap {tap}: the kernel cannot carry a tap across a kexec and the card has kexec=refuse"
        )),
        (NetKexecPolicy::Recreate, true) => Ok(TapHandover::Recreate),
        (NetKexecPolicy::Recreate, false) => Err(format!(
            "tap {tap} was given as fds, which the kernel cannot carry across a kexec and this \
             VMM cannot create again; set kexec=fds on the card and pass new tap fds to the \
             restoring VMM (--restore ...,net_fds=[{id}@[fd,...]])"
        )),
        (NetKexecPolicy::Fds, _) => Ok(TapHandover::OperatorFds),
    }
}

impl AnyParticipant for NetTapParticipant<'_> {
    fn id(&self) -> String {
        NetTapParticipant::id(self)
    }

    fn prepare(&mut self, files: &mut FileSink<'_>) -> Result<(), ParticipantError> {
        if super::as_across_kexec() {
            let handover = self.across_kexec()?;
            self.set_handover(Some(handover));
            return Ok(());
        }
        let mut tokens = Vec::with_capacity(self.entry.taps.len());
        for tap in &self.entry.taps {
            match files.attach(tap.as_fd()) {
                Ok(token) => tokens.push(token),
                // Only a restart-mode session takes attachments: a kexec is coming.
                Err(ParticipantError::Session(SessionError::AttachmentsUnsupported))
                    if tokens.is_empty() =>
                {
                    let handover = self.across_kexec()?;
                    self.set_handover(Some(handover));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.set_handover(Some(TapHandover::Attached(tokens)));
        Ok(())
    }

    fn pause(&mut self) -> Result<(), ParticipantError> {
        // The device's queue worker stops with `virtio/<id>`; frames wait in the tap.
        Ok(())
    }

    fn save(&mut self, _files: &mut FileSink<'_>) -> Result<Envelope, ParticipantError> {
        let handover = self
            .entry
            .handover
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| ParticipantError::Failed {
                id: self.id(),
                reason: "saved without a prepare".into(),
            })?;
        // What the host side looks like now, for a tap created again (informative otherwise).
        let name = self.entry.tap_name();
        let state = NetTapState {
            tap: name.to_string(),
            handover,
            host_mac: tap::mac(name).ok(),
            mtu: tap::mtu(name).ok(),
        };
        envelope(&self.id(), &state)
    }

    fn resume(&mut self) -> Result<(), ParticipantError> {
        self.set_handover(None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tap_opened_by_name_is_created_again_after_a_kexec() {
        let handover = kexec_handover(NetKexecPolicy::Recreate, true, "vmtap0", "net0");

        assert_eq!(handover, Ok(TapHandover::Recreate));
    }

    #[test]
    fn a_card_on_fds_refuses_a_kexec_naming_the_option_that_allows_it() {
        let handover = kexec_handover(NetKexecPolicy::Recreate, false, "kata0", "net0");

        let reason = handover.unwrap_err();
        assert!(reason.contains("kexec=fds"), "{reason}");
        assert!(reason.contains("net_fds=[net0@"), "{reason}");
    }

    #[test]
    fn a_card_with_kexec_fds_waits_for_the_operators_fds() {
        let handover = kexec_handover(NetKexecPolicy::Fds, false, "kata0", "net0");

        assert_eq!(handover, Ok(TapHandover::OperatorFds));
    }

    #[test]
    fn kexec_refuse_refuses_even_a_tap_opened_by_name() {
        let handover = kexec_handover(NetKexecPolicy::Refuse, true, "vmtap0", "net0");

        assert!(handover.unwrap_err().contains("kexec=refuse"));
    }

    #[test]
    fn tap_state_round_trips_through_its_envelope() {
        let state = NetTapState {
            tap: "vmtap0".into(),
            handover: TapHandover::Attached(vec![16, 17]),
            host_mac: Some("12:34:56:78:9a:bc".parse().unwrap()),
            mtu: Some(1500),
        };

        let envelope = Envelope::wrap("net/net0", &state).unwrap();
        let mut states =
            liveupdate::state::decode(&liveupdate::state::encode(vec![envelope]).unwrap()).unwrap();
        let back: NetTapState = states.take("net/net0").unwrap();

        assert_eq!(back, state);
    }
}
