//! `cocoon bench`, start: `cocoon run`, `ctr run`, the raw VM floor, and the phases of a start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};

use super::*;
use crate::bench::ctr::{Ctr, Runtime};
use crate::bench::report::{ratios, Report};
use crate::bench::{floor, phases, Env};

/// One `cocoon run -- true`: its wall time and phases from its debug log.
pub(super) fn cocoon_run(env: &Env, flavour: &Path) -> Result<(f64, Vec<(&'static str, f64)>)> {
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

pub(super) fn ctr_run_true(ctr: &Ctr, rt: &Runtime) -> Result<f64> {
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
