//! Ethernet MAC addresses: parsed from `52:54:00:12:34:56`, or derived
//! from a tap device's name when none is given.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A unicast Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MacError {
    #[error("invalid MAC address {0:?}: expected six hex octets such as 52:54:00:12:34:56")]
    Syntax(String),
    #[error("MAC address {0} is a multicast address; a NIC needs a unicast one")]
    Multicast(MacAddr),
    #[error("MAC address {0} is all zeros")]
    Zero(MacAddr),
}

impl MacAddr {
    /// A locally administered unicast address under QEMU's customary
    /// 52:54:00 prefix, its last three octets a hash (FNV-1a) of `name`:
    /// the same tap name gives the same address on every run.
    pub fn derived_from(name: &str) -> MacAddr {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in name.bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = hash.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, a, b, c])
    }

    /// Multicast and all-zero addresses cannot name a NIC.
    pub fn check_unicast(self) -> Result<MacAddr, MacError> {
        if self.0[0] & 1 != 0 {
            return Err(MacError::Multicast(self));
        }
        if self.0 == [0; 6] {
            return Err(MacError::Zero(self));
        }
        Ok(self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl std::str::FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || MacError::Syntax(s.to_owned());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(syntax)?;
            // from_str_radix alone would take "+1".
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        MacAddr(bytes).check_unicast()
    }
}

impl TryFrom<String> for MacAddr {
    type Error = MacError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> String {
        mac.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_six_octets() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(mac.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52:54:00:ab:cd:1",
            "52-54-00-ab-cd-01",
            "52:54:00:ab:cd:zz",
            "52:54:00:ab:cd:+1",
        ] {
            assert!(
                matches!(bad.parse::<MacAddr>(), Err(MacError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            "01:00:5e:00:00:01".parse::<MacAddr>(),
            Err(MacError::Multicast(_))
        ));
        assert!(matches!(
            "00:00:00:00:00:00".parse::<MacAddr>(),
            Err(MacError::Zero(_))
        ));
    }

    #[test]
    fn derived_addresses_are_stable_local_unicast() {
        let a = MacAddr::derived_from("vmtap0");
        assert_eq!(a, MacAddr::derived_from("vmtap0"));
        assert_ne!(a, MacAddr::derived_from("vmtap1"));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
        a.check_unicast().unwrap();
    }

    #[test]
    fn json_is_the_text_form() {
        let mac: MacAddr = serde_json::from_str(r#""52:54:00:00:00:07""#).unwrap();
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""52:54:00:00:00:07""#
        );
        assert!(serde_json::from_str::<MacAddr>(r#""ff:ff:ff:ff:ff:ff""#).is_err());
    }
}
