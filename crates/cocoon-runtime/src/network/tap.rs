//! Tap devices for QEMU's userspace virtio-net.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

/// The tap of the pod's `i`-th interface. Fits IFNAMSIZ for any `i` below
/// [`cocoon_protocols::network::MAX_INTERFACES`].
pub(super) fn name(i: usize) -> String {
    format!("tap{i}_cocoon")
}

/// Whether a link is one of ours (never a pod interface to redirect).
pub(super) fn is_ours(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with("_cocoon")
}

/// Creates tap `name` in the calling thread's network namespace and
/// returns its queue fd (close-on-exec). No packet-info header, a
/// virtio-net header (QEMU then passes checksum and segmentation offloads
/// through), and not persistent: the device is removed when the last fd
/// is closed. `IFF_TUN_EXCL` refuses a name that already exists instead of
/// attaching to someone else's device.
pub(super) fn create(name: &str) -> std::io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= ifr.ifr_name.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_TUN_EXCL)
            as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the
    // call; the fd is ours and open.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_are_recognised() {
        for i in 0..cocoon_protocols::network::MAX_INTERFACES {
            let n = name(i);
            assert!(cocoon_protocols::network::valid_ifname(&n), "{n}");
            assert!(is_ours(&n));
        }
        assert!(!is_ours("eth0"));
        assert!(!is_ours("tap0"));
    }
}
