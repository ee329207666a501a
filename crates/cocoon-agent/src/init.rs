//! Guest init: pseudo filesystems, cgroups, modules.

use std::path::Path;

use anyhow::Context;
use nix::mount::{mount, MsFlags};

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .with_context(|| format!("mount {fstype} on {target}"))
}

/// Mounts what a Linux userland and libcontainer expect, then loads modules.
pub fn setup() -> anyhow::Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nosuid, None)?;
    mnt("sysfs", "/sys", "sysfs", nosuid, None)?;
    mnt(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mnt(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    )?;
    mnt("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    mnt(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mnt(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid,
        Some("nsdelegate"),
    )?;
    enable_cgroup_controllers(Path::new("/sys/fs/cgroup"));
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/0", "/dev/stdin");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/1", "/dev/stdout");
    let _ = std::os::unix::fs::symlink("/proc/self/fd/2", "/dev/stderr");
    let _ = std::os::unix::fs::symlink("/dev/pts/ptmx", "/dev/ptmx");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    crate::modules::load_listed(Path::new(crate::modules::ORDER_FILE), &cmdline);
    let _ = nix::unistd::sethostname("cocoon");
    Ok(())
}

/// Delegates every available controller to child cgroups.
fn enable_cgroup_controllers(root: &Path) {
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), wanted.join(" ")) {
        tracing::warn!("enable cgroup controllers {wanted:?}: {e}");
    }
}

/// Flushes and powers the VM off. QEMU runs with `-no-reboot`, so a reboot
/// request ends it on every machine type, with or without ACPI.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
