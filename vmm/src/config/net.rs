//! Network cards in the configuration: cloud-hypervisor's `NetConfig` (`--net`, `vm.add-net`),
//! what we refuse of it, and the ids by which the API names the cards (given, or `_net<N>`).
//!
//! A card's tap is opened (or created) by name, or taken as already-open fds (`fd=[...]` on
//! the command line; over the API the fds travel as `SCM_RIGHTS` and the numbers in the JSON
//! are ignored). Rate limiting, vhost-user, a virtual IOMMU and other PCI segments are refused
//! by name rather than ignored.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use tap::MacAddr;

use super::{ConfigError, VmConfig};

/// cloud-hypervisor's default: one queue pair.
pub const DEFAULT_NET_QUEUES: usize = 2;
/// cloud-hypervisor's default queue size.
pub const DEFAULT_NET_QUEUE_SIZE: u16 = 256;
/// Smallest MTU we announce (IPv6's minimum, as cloud-hypervisor).
pub const MIN_MTU: u16 = 1280;
/// Most queue pairs a card may have (one tap queue each).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// The longest interface name Linux takes (`IFNAMSIZ` less the NUL).
pub const MAX_TAP_NAME: usize = 15;

/// What a kexec-mode live update does with a card, whose tap no kernel can carry across a
/// kexec (`--net ...,kexec=recreate|fds|refuse`). Restart mode always hands the tap over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetKexecPolicy {
    /// Taps opened by name are created again, with the same name and host-side settings, by
    /// the VMM that restores the VM; a card built on fds refuses the update in prepare.
    #[default]
    Recreate,
    /// The restoring VMM gets new tap fds from the operator (`--restore ...,net_fds=[id@[fd]]`).
    Fds,
    /// The update is refused in prepare, the guest untouched.
    Refuse,
}

impl NetKexecPolicy {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// One network card, in cloud-hypervisor's `NetConfig` shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The tap interface to open or create; absent or empty: a new `vmtap<N>`.
    #[serde(default)]
    pub tap: Option<String>,
    /// IPv4 address given to the host side of the tap.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Netmask of `ip`.
    #[serde(default)]
    pub mask: Option<Ipv4Addr>,
    /// The guest's MAC address (random, locally administered, when absent).
    #[serde(default = "random_mac")]
    pub mac: MacAddr,
    /// MAC address of the host side of the tap.
    #[serde(default)]
    pub host_mac: Option<MacAddr>,
    /// MTU of the tap and of the guest's card.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// A virtual IOMMU: not supported (must be false).
    #[serde(default)]
    pub iommu: bool,
    /// Virtqueues: two per queue pair, one tap queue per pair.
    #[serde(default = "default_num_queues")]
    pub num_queues: usize,
    /// Size of each virtqueue.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// vhost-user: not supported (must be false).
    #[serde(default)]
    pub vhost_user: bool,
    /// vhost-user socket: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_socket: Option<String>,
    /// Card id (for the API and counters); `_net<N>` when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Already-open tap fds, one per queue pair. Over the API they come as `SCM_RIGHTS` only:
    /// numbers in the JSON are ignored.
    #[serde(default)]
    pub fds: Option<Vec<i32>>,
    /// Rate limiting: not supported (must be null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter_config: Option<serde_json::Value>,
    /// PCI segment: only 0.
    #[serde(default)]
    pub pci_segment: u16,
    /// Offer TCP segmentation offload.
    #[serde(default = "yes")]
    pub offload_tso: bool,
    /// Offer UDP fragmentation offload.
    #[serde(default = "yes")]
    pub offload_ufo: bool,
    /// Offer checksum offload (TSO and UFO need it).
    #[serde(default = "yes")]
    pub offload_csum: bool,
    /// Ours: what a kexec-mode live update does with the card.
    #[serde(default, skip_serializing_if = "NetKexecPolicy::is_default")]
    pub kexec: NetKexecPolicy,
    /// Removed from the running VM (`vm.remove-device`). It keeps its place, and so the slots
    /// and MSI vectors of the devices after it, until the next boot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// A random locally administered MAC, as cloud-hypervisor gives a card without one. Without
/// randomness (no `/dev/urandom`), one from the process id and the clock.
fn random_mac() -> MacAddr {
    MacAddr::random_local().unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let [a, b, c, d] = (std::process::id() ^ nanos).to_le_bytes();
        MacAddr::new([0x52, 0x54, a, b, c, d])
    })
}

fn default_num_queues() -> usize {
    DEFAULT_NET_QUEUES
}

fn default_queue_size() -> u16 {
    DEFAULT_NET_QUEUE_SIZE
}

fn yes() -> bool {
    true
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            tap: None,
            ip: None,
            mask: None,
            mac: random_mac(),
            host_mac: None,
            mtu: None,
            iommu: false,
            num_queues: DEFAULT_NET_QUEUES,
            queue_size: DEFAULT_NET_QUEUE_SIZE,
            vhost_user: false,
            vhost_socket: None,
            id: None,
            fds: None,
            rate_limiter_config: None,
            pci_segment: 0,
            offload_tso: true,
            offload_ufo: true,
            offload_csum: true,
            kexec: NetKexecPolicy::default(),
            removed: false,
        }
    }
}

fn invalid(key: &'static str, value: impl ToString, reason: &'static str) -> ConfigError {
    ConfigError::InvalidValue {
        flag: "net",
        key,
        value: value.to_string(),
        reason,
    }
}

impl NetConfig {
    /// Parses a `NetConfig` JSON document (`vm.add-net`), refusing every key we cannot honour.
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        super::json::from_checked_json(json, "NetConfig", &super::schema::NET)
    }

    /// Queue pairs (tap queues) of the card.
    pub fn queue_pairs(&self) -> usize {
        self.num_queues / 2
    }

    /// The tap's name when the VMM opens it by name (an empty name means "pick one").
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_deref().filter(|name| !name.is_empty())
    }

    /// Whether the card's taps come as fds rather than by name.
    pub fn uses_fds(&self) -> bool {
        self.fds.as_ref().is_some_and(|fds| !fds.is_empty())
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.iommu {
            return Err(invalid("iommu", "on", "a virtual IOMMU is not supported"));
        }
        if self.vhost_user || self.vhost_socket.is_some() {
            return Err(invalid("vhost_user", "on", "vhost-user is not supported"));
        }
        if self.rate_limiter_config.is_some() {
            return Err(invalid(
                "rate_limiter_config",
                "set",
                "rate limiting is not supported",
            ));
        }
        if self.pci_segment != 0 {
            return Err(invalid(
                "pci_segment",
                self.pci_segment,
                "only PCI segment 0 exists",
            ));
        }
        let pairs = self.queue_pairs();
        if self.num_queues < 2 || !self.num_queues.is_multiple_of(2) || pairs > MAX_QUEUE_PAIRS {
            return Err(invalid(
                "num_queues",
                self.num_queues,
                "expected an even number from 2 to 32 (two per tap queue)",
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 || self.queue_size > 32768 {
            return Err(invalid(
                "queue_size",
                self.queue_size,
                "expected a power of two from 2 to 32768",
            ));
        }
        if let Some(name) = self.tap_name()
            && (name.len() > MAX_TAP_NAME
                || name.contains('/')
                || name.chars().any(char::is_whitespace))
        {
            return Err(invalid(
                "tap",
                name,
                "expected an interface name of at most 15 bytes, without '/' or spaces",
            ));
        }
        if self.mac.is_multicast() {
            return Err(invalid(
                "mac",
                self.mac,
                "a card needs a unicast MAC address",
            ));
        }
        if let Some(mac) = self.host_mac
            && mac.is_multicast()
        {
            return Err(invalid(
                "host_mac",
                mac,
                "a card needs a unicast MAC address",
            ));
        }
        if let Some(mtu) = self.mtu
            && mtu < MIN_MTU
        {
            return Err(invalid("mtu", mtu, "expected at least 1280"));
        }
        if self.mask.is_some() && self.ip.is_none() {
            return Err(invalid("mask", "set", "a netmask needs ip="));
        }
        if let Some(fds) = self.fds.as_ref().filter(|fds| !fds.is_empty()) {
            if self.tap_name().is_some() {
                return Err(invalid("fd", "set", "give either tap= or fd=, not both"));
            }
            if fds.len() != pairs {
                return Err(invalid(
                    "fd",
                    fds.len(),
                    "expected one tap fd per queue pair (num_queues / 2)",
                ));
            }
            if self.ip.is_some() || self.host_mac.is_some() || self.mtu.is_some() {
                return Err(invalid(
                    "fd",
                    "set",
                    "ip=, host_mac= and mtu= configure a tap the VMM opens; set them on a tap \
                     passed as fd yourself",
                ));
            }
        } else if self.kexec == NetKexecPolicy::Fds {
            return Err(invalid(
                "kexec",
                "fds",
                "only a card built on fds can be given fds again",
            ));
        }
        Ok(())
    }
}

impl VmConfig {
    /// The API id of network card `index`: its own, or `_net<index>`.
    pub fn net_id(&self, index: usize) -> String {
        self.net
            .get(index)
            .and_then(|net| net.id.clone())
            .unwrap_or_else(|| format!("_net{index}"))
    }

    /// The index of the network card with API id `id` (removed ones included).
    pub fn net_index(&self, id: &str) -> Option<usize> {
        (0..self.net.len()).find(|&index| self.net_id(index) == id)
    }

    /// The index of the network card with API id `id` that is not removed.
    pub fn present_net_index(&self, id: &str) -> Option<usize> {
        self.net_index(id).filter(|&index| !self.net[index].removed)
    }

    /// Takes network card `index` out of the configuration of a VM that is not running; the
    /// cards after it keep their ids.
    pub fn remove_net(&mut self, index: usize) {
        if index < self.net.len() {
            self.pin_net_ids();
            self.net.remove(index);
        }
    }

    /// Gives every card its API id for good, so ids do not move when a card before it goes.
    pub(super) fn pin_net_ids(&mut self) {
        for index in 0..self.net.len() {
            let id = self.net_id(index);
            self.net[index].id = Some(id);
        }
    }

    /// Appends a network card, giving it the first free `_net<N>` id when it has none, and
    /// returns its id. A taken id is refused and the configuration left as it was.
    pub fn add_net(&mut self, mut net: NetConfig) -> Result<String, ConfigError> {
        net.validate()?;
        let id = self.new_device_id(net.id.take(), "_net", self.net.len())?;
        net.id = Some(id.clone());
        self.net.push(net);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(change: impl FnOnce(&mut NetConfig)) -> NetConfig {
        let mut net = NetConfig {
            tap: Some("tap0".into()),
            mac: "12:34:56:78:9a:bc".parse().unwrap(),
            ..NetConfig::default()
        };
        change(&mut net);
        net
    }

    fn refused_key(net: &NetConfig) -> &'static str {
        match net.validate() {
            Err(ConfigError::InvalidValue { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_cloud_hypervisors() {
        let net: NetConfig = serde_json::from_str("{}").unwrap();

        assert_eq!(net.num_queues, 2);
        assert_eq!(net.queue_size, 256);
        assert!(net.offload_tso && net.offload_ufo && net.offload_csum);
        assert!(!net.mac.is_multicast());
        assert_eq!(net.validate(), Ok(()));
    }

    #[test]
    fn odd_or_too_many_queues_are_refused() {
        assert_eq!(refused_key(&with(|n| n.num_queues = 3)), "num_queues");
        assert_eq!(refused_key(&with(|n| n.num_queues = 0)), "num_queues");
        assert_eq!(refused_key(&with(|n| n.num_queues = 34)), "num_queues");
    }

    #[test]
    fn long_tap_name_is_refused() {
        assert_eq!(
            refused_key(&with(|n| n.tap = Some("a-name-of-16-byt".into()))),
            "tap"
        );
    }

    #[test]
    fn multicast_mac_is_refused() {
        assert_eq!(
            refused_key(&with(|n| n.mac = "01:00:5e:00:00:01".parse().unwrap())),
            "mac"
        );
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        assert_eq!(refused_key(&with(|n| n.vhost_user = true)), "vhost_user");
        assert_eq!(refused_key(&with(|n| n.iommu = true)), "iommu");
        assert_eq!(
            refused_key(&with(
                |n| n.rate_limiter_config = Some(serde_json::json!({}))
            )),
            "rate_limiter_config"
        );
    }

    #[test]
    fn fds_must_match_the_queue_pairs_and_exclude_a_tap_name() {
        assert_eq!(
            refused_key(&with(|n| {
                n.tap = None;
                n.fds = Some(vec![3, 4]);
            })),
            "fd"
        );
        assert_eq!(refused_key(&with(|n| n.fds = Some(vec![3]))), "fd");
        assert_eq!(
            with(|n| {
                n.tap = None;
                n.fds = Some(vec![3, 4]);
                n.num_queues = 4;
            })
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn added_card_gets_the_first_free_id_and_a_taken_id_is_refused() {
        let mut config = VmConfig::default();

        let first = config.add_net(with(|_| {})).unwrap();
        let taken = config.add_net(with(|n| n.id = Some("_net0".into())));

        assert_eq!(first, "_net0");
        assert_eq!(taken, Err(ConfigError::DuplicateDeviceId("_net0".into())));
        assert_eq!(config.net.len(), 1);
    }
}
