//! The sections of `cocoon bench`. Each runs its systems in turn within
//! each run, and records what failed as a note instead of stopping.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::ctr::{Ctr, Runtime};
use super::report::{ratios, Report};
use super::{floor, host, phases, Env};

const SLEEP: &[&str] = &["sleep", "3600"];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Samples of one figure and the errors met taking them.
#[derive(Default)]
struct Series {
    samples: Vec<f64>,
    errors: Vec<String>,
}

impl Series {
    fn push(&mut self, r: Result<f64>) {
        match r {
            Ok(v) => self.samples.push(v),
            Err(e) => {
                eprintln!("cocoon bench: {e:#}");
                self.errors.push(format!("{e:#}"));
            }
        }
    }

    fn add_to(self, report: &mut Report, section: &str, measure: &str, system: &str, unit: &str) {
        if self.errors.is_empty() {
            report.add(section, measure, system, unit, self.samples);
        } else {
            // The first error's first line, short enough for a table cell
            // (the whole of each went to stderr).
            let first = self.errors[0].lines().next().unwrap_or_default();
            let mut e: String = first.chars().take(120).collect();
            if e.len() < first.len() {
                e.push('…');
            }
            let note = format!("{} failed: {e}", self.errors.len());
            report.add_noted(section, measure, system, unit, self.samples, &note);
        }
    }
}

/// A name unique within this bench run.
fn uid(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "bench-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn progress(msg: &str) {
    eprintln!("cocoon bench: {msg}");
}

/// The runtimes compared through containerd: Cocoon on the first flavour,
/// and runc.
fn pod_runtimes(env: &Env) -> Vec<Runtime> {
    let (label, path) = &env.flavours[0];
    vec![Runtime::cocoon(label, path), Runtime::runc()]
}

// ---------------------------------------------------------------- start

/// One `cocoon run -- true`: its wall time and phases from its debug log.
fn cocoon_run(env: &Env, flavour: &Path) -> Result<(f64, Vec<(&'static str, f64)>)> {
    let log = env.work.join("cocoon-run.log");
    let err = std::fs::File::create(&log)?;
    let t0 = SystemTime::now();
    let i0 = Instant::now();
    let status = Command::new(&env.cocoon)
        .args(["--log", "debug", "run", "--config"])
        .arg(flavour)
        .arg("--rootfs")
        .arg(&env.rootfs)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .status()
        .context("cocoon run")?;
    let took = i0.elapsed();
    let t1 = SystemTime::now();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        bail!("cocoon run -- true: {status}: {}", tail.join(" / "));
    }
    Ok((ms(took), phases::phases(&text, epoch(t0), epoch(t1))))
}

fn ctr_run_true(ctr: &Ctr, rt: &Runtime) -> Result<f64> {
    let id = uid("start");
    let t = Instant::now();
    ctr.run_rm(rt, &[], &id, &["true"])?;
    Ok(ms(t.elapsed()))
}

pub fn start(env: &Env, report: &mut Report) {
    const S: &str = "start";
    let floor_dir = env.work.join("floor");
    let initrd = std::fs::create_dir_all(&floor_dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| floor::build_initrd(&floor_dir, &env.busybox));
    let configs: Vec<Option<cocoon_config::Config>> = env
        .flavours
        .iter()
        .map(|(_, p)| cocoon_config::load(Some(p)).ok().map(|l| l.config))
        .collect();
    let n = env.flavours.len();
    let mut floor_t: Vec<Series> = (0..n).map(|_| Series::default()).collect();
    let mut run_t: Vec<Series> = (0..n).map(|_| Series::default()).collect();
    let mut phase_t: Vec<BTreeMap<&'static str, Vec<f64>>> = vec![BTreeMap::new(); n];
    let runtimes: Vec<Runtime> = env
        .flavours
        .iter()
        .map(|(l, p)| Runtime::cocoon(l, p))
        .chain([Runtime::runc()])
        .collect();
    let mut ctr_t: Vec<Series> = runtimes.iter().map(|_| Series::default()).collect();
    for run in 0..env.runs {
        progress(&format!("start: run {}/{}", run + 1, env.runs));
        for (i, (_, path)) in env.flavours.iter().enumerate() {
            floor_t[i].push(match (&initrd, &configs[i]) {
                (Ok(initrd), Some(c)) => floor::boot(c, initrd, &floor_dir).map(ms),
                (Err(e), _) => Err(anyhow::anyhow!("floor initrd: {e:#}")),
                (_, None) => Err(anyhow::anyhow!("flavour {} does not load", path.display())),
            });
            match cocoon_run(env, path) {
                Ok((t, p)) => {
                    run_t[i].samples.push(t);
                    for (name, v) in p {
                        phase_t[i].entry(name).or_default().push(v);
                    }
                }
                Err(e) => run_t[i].push(Err(e)),
            }
        }
        if let Ok(ctr) = env.ctr() {
            for (rt, s) in runtimes.iter().zip(ctr_t.iter_mut()) {
                s.push(ctr_run_true(ctr, rt));
            }
        }
    }
    for (i, (label, _)) in env.flavours.iter().enumerate() {
        let sys = format!("cocoon {label}");
        let ratio = ratios(&run_t[i].samples, &floor_t[i].samples);
        std::mem::take(&mut floor_t[i]).add_to(
            report,
            S,
            "raw VM floor (kernel + trivial /init)",
            &format!("QEMU {label}"),
            "ms",
        );
        std::mem::take(&mut run_t[i]).add_to(report, S, "`cocoon run -- true`", &sys, "ms");
        report.add(S, "`cocoon run` ÷ raw VM floor", &sys, "×", ratio);
        // Phases in the order they happen.
        for (_, phase) in phases::MILESTONES.iter().chain([&("", phases::EXIT_PHASE)]) {
            if let Some(v) = phase_t[i].get(phase) {
                report.add(S, &format!("phase: {phase}"), &sys, "ms", v.clone());
            }
        }
    }
    if env.ctr.is_some() {
        let runc = ctr_t.last().map(|s| s.samples.clone()).unwrap_or_default();
        let mut vs_runc = Vec::new();
        for (rt, s) in runtimes.iter().zip(ctr_t) {
            if rt.label != "runc" {
                vs_runc.push((rt.label.clone(), ratios(&s.samples, &runc)));
            }
            s.add_to(report, S, "`ctr run --rm … true`", &rt.label, "ms");
        }
        for (label, r) in vs_runc {
            report.add(S, "`ctr run` ÷ runc's", &label, "×", r);
        }
    } else {
        report.note(S, "`ctr run` not measured: no --containerd.");
    }
    report.note(
        S,
        "The raw VM floor boots the flavour's kernel with QEMU's command line as the runtime builds \
         it, less the vhost-user devices (virtio-fs, vsock), which need their daemons; its initrd \
         is busybox and an /init script that prints a line and reboots. The phases come from the \
         runtime's debug log (`phase=` events); `first output` ends at the first byte of stdout or \
         its end, `exit seen` when the runtime learns the exit status.",
    );
}

// ---------------------------------------------------------------- pods, memory

/// Starts `count` containers at once; the time until every `ctr run -d`
/// has returned (every task started).
fn start_many(ctr: &Ctr, rt: &Runtime, ids: &[String]) -> Result<f64> {
    let t = Instant::now();
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            ctr.run_command(rt, &["-d"], id, SLEEP)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect();
    let mut failed = Vec::new();
    for (c, id) in children.into_iter().zip(ids) {
        match c.and_then(|c| c.wait_with_output()) {
            Ok(o) if o.status.success() => {}
            Ok(o) => failed.push(format!(
                "{id}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => failed.push(format!("{id}: {e}")),
        }
    }
    let took = t.elapsed();
    if !failed.is_empty() {
        bail!(
            "{} of {} pods failed: {}",
            failed.len(),
            ids.len(),
            failed[0]
        );
    }
    Ok(ms(took))
}

fn remove_all(ctr: &Ctr, ids: &[String]) {
    std::thread::scope(|s| {
        for id in ids {
            s.spawn(move || ctr.remove(id));
        }
    });
}

/// Per pod, mean over the pods: PSS of each kind of process, and QEMU's
/// touched memory (anon + shmem).
fn pod_memory(ctr: &Ctr, ids: &[String]) -> Result<BTreeMap<String, f64>> {
    let all = host::processes();
    let address = ctr.address.to_string_lossy();
    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
    for id in ids {
        let shim =
            host::shim_of(&all, &address, id).with_context(|| format!("no shim for {id}"))?;
        for pid in host::tree(&all, shim) {
            let kind = host::kind(&all[&pid].1);
            let pss = host::pss_mib(pid);
            *sum.entry(format!("PSS: {kind}")).or_default() += pss;
            *sum.entry("PSS: total".into()).or_default() += pss;
            if kind == "QEMU" {
                let (anon, shmem) = host::rss_anon_shmem_mib(pid);
                *sum.entry("guest memory touched (QEMU RssShmem)".into())
                    .or_default() += shmem;
                *sum.entry("QEMU's own memory (RssAnon)".into()).or_default() += anon;
            }
        }
    }
    Ok(sum
        .into_iter()
        .map(|(k, v)| (k, v / ids.len() as f64))
        .collect())
}

pub fn pods(env: &Env, report: &mut Report, times: bool, memory: bool) {
    let Ok(ctr) = env.ctr() else {
        report.note("pods", "not measured: no --containerd.");
        return;
    };
    let runtimes = pod_runtimes(env);
    // (runtime, pods) → series; (runtime, pods, measure) → samples.
    let mut t: BTreeMap<(usize, usize), Series> = BTreeMap::new();
    let mut mem: BTreeMap<(usize, usize, String), Vec<f64>> = BTreeMap::new();
    let mut mem_err: Vec<String> = Vec::new();
    for run in 0..env.runs {
        for &n in &env.args.pods {
            for (r, rt) in runtimes.iter().enumerate() {
                progress(&format!(
                    "pods: run {}/{}, {n} × {}",
                    run + 1,
                    env.runs,
                    rt.label
                ));
                let ids: Vec<String> = (0..n).map(|_| uid("pod")).collect();
                let started = start_many(ctr, rt, &ids);
                let ok = started.is_ok();
                t.entry((r, n)).or_default().push(started);
                if ok && memory {
                    std::thread::sleep(Duration::from_secs(env.args.settle_secs));
                    match pod_memory(ctr, &ids) {
                        Ok(m) => {
                            for (k, v) in m {
                                mem.entry((r, n, k)).or_default().push(v);
                            }
                        }
                        Err(e) => mem_err.push(format!("{}: {e:#}", rt.label)),
                    }
                }
                remove_all(ctr, &ids);
            }
        }
    }
    if times {
        for ((r, n), s) in t {
            s.add_to(
                report,
                "pods",
                &format!("{n} pod(s) started at once (`ctr run -d`), until all run"),
                &runtimes[r].label,
                "ms",
            );
        }
    }
    if memory {
        // Per runtime and pod count: the processes, their total, then the guest.
        let rank = |k: &str| {
            [
                "PSS: shim",
                "PSS: QEMU",
                "PSS: virtiofsd",
                "PSS: vsock backend",
                "PSS: container",
                "PSS: total",
            ]
            .iter()
            .position(|x| *x == k)
            .unwrap_or(usize::MAX)
        };
        let mut mem: Vec<_> = mem.into_iter().collect();
        mem.sort_by_key(|((r, n, k), _)| (*r, *n, rank(k)));
        for ((r, n, k), v) in mem {
            report.add(
                "memory",
                &format!("{k}, per pod, {n} pod(s)"),
                &runtimes[r].label,
                "MiB",
                v,
            );
        }
        for e in mem_err {
            report.note("memory", format!("failed: {e}"));
        }
        report.note(
            "memory",
            format!(
                "Per pod: the mean over the pods running at once of the PSS (smaps_rollup) of the \
                 pod's shim and its descendants, {} s after all started; runc's `container` is \
                 `sleep` itself. The guest memory touched is QEMU's resident shared memory (the \
                 memfd of guest RAM); QEMU's own is its resident anonymous memory (heap, \
                 TCG's translation cache).",
                env.args.settle_secs
            ),
        );
    }
}

// ---------------------------------------------------------------- files

/// Builds the static I/O helper (`io.c`) into `dir`.
fn io_helper(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("bench-io.c");
    std::fs::write(&src, include_str!("io.c"))?;
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
fn with_cache(flavour: &Path, mode: &str, dir: &Path) -> Result<PathBuf> {
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

const FILE_MEASURES: &[(&str, &str, &str)] = &[
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

/// Runs `f` with one idle container per runtime, removed afterwards.
fn with_containers<T>(
    ctr: &Ctr,
    runtimes: &[Runtime],
    f: impl FnOnce(&[(Runtime, String)]) -> T,
) -> Result<T> {
    let mut up = Vec::new();
    for rt in runtimes {
        let id = uid("idle");
        if let Err(e) = ctr.start(rt, &[], &id, SLEEP) {
            remove_all(
                ctr,
                &up.iter()
                    .map(|(_, i): &(Runtime, String)| i.clone())
                    .collect::<Vec<_>>(),
            );
            return Err(e);
        }
        up.push((rt.clone(), id));
    }
    let r = f(&up);
    let ids: Vec<String> = up.into_iter().map(|(_, i)| i).collect();
    remove_all(ctr, &ids);
    Ok(r)
}

fn exec_true(ctr: &Ctr, id: &str) -> Result<f64> {
    let e = uid("exec");
    let t = Instant::now();
    ctr.run(&["tasks", "exec", "--exec-id", &e, id, "true"])?;
    Ok(ms(t.elapsed()))
}

/// Median of `n` direct ttrpc `State` calls to the task's shim, in ms.
fn state_rtt(rt: &tokio::runtime::Runtime, socket: &Path, id: &str, n: usize) -> Result<f64> {
    use containerd_shim_protos::{api::StateRequest, shim_async::TaskClient};
    rt.block_on(async {
        let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .with_context(|| format!("connect {}", socket.display()))?;
        let task = TaskClient::new(client);
        let req = StateRequest {
            id: id.into(),
            ..Default::default()
        };
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            task.state(ttrpc::context::with_timeout(5_000_000_000), &req)
                .await
                .with_context(|| format!("State of {id} on {}", socket.display()))?;
            v.push(ms(t.elapsed()));
        }
        Ok(super::report::Stats::of(&v)
            .map(|s| s.median)
            .unwrap_or(0.0))
    })
}

pub fn exec(env: &Env, report: &mut Report) {
    const S: &str = "exec";
    let Ok(ctr) = env.ctr() else {
        report.note(S, "not measured: no --containerd.");
        return;
    };
    let runtimes = pod_runtimes(env);
    let tokio_rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            report.note(S, format!("not measured: {e}"));
            return;
        }
    };
    let r = with_containers(ctr, &runtimes, |up| {
        let mut ex: Vec<Series> = up.iter().map(|_| Series::default()).collect();
        let mut st: Vec<Series> = up.iter().map(|_| Series::default()).collect();
        for run in 0..env.runs {
            progress(&format!("exec: run {}/{}", run + 1, env.runs));
            for (i, (_, id)) in up.iter().enumerate() {
                ex[i].push(exec_true(ctr, id));
                let socket = env
                    .ctr_state
                    .as_ref()
                    .context("no containerd state directory")
                    .and_then(|s| Ctr::shim_address(s, id));
                st[i].push(socket.and_then(|s| state_rtt(&tokio_rt, &s, id, 20)));
            }
        }
        for (i, (rt, _)) in up.iter().enumerate() {
            std::mem::take(&mut ex[i]).add_to(report, S, "`ctr task exec … true`", &rt.label, "ms");
            std::mem::take(&mut st[i]).add_to(
                report,
                S,
                "Task API `State` round trip (ttrpc to the shim, median of 20)",
                &rt.label,
                "ms",
            );
        }
    });
    if let Err(e) = r {
        report.note(S, format!("not measured: {e:#}"));
    }
}

/// Runs `cmd` in container `id` with `ctr task exec`; the MiB/s of
/// `mib` MiB over the exec's wall time, checking the bytes that reached
/// stdout if `expect` is set.
fn exec_rate(ctr: &Ctr, id: &str, cmd: &[&str], mib: u64, expect: bool) -> Result<f64> {
    let e = uid("out");
    let t = Instant::now();
    let mut child = ctr
        .command()
        .args(["tasks", "exec", "--exec-id", &e, id])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("ctr tasks exec")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n: u64 = 0;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let o = child.wait_with_output()?;
    let took = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "exec in {id}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    if expect && n != mib << 20 {
        bail!("exec in {id}: {n} bytes reached stdout, not {}", mib << 20);
    }
    Ok(mib as f64 / took)
}

pub fn stdout(env: &Env, report: &mut Report) {
    const S: &str = "stdout";
    let Ok(ctr) = env.ctr() else {
        report.note(S, "not measured: no --containerd.");
        return;
    };
    let mib = env.args.stdout_mib;
    let count = format!("count={mib}");
    let to_host = ["dd", "if=/dev/zero", "bs=1M", count.as_str()];
    let in_guest_cmd = format!("dd if=/dev/zero bs=1M count={mib} of=/dev/null 2>/dev/null");
    let in_guest = ["sh", "-c", in_guest_cmd.as_str()];
    let runtimes = pod_runtimes(env);
    let r = with_containers(ctr, &runtimes, |up| {
        let mut host: Vec<Series> = up.iter().map(|_| Series::default()).collect();
        let mut null: Vec<Series> = up.iter().map(|_| Series::default()).collect();
        for run in 0..env.runs {
            progress(&format!("stdout: run {}/{}", run + 1, env.runs));
            for (i, (_, id)) in up.iter().enumerate() {
                host[i].push(exec_rate(ctr, id, &to_host, mib, true));
                null[i].push(exec_rate(ctr, id, &in_guest, mib, false));
            }
        }
        for (i, (rt, _)) in up.iter().enumerate() {
            std::mem::take(&mut host[i]).add_to(
                report,
                S,
                &format!("{mib} MiB to stdout, read on the host"),
                &rt.label,
                "MiB/s",
            );
            std::mem::take(&mut null[i]).add_to(
                report,
                S,
                &format!("{mib} MiB to /dev/null in the container"),
                &rt.label,
                "MiB/s",
            );
        }
    });
    if let Err(e) = r {
        report.note(S, format!("not measured: {e:#}"));
    }
    report.note(
        S,
        "`dd if=/dev/zero bs=1M` run by `ctr task exec` in an idle container, its stdout read \
         by the bench through ctr; the rate is over the exec's whole wall time (exec start \
         included). The /dev/null line is the same command writing inside the container.",
    );
}

pub fn idle(env: &Env, report: &mut Report) {
    const S: &str = "idle";
    let Ok(ctr) = env.ctr() else {
        report.note(S, "not measured: no --containerd.");
        return;
    };
    let runtimes = pod_runtimes(env);
    let address = ctr.address.to_string_lossy().into_owned();
    let mut cpu: Vec<Series> = runtimes.iter().map(|_| Series::default()).collect();
    for run in 0..env.runs {
        progress(&format!("idle: run {}/{}", run + 1, env.runs));
        // Both pods idle over the same window.
        let r = with_containers(ctr, &runtimes, |up| {
            std::thread::sleep(Duration::from_secs(env.args.settle_secs));
            let all = host::processes();
            let trees: Vec<Option<Vec<u32>>> = up
                .iter()
                .map(|(_, id)| host::shim_of(&all, &address, id).map(|s| host::tree(&all, s)))
                .collect();
            let secs = |t: &Option<Vec<u32>>| -> Option<f64> {
                Some(t.as_ref()?.iter().map(|p| host::cpu_secs(*p)).sum())
            };
            let before: Vec<Option<f64>> = trees.iter().map(secs).collect();
            let t = Instant::now();
            std::thread::sleep(Duration::from_secs(env.args.idle_secs));
            let after: Vec<Option<f64>> = trees.iter().map(secs).collect();
            let window = t.elapsed().as_secs_f64();
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                cpu[i].push(match (b, a) {
                    (Some(b), Some(a)) => Ok((a - b).max(0.0) / window * 60.0),
                    _ => Err(anyhow::anyhow!("no shim found for {}", up[i].1)),
                });
            }
        });
        if let Err(e) = r {
            for s in cpu.iter_mut() {
                s.push(Err(anyhow::anyhow!("{e:#}")));
            }
        }
    }
    for (rt, s) in runtimes.iter().zip(cpu) {
        s.add_to(
            report,
            S,
            "host CPU time of an idle pod (shim and descendants)",
            &rt.label,
            "s/min",
        );
    }
    report.note(
        S,
        format!(
            "utime+stime of the pod's shim and its descendants over {} s, {} s after start, as CPU \
             seconds per minute; one container running `sleep`.",
            env.args.idle_secs, env.args.settle_secs
        ),
    );
}

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
