//! `<state_dir>/<sandbox-id>/`: one pod's host state, and the part of the
//! host its guest sees.
//!
//! ```text
//! <state_dir>/          0700 when Cocoon creates it
//!   <id>/               0700, a private bind of itself: sockets, logs,
//!                       `*.pid` (0600), `sandbox-id` (0600, the marker),
//!                       `network` and `cgroup` (0600, what teardown undoes)
//!     mounts/           host side, never exported: a bind of itself, MS_SHARED
//!       <cid>/          0700, one per container
//!         rootfs        the container's rootfs (MS_BIND|MS_REC), read-write
//!         <n>           a volume, file or directory, read-only or read-write
//!     shared/           a bind of mounts/, MS_SLAVE, read-only: what
//!                       virtiofsd exports
//! ```
//!
//! This is Kata's mounts/shared model. Root in the guest owns whatever it
//! can write, so the guest sees the share root (`shared/`, and each
//! `shared/<cid>/`) read-only: it cannot fill the host's `/run`, nor plant
//! or swap entries next to its mount points. Each bind made under
//! `mounts/` reaches `shared/` by propagation with its own flags, so a
//! container's rootfs stays writable and a read-only volume stays
//! read-only (see [`bind`]). Teardown works from `mounts/` and the
//! directory descriptors of [`safe_fs`], never from a path the guest could
//! have changed (Kata's CVE-2020-2024: a guest swapped its rootfs mount
//! point for a symlink and the runtime unmounted a host mount), and never
//! removes anything below a mount point.
//!
//! `<id>/` is made a private mount of its own so that nothing mounted in
//! it propagates out: on hosts where `/run` is a shared mount (systemd),
//! every rootfs bind would otherwise be copied into each peer of `/run`,
//! and pin the rootfs there.

mod bind;
mod dead;
pub(crate) mod mountinfo;
pub(crate) mod safe_fs;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use cocoon_protocols::Id;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fchmod, Mode};

use safe_fs::{errno, open_beneath, proc_path, Cross, Leftover};

use crate::{Error, Result};

#[cfg(test)]
use dead::within;
pub use dead::{cleanup_dead, owned_processes, sandbox_id_of};

/// Whether the guest may write to a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// How mounts the host makes below a share's source after it was shared
/// reach the guest (the bind's `rprivate`, `rslave` or `rshared`).
/// Nothing the guest mounts ever reaches the host: `Shared` is `Slave`
/// on the host side of the boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// They do not.
    #[default]
    Private,
    /// They do.
    Slave,
    /// They do; the guest's side of `rshared` is the agent's.
    Shared,
}

/// The name of a share in its container's directory: Cocoon's own, never
/// the caller's, so it can neither escape the directory nor collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShareName {
    /// `rootfs`
    Rootfs,
    /// `<n>`: the container's n-th host bind mount.
    Volume(u32),
}

impl fmt::Display for ShareName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShareName::Rootfs => f.write_str("rootfs"),
            ShareName::Volume(n) => write!(f, "{n}"),
        }
    }
}

/// Marks a directory as a sandbox's and names it: [`cleanup_dead`]
/// removes nothing that lacks it.
const MARKER: &str = "sandbox-id";
const MOUNTS: &str = "mounts";
const SHARED: &str = "shared";

/// A sandbox's state directory, laid out and mounted as above. Dropping
/// it unmounts and removes everything (see [`RunDir::remove`]).
pub struct RunDir {
    id: Id,
    path: PathBuf,
    shared: PathBuf,
    /// `<state_dir>`: where `<id>` is removed from.
    state: OwnedFd,
    /// `<id>/`, the root of its private bind.
    dir: OwnedFd,
    /// The root of the `mounts/` bind, once made.
    mounts: Option<OwnedFd>,
    /// The root of the `shared/` bind, once made (`O_PATH`).
    shared_root: Option<OwnedFd>,
    api: bind::Api,
    removed: bool,
}

/// An error of sandbox `id` about `path`.
fn host(id: &Id, action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let (id, path) = (id.to_string(), path.to_path_buf());
    move |source| Error::Host {
        id,
        action,
        path,
        source,
    }
}

/// The file in `<id>/` that says what the pod network's teardown undoes.
const NETWORK_RECORD: &str = "network";

/// Its largest size: a netns path and [`cocoon_protocols::network::MAX_INTERFACES`] lines.
const NETWORK_RECORD_MAX: u64 = 8192;

/// The file in `<id>/` that says which host cgroup directories Cocoon
/// created for the pod ([`crate::cgroup::HostCgroup::record`]).
const CGROUP_RECORD: &str = "cgroup";

/// Its largest size: a few directories in each of a dozen hierarchies.
const CGROUP_RECORD_MAX: u64 = 64 << 10;

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl RunDir {
    /// Creates and mounts `<state_dir>/<id>/`. It must not exist: state
    /// left by an owner that died is [`cleanup_dead`]'s to remove.
    pub fn create(state_dir: &Path, id: &Id) -> Result<Self> {
        let state = open_state_dir(state_dir).map_err(host(id, "create", state_dir))?;
        let path = state_dir.join(id);
        let under =
            safe_fs::mkdir_private(state.as_fd(), os(id)).map_err(host(id, "create", &path))?;
        let bound = self_bind(under.as_fd(), || {
            open_beneath(
                state.as_fd(),
                id,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Cross::Mounts,
            )
        });
        let dir = match bound {
            Ok(dir) => dir,
            Err(e) => {
                report(id, &teardown(state.as_fd(), id, &path));
                return Err(host(id, "bind-mount", &path)(e));
            }
        };
        let mut run = Self {
            id: id.clone(),
            shared: path.join(SHARED),
            path,
            state,
            dir,
            mounts: None,
            shared_root: None,
            api: bind::Api::Auto,
            removed: false,
        };
        // From here on, dropping `run` undoes whatever was made.
        run.lay_out()?;
        Ok(run)
    }

    fn lay_out(&mut self) -> Result<()> {
        let err = |action, name: &str| host(&self.id, action, &self.path.join(name));
        let dir = self.dir.as_fd();
        mount_propagation(dir, MsFlags::MS_PRIVATE).map_err(err("make private", ""))?;
        let mut marker =
            safe_fs::create_private_file(dir, os(MARKER), true).map_err(err("create", MARKER))?;
        marker
            .write_all(self.id.as_bytes())
            .map_err(err("write", MARKER))?;

        // mounts/: a bind of itself, shared in a peer group of its own.
        let under = safe_fs::mkdir_private(dir, os(MOUNTS)).map_err(err("create", MOUNTS))?;
        let mounts = self_bind(under.as_fd(), || {
            open_beneath(
                dir,
                MOUNTS,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Cross::Mounts,
            )
        })
        .map_err(err("bind-mount", MOUNTS))?;
        mount_propagation(mounts.as_fd(), MsFlags::MS_SHARED)
            .map_err(err("make shared", MOUNTS))?;

        // shared/: receives what is mounted under mounts/, sends nothing
        // back, and is read-only at its root.
        let under = safe_fs::mkdir_private(dir, os(SHARED)).map_err(err("create", SHARED))?;
        let none = None::<&Path>;
        mount(
            Some(&proc_path(mounts.as_fd())),
            &proc_path(under.as_fd()),
            none,
            MsFlags::MS_BIND,
            none,
        )
        .map_err(|e| err("bind-mount", SHARED)(errno(e)))?;
        self.mounts = Some(mounts);
        let shared = open_beneath(
            dir,
            SHARED,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Cross::Mounts,
        )
        .map_err(err("open", SHARED))?;
        mount_propagation(shared.as_fd(), MsFlags::MS_SLAVE).map_err(err("make slave", SHARED))?;
        mount(
            none,
            &proc_path(shared.as_fd()),
            none,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            none,
        )
        .map_err(|e| err("remount read-only", SHARED)(errno(e)))?;
        self.shared_root = Some(shared);
        Ok(())
    }

    pub fn id(&self) -> &Id {
        &self.id
    }

    /// `<state_dir>/<id>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<state_dir>/<id>/shared`: the directory virtiofsd exports.
    pub fn shared(&self) -> &Path {
        &self.shared
    }

    /// Records the pid of a process of this sandbox in `<name>.pid`, for
    /// the cleanup of an owner that died ([`cleanup_dead`]). `name` is a
    /// plain word (`qemu`, `virtiofsd`).
    pub fn record_pid(&self, name: &str, pid: u32) -> Result<()> {
        let file = format!("{name}.pid");
        let err = host(&self.id, "record pid in", &self.path.join(&file));
        if !is_word(name) {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a plain process name",
            )));
        }
        self.record(&file, pid.to_string().as_bytes(), "record pid in")
    }

    /// Records what the pod network's teardown undoes (see
    /// [`crate::network::Network::record`]), for [`cleanup_dead`].
    pub fn record_network(&self, record: &[u8]) -> Result<()> {
        self.record(NETWORK_RECORD, record, "record the network in")
    }

    /// Records which host cgroup directories were created for the pod
    /// ([`crate::cgroup::HostCgroup::record`]), for [`cleanup_dead`].
    pub fn record_cgroup(&self, record: &[u8]) -> Result<()> {
        self.record(CGROUP_RECORD, record, "record the cgroup in")
    }

    /// Writes `bytes` to the new private file `name` of the directory.
    fn record(&self, name: &str, bytes: &[u8], action: &'static str) -> Result<()> {
        safe_fs::create_private_file(self.dir.as_fd(), os(name), false)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(host(&self.id, action, &self.path.join(name)))
    }

    /// Shares host path `source` (a file or a directory, and everything
    /// mounted below it) with the guest as `<cid>/<name>`, read-only or
    /// read-write, receiving later host mounts below it or not; returns
    /// that path, relative to the guest's share.
    /// `source` is the caller's (from the bundle or the spec), so symlinks
    /// in it are followed; what gets mounted is what was opened.
    pub fn share(
        &mut self,
        cid: &Id,
        name: ShareName,
        source: &Path,
        access: Access,
        propagation: Propagation,
    ) -> Result<String> {
        let src =
            safe_fs::open_host(source, OFlag::O_PATH).map_err(host(&self.id, "open", source))?;
        self.share_fd(cid, name, src, access, propagation)
    }

    /// Shares directory `rootfs` read-write as the root filesystem of
    /// `cid`; returns `<cid>/rootfs`, relative to the guest's share.
    pub fn share_rootfs(&mut self, cid: &Id, rootfs: &Path) -> Result<String> {
        let src = safe_fs::open_host(rootfs, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(host(
            &self.id,
            "open as a rootfs",
            rootfs,
        ))?;
        self.share_fd(
            cid,
            ShareName::Rootfs,
            src,
            Access::ReadWrite,
            Propagation::Private,
        )
    }

    fn share_fd(
        &mut self,
        cid: &Id,
        name: ShareName,
        src: OwnedFd,
        access: Access,
        propagation: Propagation,
    ) -> Result<String> {
        let rel = format!("{cid}/{name}");
        let shown = self.path.join(MOUNTS).join(&rel);
        let err = |action| host(&self.id, action, &shown);
        let (Some(mounts), Some(shared)) = (&self.mounts, &self.shared_root) else {
            return Err(err("share")(io::Error::from(io::ErrorKind::NotConnected)));
        };
        let is_dir =
            safe_fs::is_type(&src, nix::sys::stat::SFlag::S_IFDIR).map_err(err("inspect"))?;
        let cdir = match open_beneath(
            mounts.as_fd(),
            cid,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Cross::NoMounts,
        ) {
            Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => {
                safe_fs::mkdir_private(mounts.as_fd(), os(cid))
            }
            opened => opened,
        }
        .map_err(host(&self.id, "create", &self.path.join(MOUNTS).join(cid)))?;
        let point = name.to_string();
        // The mount point is of the source's kind: a bind needs both to be
        // directories or both not.
        if is_dir {
            safe_fs::mkdir_private(cdir.as_fd(), os(&point)).map(drop)
        } else {
            safe_fs::create_private_file(cdir.as_fd(), os(&point), true).map(drop)
        }
        .map_err(err("create"))?;
        let shared_copy = || open_beneath(shared.as_fd(), &rel, OFlag::O_PATH, Cross::Mounts);
        if let Err(e) = bind::bind(
            src.as_fd(),
            cdir.as_fd(),
            os(&point),
            access,
            propagation,
            self.api,
            shared_copy,
        ) {
            let mut left = Vec::new();
            safe_fs::remove_entry(cdir.as_fd(), os(&point), &shown, &mut left);
            report(&self.id, &left);
            return Err(err("bind-mount")(e));
        }
        tracing::debug!(sandbox = %self.id, container = %cid, share = %rel, ?access, ?propagation, "shared");
        Ok(rel)
    }

    /// Stops sharing everything of container `cid` and removes
    /// `mounts/<cid>/`. What cannot be undone (an unmount that failed,
    /// leaving a user's data below it) is left in place, logged, and the
    /// first of it returned.
    pub fn unshare_container(&mut self, cid: &Id) -> Result<()> {
        let Some(mounts) = &self.mounts else {
            return Ok(());
        };
        let shown = self.path.join(MOUNTS).join(cid);
        let mut left = Vec::new();
        match open_beneath(
            mounts.as_fd(),
            cid,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Cross::NoMounts,
        ) {
            Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => return Ok(()),
            // Not a directory (a symlink, say): nothing is mounted on it;
            // it is unlinked below, never followed.
            Err(e) => tracing::warn!(sandbox = %self.id, "unexpected {}: {e}", shown.display()),
            // The propagated copies under shared/ go with these.
            Ok(cdir) => unmount_below(
                cdir.as_fd(),
                &shown,
                |rel| mountinfo::depth(rel) == 1,
                &mut left,
            ),
        }
        safe_fs::remove_entry(mounts.as_fd(), os(cid), &shown, &mut left);
        into_result(&self.id, left)
    }

    /// Unmounts everything and removes the directory; what could not be
    /// undone is left in place, logged, and the first of it returned.
    pub fn remove(mut self) -> Result<()> {
        let left = self.teardown();
        into_result(&self.id, left)
    }

    fn teardown(&mut self) -> Vec<Leftover> {
        self.removed = true;
        self.mounts = None;
        self.shared_root = None;
        teardown(self.state.as_fd(), &self.id, &self.path)
    }

    /// Makes shares with `mount(2)` and remounts, as on kernels before 5.12.
    #[cfg(test)]
    fn use_legacy_binds(&mut self) {
        self.api = bind::Api::Legacy;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.removed {
            let left = self.teardown();
            report(&self.id, &left);
        }
    }
}

/// Opens `state_dir`, creating it 0700 (whatever the umask) if missing.
/// An existing directory keeps its mode: it may be a path the host
/// administrator shares with other uses.
fn open_state_dir(state_dir: &Path) -> io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    match safe_fs::open_host(state_dir, flags) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        opened => return opened,
    }
    if let Some(parent) = state_dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let created = match nix::unistd::mkdir(state_dir, Mode::S_IRWXU) {
        Ok(()) => true,
        Err(Errno::EEXIST) => false,
        Err(e) => return Err(errno(e)),
    };
    let fd = safe_fs::open_host(state_dir, flags)?;
    if created {
        fchmod(std::os::fd::AsRawFd::as_raw_fd(&fd), Mode::S_IRWXU).map_err(errno)?;
    }
    Ok(fd)
}

/// Bind-mounts directory `under` on itself; `top` then opens the new
/// mount's root (the descriptor `under` stays below it).
fn self_bind(
    under: BorrowedFd<'_>,
    top: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<OwnedFd> {
    let p = proc_path(under);
    mount(Some(&p), &p, None::<&Path>, MsFlags::MS_BIND, None::<&Path>).map_err(errno)?;
    top()
}

fn mount_propagation(root: BorrowedFd<'_>, flag: MsFlags) -> io::Result<()> {
    let none = None::<&Path>;
    mount(none, &proc_path(root), none, flag, none).map_err(errno)
}

/// Unmounts and removes `<state>/<id>` (shown as `shown`): the binds under
/// `mounts/<cid>/`, then `shared/` (the guest's copies go with it) and
/// `mounts/`, then the directory's own bind; then removes the tree without
/// entering a mount point. Returns what was left.
fn teardown(state: BorrowedFd<'_>, id: &Id, shown: &Path) -> Vec<Leftover> {
    let mut left = Vec::new();
    match open_beneath(state, id, OFlag::O_PATH | OFlag::O_DIRECTORY, Cross::Mounts) {
        Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => return left,
        Err(e) => {
            left.push(Leftover {
                action: "open",
                path: shown.to_path_buf(),
                error: e,
            });
            return left;
        }
        Ok(dir) => {
            // Only these depths: every directory above them is Cocoon's and
            // read-only to the guest. Anything deeper (inside a rootfs) is
            // detached with its ancestor, never looked up by its path.
            let ours = |rel: &Path| match mountinfo::depth(rel) {
                1 => true,
                3 => rel.starts_with(MOUNTS),
                _ => false,
            };
            unmount_below(dir.as_fd(), shown, ours, &mut left);
        }
    }
    // The directory's own bind, and anything stacked on it.
    for _ in 0..8 {
        match safe_fs::unmount(state, os(id)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => break,
            Err(e) => {
                left.push(Leftover {
                    action: "unmount",
                    path: shown.to_path_buf(),
                    error: e,
                });
                break;
            }
        }
    }
    safe_fs::remove_entry(state, os(id), shown, &mut left);
    left
}

/// Unmounts (lazily, deepest first) the mounts below directory `dir` whose
/// path relative to it `pick` selects, each through its parent's
/// descriptor; repeats while stacked mounts remain. Those still mounted
/// at the end are reported.
fn unmount_below(
    dir: BorrowedFd<'_>,
    shown: &Path,
    pick: impl Fn(&Path) -> bool,
    left: &mut Vec<Leftover>,
) {
    let real = match safe_fs::kernel_path(dir) {
        Ok(p) => p,
        Err(error) => {
            return left.push(Leftover {
                action: "resolve",
                path: shown.to_path_buf(),
                error,
            })
        }
    };
    let list = |left: &mut Vec<Leftover>| match mountinfo::below(&real) {
        Ok(mut v) => {
            v.retain(|rel| pick(rel));
            v.sort_by_key(|rel| Reverse(mountinfo::depth(rel)));
            v.dedup();
            Some(v)
        }
        Err(error) => {
            left.push(Leftover {
                action: "read mount table for",
                path: shown.to_path_buf(),
                error,
            });
            None
        }
    };
    let mut failed: BTreeMap<PathBuf, io::Error> = BTreeMap::new();
    for _ in 0..8 {
        let Some(mounted) = list(left) else { return };
        let mut progress = false;
        for rel in mounted {
            let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
                continue;
            };
            let parent_fd = if parent.as_os_str().is_empty() {
                None
            } else {
                match open_beneath(
                    dir,
                    parent,
                    OFlag::O_PATH | OFlag::O_DIRECTORY,
                    Cross::Mounts,
                ) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        failed.insert(rel, e);
                        continue;
                    }
                }
            };
            let parent_fd = parent_fd.as_ref().map_or(dir, |fd| fd.as_fd());
            match safe_fs::unmount(parent_fd, name) {
                Ok(()) => progress = true,
                // Already gone with an ancestor or a propagated unmount.
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {}
                Err(e) => {
                    failed.insert(rel, e);
                }
            }
        }
        if !progress {
            break;
        }
    }
    let Some(mounted) = list(left) else { return };
    for rel in mounted {
        let error = failed
            .remove(&rel)
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::ResourceBusy, "still mounted"));
        left.push(Leftover {
            action: "unmount",
            path: shown.join(rel),
            error,
        });
    }
}

fn report(id: &Id, left: &[Leftover]) {
    for l in left {
        tracing::warn!(sandbox = %id, "left behind: could not {} {}: {}", l.action, l.path.display(), l.error);
    }
}

fn into_result(id: &Id, left: Vec<Leftover>) -> Result<()> {
    report(id, &left);
    match left.into_iter().next() {
        None => Ok(()),
        Some(first) => Err(host(id, first.action, &first.path)(first.error)),
    }
}

/// `a-z A-Z 0-9 - _`, starting with a letter or digit.
fn is_word(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
