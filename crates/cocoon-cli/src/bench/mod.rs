//! `cocoon bench`: repeatable figures for one host, Cocoon beside runc and
//! beside a bare VM, printed as a markdown table and written as JSON and a
//! PNG chart. Every figure is the median (min–max) of `--runs` runs, and
//! the systems compared are measured in turn within each run (round
//! robin), so a busy moment of the host falls on all of them alike.
//!
//! The harness drives Cocoon as users do: `cocoon run`, and `ctr` against
//! a containerd that has Cocoon's shim and runc (`scripts/bench.sh` starts
//! a private one with `scripts/containerd.sh`). The phases of a start come
//! from the runtime's own debug log ([`phases`]), not from timing here.

mod chart;
mod ctr;
mod floor;
mod host;
mod phases;
mod report;
mod sections;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use report::Report;

/// Every section, in the order they run.
pub const SECTIONS: &[&str] = &["start", "pods", "memory", "files", "exec", "stdout", "idle"];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Runs per figure (each figure: median, min and max of them).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sections to run, comma-separated (start, pods, memory, files, exec,
    /// stdout, idle); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Flavour files to measure (the first is the one the pod, memory,
    /// file, exec, stdout and idle sections use).
    #[arg(long = "config", default_values = ["configs/q35.toml", "configs/microvm.toml"])]
    configs: Vec<PathBuf>,
    /// A directory set up by `scripts/containerd.sh start DIR` (containerd
    /// with Cocoon's shim and runc): its socket, state and images are used.
    /// Without it, only `cocoon run` and the VM floor are measured.
    #[arg(long, value_name = "DIR")]
    containerd: Option<PathBuf>,
    /// The busybox OCI tarball (`scripts/busybox-oci.sh` writes it),
    /// imported into the bench's own containerd namespace.
    #[arg(long, default_value = "build/busybox-oci.tar")]
    image: PathBuf,
    /// A static busybox, for the `cocoon run` root filesystem and the VM
    /// floor's initrd.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Pods started at once (the `pods` and `memory` sections).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 8])]
    pods: Vec<usize>,
    /// MiB written to stdout in the `stdout` section.
    #[arg(long, default_value_t = 256)]
    stdout_mib: u64,
    /// File size in MiB for sequential I/O, and the count of random 4 KiB
    /// operations, in the `files` section.
    #[arg(long, default_value_t = 64)]
    file_mib: u64,
    #[arg(long, default_value_t = 2000)]
    file_ops: u64,
    /// virtiofsd cache modes tried in the `files` section (each a copy of
    /// the first flavour with `virtiofs.cache` set).
    #[arg(long, value_delimiter = ',', default_values = ["auto", "always", "never"])]
    cache_modes: Vec<String>,
    /// Seconds a pod idles before it is measured, and the window its CPU
    /// time is counted over (`idle`; `memory` waits the first too).
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// The markdown table also goes here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Writes the figures (every sample) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draws the figures as a PNG chart.
    #[arg(long)]
    png: Option<PathBuf>,
    /// TrueType font for the chart (Debian `fonts-dejavu-core`).
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// Scratch directory (kept with its logs if given; else a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// What every section needs.
pub struct Env {
    pub runs: usize,
    /// (label, path) of each flavour.
    pub flavours: Vec<(String, PathBuf)>,
    pub ctr: Option<ctr::Ctr>,
    /// containerd's state directory (the shims' sockets).
    pub ctr_state: Option<PathBuf>,
    pub busybox: PathBuf,
    pub rootfs: PathBuf,
    pub work: PathBuf,
    pub cocoon: PathBuf,
    pub args: BenchArgs,
}

impl Env {
    pub fn ctr(&self) -> Result<&ctr::Ctr> {
        self.ctr
            .as_ref()
            .context("no containerd (--containerd DIR from scripts/containerd.sh)")
    }
}

/// A `cocoon run` root filesystem of busybox.
fn make_rootfs(dir: &Path, busybox: &Path) -> Result<()> {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let bb = dir.join("bin/busybox");
    if !bb.exists() {
        std::fs::copy(busybox, &bb).with_context(|| format!("copy {}", busybox.display()))?;
    }
    for a in ["sh", "true", "echo", "sleep", "dd", "cat"] {
        let l = dir.join("bin").join(a);
        if l.symlink_metadata().is_err() {
            std::os::unix::fs::symlink("busybox", &l)?;
        }
    }
    Ok(())
}

pub fn main(args: BenchArgs) -> i32 {
    match bench(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cocoon bench: {e:#}");
            1
        }
    }
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let only: Vec<String> = if args.only.is_empty() {
        SECTIONS.iter().map(|s| s.to_string()).collect()
    } else {
        args.only.clone()
    };
    for s in &only {
        if !SECTIONS.contains(&s.as_str()) {
            bail!(
                "--only: unknown section `{s}` (one of {})",
                SECTIONS.join(", ")
            );
        }
    }
    if nix::unistd::geteuid().as_raw() != 0 {
        bail!("needs root (VMs mount and share host directories)");
    }
    let mut flavours = Vec::new();
    for c in &args.configs {
        let path = std::fs::canonicalize(c).with_context(|| format!("flavour {}", c.display()))?;
        let label = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "flavour".into());
        flavours.push((label, path));
    }
    if flavours.is_empty() {
        bail!("no flavour (--config)");
    }
    let first = cocoon_config::load(Some(&flavours[0].1))?.config;
    let temp;
    let work = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            std::fs::canonicalize(d)?
        }
        None => {
            temp = tempdir()?;
            temp.0.clone()
        }
    };
    let rootfs = work.join("rootfs");
    make_rootfs(&rootfs, &args.busybox)?;
    let (ctr, ctr_state) = match &args.containerd {
        Some(dir) => {
            let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
            let c = ctr::Ctr {
                address: dir.join("containerd.sock"),
            };
            c.import(&args.image)
                .with_context(|| format!("import {}", args.image.display()))?;
            (Some(c), Some(dir.join("state")))
        }
        None => (None, None),
    };
    let accel = format!(
        "{:?}",
        cocoon_hypervisor::HostCaps::probe().resolve_accel(first.hypervisor.accel)
    )
    .to_lowercase();
    let header = host::header(&first.hypervisor.path, &accel, args.runs, only.clone());
    let mut report = Report::new(header);
    let env = Env {
        runs: args.runs,
        flavours,
        ctr,
        ctr_state,
        busybox: args.busybox.clone(),
        rootfs,
        work: work.clone(),
        cocoon: std::env::current_exe().context("this binary's path")?,
        args,
    };
    let want = |s: &str| only.iter().any(|o| o == s);
    if want("start") {
        sections::start(&env, &mut report);
    }
    if want("pods") || want("memory") {
        sections::pods(&env, &mut report, want("pods"), want("memory"));
    }
    if want("files") {
        sections::files(&env, &mut report);
    }
    if want("exec") {
        sections::exec(&env, &mut report);
    }
    if want("stdout") {
        sections::stdout(&env, &mut report);
    }
    if want("idle") {
        sections::idle(&env, &mut report);
    }
    let md = report.markdown();
    print!("{md}");
    if let Some(p) = &env.args.markdown {
        std::fs::write(p, &md).with_context(|| format!("{}", p.display()))?;
    }
    if let Some(p) = &env.args.json {
        std::fs::write(p, report.json()).with_context(|| format!("{}", p.display()))?;
    }
    if let Some(p) = &env.args.png {
        chart::draw(&report, p, &env.args.font)
            .with_context(|| format!("chart {}", p.display()))?;
    }
    Ok(())
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!("cocoon-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
