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
