//! `cocoon bench`, pods started at once, and their memory.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::*;
use crate::bench::ctr::{Ctr, Runtime};
use crate::bench::report::Report;
use crate::bench::{host, Env};

/// Starts `count` containers at once; the time until every `ctr run -d`
/// has returned (every task started).
pub(super) fn start_many(ctr: &Ctr, rt: &Runtime, ids: &[String]) -> Result<f64> {
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

pub(super) fn remove_all(ctr: &Ctr, ids: &[String]) {
    std::thread::scope(|s| {
        for id in ids {
            s.spawn(move || ctr.remove(id));
        }
    });
}

/// Per pod, mean over the pods: PSS of each kind of process, and QEMU's
/// touched memory (anon + shmem).
pub(super) fn pod_memory(ctr: &Ctr, ids: &[String]) -> Result<BTreeMap<String, f64>> {
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
