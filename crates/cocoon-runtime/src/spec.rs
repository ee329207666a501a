//! Making a bundle's OCI spec fit the guest: pure functions of the spec,
//! tested without a VM.
//!
//! - The VM is the pod: a spec that shares a namespace of the host
//!   (`hostNetwork`, `hostIPC`, `hostPID`) cannot be served: front ends
//!   refuse it with [`check_namespaces`] before a VM boots (to the runtime
//!   itself, a missing namespace is the guest's).
//! - Every container runs in the guest's network namespace, which the
//!   agent configures as the pod's: the network namespace entry goes.
//! - A path given for the IPC, UTS or PID namespace names a namespace of
//!   the pod's sandbox container on the host (that is how CRI joins a
//!   container to its pod); it is kept for the agent, which joins the
//!   sandbox container's namespace of that type in the guest. Paths of the
//!   other namespaces mean nothing in the guest and go.
//! - Host bind mounts (CRI's pod files, volumes) reach the guest through
//!   the share ([`host_binds`] says which, the caller shares them, then
//!   [`adapt`] points each mount at its share); the pod's `/dev/shm`
//!   becomes the guest's per-pod tmpfs.
//! - Host devices and the host cgroup placement go: the agent places the
//!   container in the guest's cgroups.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cocoon_protocols::{Error, GUEST_SHARE_DIR, GUEST_SHM_DIR};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

use crate::rundir::{Access, Propagation};

/// Where the guest finds a host bind mount of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSource {
    /// A share, as `<cid>/<name>` relative to the guest's share.
    Shared(String),
    /// The pod's `/dev/shm`: the agent's tmpfs of `size` bytes.
    PodShm { size: u64 },
}

/// A host bind mount of the spec: the `index`-th mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    pub index: usize,
    pub source: PathBuf,
    pub access: Access,
    pub propagation: Propagation,
    /// The pod's `/dev/shm`, a tmpfs of that many bytes on the host.
    pub pod_shm: Option<u64>,
}

/// containerd CRI's size for a pod's `/dev/shm` when the host's cannot
/// be read.
pub const DEFAULT_SHM_SIZE: u64 = 64 << 20;

/// The namespaces a VM cannot share with the host, and the Kubernetes
/// setting that asks for it.
const MUST_BE_OWN: [(LinuxNamespaceType, &str, &str); 5] = [
    (LinuxNamespaceType::Network, "network", " (hostNetwork)"),
    (LinuxNamespaceType::Ipc, "IPC", " (hostIPC)"),
    (LinuxNamespaceType::Pid, "PID", " (hostPID)"),
    (LinuxNamespaceType::Uts, "UTS", ""),
    (LinuxNamespaceType::Mount, "mount", ""),
];

/// Refuses a spec that runs in a namespace of the host (no entry of that
/// type): the container would run in the VM's, silently not what was
/// asked.
pub fn check_namespaces(spec: &Spec, container: &str) -> Result<(), Error> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for (typ, name, setting) in MUST_BE_OWN {
        if !namespaces.iter().any(|n| n.typ() == typ) {
            return Err(Error::InvalidArgument(format!(
                "container {container} asks for the host's {name} namespace{setting}: \
                 a VM cannot share the host's namespaces"
            )));
        }
    }
    Ok(())
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

fn access(m: &Mount) -> Access {
    let ro = m
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == "ro"));
    if ro {
        Access::ReadOnly
    } else {
        Access::ReadWrite
    }
}

/// The propagation a bind asks for; the last option naming one wins, as
/// with runc, and a bind naming none is private (`rprivate`).
fn propagation(m: &Mount) -> Propagation {
    let options = m.options().as_deref().unwrap_or_default();
    options
        .iter()
        .rev()
        .find_map(|o| match o.as_str() {
            "private" | "rprivate" => Some(Propagation::Private),
            "slave" | "rslave" => Some(Propagation::Slave),
            "shared" | "rshared" => Some(Propagation::Shared),
            _ => None,
        })
        .unwrap_or_default()
}

/// The spec's bind mounts of host paths. `tmpfs_size` tells whether a host
/// path is a tmpfs, and its size: a tmpfs bound on `/dev/shm` is the pod's
/// shared memory, which the guest makes its own.
pub fn host_binds(spec: &Spec, tmpfs_size: impl Fn(&Path) -> Option<u64>) -> Vec<HostBind> {
    let Some(mounts) = spec.mounts() else {
        return Vec::new();
    };
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| is_bind(m))
        .filter_map(|(index, m)| {
            let source = m.source().clone()?;
            let pod_shm = (m.destination() == Path::new("/dev/shm"))
                .then(|| tmpfs_size(&source))
                .flatten();
            Some(HostBind {
                index,
                access: access(m),
                propagation: propagation(m),
                source,
                pod_shm,
            })
        })
        .collect()
}

/// Rewrites `spec` for the guest: the root is the shared rootfs at
/// `rootfs_rel` (relative to the guest's share), each host bind mount
/// (by index) is where `guest` says, and namespaces and host paths are
/// as the module says. A bind mount missing from `guest` is dropped.
pub fn adapt(spec: &mut Spec, rootfs_rel: &str, guest: &BTreeMap<usize, GuestSource>) {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs_rel.into());
    spec.set_root(Some(root));
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(ns) = linux.namespaces().clone() {
            let ns = ns
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .map(|mut n| {
                    let joinable = matches!(
                        n.typ(),
                        LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts | LinuxNamespaceType::Pid
                    );
                    if !joinable {
                        n.set_path(None);
                    }
                    n
                })
                .collect();
            linux.set_namespaces(Some(ns));
        }
        linux.set_cgroups_path(None);
        linux.set_devices(None);
        spec.set_linux(Some(linux));
    }
    if let Some(mounts) = spec.mounts().clone() {
        let kept = mounts
            .into_iter()
            .enumerate()
            .filter_map(|(i, mut m)| {
                if !is_bind(&m) {
                    return Some(m);
                }
                match guest.get(&i) {
                    Some(GuestSource::Shared(rel)) => {
                        m.set_source(Some(Path::new(GUEST_SHARE_DIR).join(rel)));
                    }
                    Some(GuestSource::PodShm { size }) => {
                        m.set_source(Some(GUEST_SHM_DIR.into()));
                        let mut options = m.options().clone().unwrap_or_default();
                        options.retain(|o| !o.starts_with("size="));
                        options.push(format!("size={size}"));
                        m.set_options(Some(options));
                    }
                    None => {
                        tracing::warn!("bind mount on {:?} has no share; skipped", m.destination());
                        return None;
                    }
                }
                Some(m)
            })
            .collect();
        spec.set_mounts(Some(kept));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceBuilder, MountBuilder};

    fn bind(dest: &str, source: &str, options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination(dest)
            .source(source)
            .typ("bind")
            .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    fn ns(typ: LinuxNamespaceType, path: Option<&str>) -> LinuxNamespace {
        let mut b = LinuxNamespaceBuilder::default().typ(typ);
        if let Some(p) = path {
            b = b.path(p);
        }
        b.build().unwrap()
    }

    fn with_namespaces(namespaces: Vec<LinuxNamespace>) -> Spec {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        spec
    }

    fn pod_namespaces() -> Vec<LinuxNamespace> {
        vec![
            ns(LinuxNamespaceType::Pid, Some("/proc/42/ns/pid")),
            ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
            ns(LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc")),
            ns(LinuxNamespaceType::Uts, Some("/proc/42/ns/uts")),
            ns(LinuxNamespaceType::Mount, None),
        ]
    }

    #[test]
    fn host_namespaces_are_refused_by_name() {
        assert!(check_namespaces(&with_namespaces(pod_namespaces()), "c1").is_ok());
        assert!(check_namespaces(&Spec::default(), "c1").is_ok());
        for (typ, setting) in [
            (LinuxNamespaceType::Network, "hostNetwork"),
            (LinuxNamespaceType::Ipc, "hostIPC"),
            (LinuxNamespaceType::Pid, "hostPID"),
        ] {
            let mut all = pod_namespaces();
            all.retain(|n| n.typ() != typ);
            let e = check_namespaces(&with_namespaces(all), "c1").unwrap_err();
            let Error::InvalidArgument(msg) = e else {
                panic!("{e:?}")
            };
            assert!(msg.contains("container c1"), "{msg}");
            assert!(msg.contains(setting), "{msg}");
            assert!(msg.contains("a VM cannot share"), "{msg}");
        }
    }

    #[test]
    fn namespaces_join_the_pod_in_the_guest() {
        let mut spec = with_namespaces(pod_namespaces());
        let mut linux = spec.linux().clone().unwrap();
        linux.set_cgroups_path(Some("/kubepods/pod1/c1".into()));
        spec.set_linux(Some(linux));
        adapt(&mut spec, "c1/rootfs", &BTreeMap::new());
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        assert!(linux.devices().is_none());
        let ns = linux.namespaces().as_ref().unwrap();
        assert!(
            ns.iter().all(|n| n.typ() != LinuxNamespaceType::Network),
            "the guest's network namespace is the pod's"
        );
        let path = |t| {
            ns.iter()
                .find(|n| n.typ() == t)
                .unwrap()
                .path()
                .clone()
                .map(|p| p.display().to_string())
        };
        assert_eq!(
            path(LinuxNamespaceType::Ipc).as_deref(),
            Some("/proc/42/ns/ipc")
        );
        assert_eq!(
            path(LinuxNamespaceType::Uts).as_deref(),
            Some("/proc/42/ns/uts")
        );
        assert_eq!(
            path(LinuxNamespaceType::Pid).as_deref(),
            Some("/proc/42/ns/pid")
        );
        assert_eq!(path(LinuxNamespaceType::Mount), None);
    }

    #[test]
    fn binds_are_found_with_their_access_and_the_pod_shm() {
        let mut spec = Spec::default();
        let mut mounts = spec.mounts().clone().unwrap();
        let first = mounts.len();
        mounts.push(bind(
            "/etc/hosts",
            "/pods/p1/hosts",
            &["rbind", "rprivate", "rw"],
        ));
        mounts.push(bind(
            "/etc/resolv.conf",
            "/pods/p1/resolv.conf",
            &["rbind", "rshared", "ro"],
        ));
        mounts.push(bind("/dev/shm", "/pods/p1/shm", &["rbind", "rw"]));
        let mut none_bind = bind("/data", "/srv/data", &["bind", "rshared", "rslave"]);
        none_bind.set_typ(Some("none".into()));
        mounts.push(none_bind);
        spec.set_mounts(Some(mounts));
        let binds = host_binds(&spec, |p| {
            (p == Path::new("/pods/p1/shm")).then_some(1 << 20)
        });
        let got: Vec<_> = binds
            .iter()
            .map(|b| {
                (
                    b.index - first,
                    b.source.to_str().unwrap(),
                    b.access,
                    b.propagation,
                    b.pod_shm,
                )
            })
            .collect();
        use Propagation::*;
        assert_eq!(
            got,
            [
                (0, "/pods/p1/hosts", Access::ReadWrite, Private, None),
                (1, "/pods/p1/resolv.conf", Access::ReadOnly, Shared, None),
                (2, "/pods/p1/shm", Access::ReadWrite, Private, Some(1 << 20)),
                (3, "/srv/data", Access::ReadWrite, Slave, None),
            ]
        );
        // A tmpfs bound elsewhere is an ordinary share.
        let binds = host_binds(&spec, |_| Some(1));
        assert_eq!(binds.iter().filter(|b| b.pod_shm.is_some()).count(), 1);
    }

    #[test]
    fn binds_point_at_their_guest_source() {
        let mut spec = Spec::default();
        let mut mounts = spec.mounts().clone().unwrap();
        let (kept, first) = (mounts.clone(), mounts.len());
        mounts.push(bind("/etc/hosts", "/pods/p1/hosts", &["rbind", "ro"]));
        mounts.push(bind("/dev/shm", "/pods/p1/shm", &["rbind", "size=1"]));
        mounts.push(bind("/lost", "/srv/lost", &["rbind"]));
        spec.set_mounts(Some(mounts));
        let guest = BTreeMap::from([
            (first, GuestSource::Shared("c1/0".into())),
            (first + 1, GuestSource::PodShm { size: 4096 }),
        ]);
        adapt(&mut spec, "c1/rootfs", &guest);
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("c1/rootfs"));
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(
            &mounts[..first],
            &kept[..],
            "the other mounts are untouched"
        );
        assert_eq!(mounts.len(), first + 2, "the bind with no share is dropped");
        let hosts = &mounts[first];
        assert_eq!(
            hosts.source().as_deref(),
            Some(Path::new(GUEST_SHARE_DIR).join("c1/0").as_path())
        );
        assert_eq!(hosts.options().as_ref().unwrap(), &["rbind", "ro"]);
        let shm = &mounts[first + 1];
        assert_eq!(shm.source().as_deref(), Some(Path::new(GUEST_SHM_DIR)));
        assert_eq!(shm.options().as_ref().unwrap(), &["rbind", "size=4096"]);
    }
}
