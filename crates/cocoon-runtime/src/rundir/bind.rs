//! One bind mount of a host file or directory onto a mount point under
//! `mounts/<cid>/`, with its own read-only or read-write flag, as it must
//! also appear under `shared/` (the copy that mount propagation makes).
//!
//! With the new mount API (Linux 5.12: `open_tree`, `mount_setattr`,
//! `move_mount`) the bind is cloned from the checked source descriptor,
//! given its flags while still detached, and only then attached: so the
//! copy that propagation makes under `shared/` is born with those flags
//! (propagation copies a mount's flags, but a later remount does not
//! propagate), read-only applies to every submount of a recursive bind
//! (those there when it is made: a mount the host makes later below an
//! `rslave` or `rshared` share arrives with its own flags, as with runc),
//! and the guest never sees a moment where a read-only share is writable.
//! A private bind (`rprivate`, the default) leaves the source's peer
//! group before it is attached, so it joins no propagation with the
//! host's mount of it. An `rslave` or `rshared` bind becomes a slave of
//! that group and a shared mount of its own: mounts the host makes below
//! the source reach it, and from it the guest's copy under `shared/`
//! (and virtiofsd's), never the other way.
//!
//! Older kernels get `mount(MS_BIND)` from `/proc/self/fd/N` and a remount
//! of both copies (`mounts/…` and, explicitly, `shared/…`); a read-only
//! share is then non-recursive, since a remount only reaches the top mount
//! and submounts would stay writable.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::SFlag;

use super::safe_fs::{errno, is_type, open_beneath, proc_path, unmount, Cross};
use super::{Access, Propagation};

/// Which kernel interface makes the bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `open_tree` + `mount_setattr` + `move_mount`, if the kernel has
    /// them, else [`Api::Legacy`].
    Auto,
    /// `mount(MS_BIND)` and remounts. Only tests choose it: elsewhere it
    /// is reached through `ENOSYS`.
    #[cfg_attr(not(test), allow(dead_code))]
    Legacy,
}

/// Binds `source` (an `O_PATH` descriptor of what the caller checked) on
/// the mount point `name` that Cocoon created in `parent`. `shared_copy`
/// opens the copy of the new mount that propagation made under `shared/`
/// (needed by [`Api::Legacy`] only).
pub fn bind(
    source: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &OsStr,
    access: Access,
    propagation: Propagation,
    api: Api,
    shared_copy: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<()> {
    let target = open_beneath(parent, name, OFlag::O_PATH, Cross::NoMounts)?;
    if is_type(&target, SFlag::S_IFLNK)? {
        // O_PATH|O_NOFOLLOW opens a symlink as itself; never mount on one.
        return Err(errno(Errno::ELOOP));
    }
    if api == Api::Auto {
        match bind_detached(source, target.as_fd(), access, propagation) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {}
            done => return done,
        }
    }
    bind_legacy(
        source,
        target.as_fd(),
        access,
        propagation,
        || {
            // The root of the mount now on the mount point: `target` still
            // names the directory under it.
            open_beneath(parent, name, OFlag::O_PATH, Cross::Mounts)
        },
        shared_copy,
    )
    .inspect_err(|_| {
        // Never leave a share with other flags than asked for.
        let _ = unmount(parent, name);
    })
}

/// Flags of every share on the host side: nothing on the host executes,
/// runs set-id, or opens a device node from a tree the guest can write.
/// (The guest is unaffected: it executes and opens devices itself.)
const HOST_ATTRS: u64 = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;

fn bind_detached(
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    access: Access,
    propagation: Propagation,
) -> io::Result<()> {
    let tree = open_tree(
        source,
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32,
    )?;
    let mut attr_set = HOST_ATTRS;
    if access == Access::ReadOnly {
        attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    match propagation {
        Propagation::Private => mount_setattr(tree.as_fd(), attr_set, libc::MS_PRIVATE)?,
        Propagation::Slave | Propagation::Shared => {
            mount_setattr(tree.as_fd(), attr_set, libc::MS_SLAVE)?;
            // Shared as well, so that it passes on what it receives to
            // its copies under `shared/` (made when it is attached).
            mount_setattr(tree.as_fd(), 0, libc::MS_SHARED)?;
        }
    }
    // Closing an unattached tree dissolves it: an error here leaks nothing.
    move_mount(tree.as_fd(), target)
}

fn bind_legacy(
    source: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    access: Access,
    propagation: Propagation,
    top: impl FnOnce() -> io::Result<OwnedFd>,
    shared_copy: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<()> {
    let mut flags = MsFlags::MS_BIND;
    if access == Access::ReadWrite {
        flags |= MsFlags::MS_REC;
    }
    let none = None::<&Path>;
    mount(
        Some(&proc_path(source)),
        &proc_path(target),
        none,
        flags,
        none,
    )
    .map_err(errno)?;
    let remount = |mnt: OwnedFd| {
        let mut flags = MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        if access == Access::ReadOnly {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(none, &proc_path(mnt.as_fd()), none, flags, none).map_err(errno)
    };
    let (top, copy) = (top()?, shared_copy()?);
    // Attached at once, the bind joined the source's peer group (if the
    // host's mount is shared), and its copy under `shared/` became its
    // slave: a private bind makes the copy private too, or it would stay
    // a slave of the host's group.
    let rec = |mnt: &OwnedFd, flag| {
        let p = proc_path(mnt.as_fd());
        mount(none, &p, none, flag | MsFlags::MS_REC, none).map_err(errno)
    };
    match propagation {
        Propagation::Private => {
            rec(&top, MsFlags::MS_PRIVATE)?;
            rec(&copy, MsFlags::MS_PRIVATE)?;
        }
        Propagation::Slave | Propagation::Shared => {
            rec(&top, MsFlags::MS_SLAVE)?;
            rec(&top, MsFlags::MS_SHARED)?;
        }
    }
    remount(top)?;
    // A remount does not propagate: the guest's copy needs its own.
    remount(copy)
}

fn open_tree(source: BorrowedFd<'_>, flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: the descriptor is live for the call, the path is a static
    // NUL-terminated string, and the flags are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source.as_raw_fd(),
            c"".as_ptr(),
            flags | libc::AT_EMPTY_PATH as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn mount_setattr(
    tree: BorrowedFd<'_>,
    attr_set: u64,
    propagation: libc::c_ulong,
) -> io::Result<()> {
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on 32-bit targets
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: u64::from(propagation),
        userns_fd: 0,
    };
    // SAFETY: the descriptor is live, the path a static NUL-terminated
    // string, and `attr` a valid `mount_attr` whose size is passed with it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as u32,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn move_mount(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: both descriptors are live for the call, both paths static
    // NUL-terminated strings, the flags plain integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
