//! `<state_dir>/<sandbox-id>/`: sockets, logs, pid files, and `shared/`,
//! the directory virtio-fs exports. `shared/` is a shared-propagation bind
//! mount of itself, so rootfs bind mounts made under it after virtiofsd has
//! started still reach virtiofsd's mount namespace.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::{Error, Result};

pub struct RunDir {
    id: String,
    path: PathBuf,
    shared: PathBuf,
    shared_mounted: bool,
    rootfs: BTreeMap<String, PathBuf>,
}

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

impl RunDir {
    pub fn create(id: &str, state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(id);
        let host = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Host {
                id: id.into(),
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(state_dir).map_err(host("create", state_dir))?;
        std::fs::create_dir(&path).map_err(host("create", &path))?;
        let mut dir = Self {
            id: id.into(),
            shared: path.join("shared"),
            path,
            shared_mounted: false,
            rootfs: BTreeMap::new(),
        };
        std::fs::create_dir(&dir.shared).map_err(host("create", &dir.shared))?;
        mount(
            Some(&dir.shared),
            &dir.shared,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| host("bind-mount", &dir.shared)(io(e)))?;
        dir.shared_mounted = true;
        mount(
            None::<&str>,
            &dir.shared,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| host("make shared", &dir.shared)(io(e)))?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// Records a pid for the `delete` cleanup path of a shim that died.
    pub fn record_pid(&self, name: &str, pid: u32) {
        let _ = std::fs::write(self.path.join(format!("{name}.pid")), pid.to_string());
    }

    pub fn bind_rootfs(&mut self, container_id: &str, rootfs: &Path) -> Result<String> {
        let rel = format!("{container_id}/rootfs");
        let target = self.shared.join(&rel);
        let err = |action, path: &Path| {
            let (id, path) = (self.id.clone(), path.to_path_buf());
            move |source| Error::Host {
                id,
                action,
                path,
                source,
            }
        };
        if !rootfs.is_dir() {
            return Err(err("use as rootfs", rootfs)(std::io::Error::from(
                std::io::ErrorKind::NotADirectory,
            )));
        }
        std::fs::create_dir_all(&target).map_err(err("create", &target))?;
        mount(
            Some(rootfs),
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| err("bind-mount", rootfs)(io(e)))?;
        self.rootfs.insert(container_id.into(), target);
        Ok(rel)
    }

    pub fn unbind_rootfs(&mut self, container_id: &str) {
        if let Some(target) = self.rootfs.remove(container_id) {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&target);
            let _ = target.parent().map(std::fs::remove_dir);
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let ids: Vec<String> = self.rootfs.keys().cloned().collect();
        for id in ids {
            self.unbind_rootfs(&id);
        }
        if self.shared_mounted {
            let _ = umount2(&self.shared, MntFlags::MNT_DETACH);
        }
        remove_no_follow(&self.path);
    }
}

/// Removes what Cocoon made under `dir`, never recursing into a directory
/// under `shared/` that is not empty: if an unmount failed there, the
/// directory is still a user's rootfs, and is left alone (and reported).
fn remove_no_follow(dir: &Path) {
    let shared = dir.join("shared");
    if let Ok(entries) = std::fs::read_dir(&shared) {
        for e in entries.flatten() {
            let rootfs = e.path().join("rootfs");
            let _ = std::fs::remove_dir(&rootfs);
            let _ = std::fs::remove_dir(e.path());
        }
    }
    let _ = std::fs::remove_dir(&shared);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| !t.is_dir()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!("could not remove {}: {e}", dir.display());
    }
}

/// `dir` with a trailing slash: what paths inside it start with. Without
/// the slash, sandbox `a` would claim the processes and mounts of `ab`.
fn within(dir: &Path) -> String {
    format!("{}/", dir.to_string_lossy().trim_end_matches('/'))
}

/// The recorded processes (`*.pid`) of `dir` that are still alive and
/// still ours: their command line names the directory.
pub fn owned_processes(dir: &Path) -> Vec<nix::unistd::Pid> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<i32>().ok())
        .map(nix::unistd::Pid::from_raw)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&within(dir))
        })
        .collect()
}

/// Cleans up after an owner that died: kills the processes recorded in
/// `*.pid`, unmounts everything below `dir`, removes it.
pub async fn cleanup_dead(dir: &Path) {
    let pids = owned_processes(dir);
    for p in &pids {
        let _ = nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        // Reap them if they were our children; else wait for their parent to.
        for p in &pids {
            let _ = nix::sys::wait::waitpid(*p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let prefix = within(dir);
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = umount2(Path::new(&m), MntFlags::MNT_DETACH);
    }
    remove_no_follow(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_does_not_claim_its_prefix_siblings() {
        let a = within(Path::new("/run/cocoon/a"));
        assert!("/run/cocoon/a/shared".starts_with(&a));
        assert!(!"/run/cocoon/ab/shared".starts_with(&a));
        assert_eq!(within(Path::new("/run/cocoon/a/")), a);
    }
}
