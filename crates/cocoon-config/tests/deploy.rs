//! The shipped flavours load, and `deploy/` agrees with them: every
//! containerd handler names a shipped flavour at the path `setup.sh`
//! installs it to, and every handler has exactly one RuntimeClass.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The shipped flavours: the `*.toml` files of `configs/` (its `kernel/`
/// holds the guest kernel's config, not a flavour).
fn flavours() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("configs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".toml"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "shipped flavours: {v:?}");
    v
}

/// Where `scripts/setup.sh` installs each shipped flavour.
fn installed_as(flavour: &str) -> String {
    match flavour {
        "q35.toml" => "/etc/cocoon/configuration.toml".into(),
        other => format!("/etc/cocoon/{other}"),
    }
}

#[test]
fn shipped_flavours_load() {
    for f in flavours() {
        let path = repo().join("configs").join(f);
        cocoon_config::load_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[test]
fn handlers_name_shipped_flavours_and_have_a_runtime_class() {
    let setup = std::fs::read_to_string(repo().join("scripts/setup.sh")).unwrap();
    let text = std::fs::read_to_string(repo().join("deploy/containerd-cocoon.toml")).unwrap();
    let config: toml::Table = toml::from_str(&text).unwrap();
    let runtimes = config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
        .as_table()
        .unwrap();
    let mut handlers = BTreeSet::new();
    let mut named_flavours = BTreeSet::new();
    for (name, runtime) in runtimes {
        let path = runtime["options"]["ConfigPath"].as_str().unwrap();
        let shipped = flavours()
            .into_iter()
            .find(|f| installed_as(f) == path)
            .unwrap_or_else(|| panic!("handler {name}: {path} is no shipped flavour"));
        assert!(
            setup.contains(&format!("configs/{shipped} {path}")),
            "setup.sh does not install configs/{shipped} as {path}"
        );
        assert!(named_flavours.insert(shipped), "two handlers share {path}");
        handlers.insert(name.clone());
    }
    let shipped: BTreeSet<_> = flavours().into_iter().collect();
    assert_eq!(named_flavours, shipped, "a shipped flavour has no handler");

    let classes = std::fs::read_to_string(repo().join("deploy/runtimeclasses.yaml")).unwrap();
    let named: BTreeSet<String> = classes
        .lines()
        .filter_map(|l| l.strip_prefix("handler: "))
        .map(|h| h.trim().to_string())
        .collect();
    assert_eq!(named, handlers);
    let overheads = classes.matches("podFixed:").count();
    assert_eq!(overheads, handlers.len(), "a RuntimeClass without overhead");
}
