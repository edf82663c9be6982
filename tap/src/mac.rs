//! Ethernet MAC addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::TapError;

/// A 48-bit Ethernet address. Parses from and prints as `12:34:56:78:9a:bc`, and is
/// serialized in that string form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The address with these bytes, first byte first (as on the wire).
    pub const fn new(bytes: [u8; 6]) -> Self {
        Self(bytes)
    }

    /// The six bytes, first byte first.
    pub const fn bytes(self) -> [u8; 6] {
        self.0
    }

    /// A group address (bit 0 of the first byte). Such an address cannot be a device's own.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    /// Assigned locally rather than by a vendor (bit 1 of the first byte).
    pub const fn is_local(self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// A random, locally administered unicast address, from the kernel's random pool
    /// (`getrandom(2)`: no file is opened, so a seccomp-confined thread may call it).
    pub fn random_local() -> Result<Self, TapError> {
        let mut bytes = [0; 6];
        crate::sys::fill_random(&mut bytes).map_err(|source| TapError::Random { source })?;
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Ok(Self(bytes))
    }
}

impl FromStr for MacAddr {
    type Err = TapError;

    /// Accepts exactly six colon-separated pairs of hex digits, in either case. Multicast
    /// addresses parse too: whether one is acceptable is the caller's call.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TapError::InvalidMac {
            input: s.to_owned(),
        };
        let mut bytes = [0; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Self(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_either_case() {
        let mac: MacAddr = "12:34:56:78:9A:bc".parse().unwrap();

        assert_eq!(mac, MacAddr::new([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]));
    }

    #[test]
    fn display_is_lowercase_colon_form() {
        let mac = MacAddr::new([0x0a, 0xBC, 0, 1, 0xff, 0x10]);

        assert_eq!(mac.to_string(), "0a:bc:00:01:ff:10");
    }

    #[test]
    fn parse_refuses_malformed_text() {
        let refused = [
            "",
            "12:34:56:78:9a",
            "12:34:56:78:9a:bc:de",
            "12-34-56-78-9a-bc",
            "1:34:56:78:9a:bc",
            "123:4:56:78:9a:bc",
            "12:34:56:78:9a:bg",
            "+1:34:56:78:9a:bc",
            "12:34:56:78:9a:bc ",
        ];

        let accepted: Vec<_> = refused
            .iter()
            .filter(|s| s.parse::<MacAddr>().is_ok())
            .collect();

        assert_eq!(accepted, Vec::<&&str>::new());
    }

    #[test]
    fn parse_error_names_the_input() {
        let err = "nope".parse::<MacAddr>().unwrap_err();

        assert_eq!(err.to_string(), "Invalid MAC address \"nope\"");
    }

    #[test]
    fn parse_accepts_a_multicast_address_and_flags_it() {
        let mac: MacAddr = "01:00:5e:00:00:01".parse().unwrap();

        assert!(mac.is_multicast());
    }

    #[test]
    fn random_local_is_local_unicast() {
        let mac = MacAddr::random_local().unwrap();

        assert_eq!((mac.is_multicast(), mac.is_local()), (false, true));
    }

    #[test]
    fn serde_uses_the_string_form() {
        let mac = MacAddr::new([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

        let json = serde_json::to_string(&mac).unwrap();
        let back: MacAddr = serde_json::from_str(&json).unwrap();

        assert_eq!((json.as_str(), back), ("\"52:54:00:12:34:56\"", mac));
    }

    #[test]
    fn serde_refuses_a_malformed_string() {
        let result = serde_json::from_str::<MacAddr>("\"52:54:00\"");

        assert_eq!(
            result.map_err(|e| e.to_string()),
            Err("Invalid MAC address \"52:54:00\"".to_owned())
        );
    }
}
