//! `cocoon bench`, files through the share, beside the guest's tmpfs and runc.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::*;
use crate::bench::ctr::Runtime;
use crate::bench::report::Report;
use crate::bench::Env;

/// Builds the static I/O helper (`io.c`) into `dir`.
pub(super) fn io_helper(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("bench-io.c");
    std::fs::write(&src, include_str!("../io.c"))?;
    let bin = dir.join("bench-io");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("cc (Debian gcc and libc6-dev) for the static I/O helper")?;
    if !out.status.success() {
        bail!(
            "cc bench-io.c: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(bin)
}

/// The `key=value` lines of the helper's output.
pub fn parse_kv(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// A copy of `flavour` with `virtiofs.cache = mode`, in `dir`.
pub(super) fn with_cache(flavour: &Path, mode: &str, dir: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(flavour)?;
    let mut v: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}", flavour.display()))?;
    let fs = v
        .entry("virtiofs")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = fs {
        t.insert("cache".into(), toml::Value::String(mode.into()));
    }
    let out = dir.join(format!("cache-{mode}.toml"));
    std::fs::write(&out, toml::to_string(&v)?)?;
    Ok(out)
}

pub(super) const FILE_MEASURES: &[(&str, &str, &str)] = &[
    ("seq_write_mib_s", "sequential write + fsync", "MiB/s"),
    ("seq_read_mib_s", "sequential read", "MiB/s"),
    ("rand_write_iops", "random 4 KiB write + fsync", "IOPS"),
    ("rand_read_iops", "random 4 KiB read", "IOPS"),
];

pub fn files(env: &Env, report: &mut Report) {
    const S: &str = "files";
    let Ok(ctr) = env.ctr() else {
        report.note(S, "not measured: no --containerd.");
        return;
    };
    let dir = env.work.join("files");
    let helper = match io_helper(&dir) {
        Ok(h) => h,
        Err(e) => {
            report.note(S, format!("not measured: {e:#}"));
            return;
        }
    };
    let (label, flavour) = &env.flavours[0];
    // (system, where) cases: Cocoon per cache mode in the rootfs, Cocoon's
    // guest tmpfs, runc's rootfs and tmpfs.
    let mut systems: Vec<(String, Runtime)> = Vec::new();
    for mode in &env.args.cache_modes {
        match with_cache(flavour, mode, &dir) {
            Ok(p) => systems.push((
                format!("cocoon {label}, cache={mode}"),
                Runtime::cocoon(label, &p),
            )),
            Err(e) => report.note(S, format!("cache={mode}: {e:#}")),
        }
    }
    systems.push(("runc".into(), Runtime::runc()));
    let bind = format!(
        "type=bind,src={},dst=/bench,options=rbind:ro",
        helper.parent().unwrap_or(Path::new("/")).display()
    );
    let mount_tmpfs = format!(
        "type=tmpfs,src=tmpfs,dst=/scratch,options=size={}m",
        env.args.file_mib * 2 + 16
    );
    let script = format!(
        "/bench/bench-io /data.bin {m} {o} | sed 's/^/rootfs./' && /bench/bench-io /scratch/data.bin {m} {o} | sed 's/^/tmpfs./'",
        m = env.args.file_mib,
        o = env.args.file_ops
    );
    let mut samples: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    for run in 0..env.runs {
        for (i, (sys, rt)) in systems.iter().enumerate() {
            progress(&format!("files: run {}/{}, {sys}", run + 1, env.runs));
            let id = uid("files");
            match ctr.run_rm(
                rt,
                &["--mount", &bind, "--mount", &mount_tmpfs],
                &id,
                &["sh", "-c", &script],
            ) {
                Ok(out) => {
                    for (k, v) in parse_kv(&String::from_utf8_lossy(&out.stdout)) {
                        samples.entry((i, k)).or_default().push(v);
                    }
                }
                Err(e) => {
                    eprintln!("cocoon bench: {e:#}");
                    errors.push(format!("{sys}: {e:#}"));
                }
            }
        }
    }
    for (key, name, unit) in FILE_MEASURES {
        for place in ["rootfs", "tmpfs"] {
            for (i, (sys, _)) in systems.iter().enumerate() {
                // The guest's tmpfs is the same whatever the cache mode.
                if place == "tmpfs" && i > 0 && i + 1 < systems.len() {
                    continue;
                }
                let sys = if place == "tmpfs" && i + 1 < systems.len() {
                    format!("cocoon {label}")
                } else {
                    sys.clone()
                };
                if let Some(v) = samples.get(&(i, format!("{place}.{key}"))) {
                    let where_ = if place == "rootfs" {
                        "container rootfs"
                    } else {
                        "tmpfs"
                    };
                    report.add(S, &format!("{name}, {where_}"), &sys, unit, v.clone());
                }
            }
        }
    }
    for e in errors {
        report.note(S, format!("failed: {e}"));
    }
    report.note(
        S,
        format!(
            "A static helper (`bench-io`, built from src/bench/io.c) in the container: {} MiB \
             written in 1 MiB blocks then fsync, read back after its cached pages are dropped \
             (POSIX_FADV_DONTNEED); {} random 4 KiB writes then fsync, and reads. Cocoon's rootfs is \
             virtio-fs (virtiofsd with the cache mode shown); its tmpfs is the guest's memory; \
             runc's rootfs is containerd's overlayfs on the host's disk.",
            env.args.file_mib, env.args.file_ops
        ),
    );
}

// ---------------------------------------------------------------- exec, stdout, idle

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_output_parses() {
        let kv = parse_kv("rootfs.seq_write_mib_s=12.5\nrootfs.rand_read_iops=900\nnoise\nx=y\n");
        assert_eq!(kv.len(), 2);
        assert_eq!(kv["rootfs.seq_write_mib_s"], 12.5);
    }

    #[test]
    fn cache_mode_copies_keep_the_flavour() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f.toml");
        std::fs::write(&f, "[hypervisor]\nmachine = \"microvm\"\n").unwrap();
        let c = with_cache(&f, "never", dir.path()).unwrap();
        let text = std::fs::read_to_string(c).unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["virtiofs"]["cache"].as_str(), Some("never"));
        assert_eq!(v["hypervisor"]["machine"].as_str(), Some("microvm"));
    }
}
