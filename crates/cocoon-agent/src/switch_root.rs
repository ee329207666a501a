//! Moves the guest root off the initramfs onto a tmpfs, as busybox
//! `switch_root` does.
//!
//! The kernel unpacks the initrd into `rootfs`, the root of the mount tree,
//! which pivot_root(2) cannot leave: containers could then only be entered
//! by chroot, which leaves the guest's whole mount tree in each container's
//! mount namespace, under its root. So, first thing as PID 1 (once the
//! kernel modules are loaded), the agent builds a tmpfs root, deletes what
//! is left on the initramfs (freeing its memory), moves the tmpfs onto `/`
//! and chroots into it. The guest root is then an ordinary mount, and
//! libcontainer enters every container with pivot_root(2), which detaches
//! the guest's mounts from the container's mount namespace.
//!
//! Copying costs boot time under TCG (tens of ms per MiB), and so would
//! exec'ing the agent again from the new root. So nothing the agent runs
//! is copied: the files mapped into this process (the agent and its shared
//! libraries, which PID 1 keeps in memory anyway, and which the helper it
//! re-executes needs) are bind-mounted read-only from the initramfs into
//! the new root, and the agent carries on. Only the small rest is copied
//! (the directory skeleton, `/etc`); what was needed only before the switch
//! (the modules) is left behind, and freed by a background thread at the
//! lowest priority, off the boot's critical path.

use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::mount::{mount, MsFlags};

/// Where the new root is built before it is moved onto `/`.
const NEW_ROOT: &str = "/.cocoon-root";

#[derive(Debug, thiserror::Error)]
pub enum SwitchRootError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount a tmpfs on {NEW_ROOT}")]
    MountTmpfs(#[source] nix::Error),
    #[error("copy {path} into the new root")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind-mount {path} into the new root")]
    Bind {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("move /proc into the new root")]
    MoveProc(#[source] nix::Error),
    #[error("move {NEW_ROOT} onto /")]
    MoveRoot(#[source] nix::Error),
    #[error("enter the new root")]
    Enter(#[source] std::io::Error),
}

/// Whether the topmost mount on `/` in `mountinfo` (the text of
/// `/proc/self/mountinfo`) is the initramfs.
pub fn root_is_initramfs(mountinfo: &str) -> bool {
    // (mount id, parent id, fs type) of each mount on "/".
    let on_root: Vec<(&str, &str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            let f: Vec<&str> = mount.split(' ').collect();
            let fstype = fs.split(' ').next()?;
            match (f.first(), f.get(1), f.get(4)) {
                (Some(id), Some(parent), Some(&"/")) => Some((*id, *parent, fstype)),
                _ => None,
            }
        })
        .collect();
    on_root
        .iter()
        .find(|(id, _, _)| {
            !on_root
                .iter()
                .any(|(other, parent, _)| parent == id && other != id)
        })
        .is_some_and(|(_, _, fstype)| *fstype == "rootfs")
}

/// Whether `/` is still the initramfs. `/proc` must be mounted.
pub fn is_initramfs() -> Result<bool, SwitchRootError> {
    let path = Path::new("/proc/self/mountinfo");
    std::fs::read_to_string(path)
        .map(|m| root_is_initramfs(&m))
        .map_err(|source| SwitchRootError::Read {
            path: path.into(),
            source,
        })
}

/// The files mapped into a process, from the text of its
/// `/proc/<pid>/maps`.
pub fn mapped_files(maps: &str) -> BTreeSet<PathBuf> {
    maps.lines()
        // The path is the last field, the only one with a '/'.
        .filter_map(|l| l.find(" /").map(|i| &l[i + 1..]))
        .filter(|p| !p.ends_with(" (deleted)"))
        .map(PathBuf::from)
        .collect()
}

/// Switches `/` from the initramfs to a tmpfs (see the module docs),
/// leaving the paths in `left_behind` on the initramfs to be freed. `/proc`
/// must be mounted, and is moved into the new root; this process must be
/// single-threaded.
pub fn switch(left_behind: &[&Path]) -> Result<(), SwitchRootError> {
    let started = Instant::now();
    let maps = Path::new("/proc/self/maps");
    let maps = std::fs::read_to_string(maps).map_err(|source| SwitchRootError::Read {
        path: maps.into(),
        source,
    })?;
    let root_dev = dev_of(Path::new("/"))?;
    // Before the switch only /proc is mounted, and nothing is mapped from
    // it: every mapped file is on the initramfs.
    let in_use: Vec<PathBuf> = mapped_files(&maps).into_iter().collect();
    std::fs::create_dir_all(NEW_ROOT).map_err(|source| SwitchRootError::Copy {
        path: NEW_ROOT.into(),
        source,
    })?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(SwitchRootError::MountTmpfs)?;
    let mut skip: Vec<&Path> = vec![Path::new(NEW_ROOT)];
    skip.extend(in_use.iter().map(PathBuf::as_path));
    skip.extend_from_slice(left_behind);
    let mut copied = Copied::default();
    // Modes are copied as they are (and so with no chmod after each mkdir).
    let umask = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let done = copy_tree(
        Path::new("/"),
        Path::new(NEW_ROOT),
        root_dev,
        &skip,
        &mut copied,
    );
    nix::sys::stat::umask(umask);
    done?;
    for path in &in_use {
        bind_read_only(path, &in_new_root(path))?;
    }
    mount(
        Some("/proc"),
        &in_new_root(Path::new("/proc")),
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(SwitchRootError::MoveProc)?;
    // Kept open to free what stays on rootfs once in the new root.
    let old_root = std::fs::File::open("/").map_err(SwitchRootError::Enter)?;
    std::env::set_current_dir(NEW_ROOT).map_err(SwitchRootError::Enter)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(SwitchRootError::MoveRoot)?;
    nix::unistd::chroot(".").map_err(|e| SwitchRootError::Enter(e.into()))?;
    std::env::set_current_dir("/").map_err(SwitchRootError::Enter)?;
    tracing::info!(
        "switched root to tmpfs in {} ms: {} files bound, {} copied ({} KiB)",
        started.elapsed().as_millis(),
        in_use.len(),
        copied.files,
        copied.bytes / 1024,
    );
    free_in_background(old_root, root_dev, in_use);
    Ok(())
}

/// Removes what stays on rootfs (`old_root`), but the files in use, which
/// are bound into the new root: it is never reachable again. This runs on
/// a thread of its own at the lowest priority, so that it takes only CPU
/// time nobody else wants; a file that cannot be removed costs memory, not
/// correctness.
fn free_in_background(old_root: std::fs::File, dev: u64, in_use: Vec<PathBuf>) {
    use std::os::fd::AsRawFd;
    let spawned = std::thread::Builder::new()
        .name("free-initramfs".into())
        .spawn(move || {
            // SAFETY: setpriority only reads its arguments; with PRIO_PROCESS
            // and 0 it applies to the calling thread on Linux.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            let started = Instant::now();
            // The magic link leads out of the new root to rootfs's root.
            let base = PathBuf::from(format!("/proc/self/fd/{}", old_root.as_raw_fd()));
            let keep: Vec<PathBuf> = in_use
                .iter()
                .map(|p| base.join(p.strip_prefix("/").unwrap_or(p)))
                .collect();
            remove_tree(&base, dev, &keep);
            drop(old_root);
            tracing::debug!("initramfs freed in {} ms", started.elapsed().as_millis());
        });
    if let Err(e) = spawned {
        tracing::warn!("initramfs left in memory: start a thread: {e}");
    }
}

/// Where `path` (absolute) is in the new root while it is being built.
fn in_new_root(path: &Path) -> PathBuf {
    Path::new(NEW_ROOT).join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes `target` (created, with its parents) a read-only bind mount of
/// the file `source`.
fn bind_read_only(source: &Path, target: &Path) -> Result<(), SwitchRootError> {
    let copy_failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SwitchRootError::Copy { path, source }
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(copy_failed(parent))?;
    }
    std::fs::File::create(target).map_err(copy_failed(target))?;
    let failed = |e| SwitchRootError::Bind {
        path: source.into(),
        source: e,
    };
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(failed)?;
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(failed)
}

fn dev_of(path: &Path) -> Result<u64, SwitchRootError> {
    std::fs::symlink_metadata(path)
        .map(|m| m.dev())
        .map_err(|source| SwitchRootError::Read {
            path: path.into(),
            source,
        })
}

#[derive(Default)]
struct Copied {
    files: u64,
    bytes: u64,
}

/// Copies the tree under `src` into `dst`, staying on device `dev` (a
/// mount point becomes an empty directory) and leaving out the paths in
/// `skip`. Directories, regular files and symlinks are copied with their
/// modes and owners; device nodes are not (`/dev` is a devtmpfs).
fn copy_tree(
    src: &Path,
    dst: &Path,
    dev: u64,
    skip: &[&Path],
    n: &mut Copied,
) -> Result<(), SwitchRootError> {
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SwitchRootError::Copy { path, source }
    };
    for entry in std::fs::read_dir(src).map_err(failed(src))? {
        let entry = entry.map_err(failed(src))?;
        let from = entry.path();
        if skip.contains(&from.as_path()) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&from).map_err(failed(&from))?;
        let to = dst.join(entry.file_name());
        let kind = meta.file_type();
        if kind.is_dir() {
            std::fs::DirBuilder::new()
                .mode(meta.mode() & 0o7777)
                .create(&to)
                .map_err(failed(&to))?;
            if meta.dev() == dev {
                copy_tree(&from, &to, dev, skip, n)?;
            }
        } else if kind.is_file() {
            n.bytes += std::fs::copy(&from, &to).map_err(failed(&from))?;
            n.files += 1;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&from).map_err(failed(&from))?;
            std::os::unix::fs::symlink(target, &to).map_err(failed(&to))?;
        } else {
            continue;
        }
        // What this process makes is root's already.
        if (meta.uid(), meta.gid()) != (0, 0) {
            std::os::unix::fs::lchown(&to, Some(meta.uid()), Some(meta.gid()))
                .map_err(failed(&to))?;
        }
    }
    Ok(())
}

/// Removes everything under `dir` that is on device `dev`, but the files
/// in `keep` (and so the directories that lead to them).
fn remove_tree(dir: &Path, dev: u64, keep: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev || keep.contains(&path) {
            continue;
        }
        let removed = if meta.is_dir() {
            remove_tree(&path, dev, keep);
            if keep.iter().any(|k| k.starts_with(&path)) {
                continue;
            }
            std::fs::remove_dir(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            tracing::debug!("initramfs: remove {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_initramfs_is_recognised_only_when_on_top() {
        let initramfs = "1 1 0:2 / / rw - rootfs rootfs rw,size=180000k\n\
                         20 1 0:20 / /proc rw,nosuid - proc proc rw\n";
        assert!(root_is_initramfs(initramfs));
        // Were rootfs shown under the tmpfs, the tmpfs is still on top.
        let stacked = "1 1 0:2 / / rw - rootfs rootfs rw\n\
                       25 1 0:25 / / rw - tmpfs tmpfs rw,mode=755\n\
                       26 25 0:26 / /proc rw - proc proc rw\n";
        assert!(!root_is_initramfs(stacked));
        let switched = "25 1 0:25 / / rw - tmpfs tmpfs rw,mode=755\n\
                        26 25 0:26 / /proc rw - proc proc rw\n";
        assert!(!root_is_initramfs(switched));
        let disk = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n";
        assert!(!root_is_initramfs(disk));
        assert!(!root_is_initramfs(""));
    }

    #[test]
    fn mapped_files_are_read_from_maps() {
        let maps = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 00:02 12                         /init
55d0c0b00000-55d0c1000000 r-xp 00100000 00:02 12                         /init
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00000000 00:02 20                         /lib/x86_64-linux-gnu/libc.so.6
7f0000200000-7f0000201000 rw-p 00000000 00:00 0 
7f0000300000-7f0000301000 r--p 00000000 00:02 30                         /tmp/gone (deleted)
7f0000400000-7f0000420000 r-xp 00000000 00:02 21                         /lib64/ld-linux-x86-64.so.2
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";
        let files: Vec<PathBuf> = mapped_files(maps).into_iter().collect();
        assert_eq!(
            files,
            [
                "/init",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn a_tree_is_copied_with_modes_and_links_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let dst = tmp.path().join("dst");
        std::fs::create_dir_all(src.join("lib/x86_64")).unwrap();
        std::fs::create_dir_all(src.join("lib/modules/6.1")).unwrap();
        std::fs::create_dir_all(src.join("etc")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(src.join("init"), b"agent").unwrap();
        std::fs::write(src.join("etc/hostname"), b"cocoon\n").unwrap();
        std::fs::set_permissions(
            src.join("etc/hostname"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::fs::write(src.join("lib/x86_64/libc.so.6"), vec![7u8; 10_000]).unwrap();
        std::fs::write(src.join("lib/modules/6.1/virtio.ko"), b"module").unwrap();
        std::os::unix::fs::symlink("lib", src.join("lib64")).unwrap();
        let dev = dev_of(&src).unwrap();
        let in_use = [src.join("init"), src.join("lib/x86_64/libc.so.6")];
        let modules = src.join("lib/modules");
        let mut skip: Vec<&Path> = in_use.iter().map(PathBuf::as_path).collect();
        skip.push(&modules);
        let mut n = Copied::default();
        copy_tree(&src, &dst, dev, &skip, &mut n).unwrap();

        assert_eq!((n.files, n.bytes), (1, 7));
        assert_eq!(
            std::fs::read(dst.join("etc/hostname")).unwrap(),
            b"cocoon\n"
        );
        let mode = std::fs::metadata(dst.join("etc/hostname")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o640);
        assert_eq!(
            std::fs::read_link(dst.join("lib64")).unwrap(),
            Path::new("lib")
        );
        assert!(dst.join("lib/x86_64").is_dir(), "a directory was not made");
        assert!(!dst.join("init").exists(), "a file in use was copied");
        assert!(
            !dst.join("lib/modules").exists(),
            "a path left behind was copied"
        );

        remove_tree(&src, dev, &in_use);
        let mut left: Vec<PathBuf> = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p.clone());
                }
                left.push(p.strip_prefix(&src).unwrap().to_path_buf());
            }
        }
        left.sort();
        assert_eq!(
            left,
            ["init", "lib", "lib/x86_64", "lib/x86_64/libc.so.6"].map(PathBuf::from)
        );
    }
}
