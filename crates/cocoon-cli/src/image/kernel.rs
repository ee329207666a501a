//! The Cocoon guest kernel: Debian's packaged kernel source
//! (`linux-source-6.1`) configured by `allnoconfig` plus the reviewed
//! fragment `configs/kernel/cocoon-guest.config`, everything built in.
//! Built once per (fragment, source tarball, builder version), in a cache
//! directory keyed by their hash: both images, the bzImage (q35) and the
//! PVH `vmlinux` (microvm), and the resolved `.config`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::run;

/// The config fragment, as reviewed in the repository.
pub const FRAGMENT: &str = include_str!("../../../../configs/kernel/cocoon-guest.config");

/// Debian's packaged kernel source.
pub const DEFAULT_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Where built kernels are kept, one directory per key.
pub const DEFAULT_CACHE: &str = "/var/cache/cocoon/kernel";

/// Version of the build recipe; bump it when the steps below change what
/// they produce.
const RECIPE: u32 = 1;

/// The files of a built kernel, in its cache directory.
#[derive(Debug)]
pub struct Built {
    pub key: String,
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub config: PathBuf,
    /// `uname -r` of the kernel.
    pub release: String,
}

impl Built {
    fn in_dir(key: String, dir: &Path) -> Self {
        Self {
            key,
            bzimage: dir.join("bzImage"),
            vmlinux: dir.join("vmlinux"),
            config: dir.join("config"),
            release: std::fs::read_to_string(dir.join("release"))
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }

    fn complete(&self) -> bool {
        self.bzimage.is_file()
            && self.vmlinux.is_file()
            && self.config.is_file()
            && !self.release.is_empty()
    }
}

/// The `CONFIG_X=v` settings of a fragment or `.config` (comments and
/// `# CONFIG_X is not set` lines left out).
pub fn settings(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .collect()
}

/// The settings of `fragment` that the resolved `config` does not have
/// (Kconfig drops an option whose dependencies are off, silently).
pub fn dropped<'a>(fragment: &'a str, config: &str) -> Vec<(&'a str, &'a str)> {
    let have: std::collections::BTreeMap<&str, &str> = settings(config).into_iter().collect();
    settings(fragment)
        .into_iter()
        .filter(|(k, v)| have.get(k) != Some(v))
        .collect()
}

/// The cache key: the fragment, the source tarball (name, size, mtime: a
/// package upgrade changes them) and the recipe.
pub fn key(fragment: &str, source: &Path) -> Result<String> {
    let meta = std::fs::metadata(source).with_context(|| {
        format!(
            "kernel source {} (install Debian's linux-source-6.1)",
            source.display()
        )
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let mut h = Sha256::new();
    h.update(format!(
        "recipe {RECIPE}\nsource {} {} {mtime}\n",
        source.file_name().unwrap_or_default().to_string_lossy(),
        meta.len()
    ));
    h.update(fragment.as_bytes());
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

/// The kernel for `fragment` and `source`: from the cache, or built into it.
pub fn build(fragment: &str, source: &Path, cache: &Path, force: bool) -> Result<Built> {
    let key = key(fragment, source)?;
    let dir = cache.join(&key);
    let built = Built::in_dir(key.clone(), &dir);
    if built.complete() && !force {
        eprintln!(
            "      kernel {} from the cache ({})",
            built.release,
            dir.display()
        );
        return Ok(built);
    }
    let work = cache.join(format!("{key}.build"));
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    let obj = work.join("obj");
    std::fs::create_dir_all(&src).with_context(|| format!("create {}", src.display()))?;
    std::fs::create_dir_all(&obj)?;
    eprintln!("      extracting {}", source.display());
    run(Command::new("tar")
        .arg("-xf")
        .arg(source)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(&src))?;
    let fragment_file = work.join("cocoon-guest.config");
    std::fs::write(&fragment_file, fragment)?;
    let make = |args: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C").arg(&src).arg(format!("O={}", obj.display()));
        c.args(args);
        c
    };
    run(&mut make(&["allnoconfig"]))?;
    run(Command::new(src.join("scripts/kconfig/merge_config.sh"))
        .arg("-m")
        .arg("-O")
        .arg(&obj)
        .arg(obj.join(".config"))
        .arg(&fragment_file)
        .current_dir(&src))?;
    run(&mut make(&["olddefconfig"]))?;
    let config = std::fs::read_to_string(obj.join(".config"))?;
    let lost = dropped(fragment, &config);
    if !lost.is_empty() {
        bail!(
            "kernel config: olddefconfig dropped {} (a dependency is missing from the fragment)",
            lost.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("      make -j{jobs} bzImage vmlinux (a few minutes)");
    // A kernel build takes the machine's cores for minutes: below the VMs.
    run(Command::new("nice")
        .args(["-n", "10", "make", "-C"])
        .arg(&src)
        .arg(format!("O={}", obj.display()))
        .arg(format!("-j{jobs}"))
        .args(["bzImage", "vmlinux"]))
    .context("build the guest kernel")?;
    let release = run(&mut make(&["-s", "kernelrelease"]))?.trim().to_string();

    let _ = std::fs::remove_dir_all(&dir);
    let tmp = cache.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    std::fs::copy(obj.join("arch/x86/boot/bzImage"), tmp.join("bzImage"))?;
    // Symbols are for debugging on the host; the PVH note stays.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(obj.join("vmlinux"))
        .arg(tmp.join("vmlinux")))?;
    std::fs::write(tmp.join("config"), &config)?;
    std::fs::write(tmp.join("release"), format!("{release}\n"))?;
    std::fs::rename(&tmp, &dir).with_context(|| format!("rename to {}", dir.display()))?;
    std::fs::remove_dir_all(&work)?;
    Ok(Built::in_dir(key, &dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_builds_in_what_the_guest_needs_and_no_modules() {
        let s: std::collections::BTreeMap<_, _> = settings(FRAGMENT).into_iter().collect();
        for k in [
            "CONFIG_VIRTIO_PCI",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_VIRTIO_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_PVH",
            "CONFIG_ACPI_HOTPLUG_MEMORY",
            "CONFIG_HOTPLUG_CPU",
            "CONFIG_SECCOMP_FILTER",
            "CONFIG_MEMCG",
            // libcontainer's v2 stats need memory.swap.* and *.pressure.
            "CONFIG_SWAP",
            "CONFIG_PSI",
            "CONFIG_DMIID",
        ] {
            assert_eq!(s.get(k), Some(&"y"), "{k}");
        }
        assert!(!s.contains_key("CONFIG_MODULES"));
        assert!(!FRAGMENT.contains("=m"), "a module in the fragment");
    }

    #[test]
    fn a_setting_that_did_not_survive_is_reported() {
        let fragment = "# c\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=\"x\"\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n";
        assert_eq!(dropped(fragment, config), [("CONFIG_B", "y")]);
    }

    #[test]
    fn the_key_follows_the_fragment_and_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("linux-source-6.1.tar.xz");
        std::fs::write(&src, b"one").unwrap();
        let a = key("CONFIG_A=y\n", &src).unwrap();
        assert_eq!(a, key("CONFIG_A=y\n", &src).unwrap());
        assert_ne!(a, key("CONFIG_A=n\n", &src).unwrap());
        std::fs::write(&src, b"longer").unwrap();
        assert_ne!(a, key("CONFIG_A=y\n", &src).unwrap());
        let err = key("", &dir.path().join("none.tar.xz")).unwrap_err();
        assert!(format!("{err:#}").contains("none.tar.xz"), "{err:#}");
    }
}
