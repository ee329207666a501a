//! What host and guest agree on about pod networking: the bounds of a
//! `ConfigureNetwork` request (the host stays within them, the agent
//! refuses anything beyond) and the MAC address as it travels.

use std::fmt;
use std::str::FromStr;

/// The most NICs one pod gets.
pub const MAX_INTERFACES: usize = 16;
/// The most addresses one NIC gets.
pub const MAX_ADDRESSES: usize = 64;
/// The most routes one request carries.
pub const MAX_ROUTES: usize = 256;
/// The most neighbour entries one request carries.
pub const MAX_NEIGHBOURS: usize = 256;
/// The longest interface name (the kernel's IFNAMSIZ less its NUL).
pub const MAX_IFNAME: usize = 15;

/// An Ethernet MAC address; on the wire `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A multicast (or broadcast) address cannot be a NIC's.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }

    /// The address of a link, if it has an Ethernet one.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(Self)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a MAC address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (want aa:bb:cc:dd:ee:ff)")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMac(s.chars().take(32).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

/// Whether `name` can name a network interface: 1 to [`MAX_IFNAME`] bytes,
/// none of them `/`, `:`, whitespace or control, and not `.` or `..`
/// (the kernel's `dev_valid_name`, plus `:`, which means an alias).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let m: MacAddr = "02:42:ac:11:00:02".parse().unwrap();
        assert_eq!(m.0, [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(m.to_string(), "02:42:ac:11:00:02");
        assert!(m.is_unicast());
        assert!(!"ff:ff:ff:ff:ff:ff".parse::<MacAddr>().unwrap().is_unicast());
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "02:42:ac:11:00:0g",
            "02-42-ac-11-00-02",
            "+2:42:ac:11:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
    }

    #[test]
    fn interface_names() {
        for ok in ["eth0", "net1", "a", "x".repeat(15).as_str()] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "eth0:1",
            "a b",
            "a\nb",
            "x".repeat(16).as_str(),
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
