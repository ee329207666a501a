//! Making a bundle's OCI spec fit the guest: a pure function of the spec
//! and the place the rootfs was shared at, tested without a VM.

use oci_spec::runtime::Spec;

/// Rewrites `spec` for the guest: the root is the shared rootfs at
/// `rootfs_rel` (relative to the guest's share mount); host paths of
/// namespaces, host devices and the host cgroup placement do not exist
/// there (the agent places the container in the guest's cgroups). The
/// network namespace goes: every container of the pod shares the guest's
/// own, where the pod's NICs are (the VM is the pod's network namespace).
pub fn adapt(spec: &mut Spec, rootfs_rel: &str) {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs_rel.into());
    spec.set_root(Some(root));
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(ns) = linux.namespaces().clone() {
            let ns = ns
                .into_iter()
                .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network)
                .map(|mut n| {
                    n.set_path(None);
                    n
                })
                .collect();
            linux.set_namespaces(Some(ns));
        }
        linux.set_cgroups_path(None);
        linux.set_devices(None);
        spec.set_linux(Some(linux));
    }
    // Bind mounts of host paths (volumes, pod files) are not shared into
    // the guest yet: a host path means nothing there.
    if let Some(mounts) = spec.mounts().clone() {
        let kept = mounts
            .into_iter()
            .filter(|m| {
                let bind = m.typ().as_deref() == Some("bind")
                    || m.options()
                        .as_ref()
                        .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
                if bind {
                    tracing::warn!(
                        "host bind mount {:?} is not supported yet; skipped",
                        m.destination()
                    );
                }
                !bind
            })
            .collect();
        spec.set_mounts(Some(kept));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder};

    #[test]
    fn host_paths_do_not_reach_the_guest() {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_namespaces(Some(vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path("/var/run/netns/cni-1")
                .build()
                .unwrap(),
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Ipc)
                .path("/proc/42/ns/ipc")
                .build()
                .unwrap(),
        ]));
        linux.set_cgroups_path(Some("/kubepods/pod1/c1".into()));
        spec.set_linux(Some(linux));
        let mut mounts = spec.mounts().clone().unwrap();
        let proc_count = mounts.len();
        mounts.push(
            MountBuilder::default()
                .destination("/data")
                .source("/srv/data")
                .typ("bind")
                .options(vec!["rbind".into(), "rw".into()])
                .build()
                .unwrap(),
        );
        mounts.push(
            MountBuilder::default()
                .destination("/etc/hosts")
                .source("/var/lib/pod/hosts")
                .typ("none")
                .options(vec!["bind".into()])
                .build()
                .unwrap(),
        );
        spec.set_mounts(Some(mounts));
        adapt(&mut spec, "c1/rootfs");

        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            std::path::Path::new("c1/rootfs")
        );
        let linux = spec.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        assert!(linux.devices().is_none());
        let ns = linux.namespaces().as_ref().unwrap();
        assert_eq!(ns.len(), 1, "the network namespace is the guest's own");
        assert_eq!(ns[0].typ(), LinuxNamespaceType::Ipc);
        assert!(ns[0].path().is_none(), "kept, fresh in the guest");
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), proc_count, "both host binds are dropped");
        assert!(mounts.iter().all(|m| !m
            .source()
            .as_ref()
            .is_some_and(|s| s.starts_with("/srv") || s.starts_with("/var"))));
    }
}
