//! Which kernel modules the guest loads, and in what order.

use std::collections::{BTreeMap, BTreeSet};

/// Drivers the guest needs: virtio transports, vsock, virtio-fs, overlay,
/// network and block devices. Missing ones (built in) are skipped.
pub const WANTED: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
    "virtio_net",
    "virtio_blk",
];

/// `modules.dep`: module path → the paths it depends on.
pub fn parse_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let (m, deps) = l.split_once(':')?;
            Some((
                m.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The module name of a path: `kernel/fs/fuse/virtiofs.ko.xz` → `virtiofs`.
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).replace('-', "_")
}

/// The paths to load for `wanted`, every dependency before its dependents.
/// Returns the order and the wanted names that are not modules.
pub fn load_order(
    dep: &BTreeMap<String, Vec<String>>,
    wanted: &[&str],
) -> (Vec<String>, Vec<String>) {
    let by_name: BTreeMap<String, &String> = dep.keys().map(|p| (name_of(p), p)).collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    let mut missing = Vec::new();
    fn visit(
        p: &str,
        dep: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !done.insert(p.to_string()) {
            return;
        }
        // modules.dep lists the deepest dependency last; visiting the list
        // reversed loads it first.
        for d in dep.get(p).into_iter().flatten().rev() {
            visit(d, dep, done, order);
        }
        order.push(p.to_string());
    }
    for w in wanted {
        match by_name.get(&w.replace('-', "_")) {
            Some(p) => visit(p, dep, &mut done, &mut order),
            None => missing.push(w.to_string()),
        }
    }
    (order, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
";

    fn pos(order: &[String], name: &str) -> usize {
        order
            .iter()
            .position(|p| name_of(p) == name)
            .unwrap_or_else(|| panic!("{name} not in {order:?}"))
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let dep = parse_dep(DEP);
        let (order, missing) = load_order(
            &dep,
            &[
                "virtio_pci",
                "vmw_vsock_virtio_transport",
                "virtiofs",
                "vsock",
                "overlay",
            ],
        );
        assert_eq!(missing, ["overlay"]);
        assert_eq!(order.len(), 8);
        assert!(pos(&order, "vsock") < pos(&order, "vmw_vsock_virtio_transport_common"));
        assert!(
            pos(&order, "vmw_vsock_virtio_transport_common")
                < pos(&order, "vmw_vsock_virtio_transport")
        );
        assert!(pos(&order, "fuse") < pos(&order, "virtiofs"));
        assert!(pos(&order, "virtio_pci_legacy_dev") < pos(&order, "virtio_pci"));
        assert!(pos(&order, "virtio_pci_modern_dev") < pos(&order, "virtio_pci"));
    }

    #[test]
    fn names_ignore_compression_and_dashes() {
        assert_eq!(name_of("kernel/fs/fuse/virtiofs.ko.xz"), "virtiofs");
        assert_eq!(name_of("kernel/x/virtio-mmio.ko"), "virtio_mmio");
    }
}
