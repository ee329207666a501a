//! `cocoon image build`: the guest kernels and initrds from Debian packages
//! alone. The image directory holds
//! - the Cocoon kernel, built from Debian's kernel source with everything
//!   the guest needs built in ([`kernel`]): `vmlinuz` (bzImage, for q35) and
//!   `vmlinux` (PVH entry, for microvm), and `initrd.img`: `cocoon-agent` as
//!   `/init` with the shared libraries it links, and no modules;
//! - unless left out, Debian's cloud kernel in `debian/`: its `vmlinuz` and
//!   an `initrd.img` that also carries the modules the guest needs, with
//!   their load order (`lib/modules/cocoon.load`, read by the agent).

pub mod kernel;
pub mod modules;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Version of the image layout; bump it when the builder's output changes.
const LAYOUT: u32 = 2;

/// Inputs of a build; a rebuild with the same inputs is skipped.
pub struct BuildOptions {
    pub out: PathBuf,
    pub agent: PathBuf,
    /// Debian kernel package for `debian/`; `None` leaves it out.
    pub debian_kernel: Option<String>,
    /// Kernel source tarball and config fragment of the Cocoon kernel.
    pub kernel_source: PathBuf,
    pub kernel_config: Option<PathBuf>,
    /// Where built Cocoon kernels are cached.
    pub kernel_cache: PathBuf,
    pub force: bool,
}

fn step(n: u32, total: u32, what: &str) {
    eprintln!("[{n}/{total}] {what}");
}

fn run(cmd: &mut Command) -> Result<String> {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // A killed build takes its tar or make with it (a Ctrl-C
            // reaches the whole process group anyway); what they left is
            // swept by the next build.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

/// Replaces `dest` with a copy of `src` in one rename: a VM starting
/// meanwhile boots the old file or the new one, never half of one.
fn replace_with_copy(src: &Path, dest: &Path) -> Result<()> {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dest.with_file_name(name);
    std::fs::copy(src, &tmp)
        .with_context(|| format!("copy {} to {}", src.display(), tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("rename to {}", dest.display()))?;
    Ok(())
}

/// Writes `root` (a directory tree) as a newc cpio to `dest`, replaced
/// atomically.
fn write_cpio(root: &Path, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("img.tmp");
    let script = format!(
        "cd '{}' && find . -mindepth 1 -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet > '{}'",
        root.display(),
        tmp.display()
    );
    run(Command::new("sh").arg("-c").arg(&script))?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// The initrd tree every image has: the agent as `/init`, its libraries,
/// and an empty module list.
fn initrd_tree(root: &Path, agent: &Path) -> Result<()> {
    for d in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "sbin",
        "lib/modules",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    copy_into(root, agent, Path::new("init"))?;
    // Debug info is for the host; the guest loads every byte of the initrd.
    run(Command::new("strip").arg(root.join("init")))?;
    let libraries = shared_libraries(agent)?;
    if !libraries.is_empty() {
        eprintln!(
            "      note: {} is dynamically linked: its {} shared libraries go into the initrd too (scripts/build-agent.sh builds it static and smaller)",
            agent.display(),
            libraries.len()
        );
    }
    for lib in libraries {
        copy_into(root, &lib, lib.strip_prefix("/").unwrap())?;
    }
    std::fs::write(root.join("lib/modules/cocoon.load"), "")?;
    std::fs::write(root.join("etc/hostname"), "cocoon\n")?;
    Ok(())
}

/// What the Debian kernel part of the image was built from.
struct DebianBuilt {
    package: String,
    version: String,
    release: String,
    modules: Vec<String>,
}

/// Debian's kernel `pkg` and an initrd with its modules, into `dest`.
fn build_debian(
    pkg: &str,
    version: &str,
    agent: &Path,
    work: &Path,
    dest: &Path,
) -> Result<DebianBuilt> {
    std::fs::create_dir_all(work)?;
    run(Command::new("apt-get")
        .arg("download")
        .arg(pkg)
        .current_dir(work))?;
    let deb = std::fs::read_dir(work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
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
    let root = work.join("initrd");
    initrd_tree(&root, agent)?;
    let mut list = String::new();
    for m in &order {
        let rel = Path::new("lib/modules").join(&kver).join(m);
        copy_into(&root, &mod_dir.join(m), &rel)?;
        list.push_str(&format!("/{}\n", rel.display()));
    }
    std::fs::write(root.join("lib/modules/cocoon.load"), list)?;
    std::fs::create_dir_all(dest).with_context(|| format!("create {}", dest.display()))?;
    write_cpio(&root, &dest.join("initrd.img"))?;
    replace_with_copy(&vmlinuz, &dest.join("vmlinuz"))?;
    Ok(DebianBuilt {
        package: pkg.to_string(),
        version: version.to_string(),
        release: kver,
        modules: order,
    })
}

/// Builds the image into `opts.out` (see the module documentation) and
/// its `manifest.json`; a no-op when the inputs are those of the image
/// already there.
pub fn build(opts: &BuildOptions) -> Result<()> {
    const TOTAL: u32 = 5;
    if !opts.agent.is_file() {
        bail!(
            "guest agent binary {} not found (build it: scripts/build-agent.sh)",
            opts.agent.display()
        );
    }
    step(1, TOTAL, "resolving inputs");
    let fragment = match &opts.kernel_config {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("read kernel config fragment {}", p.display()))?,
        None => kernel::FRAGMENT.to_string(),
    };
    let kernel_key = kernel::key(&fragment, &opts.kernel_source)?;
    let debian = match &opts.debian_kernel {
        Some(name) => Some(resolve_kernel_package(name)?),
        None => None,
    };
    let fingerprint = format!(
        "layout {LAYOUT} kernel {kernel_key} agent {} debian {}",
        sha256_file(&opts.agent)?,
        match &debian {
            Some((pkg, version)) =>
                format!("{pkg} {version} modules {}", modules::WANTED.join(",")),
            None => "none".into(),
        }
    );
    let manifest_path = opts.out.join("manifest.json");
    let mut wanted_files = vec!["vmlinuz", "vmlinux", "initrd.img"];
    if debian.is_some() {
        wanted_files.extend(["debian/vmlinuz", "debian/initrd.img"]);
    }
    if !opts.force {
        if let Ok(old) = std::fs::read_to_string(&manifest_path) {
            let old: serde_json::Value = serde_json::from_str(&old).unwrap_or_default();
            if old["fingerprint"] == fingerprint.as_str()
                && wanted_files.iter().all(|f| opts.out.join(f).is_file())
            {
                eprintln!(
                    "guest image in {} is up to date (kernel {}); nothing to do",
                    opts.out.display(),
                    old["kernel_release"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
        }
    }

    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    // The files are replaced one by one: until the new manifest is
    // written, the image is nobody's (an interrupted build is redone).
    match std::fs::remove_file(&manifest_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", manifest_path.display()));
        }
        _ => {}
    }
    let work = opts.out.join(".build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let fragment_name = opts
        .kernel_config
        .as_deref()
        .map_or("configs/kernel/cocoon-guest.config".into(), |p| {
            p.display().to_string()
        });
    step(
        2,
        TOTAL,
        &format!(
            "Cocoon kernel {kernel_key} ({} + {fragment_name})",
            opts.kernel_source.display(),
        ),
    );
    let built = kernel::build(
        &fragment,
        &fragment_name,
        &opts.kernel_source,
        &opts.kernel_cache,
        opts.force,
    )?;

    step(3, TOTAL, "assembling initrd.img: the agent, no modules");
    let root = work.join("initrd");
    initrd_tree(&root, &opts.agent)?;
    write_cpio(&root, &opts.out.join("initrd.img"))?;
    replace_with_copy(&built.bzimage, &opts.out.join("vmlinuz"))?;
    replace_with_copy(&built.vmlinux, &opts.out.join("vmlinux"))?;

    let debian_built = match &debian {
        Some((pkg, version)) => {
            step(
                4,
                TOTAL,
                &format!("Debian kernel {pkg} {version} and its modules into debian/"),
            );
            Some(build_debian(
                pkg,
                version,
                &opts.agent,
                &work.join("debian"),
                &opts.out.join("debian"),
            )?)
        }
        None => {
            step(4, TOTAL, "Debian kernel left out");
            let _ = std::fs::remove_dir_all(opts.out.join("debian"));
            None
        }
    };

    step(5, TOTAL, "writing manifest.json");
    let manifest = serde_json::json!({
        "fingerprint": fingerprint,
        "kernel_release": built.release,
        "kernel_key": built.key,
        "kernel_source": opts.kernel_source,
        "debian": debian_built.as_ref().map(|d| serde_json::json!({
            "kernel_package": d.package,
            "kernel_version": d.version,
            "kernel_release": d.release,
            "modules": d.modules,
        })),
    });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "guest image written to {} (kernel {}{})",
        opts.out.display(),
        built.release,
        debian_built
            .as_ref()
            .map_or(String::new(), |d| format!("; debian/: {}", d.release))
    );
    Ok(())
}
