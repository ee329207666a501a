//! Operations on the sandbox (the VM) itself: identity, hostname, the
//! shared directory, power-off.

use std::time::Duration;

use cocoon_protocols::Error;

use super::Result;

/// The guest kernel's release.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Sets the hostname (a failure is logged: the name is cosmetic) and mounts
/// the shared directory.
pub fn create(hostname: &str, share_tag: &str) -> Result<()> {
    if !hostname.is_empty() {
        if let Err(e) = nix::unistd::sethostname(hostname) {
            tracing::warn!("set hostname {hostname:?}: {e}");
        }
    }
    mount_share(share_tag)
}

fn mount_share(tag: &str) -> Result<()> {
    let target = cocoon_protocols::GUEST_SHARE_DIR;
    std::fs::create_dir_all(target).map_err(super::internal(format!("create {target}")))?;
    nix::mount::mount(
        Some(tag),
        target,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::Internal(format!("mount virtio-fs {tag} on {target}: {e}")))
}

/// Flushes, then powers the guest off shortly, so that the reply leaves
/// first.
pub async fn destroy() {
    tracing::info!("powering off");
    // Flush before replying: the host may end the VM as soon as it has
    // the reply.
    tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        crate::init::power_off();
    });
}

/// Mounts the pod's `/dev/shm`, a tmpfs of `size` bytes, once: the first
/// container that binds it (the sandbox container, under CRI) sizes it.
pub fn ensure_pod_shm(size: u64) -> Result<()> {
    let target = cocoon_protocols::GUEST_SHM_DIR;
    static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut mounted = MOUNTED.lock().unwrap();
    if *mounted {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(super::internal(format!("create {target}")))?;
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("shm"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(format!("mode=1777,size={size}").as_str()),
    )
    .map_err(|e| Error::Internal(format!("mount the pod's shm tmpfs on {target}: {e}")))?;
    *mounted = true;
    Ok(())
}

/// Applies `net.*` sysctls in the guest's network namespace, the pod's.
/// A key is a dotted or slashed name under `/proc/sys/net`, nothing else.
pub fn apply_net_sysctls(sysctls: &std::collections::HashMap<String, String>) -> Result<()> {
    for (key, value) in sysctls {
        // `net.ipv4.conf.eth0/100.rp_filter` is not a thing: a key is all
        // dots or all slashes (where a dot may be part of a name).
        let rel = if key.contains('/') {
            key.clone()
        } else {
            key.replace('.', "/")
        };
        let valid = rel.starts_with("net/")
            && rel
                .split('/')
                .all(|c| !c.is_empty() && c != ".." && !c.contains('\0'));
        if !valid || value.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?}={value:?} is not a network sysctl"
            )));
        }
        let path = std::path::Path::new("/proc/sys").join(&rel);
        std::fs::write(&path, value)
            .map_err(|e| Error::InvalidArgument(format!("sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}
