//! `cocoon bench`, `exec true` and a Task API round trip, stdout throughput, idle cost.

use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::*;
use crate::bench::ctr::Ctr;
use crate::bench::report::Report;
use crate::bench::{host, report, Env};

pub(super) fn exec_true(ctr: &Ctr, id: &str) -> Result<f64> {
    let e = uid("exec");
    let t = Instant::now();
    ctr.run(&["tasks", "exec", "--exec-id", &e, id, "true"])?;
    Ok(ms(t.elapsed()))
}

/// Median of `n` direct ttrpc `State` calls to the task's shim, in ms.
pub(super) fn state_rtt(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    id: &str,
    n: usize,
) -> Result<f64> {
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
        Ok(report::Stats::of(&v).map(|s| s.median).unwrap_or(0.0))
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
pub(super) fn exec_rate(ctr: &Ctr, id: &str, cmd: &[&str], mib: u64, expect: bool) -> Result<f64> {
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
