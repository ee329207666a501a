//! What the `ctr`-driven end-to-end tests share: the private containerd
//! (`scripts/containerd.sh`, its socket in `COCOON_TEST_CONTAINERD`), `ctr`
//! in a namespace of the test's own, the offline busybox image, and the
//! host's processes. Each test binary uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub const IMAGE: &str = "docker.io/library/busybox:cocoon";

pub fn socket() -> String {
    std::env::var("COCOON_TEST_CONTAINERD")
        .expect("COCOON_TEST_CONTAINERD is not set: start containerd with scripts/containerd.sh (scripts/test.sh does)")
}

/// `ctr` against the test containerd, in namespace `ns`.
pub fn ctr(ns: &str) -> Command {
    let mut c = Command::new("ctr");
    c.args(["--address", &socket(), "--namespace", ns]);
    c
}

/// Imports `build/busybox-oci.tar` (scripts/busybox-oci.sh) into `ns`, once
/// per test binary.
pub fn import_image(ns: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let tar = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/busybox-oci.tar");
        assert!(
            tar.is_file(),
            "{} missing: run scripts/busybox-oci.sh",
            tar.display()
        );
        let o = ctr(ns)
            .args(["images", "import", tar.to_str().unwrap()])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ctr");
        assert!(
            o.status.success(),
            "import into {ns}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    });
}

/// Every process: pid and command line (NULs as spaces).
pub fn processes() -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if !c.is_empty() {
                v.push((pid, String::from_utf8_lossy(&c).replace('\0', " ")));
            }
        }
    }
    v
}
