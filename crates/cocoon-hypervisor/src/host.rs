//! What this host can run: the real kind of KVM, kernel vhost-vsock, the
//! binaries on `PATH`.

use std::path::{Path, PathBuf};

use cocoon_config::{Accel, VsockTransport};

use crate::{ResolvedAccel, ResolvedVsock};

/// The KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// `/dev/kvm` backed by `kvm_intel` or `kvm_amd`.
    Hardware,
    /// `/dev/kvm` backed by PVM (`kvm_pvm`): a stock guest kernel hangs under it.
    Pvm,
    /// `/dev/kvm` from an unknown backend.
    Unknown,
    /// No `/dev/kvm`.
    None,
}

/// Host capabilities relevant to choosing an accelerator and a vsock transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCaps {
    pub kvm: KvmKind,
    pub vhost_vsock: bool,
}

impl HostCaps {
    /// Probes the running host.
    pub fn probe() -> Self {
        Self::probe_at(Path::new("/"))
    }

    /// Probes a host whose root is `root` (tests point it at a fake tree).
    pub fn probe_at(root: &Path) -> Self {
        let has = |p: &str| root.join(p).exists();
        let kvm = if !has("dev/kvm") {
            KvmKind::None
        } else if has("sys/module/kvm_intel") || has("sys/module/kvm_amd") {
            KvmKind::Hardware
        } else if has("sys/module/kvm_pvm") {
            KvmKind::Pvm
        } else {
            KvmKind::Unknown
        };
        Self {
            kvm,
            vhost_vsock: has("dev/vhost-vsock"),
        }
    }

    /// Resolves `accel = auto`: KVM only where it is hardware-backed.
    pub fn resolve_accel(&self, accel: Accel) -> ResolvedAccel {
        match accel {
            Accel::Kvm => ResolvedAccel::Kvm,
            Accel::Tcg => ResolvedAccel::Tcg,
            Accel::Auto if self.kvm == KvmKind::Hardware => ResolvedAccel::Kvm,
            Accel::Auto => ResolvedAccel::Tcg,
        }
    }

    /// Resolves `transport = auto`: kernel vhost-vsock where it exists.
    pub fn resolve_vsock(&self, transport: VsockTransport) -> ResolvedVsock {
        let vhost = || ResolvedVsock::Vhost {
            guest_cid: pick_guest_cid(),
        };
        match transport {
            VsockTransport::Vhost => vhost(),
            VsockTransport::Hybrid => ResolvedVsock::Hybrid,
            VsockTransport::Auto if self.vhost_vsock => vhost(),
            VsockTransport::Auto => ResolvedVsock::Hybrid,
        }
    }
}

/// A guest CID for kernel vhost-vsock: CIDs are host-global, so spread them.
fn pick_guest_cid() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    3 + (std::process::id().wrapping_mul(7919) ^ nanos) % 0x00ff_ffff
}

/// The host's TSC rate in kHz, measured against the monotonic clock.
///
/// Under TCG the guest's TSC runs at the host's rate. A microvm guest has no
/// HPET or PM timer to calibrate its TSC against, and its PIT calibration
/// fails when the host is busy (the kernel then hangs in early boot), so the
/// measured rate is given to the guest (`tsc_early_khz=`).
pub fn tsc_khz() -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    {
        let window = std::time::Duration::from_millis(10);
        let t0 = std::time::Instant::now();
        // SAFETY: RDTSC has no preconditions on x86_64.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        while t0.elapsed() < window {
            std::hint::spin_loop();
        }
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos() as u64;
        let khz = (c1.wrapping_sub(c0)).saturating_mul(1_000_000) / ns.max(1);
        u32::try_from(khz).ok().filter(|k| *k > 100_000)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Finds a binary: a path with a `/` is taken as it is, a bare name is looked
/// up on `PATH`.
pub fn find_binary(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 || name.is_absolute() {
        return name.is_file().then(|| name.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(paths: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for p in paths {
            let p = t.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        t
    }

    #[test]
    fn pvm_host_runs_tcg_and_hybrid_vsock() {
        let t = tree(&["dev/kvm", "sys/module/kvm_pvm/x"]);
        let caps = HostCaps::probe_at(t.path());
        assert_eq!(caps.kvm, KvmKind::Pvm);
        assert_eq!(caps.resolve_accel(Accel::Auto), ResolvedAccel::Tcg);
        assert_eq!(caps.resolve_accel(Accel::Kvm), ResolvedAccel::Kvm);
        assert_eq!(
            caps.resolve_vsock(VsockTransport::Auto),
            ResolvedVsock::Hybrid
        );
    }

    #[test]
    fn hardware_host_runs_kvm_and_vhost_vsock() {
        let t = tree(&["dev/kvm", "dev/vhost-vsock", "sys/module/kvm_intel/x"]);
        let caps = HostCaps::probe_at(t.path());
        assert_eq!(caps.kvm, KvmKind::Hardware);
        assert_eq!(caps.resolve_accel(Accel::Auto), ResolvedAccel::Kvm);
        assert!(matches!(
            caps.resolve_vsock(VsockTransport::Auto),
            ResolvedVsock::Vhost { guest_cid } if guest_cid >= 3
        ));
        assert_eq!(
            caps.resolve_vsock(VsockTransport::Hybrid),
            ResolvedVsock::Hybrid
        );
    }

    #[test]
    fn no_kvm_runs_tcg() {
        let t = tree(&[]);
        let caps = HostCaps::probe_at(t.path());
        assert_eq!(caps.kvm, KvmKind::None);
        assert_eq!(caps.resolve_accel(Accel::Auto), ResolvedAccel::Tcg);
    }
}
