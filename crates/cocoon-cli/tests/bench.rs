//! `cocoon bench` end to end, at its smallest: the start section for one
//! flavour, one run, without containerd (the raw VM floor and
//! `cocoon run -- true` with its phases from the runtime's debug log).
//! Boots two VMs, so it is `#[ignore]`d in a plain `cargo test`; the
//! suite runs it with `--include-ignored`. Needs root, the guest image
//! (`COCOON_GUEST_DIR`, default `/var/lib/cocoon/guest`), a static busybox
//! and Debian's `cpio` and `fonts-dejavu-core`.

use std::path::PathBuf;
use std::process::Command;

const COCOON: &str = env!("CARGO_BIN_EXE_cocoon");

#[test]
#[ignore = "boots VMs: run with --include-ignored"]
fn smoke_start_section() {
    let guest = PathBuf::from(
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into()),
    );
    assert!(
        guest.join("vmlinuz").is_file(),
        "no guest image in {} (run: cocoon image build --out {0})",
        guest.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let flavour = tmp.path().join("microvm.toml");
    std::fs::write(
        &flavour,
        format!(
            "[hypervisor]\nmachine = \"microvm\"\nboot_timeout_secs = 60\n[guest]\ndir = {:?}\n[runtime]\nstate_dir = {:?}\n",
            guest,
            tmp.path().join("state")
        ),
    )
    .unwrap();
    let (json, png) = (tmp.path().join("b.json"), tmp.path().join("b.png"));
    let out = Command::new(COCOON)
        .args(["bench", "--runs", "1", "--only", "start", "--config"])
        .arg(&flavour)
        .arg("--json")
        .arg(&json)
        .arg("--png")
        .arg(&png)
        .arg("--work-dir")
        .arg(tmp.path().join("work"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cocoon bench: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("failed"), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let median = |measure: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["measure"].as_str().unwrap().starts_with(measure))
            .unwrap_or_else(|| panic!("no row `{measure}` in {v}"));
        r["stats"]["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("no figure for `{measure}`: {r}"))
    };
    let floor = median("raw VM floor");
    let run = median("`cocoon run -- true`");
    assert!(
        floor > 100.0 && run > floor,
        "floor {floor} ms, cocoon run {run} ms"
    );
    // Every milestone of the runtime's log was found: the phases add up to
    // the whole run, within the time the bench itself spends around it.
    let phases: Vec<f64> = rows
        .iter()
        .filter(|r| r["measure"].as_str().unwrap().starts_with("phase:"))
        .map(|r| r["stats"]["median"].as_f64().unwrap())
        .collect();
    assert_eq!(phases.len(), 11, "every phase: {stdout}");
    let sum: f64 = phases.iter().sum();
    assert!(
        (sum - run).abs() < 50.0,
        "phases add up to {sum} ms of {run} ms"
    );
    assert!(
        stdout.contains("| `cocoon run` ÷ raw VM floor | cocoon microvm |"),
        "{stdout}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}
