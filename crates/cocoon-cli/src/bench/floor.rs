//! The raw VM floor: the flavour's own kernel, QEMU binary and command
//! line ([`cocoon_hypervisor::qemu::command_line`]) booting an initrd whose
//! `/init` is a busybox script that prints one line and reboots (which,
//! with `-no-reboot`, ends QEMU). No agent, no modules, no daemons: the
//! vhost-user devices (virtio-fs, hybrid vsock) are left out, since they
//! cannot start without their daemons. What Cocoon adds is the rest.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cocoon_config::Config;
use cocoon_hypervisor::{HostCaps, ResolvedVsock, VmSpec};

const READY: &str = "cocoon-floor: init ran";

/// Writes `dir/initrd.img`: busybox, `/dev/console` and the `/init` script.
pub fn build_initrd(dir: &Path, busybox: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    for d in ["bin", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("copy {}", busybox.display()))?;
    let init = root.join("init");
    std::fs::write(
        &init,
        format!("#!/bin/busybox sh\n/bin/busybox echo {READY}\n/bin/busybox reboot -f\n"),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))?;
    let console = root.join("dev/console");
    if !console.exists() {
        nix::sys::stat::mknod(
            &console,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(5, 1),
        )
        .with_context(|| format!("mknod {}", console.display()))?;
    }
    let initrd = dir.join("initrd.img");
    let out = std::fs::File::create(&initrd)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet")
        .current_dir(&root)
        .stdout(out)
        .status()
        .context("cpio (Debian package cpio)")?;
    if !status.success() {
        bail!("cpio for {}: {status}", initrd.display());
    }
    Ok(initrd)
}

/// Whether argument `a` (the value after `-chardev` or `-device`) belongs
/// to a vhost-user device.
fn is_vhost_user(opt: &str, value: &str) -> bool {
    match opt {
        "-chardev" => value.starts_with("socket,id=fs,") || value.starts_with("socket,id=vsock,"),
        "-device" => value.starts_with("vhost-user-"),
        _ => false,
    }
}

/// The flavour's QEMU command line without its vhost-user devices.
pub fn command_line(spec: &VmSpec, console_fd: i32) -> Vec<OsString> {
    let full = cocoon_hypervisor::qemu::command_line(spec, console_fd);
    let mut out = Vec::with_capacity(full.len());
    let mut i = 0;
    while i < full.len() {
        let opt = full[i].to_string_lossy();
        if let Some(v) = full.get(i + 1) {
            if is_vhost_user(&opt, &v.to_string_lossy()) {
                i += 2;
                continue;
            }
        }
        out.push(full[i].clone());
        i += 1;
    }
    out
}

/// Boots the floor VM once for `config` with `initrd`; its wall time.
pub fn boot(config: &Config, initrd: &Path, dir: &Path) -> Result<Duration> {
    let caps = HostCaps::probe();
    let accel = caps.resolve_accel(config.hypervisor.accel);
    let mut config = config.clone();
    config.guest.initrd = initrd.to_path_buf();
    let run_dir = dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let spec = VmSpec {
        name: "cocoon-floor".into(),
        config: config.clone(),
        accel,
        vsock: ResolvedVsock::Hybrid,
        run_dir: run_dir.clone(),
        shared_dir: run_dir.clone(),
        share_tag: cocoon_protocols::SHARE_TAG.into(),
        tsc_khz: match accel {
            cocoon_hypervisor::ResolvedAccel::Tcg => cocoon_hypervisor::host::tsc_khz(),
            cocoon_hypervisor::ResolvedAccel::Kvm => None,
        },
        nics: Vec::new(),
        cgroup_procs: Vec::new(),
    };
    let log = run_dir.join("console.log");
    let file = std::fs::File::create(&log)?;
    // QEMU takes the console by fd number: a copy without close-on-exec.
    // SAFETY: dup(2) of an open fd; the result, if valid, is ours alone.
    let raw = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&file)) };
    if raw < 0 {
        bail!("dup: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by dup(2) and is owned by nobody else.
    let console = unsafe { OwnedFd::from_raw_fd(raw) };
    let qemu = cocoon_hypervisor::host::find_binary(&config.hypervisor.path)
        .with_context(|| format!("QEMU {}", config.hypervisor.path.display()))?;
    let args = command_line(&spec, raw);
    let t = Instant::now();
    let out = Command::new(&qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{}", qemu.display()))?;
    let took = t.elapsed();
    drop(console);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !text.contains(READY) {
        bail!(
            "the floor VM did not run its /init ({}; QEMU said: {}; console: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            text.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
        );
    }
    Ok(took)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_has_no_vhost_user_devices_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.guest.kernel = "/k".into();
        config.guest.initrd = "/i".into();
        for machine in [cocoon_config::Machine::Q35, cocoon_config::Machine::Microvm] {
            config.hypervisor.machine = machine;
            if machine == cocoon_config::Machine::Microvm {
                config.hypervisor.max_memory_mib = config.hypervisor.memory_mib;
            }
            let spec = VmSpec {
                name: "f".into(),
                config: config.clone(),
                accel: cocoon_hypervisor::ResolvedAccel::Tcg,
                vsock: ResolvedVsock::Hybrid,
                run_dir: dir.path().into(),
                shared_dir: dir.path().into(),
                share_tag: "t".into(),
                tsc_khz: None,
                nics: Vec::new(),
                cgroup_procs: Vec::new(),
            };
            let full = cocoon_hypervisor::qemu::command_line(&spec, 9);
            let floor: Vec<String> = command_line(&spec, 9)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            assert_eq!(floor.len(), full.len() - 8, "{machine:?}: {floor:?}");
            assert!(!floor.iter().any(|a| a.contains("vhost-user")), "{floor:?}");
            assert!(!floor
                .iter()
                .any(|a| a.contains("id=fs") || a.contains("id=vsock")));
            for kept in [
                "-kernel", "-initrd", "-append", "-machine", "-accel", "-object",
            ] {
                assert!(floor.iter().any(|a| a == kept), "{kept} kept");
            }
        }
    }
}
