//! A container's stdio through the whole path (process → pipe → agent →
//! vsock → shim → containerd's fifos → `ctr`), with a private containerd
//! 1.6 (`scripts/containerd.sh`, its socket in `COCOON_TEST_CONTAINERD`):
//! every byte arrives once and in order, both ways. `#[ignore]`d in a
//! plain `cargo test`; `scripts/test.sh` runs the tests, and
//! `bench_stdout_throughput` is run by name.

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod common;

use common::IMAGE;

const COCOON: &str = "io.containerd.cocoon.v2";
const RUNC: &str = "io.containerd.runc.v2";
const NS: &str = "cocoon-stdio";

/// `ctr run --rm` of `script` (a `sh -c` script) on `runtime`.
fn run(runtime: &str, id: &str, script: &str, stdin: bool) -> Command {
    common::import_image(NS);
    let mut c = common::ctr(NS);
    c.args(["run", "--rm", "--runtime", runtime]);
    c.args([IMAGE, id, "sh", "-c", script]);
    c.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const MIB: usize = 1024 * 1024;

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn stdout_arrives_whole_and_in_order() {
    // 64 MiB of random data, written to stdout and hashed in the guest;
    // the guest's count and hash go to stderr.
    let script = "{ dd if=/dev/urandom bs=65536 count=1024 2>/dev/null \
                  | tee /proc/self/fd/3 | sha256sum >&2; } 3>&1";
    let o = run(COCOON, "stdio-out", script, false)
        .output()
        .expect("run ctr");
    assert!(o.status.success(), "ctr run: {}", stderr(&o));
    let err = stderr(&o);
    let guest_hash = err.split_whitespace().next().unwrap_or_default();
    assert_eq!(o.stdout.len(), 64 * MIB, "bytes received; stderr: {err}");
    assert_eq!(
        hex(Sha256::digest(&o.stdout)),
        guest_hash,
        "sha256 of stdout"
    );
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn stdin_arrives_whole_and_in_order() {
    let data: Vec<u8> = (0..16 * MIB as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let script = "cat > /tmp/in && wc -c < /tmp/in && sha256sum < /tmp/in";
    let mut child = run(COCOON, "stdio-in", script, true)
        .spawn()
        .expect("run ctr");
    let mut stdin = child.stdin.take().unwrap();
    let feed = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
        })
    };
    let o = child.wait_with_output().expect("wait for ctr");
    feed.join().unwrap();
    assert!(o.status.success(), "ctr run: {}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let mut words = out.split_whitespace();
    assert_eq!(words.next(), Some(data.len().to_string().as_str()), "{out}");
    assert_eq!(
        words.next(),
        Some(hex(Sha256::digest(&data)).as_str()),
        "{out}"
    );
}

/// Runs `script` and reads its stdout as it comes: the bytes, and the
/// time from the first byte to the end (so that boot time is not counted).
fn stream(runtime: &str, id: &str, script: &str) -> (usize, Duration) {
    let mut child = run(runtime, id, script, false).spawn().expect("run ctr");
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; MIB];
    let (mut n, mut first) = (0, None);
    loop {
        let k = out.read(&mut buf).expect("read ctr's stdout");
        if k == 0 {
            break;
        }
        first.get_or_insert_with(Instant::now);
        n += k;
    }
    let took = first.map(|t| t.elapsed()).unwrap_or_default();
    let o = child.wait_with_output().expect("wait for ctr");
    assert!(o.status.success(), "{id}: {}", stderr(&o));
    (n, took)
}

/// The guest's own time for `generator > /dev/null`, from busybox `time`.
fn in_guest(id: &str, generator: &str) -> Duration {
    // busybox `time` is a command: a redirection of the generator's
    // stderr must not take time's own.
    let o = run(
        COCOON,
        id,
        &format!("time sh -c '{generator} > /dev/null'"),
        false,
    )
    .output()
    .expect("run ctr");
    assert!(o.status.success(), "{id}: {}", stderr(&o));
    let err = stderr(&o);
    // "real\t0m 10.38s"
    let real = err
        .lines()
        .find_map(|l| l.strip_prefix("real"))
        .unwrap_or_else(|| panic!("no time in {err:?}"));
    let (m, s) = real.trim().trim_end_matches('s').split_once('m').unwrap();
    Duration::from_secs_f64(
        m.trim().parse::<f64>().unwrap() * 60.0 + s.trim().parse::<f64>().unwrap(),
    )
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Stdout throughput in MB/s, median of `COCOON_BENCH_RUNS` (3) interleaved
/// runs of `COCOON_BENCH_MIB` (64) MiB per generator: `head -c` (stdio,
/// 4 KiB writes) and `dd bs=64k`, through Cocoon and runc (first byte to
/// end, as `ctr` delivers it), and the guest's own rate writing to
/// /dev/null.
#[test]
#[ignore = "a benchmark: run it by name"]
fn bench_stdout_throughput() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let runs = env("COCOON_BENCH_RUNS", 3);
    let mib = env("COCOON_BENCH_MIB", 64);
    let bytes = mib * MIB;
    let generators = [
        ("head", format!("head -c {bytes} /dev/zero")),
        (
            "dd",
            format!(
                "dd if=/dev/zero bs=65536 count={} 2>/dev/null",
                bytes / 65536
            ),
        ),
    ];
    let mbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    for (name, generator) in &generators {
        let (mut cocoon, mut runc, mut guest) = (vec![], vec![], vec![]);
        for i in 0..runs {
            for (rt, into) in [(COCOON, &mut cocoon), (RUNC, &mut runc)] {
                let (n, took) = stream(rt, &format!("bench-{name}-{i}"), generator);
                assert_eq!(n, bytes, "{rt}: bytes received");
                into.push(mbps(took));
            }
            guest.push(mbps(in_guest(&format!("bench-{name}-g{i}"), generator)));
        }
        let all = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "stdout {name} {mib} MiB, MB/s median of {runs}: cocoon {:.1} ({}), runc {:.1} ({}), guest to /dev/null {:.1} ({})",
            median(&mut cocoon.clone()),
            all(&cocoon),
            median(&mut runc.clone()),
            all(&runc),
            median(&mut guest.clone()),
            all(&guest),
        );
    }
}
