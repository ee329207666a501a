//! Guest init: the switch off the initramfs, pseudo filesystems, cgroups,
//! modules.

use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::switch_root::{self, SwitchRootError};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("create {target}")]
    CreateDir {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("switch the root off the initramfs")]
    SwitchRoot(#[from] SwitchRootError),
}

fn mnt(
    src: &str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    std::fs::create_dir_all(target).map_err(|source| InitError::CreateDir { target, source })?;
    mount(Some(src), target, Some(fstype), flags, data).map_err(|source| InitError::Mount {
        fstype,
        target,
        source,
    })
}

/// Loads modules, leaves the initramfs for a tmpfs root (see
/// [`crate::switch_root`]), then mounts what a Linux userland and
/// libcontainer expect.
pub fn setup() -> Result<(), InitError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", "proc", nosuid, None)?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    crate::modules::load_listed(Path::new(crate::modules::ORDER_FILE), &cmdline);
    if switch_root::is_initramfs()? {
        // The modules are loaded: leave them behind, to be freed.
        switch_root::switch(&[Path::new(crate::modules::DIR)])?;
    }
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

/// Milliseconds since the kernel started (0 if unknown): boot-time figures
/// in the log.
pub fn uptime_ms() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer, which is
    // valid for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000
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
