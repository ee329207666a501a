//! `cocoon image build`: a guest kernel and initrd from the package
//! registry alone. The kernel is Debian's cloud kernel; the initrd holds
//! `cocoon-agent` as `/init` (with the shared libraries it links), and the
//! kernel modules the guest needs with their load order.

pub mod modules;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Version of the image layout; bump it when the builder's output changes.
const LAYOUT: u32 = 1;

/// Inputs of a build; a rebuild with the same inputs is skipped.
pub struct BuildOptions {
    pub out: PathBuf,
    pub agent: PathBuf,
    pub kernel_package: String,
    pub force: bool,
}

fn step(n: u32, total: u32, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete package behind a meta package such as
/// `linux-image-cloud-amd64` (whose first dependency is the real kernel).
fn resolve_kernel_package(name: &str) -> Result<(String, String)> {
    let mut pkg = name.to_string();
    loop {
        let show = run(Command::new("apt-cache").args(["show", "--no-all-versions", &pkg]))
            .with_context(|| format!("look up package {pkg} (has apt-get update run?)"))?;
        let field = |k: &str| {
            show.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let first_dep = field("Depends:")
            .and_then(|d| d.split([',', ' ']).next().map(str::to_string))
            .filter(|d| d.starts_with("linux-image-") && *d != pkg);
        match first_dep {
            Some(dep) => pkg = dep,
            None => return Ok((pkg, field("Version:").unwrap_or_default())),
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The shared libraries `binary` links, as `ldd` reports them.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn copy_into(root: &Path, src: &Path, dest_rel: &Path) -> Result<()> {
    let dest = root.join(dest_rel);
    std::fs::create_dir_all(dest.parent().unwrap())?;
    std::fs::copy(src, &dest)
        .with_context(|| format!("copy {} to {}", src.display(), dest.display()))?;
    Ok(())
}

/// Builds the image into `opts.out` (kernel `vmlinuz`, `initrd.img`, `manifest.json`).
pub fn build(opts: &BuildOptions) -> Result<()> {
    const TOTAL: u32 = 6;
    if !opts.agent.is_file() {
        bail!(
            "guest agent binary {} not found (build it: cargo build --release -p cocoon-agent)",
            opts.agent.display()
        );
    }
    step(
        1,
        TOTAL,
        &format!("resolving kernel package {}", opts.kernel_package),
    );
    let (pkg, version) = resolve_kernel_package(&opts.kernel_package)?;
    let fingerprint = format!(
        "layout {LAYOUT} kernel {pkg} {version} agent {} modules {}",
        sha256_file(&opts.agent)?,
        modules::WANTED.join(",")
    );
    let manifest_path = opts.out.join("manifest.json");
    if !opts.force {
        if let Ok(old) = std::fs::read_to_string(&manifest_path) {
            let old: serde_json::Value = serde_json::from_str(&old).unwrap_or_default();
            if old["fingerprint"] == fingerprint.as_str()
                && opts.out.join("vmlinuz").is_file()
                && opts.out.join("initrd.img").is_file()
            {
                eprintln!(
                    "guest image in {} is up to date ({pkg} {version}); nothing to do",
                    opts.out.display()
                );
                return Ok(());
            }
        }
    }

    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    let work = opts.out.join(".build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    step(2, TOTAL, &format!("downloading {pkg} {version}"));
    run(Command::new("apt-get")
        .arg("download")
        .arg(&pkg)
        .current_dir(&work))?;
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;

    step(3, TOTAL, "extracting kernel and modules");
    let tree = work.join("kernel");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let kver = std::fs::read_dir(tree.join("lib/modules"))?
        .flatten()
        .next()
        .context("no lib/modules in the kernel package")?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let vmlinuz = tree.join(format!("boot/vmlinuz-{kver}"));
    run(Command::new("depmod").arg("-b").arg(&tree).arg(&kver))?;
    let mod_dir = tree.join("lib/modules").join(&kver);
    let dep = modules::parse_dep(&std::fs::read_to_string(mod_dir.join("modules.dep"))?);
    let (order, missing) = modules::load_order(&dep, modules::WANTED);
    if !missing.is_empty() {
        eprintln!(
            "      built into the kernel or absent: {}",
            missing.join(", ")
        );
    }

    step(
        4,
        TOTAL,
        &format!("assembling initrd: agent, {} modules", order.len()),
    );
    let root = work.join("initrd");
    for d in ["proc", "sys", "dev", "run", "tmp", "etc", "sbin"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    copy_into(&root, &opts.agent, Path::new("init"))?;
    // Debug info is for the host; the guest loads every byte of the initrd.
    run(Command::new("strip").arg(root.join("init")))?;
    for lib in shared_libraries(&opts.agent)? {
        copy_into(&root, &lib, lib.strip_prefix("/").unwrap())?;
    }
    let mut list = String::new();
    for m in &order {
        let rel = Path::new("lib/modules").join(&kver).join(m);
        copy_into(&root, &mod_dir.join(m), &rel)?;
        list.push_str(&format!("/{}\n", rel.display()));
    }
    std::fs::write(root.join("lib/modules/cocoon.load"), list)?;
    std::fs::write(root.join("etc/hostname"), "cocoon\n")?;

    step(5, TOTAL, "writing initrd.img (newc cpio)");
    let initrd = opts.out.join("initrd.img.tmp");
    let script = format!(
        "cd '{}' && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet > '{}'",
        root.display(),
        initrd.display()
    );
    run(Command::new("sh").arg("-c").arg(&script))?;
    std::fs::rename(&initrd, opts.out.join("initrd.img"))?;
    std::fs::copy(&vmlinuz, opts.out.join("vmlinuz"))?;

    step(6, TOTAL, "writing manifest.json");
    let manifest = serde_json::json!({
        "fingerprint": fingerprint,
        "kernel_package": pkg,
        "kernel_version": version,
        "kernel_release": kver,
        "modules": order,
    });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "guest image written to {} (kernel {kver})",
        opts.out.display()
    );
    Ok(())
}
