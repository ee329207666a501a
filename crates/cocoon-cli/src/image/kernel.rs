//! The Cocoon guest kernel: Debian's packaged kernel source
//! (`linux-source-6.1`) configured by `allnoconfig` plus the reviewed
//! fragment `configs/kernel/cocoon-guest.config`, everything built in.
//! Built once per (fragment, source tarball, builder version), in a cache
//! directory keyed by their hash: both images, the bzImage (q35) and the
//! PVH `vmlinux` (microvm), and the resolved `.config`.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
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

/// The cache key: the fragment's settings, the source tarball (name, size,
/// mtime: a package upgrade changes them) and the recipe.
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
    // What Kconfig reads: settings and `is not set` lines, not comments
    // (a reworded comment must not cost a kernel build).
    for line in fragment.lines().map(str::trim).filter(|l| {
        l.starts_with("CONFIG_") || (l.starts_with("# CONFIG_") && l.ends_with(" is not set"))
    }) {
        h.update(line.as_bytes());
        h.update(b"\n");
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

/// What the build runs, and the Debian package that has it: checked before
/// the source is unpacked, so that a missing tool is named at once rather
/// than by `make` minutes later.
const TOOLS: &[(&str, &str)] = &[
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("bc", "bc"),
    ("bison", "bison"),
    ("flex", "flex"),
    ("perl", "perl"),
    ("lz4", "lz4"),
    ("objcopy", "binutils"),
];

/// Headers the build compiles against (objtool, the certificate tools).
const HEADERS: &[(&str, &str)] = &[
    ("/usr/include/gelf.h", "libelf-dev"),
    ("/usr/include/openssl/opensslv.h", "libssl-dev"),
];

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The Debian packages of the tools and headers this host lacks.
fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, pkg)| *pkg)
        .chain(
            HEADERS
                .iter()
                .filter(|(h, _)| !Path::new(h).exists())
                .map(|(_, pkg)| *pkg),
        )
        .collect();
    missing.dedup();
    missing
}

/// Holds the cache's lock: one build at a time per cache directory.
fn lock(cache: &Path) -> Result<Flock<File>> {
    let path = cache.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(held) => Ok(held),
        Err((file, Errno::EWOULDBLOCK)) => {
            eprintln!(
                "      waiting for another kernel build ({} is locked)",
                path.display()
            );
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| e)
                .with_context(|| format!("lock {}", path.display()))
        }
        Err((_, e)) => Err(e).with_context(|| format!("lock {}", path.display())),
    }
}

/// The kernel for `fragment` (`fragment_name` says where it came from)
/// and `source`: from the cache, or built into it. One build at a time per
/// cache (a lock), each in a scratch directory of its own that is removed
/// on every path; the result appears in the cache by one rename, so a
/// directory named by a key is always a whole kernel.
pub fn build(
    fragment: &str,
    fragment_name: &str,
    source: &Path,
    cache: &Path,
    force: bool,
) -> Result<Built> {
    let key = key(fragment, source)?;
    let dir = cache.join(&key);
    let cached = |built: &Built| {
        eprintln!(
            "      kernel {} from the cache ({})",
            built.release,
            dir.display()
        );
    };
    let built = Built::in_dir(key.clone(), &dir);
    if built.complete() && !force {
        cached(&built);
        return Ok(built);
    }
    let missing = missing_packages();
    if !missing.is_empty() {
        bail!(
            "building the guest kernel needs the Debian packages {} (scripts/setup.sh installs them)",
            missing.join(" ")
        );
    }
    std::fs::create_dir_all(cache).with_context(|| format!("create {}", cache.display()))?;
    let _lock = lock(cache)?;
    // Another build may have made it while this one waited.
    let built = Built::in_dir(key.clone(), &dir);
    if built.complete() && !force {
        cached(&built);
        return Ok(built);
    }
    sweep(cache);
    let work = tempfile::Builder::new()
        .prefix(&format!("{SCRATCH}{key}-"))
        .tempdir_in(cache)
        .with_context(|| format!("create a build directory in {}", cache.display()))?;
    let src = work.path().join("src");
    let obj = work.path().join("obj");
    let out = work.path().join("out");
    for d in [&src, &obj, &out] {
        std::fs::create_dir(d).with_context(|| format!("create {}", d.display()))?;
    }
    eprintln!("      extracting {}", source.display());
    run(Command::new("tar")
        .arg("-xf")
        .arg(source)
        .arg("--strip-components=1")
        .arg("-C")
        .arg(&src))?;
    let fragment_file = work.path().join("cocoon-guest.config");
    std::fs::write(&fragment_file, fragment)
        .with_context(|| format!("write {}", fragment_file.display()))?;
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
    let resolved = obj.join(".config");
    let config = std::fs::read_to_string(&resolved)
        .with_context(|| format!("read {}", resolved.display()))?;
    let lost = dropped(fragment, &config);
    if !lost.is_empty() {
        bail!(
            "kernel config {fragment_name}: olddefconfig dropped {} (a dependency is missing from the fragment)",
            lost.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("      make -j{jobs} bzImage vmlinux (minutes; its output follows)");
    // A kernel build takes the machine's cores for minutes: below the VMs.
    // Its progress goes to our stderr; its own stderr is kept for an error.
    let progress = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicate stderr")?;
    run(Command::new("nice")
        .args(["-n", "10", "make", "-C"])
        .arg(&src)
        .arg(format!("O={}", obj.display()))
        .arg(format!("-j{jobs}"))
        .args(["bzImage", "vmlinux"])
        .stdout(Stdio::from(progress)))
    .context("build the guest kernel")?;
    let release = run(&mut make(&["-s", "kernelrelease"]))?.trim().to_string();

    let bzimage = obj.join("arch/x86/boot/bzImage");
    std::fs::copy(&bzimage, out.join("bzImage"))
        .with_context(|| format!("copy {}", bzimage.display()))?;
    // Symbols are for debugging on the host; the PVH note stays.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(obj.join("vmlinux"))
        .arg(out.join("vmlinux")))?;
    for (name, text) in [("config", config), ("release", format!("{release}\n"))] {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    std::fs::rename(&out, &dir).with_context(|| format!("rename to {}", dir.display()))?;
    Ok(Built::in_dir(key, &dir))
}

/// Prefix of the scratch directories of builds in a cache.
const SCRATCH: &str = ".build-";

/// Removes what builds that died left in `cache` (called with its lock
/// held, so no build is running). Best effort: a leftover is only space.
fn sweep(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        // `.build`/`.tmp` suffixes: what the first recipe left.
        if name.starts_with(SCRATCH) || name.ends_with(".build") || name.ends_with(".tmp") {
            eprintln!("      removing a dead build's {}", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
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
    fn a_cache_is_built_in_by_one_build_at_a_time() {
        let cache = tempfile::tempdir().unwrap();
        let held = lock(cache.path()).unwrap();
        let other = File::open(cache.path().join(".lock")).unwrap();
        let Err((_, e)) = Flock::lock(other, FlockArg::LockExclusiveNonblock) else {
            panic!("a second build took the cache's lock");
        };
        assert_eq!(e, Errno::EWOULDBLOCK);
        drop(held);
        let again = File::open(cache.path().join(".lock")).unwrap();
        assert!(Flock::lock(again, FlockArg::LockExclusiveNonblock).is_ok());
    }

    #[test]
    fn what_dead_builds_left_is_swept_and_kernels_are_kept() {
        let cache = tempfile::tempdir().unwrap();
        for d in [".build-0123-x/src", "0123.build/obj", "0123.tmp", "0123"] {
            std::fs::create_dir_all(cache.path().join(d)).unwrap();
        }
        std::fs::write(cache.path().join(".lock"), "").unwrap();
        sweep(cache.path());
        let mut left: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".lock", "0123"]);
    }

    #[test]
    fn the_key_follows_the_fragment_and_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("linux-source-6.1.tar.xz");
        std::fs::write(&src, b"one").unwrap();
        let a = key("CONFIG_A=y\n", &src).unwrap();
        assert_eq!(a, key("CONFIG_A=y\n", &src).unwrap());
        assert_ne!(a, key("CONFIG_A=n\n", &src).unwrap());
        assert_ne!(a, key("CONFIG_A=y\n# CONFIG_B is not set\n", &src).unwrap());
        assert_eq!(a, key("# a comment\nCONFIG_A=y\n\n", &src).unwrap());
        std::fs::write(&src, b"longer").unwrap();
        assert_ne!(a, key("CONFIG_A=y\n", &src).unwrap());
        let err = key("", &dir.path().join("none.tar.xz")).unwrap_err();
        assert!(format!("{err:#}").contains("none.tar.xz"), "{err:#}");
    }
}
