//! A sandbox started with a cgroup path runs QEMU and its daemons in that
//! host cgroup, and the cleanup after a dead owner removes the cgroup
//! directories Cocoon made (killing what was left in them) and keeps the
//! parent: a real VM (QEMU, the guest image), driven through `Sandbox`.
//! `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cocoon_runtime::cgroup::CgroupPath;
use cocoon_runtime::{Sandbox, SandboxOptions};

fn hierarchies() -> Vec<cocoon_runtime::cgroup::Hierarchy> {
    cocoon_runtime::cgroup::hierarchies().expect("/proc/self/mountinfo")
}

/// A parent cgroup made by the test in every hierarchy (as the kubelet
/// makes a pod's); removed on drop.
struct Parent {
    name: String,
    dirs: Vec<PathBuf>,
}

impl Parent {
    fn new(name: &str) -> Self {
        let mut dirs = Vec::new();
        for h in hierarchies() {
            let dir = h.mount.join(name);
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            if !h.v2 && h.has("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.mount.join(f)).unwrap();
                    std::fs::write(dir.join(f), v.trim()).unwrap();
                }
            }
            dirs.push(dir);
        }
        Self {
            name: name.into(),
            dirs,
        }
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        for d in &self.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("remove {}: {e}", d.display());
            }
        }
    }
}

/// The cgroup of `pid` in each hierarchy line of /proc/PID/cgroup.
fn cgroups_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn vm_runs_in_the_pod_cgroup_and_cleanup_removes_only_what_cocoon_made() {
    let guest =
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into());
    let state = tempfile::tempdir().unwrap();
    let mut config = cocoon_config::Config::default();
    let guest = PathBuf::from(guest);
    config.guest.kernel = guest.join("vmlinuz");
    config.guest.initrd = guest.join("initrd.img");
    config.guest.dir = guest;
    config.runtime.state_dir = state.path().to_path_buf();

    let parent = Parent::new(&format!("cocoon-rt-cg-{}", std::process::id()));
    let id = cocoon_protocols::Id::sandbox("cgroup-rt").unwrap();
    // A middle level the test did not make: Cocoon creates and removes it.
    let want = format!("/{}/mid/{id}", parent.name);
    let options = SandboxOptions {
        cgroup: Some(CgroupPath::parse(&want).unwrap()),
        ..Default::default()
    };
    let hv = cocoon_runtime::hypervisor(&config);
    let mut sandbox = Sandbox::start_with(&id, &config, &options, hv.as_ref())
        .await
        .expect("sandbox");
    let pids = sandbox.vm().pids();
    assert!(pids.len() >= 2, "{pids:?}");
    for (name, pid) in &pids {
        let lines = cgroups_of(*pid);
        assert_eq!(lines.len(), hierarchies().len(), "{name}: {lines:?}");
        for l in &lines {
            assert!(l.ends_with(&format!(":{want}")), "{name} ({pid}): {l}");
        }
    }
    for l in cgroups_of(std::process::id()) {
        assert!(!l.contains(&parent.name), "the owner joined: {l}");
    }

    // A process the owner did not record (as a daemon's own child would
    // be) in the pod's cgroup.
    let mut stray = std::process::Command::new("sleep")
        .arg("1000")
        .spawn()
        .unwrap();
    let leaf = hierarchies()[0].mount.join(want.trim_start_matches('/'));
    std::fs::write(leaf.join("cgroup.procs"), stray.id().to_string()).unwrap();

    // The owner dies without stopping anything (a killed shim): the
    // processes, mounts and directories stay for the cleanup.
    std::mem::forget(sandbox);
    let t = Instant::now();
    cocoon_runtime::cleanup_dead(state.path(), &id)
        .await
        .expect("cleanup");
    eprintln!("cleanup took {:?}", t.elapsed());
    let status = stray.wait().unwrap();
    assert!(!status.success(), "the stray process was killed: {status}");
    for (name, pid) in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let st = stat.rsplit(") ").next().unwrap_or("").chars().next();
        assert!(
            matches!(st, None | Some('Z') | Some('X')),
            "{name} ({pid}) is still alive: {stat}"
        );
    }
    for d in &parent.dirs {
        assert!(d.is_dir(), "the parent {} was kept", d.display());
        assert!(
            !d.join("mid").exists(),
            "{} is gone",
            d.join("mid").display()
        );
    }
    assert!(!Path::new(&state.path().join(id.as_str())).exists());
}
