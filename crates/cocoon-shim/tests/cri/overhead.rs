//! What a pod costs the host beside its containers, per handler: the
//! memory (PSS) and CPU of the pod's shim and everything it started (for
//! Cocoon: QEMU with the guest's memory, virtiofsd, the vsock backend; for
//! runc: the pause and container processes), with one idle container.
//! The figures behind the RuntimeClass `overhead` of `deploy/`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::SLEEPER;
use crate::harness::*;

/// The pod's shim (started with the sandbox's id) and its descendants.
fn pod_processes(pod: &str) -> Vec<(u32, String)> {
    let all = processes();
    let shim_id = format!("-id {pod} ");
    let Some(shim) = all
        .iter()
        .find(|(_, c)| c.contains("containerd-shim") && c.contains(&shim_id))
        .map(|(p, _)| *p)
    else {
        return Vec::new();
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // After the command name in parentheses: state, then ppid.
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(1)?.parse().ok()
    };
    let in_pod = |mut pid: u32| loop {
        if pid == shim {
            return true;
        }
        match parent(pid) {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    };
    all.into_iter().filter(|(p, _)| in_pod(*p)).collect()
}

fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return 0;
    };
    let fields: Vec<&str> = stat[end + 2..].split(' ').collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    field(14).unwrap_or(0) + field(15).unwrap_or(0)
}

/// A short name for a process of the pod.
fn kind(cmdline: &str) -> &'static str {
    let exe = cmdline.split(' ').next().unwrap_or("");
    for k in [
        "containerd-shim",
        "qemu",
        "virtiofsd",
        "vhost-device-vsock",
        "pause",
        "sleep",
    ] {
        if exe.contains(k) {
            return k;
        }
    }
    "other"
}

struct Sample {
    pss_mib: f64,
    by_kind: BTreeMap<&'static str, f64>,
    millicores: f64,
}

fn measure(cri: &Cri, handler: &str, settle: Duration, window: Duration) -> Sample {
    let pod = cri
        .run_pod(handler, pod_config("overhead", Namespaces::default()))
        .expect("RunPodSandbox");
    pod.start(container_config("idle", SLEEPER))
        .expect("container");
    std::thread::sleep(settle);
    let procs = pod_processes(&pod.id);
    assert!(!procs.is_empty(), "no processes found for pod {}", pod.id);
    let ticks = |procs: &[(u32, String)]| procs.iter().map(|(p, _)| cpu_ticks(*p)).sum::<u64>();
    let (t0, before) = (Instant::now(), ticks(&procs));
    std::thread::sleep(window);
    // A process that exits in the window takes its ticks with it.
    let spent = ticks(&procs).saturating_sub(before);
    let elapsed = t0.elapsed().as_secs_f64();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut by_kind = BTreeMap::new();
    let mut total = 0.0;
    for (pid, c) in &procs {
        let mib = pss_kib(*pid) as f64 / 1024.0;
        *by_kind.entry(kind(c)).or_insert(0.0) += mib;
        total += mib;
    }
    pod.remove();
    Sample {
        pss_mib: total,
        by_kind,
        millicores: spent as f64 / hz / elapsed * 1000.0,
    }
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Per handler, interleaved: PSS and idle CPU of a pod with one sleeping
/// container, median (min–max) of `COCOON_BENCH_RUNS` (3) runs, after
/// `COCOON_BENCH_SETTLE` (10) seconds, CPU over `COCOON_BENCH_WINDOW` (30)
/// seconds.
#[test]
#[ignore = "a benchmark: run it by name"]
fn bench_pod_overhead() {
    let cri = cri_alone_or_skip!("bench_pod_overhead");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = env("COCOON_BENCH_RUNS", 3) as usize;
    let settle = Duration::from_secs(env("COCOON_BENCH_SETTLE", 10));
    let window = Duration::from_secs(env("COCOON_BENCH_WINDOW", 30));
    let handlers = [COCOON, COCOON_MICROVM, RUNC];
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for _ in 0..runs {
        for h in handlers {
            samples
                .entry(h)
                .or_default()
                .push(measure(&cri, h, settle, window));
        }
    }
    println!("| handler | PSS MiB, median (min–max) | idle CPU millicores | PSS by process (median MiB) |");
    println!("|---|---|---|---|");
    for h in handlers {
        let s = &samples[h];
        let pss: Vec<f64> = s.iter().map(|x| x.pss_mib).collect();
        let cpu: Vec<f64> = s.iter().map(|x| x.millicores).collect();
        let mut kinds: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for x in s {
            for (k, v) in &x.by_kind {
                kinds.entry(k).or_default().push(*v);
            }
        }
        let parts: Vec<String> = kinds
            .into_iter()
            .map(|(k, v)| format!("{k} {:.1}", median_f(v)))
            .collect();
        let (lo, hi) = (
            pss.iter().cloned().fold(f64::MAX, f64::min),
            pss.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "| {h} | {:.1} ({lo:.1}–{hi:.1}) | {:.1} ({:.1}–{:.1}) | {} |",
            median_f(pss),
            median_f(cpu.clone()),
            cpu.iter().cloned().fold(f64::MAX, f64::min),
            cpu.iter().cloned().fold(0.0, f64::max),
            parts.join(", ")
        );
    }
}
