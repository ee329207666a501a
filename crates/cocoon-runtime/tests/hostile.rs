//! The hostile guest: root inside the guest is an attacker, and the host
//! side must hold. Each test boots a real VM (QEMU, virtiofsd, the guest
//! image) through `Sandbox`, runs an attacker with guest root — a container
//! that shares the guest's PID namespace, with every capability and every
//! device, so that it reaches the agent's own mounts through
//! `/proc/1/root` and can mount the virtio-fs tag itself — and asserts that
//! the host is untouched and that the pod still tears down leaving nothing.
//! `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_protocols::Id;
use cocoon_runtime::{Container, Sandbox};
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceType, Spec,
};

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "mkdir", "mount", "mv", "ln", "touch", "dd", "sync", "yes", "head",
    "sleep", "rm", "true",
];

/// A private world: a state directory, a config, busybox rootfs.
struct World {
    tmp: tempfile::TempDir,
    config: cocoon_config::Config,
}

impl World {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("cocoon-hostile-")
            .tempdir()
            .unwrap();
        // Traversable by everyone, so that what keeps other users out of
        // the sandbox is the sandbox's own modes, not this directory's.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let guest = PathBuf::from(
            std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into()),
        );
        let mut config = cocoon_config::Config::default();
        config.guest.kernel = guest.join("vmlinuz");
        config.guest.initrd = guest.join("initrd.img");
        config.guest.dir = guest;
        config.hypervisor.boot_timeout = Duration::from_secs(90);
        config.runtime.state_dir = tmp.path().join("state");
        Self { tmp, config }
    }

    /// A busybox root filesystem for container `name`.
    fn rootfs(&self, name: &str) -> PathBuf {
        let root = self.tmp.path().join("rootfs").join(name);
        for d in ["bin", "proc", "sys", "dev", "tmp", "mnt"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("static busybox at /bin/busybox (apt-get install busybox-static)");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
        }
        root
    }

    async fn start(&self, id: &str) -> Sandbox {
        Sandbox::start(&Id::sandbox(id).unwrap(), &self.config)
            .await
            .expect("sandbox starts")
    }

    fn state(&self) -> PathBuf {
        self.config.runtime.state_dir.clone()
    }

    /// Nothing of this world's sandboxes is left: no process, mount or file.
    fn assert_clean(&self) {
        let state = self.state().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&state)).collect();
        assert!(left.is_empty(), "mounts left behind: {left:#?}");
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                assert!(!cmdline.contains(&state), "process left behind: {cmdline}");
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.state()) {
            let entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            assert!(entries.is_empty(), "state left behind: {entries:?}");
        }
    }
}

/// A container spec whose process runs `script` as guest root: no PID
/// namespace of its own (PID 1 is the agent), every capability, every
/// device, no seccomp. Its output goes to `/out` in its rootfs.
fn attacker_spec(script: &str) -> Spec {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        format!("exec >/out 2>&1\n{script}"),
    ]));
    let all: std::collections::HashSet<Capability> = [
        Capability::SysAdmin,
        Capability::SysPtrace,
        Capability::DacOverride,
        Capability::DacReadSearch,
        Capability::Fowner,
        Capability::Chown,
        Capability::Mknod,
        Capability::SysChroot,
        Capability::Kill,
    ]
    .into_iter()
    .collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(all.clone())
            .effective(all.clone())
            .permitted(all.clone())
            .inheritable(all.clone())
            .ambient(all)
            .build()
            .unwrap(),
    ));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    let mut linux = spec.linux().clone().unwrap();
    let ns = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(ns));
    linux.set_masked_paths(None);
    linux.set_readonly_paths(None);
    linux.set_seccomp(None);
    let mut res = linux.resources().clone().unwrap_or_default();
    res.set_devices(Some(vec![LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .access("rwm")
        .build()
        .unwrap()]));
    linux.set_resources(Some(res));
    spec.set_linux(Some(linux));
    spec
}

/// Runs `script` as guest root in container `id`; returns what it printed.
async fn attack(sandbox: &mut Sandbox, w: &World, id: &str, script: &str) -> String {
    let cid = Id::container(id).unwrap();
    let rootfs = w.rootfs(id);
    let c: Container = sandbox
        .create_container(&cid, attacker_spec(script), &rootfs, false)
        .await
        .expect("attacker container created");
    c.close_stdin(None).await.unwrap();
    c.start().await.expect("attacker started");
    let exit = tokio::time::timeout(Duration::from_secs(600), c.wait(None))
        .await
        .expect("the attack script finished")
        .unwrap();
    let out = std::fs::read_to_string(rootfs.join("out")).unwrap_or_default();
    assert_eq!(exit.status, 0, "attack script failed: {out}");
    sandbox.remove_container(&cid).await;
    out
}

/// A tmpfs on a host directory, unmounted when dropped (also when an
/// assertion fails half-way).
struct HostTmpfs(PathBuf);

impl HostTmpfs {
    fn mount(path: &Path) -> Self {
        std::fs::create_dir_all(path).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        Self(path.to_path_buf())
    }
}

impl Drop for HostTmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// Kata CVE-2020-2024 and the CVE-2020-2026 family: the guest swaps a
/// container's directory in the share for a symlink to a host mount point,
/// hoping that teardown unmounts or removes through it. The share root is
/// read-only to the guest, and teardown never follows a guest path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn a_guest_cannot_redirect_teardown_onto_a_host_mount() {
    let w = World::new();
    // A host mount point the attacker aims teardown at.
    let target = w.tmp.path().join("host-victim");
    let host_mount = HostTmpfs::mount(&target.join("rootfs"));
    std::fs::write(target.join("rootfs/precious"), "host data").unwrap();

    let mut sandbox = w.start("hostile-share").await;
    let victim = Id::container("victim").unwrap();
    let mut spec = Spec::default();
    let mut p = spec.process().clone().unwrap();
    p.set_args(Some(vec!["sleep".into(), "1000".into()]));
    spec.set_process(Some(p));
    sandbox
        .create_container(&victim, spec, &w.rootfs("victim"), false)
        .await
        .unwrap();

    let script = format!(
        r#"
S=/proc/1/root{share}
ls $S > /share.ls
touch $S/planted && echo ATTACK: wrote the share root
mv $S/victim $S/moved && echo ATTACK: renamed victim
ln -s {target} $S/victim && echo ATTACK: planted a symlink
mount -t virtiofs {tag} /mnt && echo mounted-tag
ls /mnt > /mnt.ls
touch /mnt/planted2
mv /mnt/victim /mnt/moved2
ln -s {target} /mnt/victim2
echo attack-done
"#,
        share = cocoon_protocols::GUEST_SHARE_DIR,
        target = target.display(),
        tag = cocoon_protocols::SHARE_TAG,
    );
    let out = attack(&mut sandbox, &w, "attacker", &script).await;
    let listed =
        std::fs::read_to_string(w.tmp.path().join("rootfs/attacker/share.ls")).unwrap_or_default();
    assert!(
        listed.contains("victim"),
        "the attacker reached the share (else the test proves nothing): {listed:?}\n{out}"
    );
    assert!(out.contains("attack-done"), "{out}");
    assert!(!out.contains("ATTACK:"), "an attack succeeded:\n{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    // A fresh mount of the tag: whatever the guest sees there, nothing it
    // did reached the host outside its own rootfs. The host's share holds
    // exactly the victim (the attacker is removed), as a directory.
    let dir = w.state().join("hostile-share");
    for side in ["mounts", "shared"] {
        let mut names: Vec<(String, bool)> = std::fs::read_dir(dir.join(side))
            .unwrap()
            .flatten()
            .map(|e| {
                let dir = e.file_type().unwrap().is_dir();
                (e.file_name().to_string_lossy().into_owned(), dir)
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [("victim".to_string(), true)],
            "{side}/ was changed by the guest:\n{out}"
        );
    }

    sandbox.remove_container(&victim).await;
    sandbox.stop().await;
    assert!(
        is_mounted(&target.join("rootfs")),
        "the host mount point was unmounted"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("rootfs/precious")).unwrap(),
        "host data"
    );
    drop(host_mount);
    w.assert_clean();
}

/// What the guest can write lands in its own rootfs (the container's
/// writable layer, as with runc), and filling it does not stop teardown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn a_guest_filling_its_rootfs_does_not_stop_teardown() {
    let w = World::new();
    let mut sandbox = w.start("hostile-fill").await;
    let out = attack(
        &mut sandbox,
        &w,
        "filler",
        "dd if=/dev/zero of=/big bs=1M count=256 && sync && echo filled",
    )
    .await;
    assert!(out.contains("filled"), "{out}");
    let big = w.tmp.path().join("rootfs/filler/big");
    assert_eq!(std::fs::metadata(&big).unwrap().len(), 256 << 20);
    sandbox.stop().await;
    std::fs::remove_file(big).unwrap();
    w.assert_clean();
}

/// A console flood: the host keeps a bounded log, and its last lines still
/// show what the guest wrote last. The 16550 serial port runs at about
/// 130 KB/s under TCG, so the default flood is 3 MiB (three times the cap,
/// about 25 s); `COCOON_FLOOD_MIB=100` runs the full 100 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn a_console_flood_is_capped_and_the_last_lines_survive() {
    let w = World::new();
    let mut sandbox = w.start("hostile-console").await;
    let mib: u64 = std::env::var("COCOON_FLOOD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let script = format!(
        "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c {} > /proc/1/root/dev/ttyS0 && echo LAST-LINE-OF-THE-FLOOD > /proc/1/root/dev/ttyS0 && echo flooded",
        mib << 20
    );
    let started = std::time::Instant::now();
    let out = attack(&mut sandbox, &w, "flooder", &script).await;
    eprintln!("flooded {mib} MiB in {:?}", started.elapsed());
    assert!(out.contains("flooded"), "{out}");
    let dir = w.state().join("hostile-console");
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("console"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total > 0, "no console log at all");
    assert!(
        total <= 2 << 20,
        "console logs hold {total} bytes after a {mib} MiB flood"
    );
    // The reader may lag the guest by a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let tail = sandbox.vm().console_tail(5);
        if tail.contains("LAST-LINE-OF-THE-FLOOD") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the last line is not in the tail: {tail:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sandbox.stop().await;
    w.assert_clean();
}

/// Local host users see nothing of a pod: its state directory is 0700 and
/// its files 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn other_host_users_cannot_read_a_pod() {
    let w = World::new();
    let sandbox = w.start("hostile-perms").await;
    let dir = w.state().join("hostile-perms");
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let m = mode(&e.path());
        assert_eq!(m & 0o077, 0, "{} is {m:o}", e.path().display());
    }
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let ls = as_nobody(&["ls", &dir.to_string_lossy()]);
    assert!(!ls.status.success(), "nobody listed {}", dir.display());
    let cat = as_nobody(&["cat", &dir.join("console.log").to_string_lossy()]);
    assert!(!cat.status.success(), "nobody read the console log");
    sandbox.stop().await;
    w.assert_clean();
}
