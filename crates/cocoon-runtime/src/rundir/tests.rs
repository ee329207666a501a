//! The state directory against a hostile guest, on real mounts: these
//! tests mount and unmount, so they need root (and say so if they lack it).
//! Each works in its own scratch directory under /tmp, whose name has
//! spaces (mountinfo escapes them), and unmounts and removes it even when
//! it fails.

use nix::unistd::Pid;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::*;

/// A scratch directory, unmounted and removed on drop (also on panic).
struct Scratch {
    root: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the rundir tests mount and unmount: run them as root"
        );
        let root = PathBuf::from(format!("/tmp/cocoon rundir {tag} {}", std::process::id()));
        unmount_all_under(&root);
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        Self { root }
    }

    fn state(&self) -> PathBuf {
        self.root.join("state dir")
    }

    /// A directory with `files` in it.
    fn dir_with(&self, name: &str, files: &[&str]) -> PathBuf {
        let d = self.root.join(name);
        fs::create_dir_all(&d).unwrap();
        for f in files {
            fs::write(d.join(f), f).unwrap();
        }
        d
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        unmount_all_under(&self.root);
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn unmount_all_under(root: &Path) {
    for _ in 0..16 {
        let mut below = mountinfo::below(root).unwrap();
        if mountinfo::mount_points().unwrap().iter().any(|m| m == root) {
            below.push(PathBuf::new());
        }
        if below.is_empty() {
            return;
        }
        below.sort_by_key(|rel| Reverse(mountinfo::depth(rel)));
        for rel in below {
            let _ = umount2(&root.join(rel), MntFlags::MNT_DETACH);
        }
    }
}

fn id(s: &str) -> Id {
    Id::sandbox(s).unwrap()
}

fn mounted_below(dir: &Path) -> Vec<PathBuf> {
    mountinfo::below(dir).unwrap()
}

fn is_mount_point(p: &Path) -> bool {
    mountinfo::mount_points().unwrap().iter().any(|m| m == p)
}

fn tmpfs(at: &Path) {
    fs::create_dir_all(at).unwrap();
    mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
}

/// The errno of creating file `p`, or `None` if it could be created.
fn create_errno(p: &Path) -> Option<i32> {
    fs::write(p, "x").err().map(|e| e.raw_os_error().unwrap())
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

const EROFS: Option<i32> = Some(nix::libc::EROFS);

#[test]
fn modes_are_private_whatever_the_umask_and_other_users_see_nothing() {
    let s = Scratch::new("modes");
    let old = nix::sys::stat::umask(Mode::empty());
    let run = RunDir::create(&s.state(), &id("pod1"));
    nix::sys::stat::umask(old);
    let mut run = run.unwrap();
    let rootfs = s.dir_with("rootfs", &["bin"]);
    let old = nix::sys::stat::umask(Mode::empty());
    run.record_pid("qemu", 4242).unwrap();
    let shared = run.share_rootfs(&Id::container("c1").unwrap(), &rootfs);
    nix::sys::stat::umask(old);
    assert_eq!(shared.unwrap(), "c1/rootfs");

    let dir = run.path().to_path_buf();
    assert_eq!(dir, s.state().join("pod1"));
    for d in [
        s.state(),
        dir.clone(),
        dir.join("mounts"),
        dir.join("shared"),
        dir.join("mounts/c1"),
    ] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in [dir.join("qemu.pid"), dir.join(MARKER)] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(fs::read_to_string(dir.join("qemu.pid")).unwrap(), "4242");
    assert!(run.record_pid("../evil", 1).is_err());

    // Another user: `ls` works for it where it may look, and fails on the
    // state directory and (with the state directory made traversable) on
    // the sandbox's.
    let ls = |p: &Path| {
        Command::new("ls")
            .arg(p)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(ls(Path::new("/")), "ls as uid 65534 must work at all");
    assert!(!ls(&s.state()));
    fs::set_permissions(s.state(), fs::Permissions::from_mode(0o711)).unwrap();
    assert!(!ls(&dir));
    assert!(!ls(&dir.join("shared")));
    fs::set_permissions(s.state(), fs::Permissions::from_mode(0o700)).unwrap();
    run.remove().unwrap();
}

/// The share root is read-only to the guest; a rootfs bind made after
/// `shared/` exists is writable through it.
fn share_root_read_only_rootfs_writable(legacy: bool) {
    let s = Scratch::new(if legacy { "root legacy" } else { "root" });
    let mut run = RunDir::create(&s.state(), &id("pod")).unwrap();
    if legacy {
        run.use_legacy_binds();
    }
    let rootfs = s.dir_with("rootfs", &["etc"]);
    let c1 = Id::container("c1").unwrap();
    run.share_rootfs(&c1, &rootfs).unwrap();
    let shared = run.shared().to_path_buf();
    assert_eq!(shared, run.path().join("shared"));

    assert_eq!(create_errno(&shared.join("x")), EROFS);
    assert_eq!(create_errno(&shared.join("c1/x")), EROFS);
    let errno = |r: io::Result<()>| r.unwrap_err().raw_os_error();
    assert_eq!(errno(fs::create_dir(shared.join("c1/d"))), EROFS);
    assert_eq!(
        errno(std::os::unix::fs::symlink("/", shared.join("c1/link"))),
        EROFS
    );
    let swapped = fs::rename(shared.join("c1/rootfs"), shared.join("c1/old"));
    assert!(swapped.is_err(), "the guest must not move its mount point");

    // Through the guest's view, into the container's own writable layer.
    assert_eq!(
        fs::read_to_string(shared.join("c1/rootfs/etc")).unwrap(),
        "etc"
    );
    assert_eq!(create_errno(&shared.join("c1/rootfs/new")), None);
    assert_eq!(fs::read_to_string(rootfs.join("new")).unwrap(), "x");

    // The host never executes or opens devices from it.
    let flags = nix::sys::statvfs::statvfs(&shared.join("c1/rootfs"))
        .unwrap()
        .flags();
    use nix::sys::statvfs::FsFlags;
    assert!(flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_NOEXEC));
    assert!(!flags.contains(FsFlags::ST_RDONLY));
    run.remove().unwrap();
    assert!(rootfs.join("etc").exists() && rootfs.join("new").exists());
}

#[test]
fn share_root_read_only_rootfs_writable_new_mount_api() {
    share_root_read_only_rootfs_writable(false);
}

#[test]
fn share_root_read_only_rootfs_writable_legacy_mount() {
    share_root_read_only_rootfs_writable(true);
}

/// A read-only share is read-only through `shared/` too (a remount does
/// not propagate: CVE-2020-28914's kind), files and directories alike,
/// submounts included.
fn read_only_shares_stay_read_only(legacy: bool) {
    let s = Scratch::new(if legacy { "ro legacy" } else { "ro" });
    let mut run = RunDir::create(&s.state(), &id("pod")).unwrap();
    if legacy {
        run.use_legacy_binds();
    }
    let vol = s.dir_with("volume", &["conf"]);
    tmpfs(&vol.join("sub"));
    fs::write(vol.join("sub/inner"), "inner").unwrap();
    let file = s.dir_with("files", &["hosts", "log"]);
    let c = Id::container("c").unwrap();
    let ro = |n| ShareName::Volume(n);
    assert_eq!(
        run.share(&c, ro(0), &vol, Access::ReadOnly, Propagation::Private)
            .unwrap(),
        "c/0"
    );
    assert_eq!(
        run.share(
            &c,
            ro(1),
            &file.join("hosts"),
            Access::ReadOnly,
            Propagation::Private
        )
        .unwrap(),
        "c/1"
    );
    assert_eq!(
        run.share(
            &c,
            ro(2),
            &file.join("log"),
            Access::ReadWrite,
            Propagation::Private
        )
        .unwrap(),
        "c/2"
    );
    // A share of the same name is refused, and the first one stays.
    assert!(run
        .share(&c, ro(0), &vol, Access::ReadWrite, Propagation::Private)
        .is_err());

    let shared = run.shared().to_path_buf();
    let mounts = run.path().join("mounts");
    for base in [&shared, &mounts] {
        assert_eq!(fs::read_to_string(base.join("c/0/conf")).unwrap(), "conf");
        assert_eq!(
            create_errno(&base.join("c/0/x")),
            EROFS,
            "{}",
            base.display()
        );
        assert_eq!(create_errno(&base.join("c/0/conf")), EROFS);
        // The submount: read-only with it (new API), or not there at all
        // (legacy: a read-only share is not recursive).
        assert_eq!(create_errno(&base.join("c/0/sub/x")), EROFS);
        assert_eq!(create_errno(&base.join("c/1")), EROFS);
        assert_eq!(fs::read_to_string(base.join("c/1")).unwrap(), "hosts");
    }
    if !legacy {
        assert_eq!(
            fs::read_to_string(shared.join("c/0/sub/inner")).unwrap(),
            "inner"
        );
    }
    assert_eq!(create_errno(&shared.join("c/2")), None);
    assert_eq!(fs::read_to_string(file.join("log")).unwrap(), "x");
    run.remove().unwrap();
    assert_eq!(fs::read_to_string(vol.join("sub/inner")).unwrap(), "inner");
    assert_eq!(fs::read_to_string(file.join("hosts")).unwrap(), "hosts");
}

#[test]
fn read_only_shares_stay_read_only_new_mount_api() {
    read_only_shares_stay_read_only(false);
}

#[test]
fn read_only_shares_stay_read_only_legacy_mount() {
    read_only_shares_stay_read_only(true);
}

#[test]
fn teardown_leaves_no_mount_and_no_directory() {
    let s = Scratch::new("teardown");
    let state = s.state();
    let rootfs1 = s.dir_with("rootfs1", &["a"]);
    let rootfs2 = s.dir_with("rootfs2", &["b"]);
    tmpfs(&rootfs2.join("proc"));
    let vol = s.dir_with("vol", &["v"]);
    let (c1, c2) = (Id::container("c1").unwrap(), Id::container("c2").unwrap());

    let mut run = RunDir::create(&state, &id("pod")).unwrap();
    let dir = run.path().to_path_buf();
    run.share_rootfs(&c1, &rootfs1).unwrap();
    run.share(
        &c1,
        ShareName::Volume(0),
        &vol,
        Access::ReadOnly,
        Propagation::Private,
    )
    .unwrap();
    run.share_rootfs(&c2, &rootfs2).unwrap();
    assert!(is_mount_point(&dir.join("shared/c2/rootfs/proc")));

    run.unshare_container(&c1).unwrap();
    assert!(!dir.join("mounts/c1").exists());
    assert!(mounted_below(&dir)
        .iter()
        .all(|m| !m.to_string_lossy().contains("c1")));
    run.unshare_container(&c1).unwrap();

    run.remove().unwrap();
    assert_eq!(mounted_below(&state), Vec::<PathBuf>::new());
    assert!(!is_mount_point(&dir));
    assert!(!dir.exists());
    // Nothing of the sources was touched.
    assert!(rootfs1.join("a").exists() && rootfs2.join("b").exists() && vol.join("v").exists());
    assert!(is_mount_point(&rootfs2.join("proc")));

    // Dropping does the same.
    let mut run = RunDir::create(&state, &id("pod")).unwrap();
    run.share_rootfs(&c1, &rootfs1).unwrap();
    drop(run);
    assert_eq!(mounted_below(&state), Vec::<PathBuf>::new());
    assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
}

#[test]
fn a_second_sandbox_of_the_same_id_is_refused_and_harms_nothing() {
    let s = Scratch::new("twice");
    let run = RunDir::create(&s.state(), &id("pod")).unwrap();
    assert!(RunDir::create(&s.state(), &id("pod")).is_err());
    assert!(run.path().join(MARKER).exists());
    run.remove().unwrap();
}

/// Kata's CVE-2020-2024: the guest replaces its rootfs mount point with a
/// symlink to a host mount, and teardown unmounts the host's. Here the
/// guest cannot (shared/ is read-only), so symlinks are planted wherever
/// the guest can write (inside its rootfs), and, standing for a bug, in
/// mounts/<cid>/ itself, including in place of the mount point.
#[test]
fn cve_2020_2024_teardown_follows_no_symlink() {
    let s = Scratch::new("cve-2020-2024");
    let host = s.root.join("host mount");
    tmpfs(&host);
    fs::write(host.join("precious"), "keep").unwrap();
    let rootfs1 = s.dir_with("rootfs1", &["a"]);
    let rootfs2 = s.dir_with("rootfs2", &["b"]);
    let (c1, c2) = (Id::container("c1").unwrap(), Id::container("c2").unwrap());

    let mut run = RunDir::create(&s.state(), &id("pod")).unwrap();
    let dir = run.path().to_path_buf();
    run.share_rootfs(&c1, &rootfs1).unwrap();
    run.share_rootfs(&c2, &rootfs2).unwrap();
    let symlink = |target: &Path, at: &Path| std::os::unix::fs::symlink(target, at);

    // The guest, through its view.
    let g = run.shared().join("c1/rootfs");
    symlink(&host, &g.join("escape")).unwrap();
    symlink(&host.join("precious"), &g.join("file")).unwrap();
    fs::create_dir(g.join("proc")).unwrap();
    symlink(&host, &g.join("proc/self")).unwrap();
    assert_eq!(
        symlink(&host, &run.shared().join("c1/rootfs2"))
            .unwrap_err()
            .raw_os_error(),
        EROFS
    );

    // A bug: mounts/c2/rootfs swapped for a symlink to the host mount
    // (unmounted first: the kernel refuses to rename a mount point), and
    // more symlinks beside it.
    let m2 = dir.join("mounts/c2");
    umount2(&m2.join("rootfs"), MntFlags::MNT_DETACH).unwrap();
    fs::remove_dir(m2.join("rootfs")).unwrap();
    symlink(&host, &m2.join("rootfs")).unwrap();
    symlink(&host, &m2.join("0")).unwrap();
    symlink(&host, &dir.join("mounts/c3")).unwrap();
    symlink(&host, &dir.join("stray")).unwrap();

    run.unshare_container(&c2).unwrap();
    run.unshare_container(&Id::container("c3").unwrap())
        .unwrap();
    run.remove().unwrap();

    assert!(is_mount_point(&host), "the host's mount must stay mounted");
    assert_eq!(fs::read_to_string(host.join("precious")).unwrap(), "keep");
    assert_eq!(fs::read_dir(&host).unwrap().count(), 1);
    assert!(!dir.exists());
    assert_eq!(mounted_below(&s.state()), Vec::<PathBuf>::new());
    // The container's own layer keeps what the guest wrote into it.
    assert!(fs::symlink_metadata(rootfs1.join("escape"))
        .unwrap()
        .is_symlink());
    assert!(rootfs2.join("b").exists());
}

#[test]
fn removal_never_enters_a_mount_point() {
    let s = Scratch::new("no-enter");
    let d = s.dir_with("d", &["f"]);
    tmpfs(&d.join("m"));
    fs::write(d.join("m/data"), "data").unwrap();
    let root = safe_fs::open_host(&s.root, OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap();
    let mut left = Vec::new();
    safe_fs::remove_entry(root.as_fd(), os("d"), &d, &mut left);
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].path, d.join("m"));
    assert!(is_mount_point(&d.join("m")));
    assert_eq!(fs::read_to_string(d.join("m/data")).unwrap(), "data");
    assert!(!d.join("f").exists());
}

#[test]
fn unmount_does_not_follow_a_symlink_in_place_of_a_mount_point() {
    let s = Scratch::new("nofollow");
    let host = s.root.join("host mount");
    tmpfs(&host);
    let d = s.dir_with("d", &[]);
    std::os::unix::fs::symlink(&host, d.join("rootfs")).unwrap();
    let dfd = safe_fs::open_host(&d, OFlag::O_PATH | OFlag::O_DIRECTORY).unwrap();
    let e = safe_fs::unmount(dfd.as_fd(), os("rootfs")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EINVAL));
    assert!(is_mount_point(&host));
    assert!(safe_fs::unmount(dfd.as_fd(), os("../host mount")).is_err());
    assert!(is_mount_point(&host));
}

/// On hosts where /run is a shared mount, nothing of a sandbox must be
/// copied into the other peers of /run (it would pin rootfs mounts there).
#[test]
fn nothing_propagates_into_peers_of_a_shared_parent() {
    let s = Scratch::new("peers");
    let parent = s.root.join("run");
    tmpfs(&parent);
    mount(
        None::<&str>,
        &parent,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    let peer = s.root.join("peer");
    fs::create_dir(&peer).unwrap();
    mount(
        Some(&parent),
        &peer,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let rootfs = s.dir_with("rootfs", &["a"]);

    let mut run = RunDir::create(&parent.join("cocoon"), &id("pod")).unwrap();
    run.share_rootfs(&Id::container("c").unwrap(), &rootfs)
        .unwrap();
    run.share(
        &Id::container("c").unwrap(),
        ShareName::Volume(0),
        &rootfs,
        Access::ReadOnly,
        Propagation::Private,
    )
    .unwrap();
    // At most the directory's own bind appears in the peer, empty of mounts.
    let leaked: Vec<_> = mounted_below(&peer)
        .into_iter()
        .filter(|m| m != Path::new("cocoon/pod"))
        .collect();
    assert_eq!(leaked, Vec::<PathBuf>::new());
    run.remove().unwrap();
    assert_eq!(mounted_below(&peer), Vec::<PathBuf>::new());
    assert_eq!(mounted_below(&parent), Vec::<PathBuf>::new());
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

/// Waits until process `pid`'s command line is readable (not empty).
fn exec_finished(pid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} never showed its command line"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn cleanup_dead_kills_unmounts_and_removes() {
    let s = Scratch::new("dead");
    let rootfs = s.dir_with("rootfs", &["a"]);
    let mut run = RunDir::create(&s.state(), &id("pod")).unwrap();
    run.share_rootfs(&Id::container("c").unwrap(), &rootfs)
        .unwrap();
    let dir = run.path().to_path_buf();
    // A daemon of the sandbox (its command line names the directory), and
    // a stranger whose pid was recorded too (it must survive).
    let mut daemon = Command::new("sh")
        .args(["-c", "sleep 600", &dir.join("qmp.sock").to_string_lossy()])
        .spawn()
        .unwrap();
    let mut stranger = Command::new("sleep").arg("600").spawn().unwrap();
    // spawn() returns once the child's exec has replaced its memory, but
    // the kernel writes the new command line a moment later.
    exec_finished(daemon.id());
    run.record_pid("qemu", daemon.id()).unwrap();
    run.record_pid("other", stranger.id()).unwrap();
    assert_eq!(
        owned_processes(&s.state(), &id("pod")),
        vec![Pid::from_raw(daemon.id() as i32)]
    );
    // The owner dies: nothing of its RunDir is undone.
    std::mem::forget(run);

    block_on(cleanup_dead(&s.state(), &id("pod"))).unwrap();
    assert!(!dir.exists());
    assert_eq!(mounted_below(&s.state()), Vec::<PathBuf>::new());
    assert!(daemon.try_wait().map_or(true, |s| s.is_some()) || daemon.wait().is_ok());
    assert!(!Path::new(&format!("/proc/{}", daemon.id())).exists());
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "a stranger was killed"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();
    assert!(rootfs.join("a").exists());
    // Cleaning what is gone is fine.
    block_on(cleanup_dead(&s.state(), &id("pod"))).unwrap();
}

#[test]
fn cleanup_dead_acts_only_on_sandbox_directories() {
    let s = Scratch::new("refuse");
    let state = s.state();
    fs::create_dir(&state).unwrap();
    // No marker: somebody else's directory.
    let plain = s.dir_with("state dir/plain", &["data"]);
    // A symlink to a real sandbox directory elsewhere.
    let other_state = s.root.join("other state");
    let elsewhere = RunDir::create(&other_state, &id("pod")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), state.join("link")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), state.join("pod")).unwrap();
    // A marker naming another sandbox.
    let wrong = s.dir_with("state dir/wrong", &[]);
    fs::write(wrong.join(MARKER), "pod").unwrap();

    for name in ["plain", "link", "pod", "wrong"] {
        let r = block_on(cleanup_dead(&state, &id(name)));
        assert!(r.is_err(), "{name}");
    }
    assert!(plain.join("data").exists());
    assert!(wrong.join(MARKER).exists());
    assert!(elsewhere.path().join(MARKER).exists());
    assert!(is_mount_point(&elsewhere.path().join("mounts")));
    // Missing: nothing to do.
    block_on(cleanup_dead(&state, &id("missing"))).unwrap();
    elsewhere.remove().unwrap();
}

#[test]
fn pointer_paths_name_a_sandbox_only_when_exactly_in_the_state_dir() {
    let st = Path::new("/run/cocoon");
    let ok = |p: &str| sandbox_id_of(st, Path::new(p)).map(String::from);
    assert_eq!(ok("/run/cocoon/pod-1").as_deref(), Some("pod-1"));
    assert_eq!(
        sandbox_id_of(Path::new("/run/cocoon/"), Path::new("/run/cocoon/a")).map(String::from),
        Some("a".into())
    );
    for bad in [
        "/",
        "",
        "/run/cocoon",
        "/run/cocoon/",
        "/run/cocoon/..",
        "/run/cocoon/../etc",
        "/run/cocoon/./a",
        "/run/cocoon//a",
        "/run/cocoon/a/",
        "/run/cocoon/a/b",
        "/run/cocoon/a/..",
        "/run/cocoonx/a",
        "/run/cocoo/a",
        "run/cocoon/a",
        "/run/cocoon/a\n",
        "/run/cocoon/.hidden",
    ] {
        assert_eq!(ok(bad), None, "{bad:?}");
    }
    assert_eq!(
        sandbox_id_of(Path::new("cocoon"), Path::new("cocoon/a")),
        None
    );
}

#[test]
fn a_sandbox_does_not_claim_its_prefix_siblings() {
    let a = within(Path::new("/run/cocoon/a"));
    assert!("/run/cocoon/a/shared".starts_with(&a));
    assert!(!"/run/cocoon/ab/shared".starts_with(&a));
    assert_eq!(within(Path::new("/run/cocoon/a/")), a);
}

#[test]
fn share_names() {
    assert_eq!(ShareName::Rootfs.to_string(), "rootfs");
    assert_eq!(ShareName::Volume(7).to_string(), "7");
}

/// A host mount made below a shared source after it was shared reaches
/// the guest's copy for `rslave` and `rshared` binds, not for `rprivate`
/// ones; removal takes the copies and leaves the host's mounts.
fn later_host_mounts_reach_the_guest(legacy: bool) {
    let s = Scratch::new(if legacy {
        "propagation legacy"
    } else {
        "propagation"
    });
    let mut run = RunDir::create(&s.state(), &id("pod")).unwrap();
    if legacy {
        run.use_legacy_binds();
    }
    // The host's volume: a shared mount, as kubelet's are.
    let vol = s.root.join("volume");
    tmpfs(&vol);
    let none = None::<&str>;
    mount(none, &vol, none, MsFlags::MS_SHARED, none).unwrap();
    for dir in ["private", "slave", "shared"] {
        fs::create_dir(vol.join(dir)).unwrap();
    }
    let c = Id::container("c").unwrap();
    let cases = [
        (0, "private", Propagation::Private, false),
        (1, "slave", Propagation::Slave, true),
        (2, "shared", Propagation::Shared, true),
    ];
    for (n, dir, propagation, _) in cases {
        let name = ShareName::Volume(n);
        run.share(&c, name, &vol.join(dir), Access::ReadOnly, propagation)
            .unwrap();
    }
    // Mounted on the host afterwards.
    for (_, dir, _, _) in cases {
        tmpfs(&vol.join(dir).join("later"));
        fs::write(vol.join(dir).join("later/file"), dir).unwrap();
    }
    let shared = run.shared().to_path_buf();
    for (n, dir, _, reaches) in cases {
        let seen = shared.join(format!("c/{n}/later/file"));
        assert_eq!(seen.exists(), reaches, "{dir}: {}", seen.display());
        if reaches {
            assert_eq!(fs::read_to_string(&seen).unwrap(), dir);
            // What propagates keeps its own flags; the share stays read-only.
            assert_eq!(create_errno(&shared.join(format!("c/{n}/x"))), EROFS);
        }
    }
    run.remove().unwrap();
    for (_, dir, _, _) in cases {
        let later = vol.join(dir).join("later");
        assert!(is_mount_point(&later), "{}", later.display());
        assert_eq!(fs::read_to_string(later.join("file")).unwrap(), dir);
    }
    assert_eq!(mounted_below(&s.state()), Vec::<PathBuf>::new());
}

#[test]
fn later_host_mounts_reach_the_guest_new_mount_api() {
    later_host_mounts_reach_the_guest(false);
}

#[test]
fn later_host_mounts_reach_the_guest_legacy_mount() {
    later_host_mounts_reach_the_guest(true);
}
