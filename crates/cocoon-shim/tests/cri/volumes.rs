//! Volumes as the kubelet gives them: host paths (hostPath, emptyDir,
//! configMap and secret directories are all host paths to CRI) bound into
//! containers read-write or read-only, files and directories, through
//! symlinks, with their mount propagation.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{Capability, ContainerConfig, Mount, MountPropagation};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{sh, SLEEPER};
use crate::harness::*;

fn volume(
    container_path: &str,
    host: &Path,
    readonly: bool,
    propagation: MountPropagation,
) -> Mount {
    Mount {
        container_path: container_path.into(),
        host_path: host.to_str().expect("UTF-8 host path").into(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

fn with_mounts(mut config: ContainerConfig, mounts: Vec<Mount>) -> ContainerConfig {
    config.mounts = mounts;
    config
}

/// Root in the container, with CAP_SYS_ADMIN: it can mount and remount.
fn with_sys_admin(mut config: ContainerConfig) -> ContainerConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    sc.capabilities = Some(Capability {
        add_capabilities: vec!["SYS_ADMIN".into()],
        ..Default::default()
    });
    config
}

fn ok(cri: &Cri, c: &str, script: &str) -> String {
    let e = cri
        .exec_sync(c, &sh(script), Duration::from_secs(30))
        .expect("ExecSync");
    assert_eq!(e.code, 0, "{script}: {e:?}");
    e.stdout
}

/// Runs `script`; it must fail because the file system is read-only.
fn read_only(cri: &Cri, c: &str, script: &str) {
    let e = cri
        .exec_sync(c, &sh(script), Duration::from_secs(30))
        .expect("ExecSync");
    assert_ne!(e.code, 0, "{script} succeeded: {e:?}");
    assert!(
        e.stderr.contains("Read-only file system"),
        "{script}: not EROFS: {e:?}"
    );
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn host_path_volumes_read_write_read_only_files_and_symlinks() {
    let cri = cri_or_skip!("host_path_volumes_read_write_read_only_files_and_symlinks");
    let host = tempfile::tempdir().unwrap();
    let dir = |name: &str| {
        let d = host.path().join(name);
        fs::create_dir(&d).unwrap();
        d
    };
    let (rw, ro, target) = (dir("rw"), dir("ro"), dir("target"));
    fs::write(ro.join("data"), "ro-data").unwrap();
    fs::write(target.join("t"), "through the link").unwrap();
    let file = host.path().join("file.conf");
    fs::write(&file, "a file").unwrap();
    let link = host.path().join("link");
    symlink(&target, &link).unwrap();
    let file_link = host.path().join("file-link");
    symlink("file.conf", &file_link).unwrap();

    let private = MountPropagation::PropagationPrivate;
    let pod = cri
        .run_pod(&handler(), pod_config("volumes", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(with_sys_admin(with_mounts(
            container_config("vol", SLEEPER),
            vec![
                volume("/rw", &rw, false, private),
                volume("/ro", &ro, true, private),
                volume("/etc/app.conf", &file, true, private),
                volume("/link", &link, false, private),
                volume("/file-link", &file_link, false, private),
            ],
        )))
        .expect("container with volumes");

    // Read-write: written in the container, read on the host (as root,
    // the container's user).
    ok(
        &cri,
        &c,
        "echo written > /rw/out && mkdir /rw/d && echo deep > /rw/d/f",
    );
    assert_eq!(fs::read_to_string(rw.join("out")).unwrap(), "written\n");
    assert_eq!(fs::read_to_string(rw.join("d/f")).unwrap(), "deep\n");
    fs::write(rw.join("from-host"), "host").unwrap();
    assert_eq!(ok(&cri, &c, "cat /rw/from-host"), "host");

    // Read-only: EROFS for root, also after it remounts its bind
    // read-write inside the guest (CVE-2020-28914: the host side of the
    // share is read-only too).
    assert_eq!(ok(&cri, &c, "cat /ro/data"), "ro-data");
    read_only(&cri, &c, "touch /ro/new");
    read_only(&cri, &c, "echo x > /ro/data");
    read_only(&cri, &c, "echo x > /etc/app.conf");
    // (On runc that remount wins: the container's mount is the only
    // read-only layer there.)
    if handler() != RUNC {
        ok(&cri, &c, "mount -o remount,rw,bind /ro");
        read_only(&cri, &c, "echo x > /ro/data");
    }
    assert_eq!(fs::read_to_string(ro.join("data")).unwrap(), "ro-data");
    assert!(!ro.join("new").exists());

    // Files, and symlinks resolved on the host.
    assert_eq!(ok(&cri, &c, "cat /etc/app.conf"), "a file");
    assert_eq!(ok(&cri, &c, "cat /link/t"), "through the link");
    assert_eq!(ok(&cri, &c, "cat /file-link"), "a file");
    assert_eq!(
        ok(
            &cri,
            &c,
            "test -L /link || test -L /file-link || echo not-links"
        ),
        "not-links\n"
    );
    pod.remove();
    // The volumes are the user's: all there after the pod.
    assert_eq!(fs::read_to_string(rw.join("d/f")).unwrap(), "deep\n");
    assert_eq!(fs::read_to_string(&file).unwrap(), "a file");
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn empty_dir_is_shared_by_the_pods_containers() {
    let cri = cri_or_skip!("empty_dir_is_shared_by_the_pods_containers");
    let empty_dir = tempfile::tempdir().unwrap();
    let private = MountPropagation::PropagationPrivate;
    let pod = cri
        .run_pod(&handler(), pod_config("emptydir", Namespaces::default()))
        .expect("RunPodSandbox");
    let mounts = || vec![volume("/cache", empty_dir.path(), false, private)];
    let a = pod
        .start(with_mounts(container_config("a", SLEEPER), mounts()))
        .expect("container a");
    let b = pod
        .start(with_mounts(container_config("b", SLEEPER), mounts()))
        .expect("container b");
    ok(&cri, &a, "echo from-a > /cache/a");
    assert_eq!(ok(&cri, &b, "cat /cache/a"), "from-a\n");
    ok(&cri, &b, "echo from-b >> /cache/a");
    assert_eq!(ok(&cri, &a, "cat /cache/a"), "from-a\nfrom-b\n");
    assert_eq!(
        fs::read_to_string(empty_dir.path().join("a")).unwrap(),
        "from-a\nfrom-b\n"
    );
    pod.remove();
}

/// The kubelet's atomic update of a configMap or secret volume: the new
/// files in a new timestamped directory, then `..data` swapped to it by a
/// rename; the keys are symlinks through `..data`.
fn config_map_version(dir: &Path, version: &str, value: &str) {
    let data = dir.join(format!("..{version}"));
    fs::create_dir(&data).unwrap();
    fs::write(data.join("key"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(format!("..{version}"), &tmp).unwrap();
    fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("key").exists() {
        symlink("..data/key", dir.join("key")).unwrap();
    }
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn config_map_update_reaches_a_running_container() {
    let cri = cri_or_skip!("config_map_update_reaches_a_running_container");
    let cm = tempfile::tempdir().unwrap();
    config_map_version(cm.path(), "2026_11_29_01", "first");
    let pod = cri
        .run_pod(&handler(), pod_config("configmap", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(with_mounts(
            container_config("reader", SLEEPER),
            vec![volume(
                "/config",
                cm.path(),
                true,
                MountPropagation::PropagationPrivate,
            )],
        ))
        .expect("container");
    assert_eq!(ok(&cri, &c, "cat /config/key"), "first");
    let swapped = Instant::now();
    config_map_version(cm.path(), "2026_11_29_02", "second");
    let seen = exec_until(
        &cri,
        &c,
        &sh("cat /config/key"),
        Duration::from_secs(20),
        |e| e.stdout == "second",
    );
    assert_eq!(seen.stdout, "second", "update not seen in 20 s: {seen:?}");
    eprintln!(
        "configMap update seen in the container after {:?}",
        swapped.elapsed()
    );
    pod.remove();
}

/// A tmpfs mounted at `at` (created), or unmounted with everything below
/// it on drop.
struct HostMount(PathBuf);

impl HostMount {
    fn tmpfs(at: &Path) -> Self {
        fs::create_dir_all(at).unwrap();
        mount(
            Some("tmpfs"),
            at,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap_or_else(|e| panic!("mount tmpfs on {}: {e}", at.display()));
        Self(at.to_path_buf())
    }

    fn make_shared(self) -> Self {
        let none = None::<&str>;
        mount(none, &self.0, none, MsFlags::MS_SHARED, none).unwrap();
        self
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn is_mount_point(p: &Path) -> bool {
    cocoon_runtime::mount_points()
        .expect("/proc/self/mountinfo")
        .iter()
        .any(|m| m == p)
}

/// `rprivate`, `rslave` (HostToContainer) and `rshared` (Bidirectional)
/// volumes of one container: a mount the host makes below each after
/// the container started reaches the last two. A mount the container
/// makes in its `rshared` volume reaches the host on runc; a VM cannot
/// send it (the guest's mounts are the guest kernel's), so on Cocoon it
/// stays in the guest: the documented difference.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn mount_propagation_private_host_to_container_and_bidirectional() {
    let cri = cri_or_skip!("mount_propagation_private_host_to_container_and_bidirectional");
    let scratch = tempfile::tempdir().unwrap();
    // kubelet's volumes live on a shared mount; containerd checks that
    // for HostToContainer and Bidirectional.
    let root = HostMount::tmpfs(&scratch.path().join("volumes")).make_shared();
    let cases = [
        ("private", MountPropagation::PropagationPrivate),
        ("slave", MountPropagation::PropagationHostToContainer),
        ("shared", MountPropagation::PropagationBidirectional),
    ];
    let mounts = cases
        .iter()
        .map(|(name, propagation)| {
            let host = root.0.join(name);
            fs::create_dir(&host).unwrap();
            volume(&format!("/{name}"), &host, false, *propagation)
        })
        .collect();
    let pod = cri
        .run_pod(&handler(), pod_config("propagation", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(with_sys_admin(with_mounts(
            container_config("watcher", SLEEPER),
            mounts,
        )))
        .expect("container with propagating volumes");

    let later: Vec<_> = cases
        .iter()
        .map(|(name, _)| {
            let m = HostMount::tmpfs(&root.0.join(name).join("later"));
            fs::write(m.0.join("file"), name).unwrap();
            m
        })
        .collect();
    for (name, _) in &cases[1..] {
        let path = format!("/{name}/later/file");
        let seen = exec_until(&cri, &c, &["cat", &path], Duration::from_secs(20), |e| {
            e.stdout == *name
        });
        assert_eq!(
            seen.stdout, *name,
            "host mount not seen at {path}: {seen:?}"
        );
    }
    let private = cri
        .exec_sync(&c, &["cat", "/private/later/file"], Duration::from_secs(30))
        .expect("ExecSync");
    assert!(
        private.code != 0 && private.stderr.contains("No such file"),
        "rprivate volume received a mount: {private:?}"
    );

    // From the container towards the host.
    ok(
        &cri,
        &c,
        "mkdir -p /shared/inner && mount -t tmpfs tmpfs /shared/inner && echo in > /shared/inner/f",
    );
    let inner = root.0.join("shared/inner");
    let reached_host = is_mount_point(&inner) && inner.join("f").exists();
    let on_runc = handler() == RUNC;
    assert_eq!(
        reached_host, on_runc,
        "a container's mount in an rshared volume reached the host: {reached_host}"
    );
    pod.remove();
    if on_runc {
        let _ = umount2(&inner, MntFlags::MNT_DETACH);
    }
    drop(later);
    drop(root);
}
