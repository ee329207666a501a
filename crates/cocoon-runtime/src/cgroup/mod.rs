//! The pod's cgroup on the host, as Kata's `sandbox_cgroup_only`: the
//! sandbox container's `linux.cgroupsPath` (the kubelet's pod cgroup plus
//! the sandbox id) holds QEMU and every helper daemon of the pod, so that
//! what the VM costs is charged to the pod and bounded by the limits the
//! kubelet set on the parent. The shim itself stays where containerd put
//! it.
//!
//! [`HostCgroup::create`] makes the cgroup in every hierarchy mounted on
//! the host (cgroup v1: one per controller and `name=systemd`; v2: the
//! unified one; a hybrid host both) and opens its `cgroup.procs` files.
//! The processes join before they exec: each writes `0` (itself) into
//! those files between `fork` and `exec` (see
//! [`cocoon_hypervisor::VmSpec::cgroup_procs`]), so every page QEMU ever
//! touches, the guest's memory included, is charged to the pod.
//!
//! Cocoon writes cgroupfs itself. It asks no cgroup manager, systemd
//! included (not over D-Bus either): a path in systemd's spelling is
//! expanded into the directories runc's and Kata's systemd drivers use
//! ([`CgroupPath`]), so the pod lands where the kubelet looks for it, but
//! systemd has no unit for it.
//!
//! Only what Cocoon created is removed: the directories of the path that
//! were missing when the sandbox started (the leaf, and the parents if
//! the kubelet had not made them), recorded in the sandbox's state
//! directory so that the cleanup after a killed shim removes them too
//! ([`remove_recorded`]). A parent that existed is never touched: no
//! limit is written, no v2 controller enabled in it. A leaf that already
//! existed is used as found and kept. Removal comes after the VM's
//! processes are gone; anything still in a leaf Cocoon created (a
//! daemon's child) is killed first. A parent Cocoon created that holds
//! another pod's cgroup by then stays (empty afterwards, as the parents
//! runc creates stay).
//!
//! In a v1 `cpuset` hierarchy a new cgroup starts with no CPUs and no
//! memory nodes, and no task can join it: each directory Cocoon creates
//! there copies `cpuset.cpus` and `cpuset.mems` from its parent. In v2,
//! each parent directory Cocoon creates delegates the controllers it has
//! to its children (`cgroup.subtree_control`), as runc does.

mod path;

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::rundir::mountinfo;
use crate::rundir::safe_fs::{errno, open_beneath, open_host, Cross};

pub use path::{CgroupPath, InvalidCgroupPath, KEY};

/// How long removal waits for a cgroup to empty (processes being killed
/// and reaped) before it leaves it.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The same on the drop path, which blocks.
const DROP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the pod's cgroup could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup hierarchy is mounted (/proc/self/mountinfo)")]
    NoHierarchy,
    #[error("cgroup {path}: {action} {dir}")]
    Io {
        path: String,
        action: &'static str,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup record")]
    Record(#[source] serde_json::Error),
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where its root is mounted.
    pub mount: PathBuf,
    pub v2: bool,
    /// Its super options (a v1 hierarchy names its controllers there).
    options: Vec<String>,
}

impl Hierarchy {
    /// Whether `controller` is in this hierarchy: a v1 mount option, or on
    /// v2 one the root enables for its children (`cgroup.subtree_control`).
    pub fn has(&self, controller: &str) -> bool {
        if self.v2 {
            std::fs::read_to_string(self.mount.join("cgroup.subtree_control"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
        } else {
            self.options.iter().any(|o| o == controller)
        }
    }

    /// A v1 hierarchy with the cpuset controller.
    fn cpuset(&self) -> bool {
        !self.v2 && self.has("cpuset")
    }

    /// Mounted with `noprefix`: `cpus`, not `cpuset.cpus`.
    fn noprefix(&self) -> bool {
        self.options.iter().any(|o| o == "noprefix")
    }
}

/// The host's cgroup hierarchies: each cgroup file system mounted at its
/// root, once (several mounts of one hierarchy share a device number).
pub fn hierarchies() -> io::Result<Vec<Hierarchy>> {
    Ok(from_mounts(mountinfo::entries()?))
}

fn from_mounts(entries: Vec<mountinfo::Entry>) -> Vec<Hierarchy> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for e in entries {
        let v2 = match e.fstype.as_str() {
            "cgroup" => false,
            "cgroup2" => true,
            _ => continue,
        };
        // Below the root (a bind of a sub-cgroup, a cgroup namespace's
        // view), the path would not start from the root; the record names
        // mount points as text.
        if e.root != Path::new("/") || e.point.to_str().is_none() || seen.contains(&e.dev) {
            continue;
        }
        seen.push(e.dev);
        out.push(Hierarchy {
            mount: e.point,
            v2,
            options: e.super_options.split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// A directory Cocoon created, as the state directory records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Created {
    /// The mount point of its hierarchy.
    hierarchy: PathBuf,
    /// Its path below the hierarchy's root.
    dir: Vec<String>,
    /// The pod's own cgroup (the processes' one), not a parent.
    leaf: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    path: String,
    created: Vec<Created>,
}

/// The pod's cgroup, made in every hierarchy. Dropping it removes what
/// [`HostCgroup::create`] created (see [`HostCgroup::remove`]).
#[derive(Debug)]
pub struct HostCgroup {
    path: CgroupPath,
    /// The leaf's `cgroup.procs` in each hierarchy, open for writing.
    procs: Vec<Arc<OwnedFd>>,
    /// What was created, top-down within each hierarchy.
    created: Vec<Created>,
    removed: bool,
}

impl HostCgroup {
    /// Creates `path` in every hierarchy (what exists is used as found)
    /// and opens its `cgroup.procs` files. On failure, what was created
    /// is removed again.
    pub fn create(path: &CgroupPath) -> Result<Self, Error> {
        let hierarchies = hierarchies().map_err(|source| Error::Io {
            path: path.to_string(),
            action: "read",
            dir: "/proc/self/mountinfo".into(),
            source,
        })?;
        if hierarchies.is_empty() {
            return Err(Error::NoHierarchy);
        }
        let mut cg = Self {
            path: path.clone(),
            procs: Vec::new(),
            created: Vec::new(),
            removed: false,
        };
        // From here on, dropping `cg` removes what was made.
        for h in &hierarchies {
            let procs = cg.create_in(h)?;
            cg.procs.push(Arc::new(procs));
        }
        tracing::info!(
            cgroup = %cg.path,
            hierarchies = hierarchies.len(),
            created = cg.created.len(),
            "pod cgroup ready"
        );
        Ok(cg)
    }

    /// Creates the path in hierarchy `h`, top-down, and opens the leaf's
    /// `cgroup.procs`. A directory that vanishes under the walk (a
    /// parent another pod's teardown removed as it emptied) restarts it.
    fn create_in(&mut self, h: &Hierarchy) -> Result<OwnedFd, Error> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.walk(h) {
                Err((Some(Errno::ENOENT), _)) if attempts < 3 => continue,
                Err((_, e)) => return Err(e),
                Ok(fd) => return Ok(fd),
            }
        }
    }

    fn walk(&mut self, h: &Hierarchy) -> Result<OwnedFd, (Option<Errno>, Error)> {
        let path = self.path.to_string();
        let err = |action, dir: &Path| {
            let (path, dir) = (path.clone(), dir.to_path_buf());
            move |source: io::Error| {
                let code = source.raw_os_error().map(Errno::from_raw);
                let e = Error::Io {
                    path,
                    action,
                    dir,
                    source,
                };
                (code, e)
            }
        };
        let mut dir = open_cgroup_root(&h.mount).map_err(err("open", &h.mount))?;
        let mut shown = h.mount.clone();
        let components = self.path.components();
        let mut leaf_made = false;
        for (i, c) in components.iter().enumerate() {
            shown.push(c);
            let leaf = i + 1 == components.len();
            let mode = Mode::from_bits_truncate(0o755);
            let made = match mkdirat(Some(dir.as_raw_fd()), c.as_str(), mode) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => return Err(err("create", &shown)(errno(e))),
            };
            if made {
                self.created.push(Created {
                    hierarchy: h.mount.clone(),
                    dir: components[..=i].to_vec(),
                    leaf,
                });
                leaf_made = leaf;
            }
            let child = open_beneath(
                dir.as_fd(),
                c,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Cross::NoMounts,
            )
            .map_err(err("open", &shown))?;
            if made && h.cpuset() {
                inherit_cpuset(dir.as_fd(), child.as_fd(), h.noprefix())
                    .map_err(err("copy cpuset.cpus and cpuset.mems into", &shown))?;
            }
            if made && h.v2 && !leaf {
                delegate_controllers(child.as_fd())
                    .map_err(err("enable controllers in", &shown))?;
            }
            dir = child;
        }
        if !leaf_made {
            tracing::warn!(
                cgroup = %self.path,
                "{} existed: used as found, and kept",
                shown.display()
            );
        }
        open_beneath(
            dir.as_fd(),
            "cgroup.procs",
            OFlag::O_WRONLY,
            Cross::NoMounts,
        )
        .map_err(err("open", &shown.join("cgroup.procs")))
    }

    /// The path, as validated.
    pub fn path(&self) -> &CgroupPath {
        &self.path
    }

    /// The `cgroup.procs` file of the pod's cgroup in each hierarchy, open
    /// for writing: a process that writes `0` into each joins it.
    pub fn procs(&self) -> Vec<Arc<OwnedFd>> {
        self.procs.clone()
    }

    /// What [`remove_recorded`] needs to remove what this created.
    pub fn record(&self) -> Vec<u8> {
        let record = Record {
            path: self.path.to_string(),
            created: self.created.clone(),
        };
        // Strings and UTF-8 paths only: this cannot fail.
        serde_json::to_vec(&record).unwrap_or_default()
    }

    /// Removes what [`HostCgroup::create`] created, deepest first, once
    /// the VM's processes are gone; whatever is still in a leaf Cocoon
    /// created is killed. What cannot be removed is left, logged, and the
    /// first failure returned.
    pub async fn remove(mut self) -> Result<(), Error> {
        self.removed = true;
        self.procs.clear();
        let created = std::mem::take(&mut self.created);
        let path = self.path.to_string();
        tokio::task::spawn_blocking(move || remove_created(&path, &created, REMOVE_TIMEOUT))
            .await
            .unwrap_or_else(|e| {
                Err(Error::Io {
                    path: self.path.to_string(),
                    action: "remove",
                    dir: PathBuf::new(),
                    source: io::Error::other(e),
                })
            })
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if !self.removed {
            self.procs.clear();
            let _ = remove_created(&self.path.to_string(), &self.created, DROP_TIMEOUT);
        }
    }
}

/// Removes what a [`HostCgroup::record`] says was created, after the
/// owner died (its processes killed): each entry only if its hierarchy is
/// still mounted where the record says and its path is a valid cgroup
/// path; whatever is still in a leaf is killed first.
pub async fn remove_recorded(record: &[u8]) -> Result<(), Error> {
    let record: Record = serde_json::from_slice(record).map_err(Error::Record)?;
    let mounted = hierarchies().unwrap_or_default();
    let created: Vec<Created> = record
        .created
        .into_iter()
        .filter(|c| {
            let known = mounted.iter().any(|h| h.mount == c.hierarchy);
            let valid = CgroupPath::parse(&format!("/{}", c.dir.join("/")))
                .is_ok_and(|p| p.components() == c.dir.as_slice());
            if !(known && valid) {
                tracing::warn!(
                    "cgroup record: {:?} in {} is not a cgroup Cocoon can have made; kept",
                    c.dir,
                    c.hierarchy.display()
                );
            }
            known && valid
        })
        .collect();
    let path = record.path;
    tokio::task::spawn_blocking(move || remove_created(&path, &created, REMOVE_TIMEOUT))
        .await
        .map_err(|e| Error::Io {
            path: String::new(),
            action: "remove",
            dir: PathBuf::new(),
            source: io::Error::other(e),
        })?
}

/// Removes `created` in reverse order; returns the first failure (all are
/// logged).
fn remove_created(path: &str, created: &[Created], timeout: Duration) -> Result<(), Error> {
    let until = Instant::now() + timeout;
    let mut first = None;
    for c in created.iter().rev() {
        let shown = c.dir.iter().fold(c.hierarchy.clone(), |p, d| p.join(d));
        match remove_one(c, until) {
            Ok(()) => tracing::debug!(cgroup = path, "removed {}", shown.display()),
            Err((action, source)) => {
                tracing::warn!(
                    cgroup = path,
                    "left behind: could not {action} {}: {source}",
                    shown.display()
                );
                first.get_or_insert(Error::Io {
                    path: path.to_string(),
                    action,
                    dir: shown,
                    source,
                });
            }
        }
    }
    first.map_or(Ok(()), Err)
}

fn remove_one(c: &Created, until: Instant) -> Result<(), (&'static str, io::Error)> {
    let Some((name, parents)) = c.dir.split_last() else {
        return Ok(());
    };
    let root = open_cgroup_root(&c.hierarchy).map_err(|e| ("open", e))?;
    let parent = if parents.is_empty() {
        root
    } else {
        match open_beneath(
            root.as_fd(),
            parents.join("/"),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Cross::NoMounts,
        ) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            opened => opened.map_err(|e| ("open", e))?,
        }
    };
    loop {
        if c.leaf {
            kill_members(parent.as_fd(), name);
        }
        match unlinkat(
            Some(parent.as_raw_fd()),
            name.as_str(),
            UnlinkatFlags::RemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            // The pod's processes still leaving.
            Err(Errno::EBUSY) if c.leaf && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20))
            }
            // A parent Cocoon made holds another pod's cgroup now: that
            // pod uses it, and it stays (empty, later: as runc leaves the
            // parents it makes).
            Err(Errno::EBUSY) if !c.leaf => {
                tracing::debug!("{name}: in use by another cgroup; kept");
                return Ok(());
            }
            Err(e) => return Err(("remove", errno(e))),
        }
    }
}

/// SIGKILLs every process listed in `<dir>/<name>/cgroup.procs`.
fn kill_members(dir: BorrowedFd<'_>, name: &str) {
    let Ok(text) = read_file(dir, &format!("{name}/cgroup.procs")) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 1 {
            tracing::debug!(pid, "killing a process left in the pod's cgroup");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Opens the root of the hierarchy mounted at `mount` (a host path from
/// the mount table), checking that a cgroup file system is mounted there.
fn open_cgroup_root(mount: &Path) -> io::Result<OwnedFd> {
    use nix::sys::statfs::{fstatfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC};
    let fd = open_host(mount, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
    let kind = fstatfs(&fd).map_err(errno)?.filesystem_type();
    if kind != CGROUP_SUPER_MAGIC && kind != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a cgroup file system",
        ));
    }
    Ok(fd)
}

fn read_file(dir: BorrowedFd<'_>, name: &str) -> io::Result<String> {
    let bytes = crate::rundir::safe_fs::read_small(dir, std::ffi::OsStr::new(name), 1 << 20)?;
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_file(dir: BorrowedFd<'_>, name: &str, value: &str) -> io::Result<()> {
    let fd = open_beneath(dir, name, OFlag::O_WRONLY, Cross::NoMounts)?;
    std::fs::File::from(fd).write_all(value.as_bytes())
}

/// A new v1 cpuset cgroup takes its parent's CPUs and memory nodes (it
/// starts with none, and no task can join it so).
fn inherit_cpuset(parent: BorrowedFd<'_>, child: BorrowedFd<'_>, noprefix: bool) -> io::Result<()> {
    for file in ["cpus", "mems"] {
        let name = if noprefix {
            file.to_string()
        } else {
            format!("cpuset.{file}")
        };
        if !read_file(child, &name)?.trim().is_empty() {
            continue;
        }
        let value = read_file(parent, &name)?;
        if value.trim().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the parent's {name} is empty"),
            ));
        }
        write_file(child, &name, value.trim())?;
    }
    Ok(())
}

/// Lets the children of a v2 cgroup Cocoon created use every controller
/// it has.
fn delegate_controllers(dir: BorrowedFd<'_>) -> io::Result<()> {
    let available = read_file(dir, "cgroup.controllers")?;
    let enable: Vec<String> = available
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if enable.is_empty() {
        return Ok(());
    }
    write_file(dir, "cgroup.subtree_control", &enable.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dev: &str, root: &str, point: &str, fstype: &str, opts: &str) -> mountinfo::Entry {
        mountinfo::Entry {
            dev: dev.into(),
            root: root.into(),
            point: point.into(),
            fstype: fstype.into(),
            super_options: opts.into(),
        }
    }

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        let h = from_mounts(vec![
            entry("0:20", "/", "/sys", "sysfs", "rw"),
            entry("0:30", "/", "/sys/fs/cgroup/cpuset", "cgroup", "rw,cpuset"),
            entry("0:31", "/", "/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
            entry(
                "0:32",
                "/",
                "/sys/fs/cgroup/systemd",
                "cgroup",
                "rw,xattr,name=systemd",
            ),
            entry(
                "0:33",
                "/",
                "/sys/fs/cgroup/unified",
                "cgroup2",
                "rw,nsdelegate",
            ),
            // The same hierarchy mounted again, and a bind of a sub-cgroup.
            entry("0:31", "/", "/mnt/memory", "cgroup", "rw,memory"),
            entry("0:34", "/kubepods", "/mnt/pids", "cgroup", "rw,pids"),
            entry("0:35", "/", "/mnt/cs", "cgroup", "rw,noprefix,cpuset"),
        ]);
        let mounts: Vec<_> = h.iter().map(|h| h.mount.to_str().unwrap()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/unified",
                "/mnt/cs"
            ]
        );
        assert!(h[0].cpuset() && !h[0].v2 && !h[0].noprefix());
        assert!(!h[1].cpuset());
        assert!(h[3].v2 && !h[3].cpuset());
        assert!(h[4].cpuset() && h[4].noprefix());
    }

    #[test]
    fn the_record_round_trips() {
        let cg = HostCgroup {
            path: CgroupPath::parse("/a/b").unwrap(),
            procs: Vec::new(),
            created: vec![Created {
                hierarchy: "/sys/fs/cgroup/memory".into(),
                dir: vec!["a".into(), "b".into()],
                leaf: true,
            }],
            // Nothing to remove on drop: it was never made.
            removed: true,
        };
        let r: Record = serde_json::from_slice(&cg.record()).unwrap();
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.created, cg.created);
    }
}
