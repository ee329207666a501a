//! After an owner died: finding a sandbox's directory from what a file
//! says, killing the processes it recorded, and tearing it down — only
//! ever `<state_dir>/<id>` holding that sandbox's marker.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_protocols::Id;
use nix::fcntl::OFlag;
use nix::unistd::Pid;

use super::safe_fs::{self, open_beneath, proc_path, Cross};
use super::{
    host, into_result, os, teardown, CGROUP_RECORD, CGROUP_RECORD_MAX, MARKER, NETWORK_RECORD,
    NETWORK_RECORD_MAX,
};
use crate::Result;

/// `dir` with a trailing slash: what paths inside it start with. Without
/// the slash, sandbox `a` would claim the processes and mounts of `ab`.
pub(super) fn within(dir: &Path) -> String {
    format!("{}/", dir.to_string_lossy().trim_end_matches('/'))
}

/// Opens `<state_dir>/<id>` if it is a sandbox directory: a real
/// directory (no symlink), holding the marker that names `id`.
fn open_sandbox(state_dir: &Path, id: &Id) -> Result<Option<(OwnedFd, OwnedFd)>> {
    let path = state_dir.join(id);
    let state = match safe_fs::open_host(state_dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(host(id, "open", state_dir))?,
    };
    let dir = match open_beneath(
        state.as_fd(),
        id,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Cross::Mounts,
    ) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        opened => opened.map_err(host(id, "open", &path))?,
    };
    let marker = safe_fs::read_small(dir.as_fd(), os(MARKER), 256).map_err(host(
        id,
        "recognise as a sandbox directory",
        &path,
    ))?;
    if marker != id.as_bytes() {
        return Err(host(id, "recognise as a sandbox directory", &path)(
            io::Error::new(
                io::ErrorKind::InvalidData,
                "its marker names another sandbox",
            ),
        ));
    }
    Ok(Some((state, dir)))
}

/// The recorded processes (`*.pid`) of sandbox `id` that are still alive
/// and still its own: their command line names its directory.
pub fn owned_processes(state_dir: &Path, id: &Id) -> Vec<Pid> {
    match open_sandbox(state_dir, id) {
        Ok(Some((_, dir))) => processes_in(dir.as_fd(), &state_dir.join(id)),
        _ => Vec::new(),
    }
}

fn processes_in(dir: BorrowedFd<'_>, path: &Path) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir(proc_path(dir)) else {
        return Vec::new();
    };
    let prefix = within(path);
    entries
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.as_bytes().ends_with(b".pid"))
        .filter_map(|n| {
            let text = safe_fs::read_small(dir, &n, 32).ok()?;
            std::str::from_utf8(&text).ok()?.trim().parse::<i32>().ok()
        })
        .filter(|&pid| pid > 1)
        .map(Pid::from_raw)
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&prefix)
        })
        .collect()
}

/// Cleans up sandbox `id` after its owner died: kills the processes
/// recorded in its `*.pid` files (those still naming its directory),
/// undoes its pod network's tc redirects (the taps went with QEMU),
/// removes the host cgroup directories it recorded as its own (killing
/// what is left in them), unmounts what is mounted in `<state_dir>/<id>`,
/// and removes it. Acts on
/// that directory only, and only if it is a sandbox directory (a real
/// directory holding the marker [`RunDir::create`] writes); a missing one
/// is already clean.
pub async fn cleanup_dead(state_dir: &Path, id: &Id) -> Result<()> {
    let Some((state, dir)) = open_sandbox(state_dir, id)? else {
        return Ok(());
    };
    let path = state_dir.join(id);
    let pids = processes_in(dir.as_fd(), &path);
    let network = safe_fs::read_small(dir.as_fd(), os(NETWORK_RECORD), NETWORK_RECORD_MAX).ok();
    let cgroup = safe_fs::read_small(dir.as_fd(), os(CGROUP_RECORD), CGROUP_RECORD_MAX).ok();
    drop(dir);
    for p in &pids {
        let _ = nix::sys::signal::kill(*p, nix::sys::signal::Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        // Reap them if they were our children; else wait for their parent to.
        for p in &pids {
            let _ = nix::sys::wait::waitpid(*p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(record) = network {
        if let Err(e) = crate::network::teardown_recorded(&record).await {
            tracing::warn!(sandbox = %id, "{}", crate::error_chain(&e));
        }
    }
    if let Some(record) = cgroup {
        if let Err(e) = crate::cgroup::remove_recorded(&record).await {
            tracing::warn!(sandbox = %id, "{}", crate::error_chain(&e));
        }
    }
    let left = teardown(state.as_fd(), id, &path);
    into_result(id, left)
}

/// The sandbox whose state directory `run_dir` is, if it is exactly
/// `<state_dir>/<id>` for a valid id: no `..`, no `.`, nothing after the
/// id. For paths read from files (the bundle's pointer to its sandbox), so
/// that whatever they say, cleanup stays inside `state_dir`.
pub fn sandbox_id_of(state_dir: &Path, run_dir: &Path) -> Option<Id> {
    let prefix = within(state_dir);
    if !prefix.starts_with('/') {
        return None;
    }
    let rest = run_dir
        .as_os_str()
        .as_bytes()
        .strip_prefix(prefix.as_bytes())?;
    Id::sandbox(std::str::from_utf8(rest).ok()?).ok()
}
