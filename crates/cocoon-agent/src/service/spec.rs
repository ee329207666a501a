//! What the agent changes in the OCI spec the host sends, as one pure
//! function, each rule tested alone:
//!
//! - `root.path` names a directory of the shared directory: it is joined
//!   onto the share's mount point in the guest (a leading `/` is ignored;
//!   `..`, or naming the share itself, is refused);
//! - `process.terminal` is the request's `terminal`;
//! - `linux.cgroupsPath` is `<cgroup parent>/<container id>`, whatever the
//!   host asked: the guest's cgroup tree is the agent's;
//! - a cgroup namespace is added if missing, so that the container sees its
//!   own cgroup at `/sys/fs/cgroup`;
//! - a `cgroup` (v1) mount becomes a `cgroup2` mount: a spec written for a
//!   cgroup v1 host asks for one, and the guest has only the v2 hierarchy;
//! - a path the host gives for the IPC, UTS or PID namespace names the pod's
//!   sandbox container's (that is how CRI joins a container to its pod):
//!   it becomes that container's namespace in the guest, found by its init's
//!   pid; paths of other namespaces, or with no sandbox container to join,
//!   go (the namespace is new);
//! - there is no network namespace entry: every container runs in the
//!   guest's own, which is the pod's, so `net.*` sysctls are taken out for
//!   the agent to apply there (libcontainer refuses them without a new
//!   network namespace);
//! - AppArmor and SELinux labels go, with a log line: the guest loads no
//!   policy (the host's profiles mean nothing there; the VM is the
//!   boundary);
//! - a bind from the pod's `/dev/shm` ([`GUEST_SHM_DIR`]) loses its
//!   `size=` option, which sizes that tmpfs.

use std::path::{Component, Path};

use std::collections::HashMap;

use cocoon_protocols::{Error, Id, GUEST_SHM_DIR};
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Spec};

/// Where the rewritten spec puts things in the guest.
pub struct Placement<'a> {
    /// The shared directory's mount point.
    pub share_dir: &'a Path,
    /// The cgroup under which every container's cgroup is made.
    pub cgroup_parent: &'a Path,
    /// The pid of the init of the pod's sandbox container, whose
    /// namespaces the container joins where the host gave a path.
    pub sandbox_init: Option<i32>,
}

/// What the rewrite took out of the spec for the agent to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PodSetup {
    /// `net.*` sysctls, for the guest's network namespace.
    pub net_sysctls: HashMap<String, String>,
    /// The size of the pod's `/dev/shm`, if the spec binds it.
    pub shm_size: Option<u64>,
}

/// The spec container `id` runs with, from the one the host sent.
pub fn rewrite(
    mut spec: Spec,
    id: &Id,
    terminal: bool,
    at: &Placement,
) -> Result<(Spec, PodSetup), Error> {
    let mut setup = PodSetup::default();
    let mut root = spec
        .root()
        .clone()
        .ok_or_else(|| Error::InvalidArgument(format!("OCI spec of container {id} has no root")))?;
    let rel = root.path().strip_prefix("/").unwrap_or(root.path());
    let names_a_subdirectory = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && rel.components().any(|c| matches!(c, Component::Normal(_)));
    if !names_a_subdirectory {
        return Err(Error::InvalidArgument(format!(
            "root path {} of container {id} must name a directory under the shared directory",
            root.path().display()
        )));
    }
    let rel: std::path::PathBuf = rel
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.set_path(at.share_dir.join(rel));
    spec.set_root(Some(root));

    if let Some(mut p) = spec.process().clone() {
        p.set_terminal(Some(terminal));
        drop_lsm_labels(&mut p, id);
        spec.set_process(Some(p));
    }

    let mut linux = spec.linux().clone().unwrap_or_default();
    if let Some(label) = linux.mount_label().clone() {
        tracing::info!(container = %id, "SELinux mount label {label:?} ignored: the guest has no SELinux policy");
        linux.set_mount_label(None);
    }
    linux.set_cgroups_path(Some(at.cgroup_parent.join(id.as_str())));
    if let Some(p) = linux.rootfs_propagation().clone() {
        linux.set_rootfs_propagation(Some(rootfs_propagation(&p, id)?.into()));
    }
    let mut namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.typ() != LinuxNamespaceType::Network)
        .map(|mut n| {
            let name = match n.typ() {
                LinuxNamespaceType::Ipc => Some("ipc"),
                LinuxNamespaceType::Uts => Some("uts"),
                LinuxNamespaceType::Pid => Some("pid"),
                _ => None,
            };
            let joined = match (n.path(), name, at.sandbox_init) {
                (Some(_), Some(name), Some(pid)) => Some(format!("/proc/{pid}/ns/{name}").into()),
                _ => None,
            };
            n.set_path(joined);
            n
        })
        .collect();
    if !namespaces
        .iter()
        .any(|n| n.typ() == LinuxNamespaceType::Cgroup)
    {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(LinuxNamespaceType::Cgroup);
        namespaces.push(ns);
    }
    linux.set_namespaces(Some(namespaces));
    if let Some(sysctls) = linux.sysctl().clone() {
        let (net, rest) = sysctls
            .into_iter()
            .partition(|(k, _)| k.replace('/', ".").starts_with("net."));
        setup.net_sysctls = net;
        linux.set_sysctl(Some(rest));
    }
    spec.set_linux(Some(linux));

    if let Some(mounts) = spec.mounts().clone() {
        let mounts = mounts
            .into_iter()
            .map(|mut m| {
                if m.typ().as_deref() == Some("cgroup") {
                    m.set_typ(Some("cgroup2".into()));
                    m.set_source(Some("cgroup2".into()));
                }
                if m.source().as_deref() == Some(Path::new(GUEST_SHM_DIR)) {
                    let mut options = m.options().clone().unwrap_or_default();
                    options.retain(|o| match o.strip_prefix("size=") {
                        Some(size) => {
                            setup.shm_size = size.parse().ok().or(setup.shm_size);
                            false
                        }
                        None => true,
                    });
                    m.set_options(Some(options));
                }
                m
            })
            .collect();
        spec.set_mounts(Some(mounts));
    }
    Ok((spec, setup))
}

/// The root's propagation as libcontainer names it. containerd's CRI
/// writes the recursive names (`rslave` for a HostToContainer volume,
/// `rshared` for a Bidirectional one), as runc accepts; libcontainer
/// takes only the plain names and applies them recursively anyway.
fn rootfs_propagation<'a>(p: &'a str, id: &Id) -> Result<&'a str, Error> {
    match p {
        "private" | "rprivate" => Ok("private"),
        "slave" | "rslave" => Ok("slave"),
        "shared" | "rshared" => Ok("shared"),
        "unbindable" | "runbindable" => Ok("unbindable"),
        other => Err(Error::InvalidArgument(format!(
            "linux.rootfsPropagation {other:?} of container {id} is not one of \
             private, slave, shared, unbindable (or their r-forms)"
        ))),
    }
}

/// Drops the AppArmor profile and SELinux label of `process` (of
/// container `id`), with a log line: the guest loads no LSM policy, and
/// libcontainer refuses a profile it cannot apply.
pub fn drop_lsm_labels(process: &mut oci_spec::runtime::Process, id: &Id) {
    if let Some(profile) = process.apparmor_profile().clone() {
        tracing::info!(container = %id, "AppArmor profile {profile:?} ignored: the guest loads no AppArmor policy");
        process.set_apparmor_profile(None);
    }
    if let Some(label) = process.selinux_label().clone() {
        tracing::info!(container = %id, "SELinux label {label:?} ignored: the guest has no SELinux policy");
        process.set_selinux_label(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{Mount, Root};
    use std::path::PathBuf;

    fn at() -> Placement<'static> {
        Placement {
            share_dir: Path::new("/run/cocoon/shared"),
            cgroup_parent: Path::new("/cocoon"),
            sandbox_init: None,
        }
    }

    fn id() -> Id {
        Id::container("c1").unwrap()
    }

    fn with_root(path: &str) -> Spec {
        let mut spec = Spec::default();
        let mut root = Root::default();
        root.set_path(path.into());
        spec.set_root(Some(root));
        spec
    }

    fn root_of(spec: &Spec) -> PathBuf {
        spec.root().as_ref().unwrap().path().clone()
    }

    #[test]
    fn root_is_joined_onto_the_share() {
        for path in ["c1/rootfs", "/c1/rootfs", "./c1/rootfs"] {
            let spec = rewrite(with_root(path), &id(), false, &at()).unwrap().0;
            assert_eq!(root_of(&spec), Path::new("/run/cocoon/shared/c1/rootfs"));
        }
    }

    #[test]
    fn a_root_outside_the_share_is_refused() {
        for path in ["", "/", ".", "../etc", "c1/../../etc"] {
            let e = rewrite(with_root(path), &id(), false, &at()).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{path:?}: {e:?}");
        }
        let mut spec = with_root("c1");
        spec.set_root(None);
        let e = rewrite(spec, &id(), false, &at()).unwrap_err();
        assert_eq!(
            e,
            Error::InvalidArgument("OCI spec of container c1 has no root".into())
        );
    }

    #[test]
    fn lsm_labels_are_dropped() {
        let mut spec = with_root("c1");
        let mut p = spec.process().clone().unwrap();
        p.set_apparmor_profile(Some("cri-containerd.apparmor.d".into()));
        p.set_selinux_label(Some("system_u:system_r:container_t:s0".into()));
        spec.set_process(Some(p));
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_mount_label(Some("system_u:object_r:container_file_t:s0".into()));
        spec.set_linux(Some(linux));
        let (spec, _) = rewrite(spec, &id(), false, &at()).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.apparmor_profile(), &None);
        assert_eq!(p.selinux_label(), &None);
        assert_eq!(spec.linux().as_ref().unwrap().mount_label(), &None);
    }

    #[test]
    fn terminal_is_the_requests() {
        for terminal in [true, false] {
            let mut spec = with_root("c1");
            let mut p = spec.process().clone().unwrap();
            p.set_terminal(Some(!terminal));
            spec.set_process(Some(p));
            let spec = rewrite(spec, &id(), terminal, &at()).unwrap().0;
            assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(terminal));
        }
        let mut spec = with_root("c1");
        spec.set_process(None);
        let spec = rewrite(spec, &id(), true, &at()).unwrap().0;
        assert!(spec.process().is_none(), "a process was made up");
    }

    #[test]
    fn cgroup_path_is_under_the_parent_whatever_was_asked() {
        let mut spec = with_root("c1");
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some("/kubepods/burstable/pod1/c1".into()));
        spec.set_linux(Some(linux));
        let spec = rewrite(spec, &id(), false, &at()).unwrap().0;
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/cocoon/c1"))
        );
        let mut spec = with_root("c1");
        spec.set_linux(None);
        let spec = rewrite(spec, &id(), false, &at()).unwrap().0;
        assert_eq!(
            spec.linux().as_ref().unwrap().cgroups_path().as_deref(),
            Some(Path::new("/cocoon/c1"))
        );
    }

    fn cgroup_namespaces(spec: &Spec) -> usize {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|n| n.typ() == LinuxNamespaceType::Cgroup)
            .count()
    }

    #[test]
    fn a_cgroup_namespace_is_added_once() {
        let spec = rewrite(with_root("c1"), &id(), false, &at()).unwrap().0;
        assert_eq!(cgroup_namespaces(&spec), 1);
        let others = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(others.len() > 1, "the default namespaces were dropped");
        let again = rewrite(spec, &id(), false, &at()).unwrap().0;
        assert_eq!(cgroup_namespaces(&again), 1);
    }

    #[test]
    fn v1_cgroup_mounts_become_cgroup2() {
        let mut spec = with_root("c1");
        let mut v1 = Mount::default();
        v1.set_destination("/host/cgroup".into());
        v1.set_typ(Some("cgroup".into()));
        v1.set_source(Some("cgroup".into()));
        v1.set_options(Some(vec!["ro".into(), "nosuid".into()]));
        // The default spec's own mounts, v1 cgroup mount included.
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        assert!(mounts.iter().any(|m| m.typ().as_deref() == Some("cgroup")));
        let before: Vec<_> = mounts
            .iter()
            .filter(|m| m.typ().as_deref() != Some("cgroup"))
            .cloned()
            .collect();
        mounts.push(v1);
        spec.set_mounts(Some(mounts));
        let spec = rewrite(spec, &id(), false, &at()).unwrap().0;
        let mounts = spec.mounts().as_ref().unwrap();
        let m = mounts
            .iter()
            .find(|m| m.destination() == Path::new("/host/cgroup"))
            .unwrap();
        assert_eq!(m.typ().as_deref(), Some("cgroup2"));
        assert_eq!(m.source().as_deref(), Some(Path::new("cgroup2")));
        assert_eq!(
            m.options().as_deref(),
            Some(&["ro".to_string(), "nosuid".to_string()][..])
        );
        assert!(mounts.iter().all(|m| m.typ().as_deref() != Some("cgroup")));
        // Every other mount is untouched.
        let others: Vec<_> = mounts
            .iter()
            .filter(|m| m.typ().as_deref() != Some("cgroup2"))
            .cloned()
            .collect();
        assert_eq!(others, before);
    }

    fn ns(typ: LinuxNamespaceType, path: Option<&str>) -> LinuxNamespace {
        let mut n = LinuxNamespace::default();
        n.set_typ(typ);
        n.set_path(path.map(Into::into));
        n
    }

    fn with_namespaces(namespaces: Vec<LinuxNamespace>) -> Spec {
        let mut spec = with_root("c1");
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        spec
    }

    fn ns_path(spec: &Spec, typ: LinuxNamespaceType) -> Option<Option<String>> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == typ)
            .map(|n| n.path().as_ref().map(|p| p.display().to_string()))
    }

    #[test]
    fn given_namespaces_join_the_sandbox_containers() {
        let host = vec![
            ns(LinuxNamespaceType::Pid, Some("/proc/9/ns/pid")),
            ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
            ns(LinuxNamespaceType::Ipc, Some("/proc/9/ns/ipc")),
            ns(LinuxNamespaceType::Uts, Some("/proc/9/ns/uts")),
            ns(LinuxNamespaceType::Mount, Some("/proc/9/ns/mnt")),
        ];
        let mut placement = at();
        placement.sandbox_init = Some(77);
        let (spec, _) = rewrite(with_namespaces(host.clone()), &id(), false, &placement).unwrap();
        use LinuxNamespaceType::*;
        assert_eq!(ns_path(&spec, Network), None, "no network namespace entry");
        assert_eq!(ns_path(&spec, Pid), Some(Some("/proc/77/ns/pid".into())));
        assert_eq!(ns_path(&spec, Ipc), Some(Some("/proc/77/ns/ipc".into())));
        assert_eq!(ns_path(&spec, Uts), Some(Some("/proc/77/ns/uts".into())));
        assert_eq!(
            ns_path(&spec, Mount),
            Some(None),
            "a mount namespace is never joined"
        );

        // Without a path (the sandbox itself; CRI's CONTAINER pid mode) or
        // without a sandbox container, the namespace is new.
        let mut own = host.clone();
        own[0].set_path(None);
        let (spec, _) = rewrite(with_namespaces(own), &id(), false, &placement).unwrap();
        assert_eq!(ns_path(&spec, Pid), Some(None));
        assert_eq!(ns_path(&spec, Ipc), Some(Some("/proc/77/ns/ipc".into())));
        let (spec, _) = rewrite(with_namespaces(host), &id(), false, &at()).unwrap();
        for t in [Pid, Ipc, Uts, Mount] {
            assert_eq!(ns_path(&spec, t), Some(None), "{t:?}");
        }
    }

    #[test]
    fn net_sysctls_are_the_agents_and_the_shm_size_is_read() {
        let mut spec = with_root("c1");
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_sysctl(Some(HashMap::from([
            (
                "net.ipv4.ip_unprivileged_port_start".to_string(),
                "0".to_string(),
            ),
            ("net/core/somaxconn".to_string(), "1024".to_string()),
            ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
        ])));
        spec.set_linux(Some(linux));
        let mut shm = Mount::default();
        shm.set_destination("/dev/shm".into());
        shm.set_typ(Some("bind".into()));
        shm.set_source(Some(GUEST_SHM_DIR.into()));
        shm.set_options(Some(vec!["rbind".into(), "size=65536".into(), "rw".into()]));
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        mounts.push(shm);
        spec.set_mounts(Some(mounts));

        let (spec, setup) = rewrite(spec, &id(), false, &at()).unwrap();
        assert_eq!(
            setup
                .net_sysctls
                .keys()
                .collect::<std::collections::BTreeSet<_>>(),
            ["net.ipv4.ip_unprivileged_port_start", "net/core/somaxconn"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .iter()
                .collect()
        );
        let left = spec.linux().as_ref().unwrap().sysctl().clone().unwrap();
        assert_eq!(left.len(), 1);
        assert!(left.contains_key("kernel.shm_rmid_forced"));
        assert_eq!(setup.shm_size, Some(65536));
        let m = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.source().as_deref() == Some(Path::new(GUEST_SHM_DIR)))
            .unwrap();
        assert_eq!(m.options().as_ref().unwrap(), &["rbind", "rw"]);
    }

    #[test]
    fn rootfs_propagation_takes_cris_recursive_names() {
        for (given, kept) in [
            ("rslave", "slave"),
            ("rshared", "shared"),
            ("private", "private"),
            ("runbindable", "unbindable"),
        ] {
            let mut spec = with_root("c1/rootfs");
            let mut linux = spec.linux().clone().unwrap();
            linux.set_rootfs_propagation(Some(given.into()));
            spec.set_linux(Some(linux));
            let (spec, _) = rewrite(spec, &id(), false, &at()).unwrap();
            let got = spec.linux().as_ref().unwrap().rootfs_propagation().clone();
            assert_eq!(got.as_deref(), Some(kept), "{given}");
        }
        let mut spec = with_root("c1/rootfs");
        let mut linux = spec.linux().clone().unwrap();
        linux.set_rootfs_propagation(Some("sideways".into()));
        spec.set_linux(Some(linux));
        let e = rewrite(spec, &id(), false, &at()).unwrap_err().to_string();
        assert!(
            e.contains("rootfsPropagation") && e.contains("sideways"),
            "{e}"
        );
    }
}
