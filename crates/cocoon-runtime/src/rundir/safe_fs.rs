//! File-system steps that never follow a path the guest could have changed.
//!
//! Everything is relative to a directory descriptor: lookups go through
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (and `RESOLVE_NO_XDEV`
//! where crossing a mount would mean entering something Cocoon did not
//! make), creation and removal through `mkdirat`/`openat2`/`unlinkat` on
//! the parent's descriptor, and unmounts through the parent's
//! `/proc/self/fd/N` with `UMOUNT_NOFOLLOW`, so no component is resolved
//! by name from `/` again. Removal never descends into a mount point: if an
//! unmount failed, what is under it is someone's data (a container's
//! rootfs), and it is left and reported instead.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::mount::{umount2, MntFlags};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Removal gives up below this depth: Cocoon's own layout is four deep,
/// so anything deeper is not ours to walk.
const MAX_DEPTH: usize = 16;

pub fn errno(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Whether a lookup may cross into another mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cross {
    /// Yes: to reach the top of a mount Cocoon made (`mounts/`, `shared/`).
    Mounts,
    /// No (`EXDEV`): removal, and opening what Cocoon is about to create.
    NoMounts,
}

/// Opens `name` beneath `dir` without following a symlink in any
/// component (the last included: with `O_PATH` a symlink opens as itself,
/// never as its target, so callers check the type they expect).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    name: impl AsRef<Path>,
    flags: OFlag,
    cross: Cross,
) -> io::Result<OwnedFd> {
    let mut resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS;
    if cross == Cross::NoMounts {
        resolve |= ResolveFlag::RESOLVE_NO_XDEV;
    }
    let mut how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(resolve);
    if flags.contains(OFlag::O_CREAT) {
        // openat2 refuses a mode without O_CREAT; callers fchmod anyway.
        how = how.mode(Mode::S_IRUSR | Mode::S_IWUSR);
    }
    let fd = openat2(dir.as_raw_fd(), name.as_ref(), how).map_err(errno)?;
    // SAFETY: openat2 just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a host path given by the caller (not the guest): symlinks in it
/// are the caller's to choose, so they are followed.
pub fn open_host(path: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(path, flags | OFlag::O_CLOEXEC, Mode::empty()).map_err(errno)?;
    // SAFETY: open just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates directory `name` in `dir`, mode 0700 whatever the umask, and
/// opens it.
pub fn mkdir_private(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    one_component(name)?;
    mkdirat(Some(dir.as_raw_fd()), name, Mode::S_IRWXU).map_err(errno)?;
    let fd = open_beneath(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Cross::NoMounts,
    )?;
    fchmod(fd.as_raw_fd(), Mode::S_IRWXU).map_err(errno)?;
    Ok(fd)
}

/// Creates (or truncates) regular file `name` in `dir`, mode 0600 whatever
/// the umask; with `exclusive`, an existing entry is an error.
pub fn create_private_file(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    exclusive: bool,
) -> io::Result<std::fs::File> {
    one_component(name)?;
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
    if exclusive {
        flags |= OFlag::O_EXCL;
    }
    let fd = open_beneath(dir, name, flags, Cross::NoMounts)?;
    fchmod(fd.as_raw_fd(), Mode::S_IRUSR | Mode::S_IWUSR).map_err(errno)?;
    Ok(fd.into())
}

/// Reads regular file `name` in `dir`, at most `limit` bytes.
pub fn read_small(dir: BorrowedFd<'_>, name: &OsStr, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let fd = open_beneath(dir, name, OFlag::O_RDONLY, Cross::NoMounts)?;
    if !is_type(&fd, SFlag::S_IFREG)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd).take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Whether `fd` is of file type `kind` (`S_IFDIR`, `S_IFREG`, ...).
pub fn is_type(fd: &OwnedFd, kind: SFlag) -> io::Result<bool> {
    let st = fstat(fd.as_raw_fd()).map_err(errno)?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind)
}

/// The path that names `fd` for the kernel calls that only take paths
/// (`mount`, `umount2`): the magic link resolves to the very object the
/// descriptor holds, whatever has been renamed since.
pub fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The kernel's current name for `fd`, as `/proc/self/mountinfo` spells
/// mount points (both are relative to this process's root).
pub fn kernel_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(proc_path(fd))
}

/// Lazily unmounts the mount on `dir`/`name`; `name` (one component) is
/// not followed if it is a symlink, and `dir` is not looked up again.
pub fn unmount(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    one_component(name)?;
    umount2(
        &proc_path(dir).join(name),
        MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW,
    )
    .map_err(errno)
}

/// What removal or unmounting could not undo, and why.
#[derive(Debug)]
pub struct Leftover {
    pub action: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

/// Removes `name` from `dir`: a symlink or file is unlinked (never
/// followed), a directory emptied the same way and removed, except a
/// directory that is a mount point (`EXDEV`), which is left with all it
/// holds. `shown` is `name`'s path for the report; failures are appended
/// to `left`, and nothing is reported for an entry that does not exist.
pub fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr, shown: &Path, left: &mut Vec<Leftover>) {
    remove_at_depth(dir, name, shown, left, 0)
}

fn remove_at_depth(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    shown: &Path,
    left: &mut Vec<Leftover>,
    depth: usize,
) {
    let fail = |left: &mut Vec<Leftover>, action, error| {
        left.push(Leftover {
            action,
            path: shown.to_path_buf(),
            error,
        })
    };
    if let Err(e) = one_component(name) {
        return fail(left, "remove", e);
    }
    let st = match fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return,
        Err(e) => return fail(left, "inspect", errno(e)),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        // A file bind-mounted over (a file volume whose unmount failed)
        // is refused by the kernel with EBUSY, and so is left.
        match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => fail(left, "remove", errno(e)),
        }
        return;
    }
    if depth >= MAX_DEPTH {
        return fail(
            left,
            "remove",
            io::Error::other("directory tree deeper than expected"),
        );
    }
    let sub = match open_beneath(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Cross::NoMounts,
    ) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(Errno::EXDEV as i32) => {
            return fail(
                left,
                "remove",
                io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "still a mount point: left with its contents",
                ),
            )
        }
        Err(e) => return fail(left, "open", e),
    };
    // The listing goes through the descriptor's magic link: the same
    // directory, not a path looked up again.
    let names: Vec<OsString> = match std::fs::read_dir(proc_path(sub.as_fd())) {
        Ok(entries) => entries.flatten().map(|e| e.file_name()).collect(),
        Err(e) => return fail(left, "list", e),
    };
    let before = left.len();
    for child in &names {
        remove_at_depth(sub.as_fd(), child, &shown.join(child), left, depth + 1);
    }
    if left.len() > before {
        // The reason it is not empty has been reported already.
        return;
    }
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => fail(left, "remove", errno(e)),
    }
}

/// `name` must be a single plain component: the `*at` calls above are
/// only as safe as that.
fn one_component(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    Ok(())
}
