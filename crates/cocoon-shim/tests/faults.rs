//! Faults and churn, end to end. Each test runs a private containerd of its
//! own (`scripts/containerd.sh start` in a temporary directory, its pods'
//! state in a private state directory), so that it can restart containerd,
//! kill what it likes and count what is left without disturbing the other
//! tests or being disturbed by them; the tests of this file run one at a
//! time. They run where the end-to-end suite runs (`COCOON_TEST_CONTAINERD`
//! set, as by `scripts/test.sh`); elsewhere they say why they skip, and
//! under `COCOON_TEST_REQUIRE` a missing requirement fails them.

mod common;

use common::processes;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/library/busybox:cocoon";
const RUNTIME: &str = "io.containerd.cocoon.v2";
const NS: &str = "cocoon-faults";
/// The CNI bridge and subnet of the private containerds: not the suite's,
/// whose bridge `containerd.sh stop` would otherwise delete.
const BRIDGE: &str = "cni-cocoonflt";
const SUBNET: &str = "10.89.68.0/24";

/// One test of this file at a time: each counts what the host holds.
static ALONE: Mutex<()> = Mutex::new(());

/// Straight to the process's stderr: the harness captures the output of a
/// passing test, and a skip or a figure must be seen.
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Whether `pid` runs (a zombie has ended).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

fn parent_of(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A count from the environment, or `default`.
fn tunable(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A private containerd in a temporary directory, stopped (every task
/// removed) and removed on drop.
struct Ctrd {
    dir: PathBuf,
    socket: String,
    /// The pods' state directory (the flavours' `runtime.state_dir`).
    state: PathBuf,
    started: Instant,
    test: &'static str,
    // Last: released once everything else of the test is.
    _alone: MutexGuard<'static, ()>,
}

impl Ctrd {
    /// Starts one for `test`, or says why the test is skipped.
    fn start_or_skip(test: &'static str) -> Option<Self> {
        let alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
        match Self::start(test, alone) {
            Ok(c) => Some(c),
            Err(why) => {
                if std::env::var_os("COCOON_TEST_REQUIRE").is_some() {
                    panic!("{test}: {why}");
                }
                say!("SKIPPED {test}: {why}");
                None
            }
        }
    }

    fn start(test: &'static str, alone: MutexGuard<'static, ()>) -> Result<Self, String> {
        if std::env::var_os("COCOON_TEST_CONTAINERD").is_none() {
            return Err(
                "COCOON_TEST_CONTAINERD is not set: the end-to-end tests run under \
                        scripts/test.sh (these start a private containerd of their own)"
                    .into(),
            );
        }
        if !nix::unistd::Uid::effective().is_root() {
            return Err("needs root (containerd, mounts, VMs)".into());
        }
        for bin in ["containerd", "ctr"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {bin}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(format!("{bin} is not on PATH (Debian package containerd)"));
            }
        }
        let shim = repo().join("target/release/containerd-shim-cocoon-v2");
        if !shim.is_file() {
            return Err(format!("{} missing: cargo build --release", shim.display()));
        }
        let guest =
            std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into());
        if !Path::new(&guest).join("initrd.img").is_file() {
            return Err(format!(
                "no guest image in {guest}: run `cocoon image build`"
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("cocoon-faults.")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?
            .keep();
        let state = dir.join("run");
        let started = Instant::now();
        let o = Self::script(&dir, &state, "start");
        let mut c = Self {
            socket: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            dir,
            state,
            started,
            test,
            _alone: alone,
        };
        if !o.status.success() || c.socket.is_empty() {
            c.socket = c.dir.join("containerd.sock").display().to_string();
            return Err(format!("scripts/containerd.sh start: {}", text(&o)));
        }
        let tar = c.dir.join("images/busybox.tar");
        let o = c.ctr(&["images", "import", tar.to_str().unwrap()]);
        if !o.status.success() {
            return Err(format!("import {}: {}", tar.display(), text(&o)));
        }
        Ok(c)
    }

    fn script(dir: &Path, state: &Path, verb: &str) -> Output {
        Command::new("bash")
            .arg(repo().join("scripts/containerd.sh"))
            .args([verb, dir.to_str().unwrap()])
            .env("COCOON_STATE_DIR", state)
            .env("COCOON_CNI_BRIDGE", BRIDGE)
            .env("COCOON_CNI_SUBNET", SUBNET)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/containerd.sh")
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .args(["--address", &self.socket, "--namespace", NS])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr` in the background, its output discarded.
    fn spawn_ctr(&self, args: &[&str]) -> Child {
        Command::new("ctr")
            .args(["--address", &self.socket, "--namespace", NS])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr")
    }

    /// `ctr run -d`: a detached task `id` running `cmd`.
    fn run_d(&self, id: &str, extra: &[&str], cmd: &[&str]) {
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        let o = self.ctr(&args);
        assert!(o.status.success(), "ctr run -d {id}: {}", text(&o));
    }

    /// Each task's status (`ctr task ls`).
    fn tasks(&self) -> Vec<(String, String, String)> {
        let o = self.ctr(&["task", "ls"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.into(), w.next()?.into(), w.next()?.into()))
            })
            .collect()
    }

    fn status(&self, id: &str) -> String {
        self.tasks()
            .into_iter()
            .find(|t| t.0 == id)
            .map(|t| t.2)
            .unwrap_or_default()
    }

    fn wait_status(&self, id: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status(id);
            if s == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} did not reach {want} within {limit:?} (is {s:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, id];
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// Kills task `id` (if any), deletes it and its container.
    fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.status(id).is_empty() && Instant::now() < deadline {
            if self.ctr(&["task", "rm", id]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let o = self.ctr(&["container", "rm", id]);
        assert!(o.status.success(), "ctr container rm {id}: {}", text(&o));
    }

    fn pid(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("containerd.pid"))
            .expect("containerd.pid")
            .trim()
            .parse()
            .expect("containerd.pid")
    }

    /// SIGTERM to containerd; waits until it has exited.
    fn stop_daemon(&self) {
        let pid = self.pid();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "containerd {pid} ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd again, on the same root, state and sockets.
    fn restart(&self) {
        let o = Self::script(&self.dir, &self.state, "restart");
        assert!(o.status.success(), "containerd.sh restart: {}", text(&o));
    }

    fn events(&self) -> Events {
        Events::follow(&self.socket)
    }

    /// The serving shim of pod `id`.
    fn shim_of(&self, id: &str) -> Option<u32> {
        let needle = format!("-id {id} ");
        processes()
            .into_iter()
            .find(|(_, c)| {
                c.contains("containerd-shim-cocoon-v2")
                    && c.contains(&needle)
                    && c.contains(&self.socket)
            })
            .map(|(p, _)| p)
    }

    /// The QEMU of pod `id`.
    fn vm_of(&self, id: &str) -> Option<u32> {
        let needle = format!("-name cocoon-{id} ");
        processes()
            .into_iter()
            .find(|(_, c)| c.contains("qemu-system") && c.contains(&needle))
            .map(|(p, _)| p)
    }

    /// The helper daemons of pod `id` whose command line contains `what`.
    fn daemons_of(&self, id: &str, what: &str) -> Vec<u32> {
        let dir = format!("{}/{id}/", self.state.display());
        processes()
            .into_iter()
            .filter(|(_, c)| c.contains(what) && c.contains(&dir) && !c.contains("qemu-system"))
            .map(|(p, _)| p)
            .collect()
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.dir
            .join("state/io.containerd.runtime.v2.task")
            .join(NS)
            .join(id)
    }

    /// The socket the shim serving task `id` listens on.
    fn shim_socket(&self, id: &str) -> PathBuf {
        let a = std::fs::read_to_string(self.bundle(id).join("address"))
            .unwrap_or_else(|e| panic!("address of task {id}: {e}"));
        PathBuf::from(a.trim().trim_start_matches("unix://"))
    }

    /// What pod `id` left on the host, waiting up to 10 s for it to go:
    /// a shim, VMM or daemon, a mount, its state directory, its bundle,
    /// the shim's socket, its host cgroup.
    fn leftovers(&self, id: &str, shim_socket: Option<&Path>) -> Vec<String> {
        let state = format!("{}/{id}", self.state.display());
        let bundle = self.bundle(id).display().to_string();
        let vm_name = format!("cocoon-{id} ");
        let shim_id = format!("-id {id} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut left = Vec::new();
            for (pid, c) in processes() {
                if c.contains(&format!("{state}/"))
                    || c.contains(&vm_name)
                    || (c.contains("containerd-shim") && c.contains(&shim_id))
                {
                    left.push(format!("process {pid}: {c}"));
                }
            }
            left.extend(
                std::fs::read_to_string("/proc/self/mountinfo")
                    .unwrap()
                    .lines()
                    .filter(|l| {
                        l.contains(&format!("{state} "))
                            || l.contains(&format!("{state}/"))
                            || l.contains(&bundle)
                    })
                    .map(|l| format!("mount: {l}")),
            );
            for p in [
                Some(Path::new(&state)),
                Some(Path::new(&bundle)),
                shim_socket,
            ]
            .into_iter()
            .flatten()
            {
                if p.symlink_metadata().is_ok() {
                    left.push(format!("{}", p.display()));
                }
            }
            // The pod's host cgroup (`ctr` names it /<namespace>/<id>), in
            // every hierarchy.
            for h in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let cg = h.path().join(NS).join(id);
                if cg.is_dir() {
                    left.push(format!("cgroup {}", cg.display()));
                }
            }
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn assert_no_leftovers(&self, id: &str, shim_socket: Option<&Path>) {
        let left = self.leftovers(id, shim_socket);
        assert!(left.is_empty(), "pod {id} left: {left:#?}");
    }

    /// A flavour like the default one that forces `vsock` transport
    /// `transport`.
    fn flavour_with_vsock(&self, transport: &str) -> PathBuf {
        let base = std::fs::read_to_string(self.dir.join("flavours/q35.toml")).unwrap();
        let path = self.dir.join(format!("flavours/q35-{transport}.toml"));
        std::fs::write(
            &path,
            format!("{base}\n[vsock]\ntransport = \"{transport}\"\n"),
        )
        .unwrap();
        path
    }
}

impl Drop for Ctrd {
    fn drop(&mut self) {
        let o = Self::script(&self.dir, &self.state, "stop");
        // Anything of this containerd still running (the script kills the
        // shims it finds) is killed here, and fails the test.
        let dir = format!("{}/", self.dir.display());
        let stray: Vec<(u32, String)> = processes()
            .into_iter()
            .filter(|(_, c)| c.contains(&dir))
            .collect();
        for (p, _) in &stray {
            sigkill(*p);
        }
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(&format!("{}/", self.dir.display())));
        // Never a recursive removal across a mount point. A failed test's
        // directory is kept for its containerd.log (the shims log there).
        if std::thread::panicking() {
            say!(
                "{}: kept {} (containerd.log)",
                self.test,
                self.dir.display()
            );
        } else if !mounted {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        let msg = format!(
            "{}: {:.1} s with its containerd",
            self.test,
            self.started.elapsed().as_secs_f64()
        );
        say!("{msg}");
        if std::thread::panicking() {
            return;
        }
        assert!(o.status.success(), "containerd.sh stop: {}", text(&o));
        assert!(
            stray.is_empty(),
            "processes outlived containerd: {stray:#?}"
        );
        assert!(!mounted, "mounts left under {}", self.dir.display());
    }
}

/// `ctr events`, read in the background.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// One event: its topic and its JSON body.
#[derive(Debug)]
struct Event {
    topic: String,
    body: serde_json::Value,
}

impl Events {
    fn follow(socket: &str) -> Self {
        let mut child = Command::new("ctr")
            .args(["--address", socket, "--namespace", NS, "events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                sink.lock().unwrap().push(l);
            }
        });
        // `ctr events` subscribes a moment after it starts.
        std::thread::sleep(Duration::from_millis(500));
        Self { child, lines }
    }

    fn parsed(&self) -> Vec<Event> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let (head, json) = l.split_at(l.find('{')?);
                let topic = head.split_whitespace().last()?.to_string();
                let body = serde_json::from_str(json).ok()?;
                Some(Event { topic, body })
            })
            .collect()
    }

    /// Waits up to `limit` for an event on `topic` whose body has every
    /// field of `fields` (strings or numbers, compared as text).
    fn wait_for(&self, topic: &str, fields: &[(&str, &str)], limit: Duration) -> Event {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.parsed().into_iter().find(|e| {
                e.topic == topic
                    && fields.iter().all(|(k, v)| match &e.body[*k] {
                        serde_json::Value::String(s) => s == v,
                        other => {
                            other == &serde_json::Value::from(v.parse::<u64>().unwrap_or(u64::MAX))
                        }
                    })
            });
            if let Some(e) = found {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {topic} event with {fields:?} within {limit:?}; seen:\n{}",
                self.lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for a child to exit; its exit code (`None` if it
/// did not exit in time, then it is killed).
fn wait_child(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restarting containerd under two running pods: their shims and VMs run
/// on, the new containerd sees both tasks running, execs in them, kills
/// and deletes them, and hears their events. A container of the first pod
/// that exits while containerd is down is found stopped, with its status.
#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn containerd_restart_keeps_the_pods() {
    let Some(c) = Ctrd::start_or_skip("containerd_restart_keeps_the_pods") else {
        return;
    };
    let pods = ["flt-restart-a", "flt-restart-b"];
    for id in pods {
        c.run_d(id, &[], &["sleep", "1000"]);
    }
    for id in pods {
        c.wait_status(id, "RUNNING", Duration::from_secs(60));
    }
    // A second container in the first pod's VM, which exits once told to.
    let app = "flt-restart-a-app";
    let sandbox = format!("io.kubernetes.cri.sandbox-id={}", pods[0]);
    c.run_d(
        app,
        &[
            "--annotation",
            &sandbox,
            "--annotation",
            "io.kubernetes.cri.container-type=container",
        ],
        &["sh", "-c", "until [ -e /stop ]; do sleep 0.1; done; exit 7"],
    );
    c.wait_status(app, "RUNNING", Duration::from_secs(30));
    let before: Vec<(u32, u32)> = pods
        .iter()
        .map(|id| {
            (
                c.shim_of(id).expect("a shim per pod"),
                c.vm_of(id).expect("a VM per pod"),
            )
        })
        .collect();
    let sockets: Vec<PathBuf> = pods.iter().map(|id| c.shim_socket(id)).collect();

    // The app exits two seconds from now: containerd is down by then.
    let o = c.ctr(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "arm",
        app,
        "sh",
        "-c",
        "sleep 2; touch /stop",
    ]);
    assert!(o.status.success(), "exec -d in {app}: {}", text(&o));
    let t = Instant::now();
    c.stop_daemon();
    std::thread::sleep(Duration::from_secs(4));
    for (id, (shim, vm)) in pods.iter().zip(&before) {
        assert!(alive(*shim), "the shim of {id} died with containerd");
        assert!(alive(*vm), "the VM of {id} died with containerd");
    }
    c.restart();
    let events = c.events();
    say!(
        "containerd stopped and started again in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let tasks = c.tasks();
    for (id, (shim, vm)) in pods.iter().zip(&before) {
        let t = tasks.iter().find(|t| t.0 == *id);
        assert_eq!(
            t.map(|t| (t.1.clone(), t.2.as_str())),
            Some((vm.to_string(), "RUNNING")),
            "task {id} after the restart: {tasks:?}"
        );
        assert_eq!(c.shim_of(id), Some(*shim), "the same shim serves {id}");
    }
    c.wait_status(app, "STOPPED", Duration::from_secs(10));
    for id in pods {
        let o = c.exec(id, "after", &["sh", "-c", "echo alive; exit 3"]);
        assert_eq!(o.status.code(), Some(3), "exec in {id}: {}", text(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "alive\n");
    }
    events.wait_for(
        "/tasks/exit",
        &[
            ("container_id", pods[0]),
            ("id", "after"),
            ("exit_status", "3"),
        ],
        Duration::from_secs(10),
    );
    let o = c.ctr(&["task", "rm", app]);
    assert!(o.status.success(), "task rm {app}: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exit code 7"),
        "the status of {app}, which exited while containerd was down: {}",
        text(&o)
    );
    let o = c.ctr(&["container", "rm", app]);
    assert!(o.status.success(), "container rm {app}: {}", text(&o));
    for id in pods {
        let o = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(o.status.success(), "kill {id}: {}", text(&o));
        events.wait_for(
            "/tasks/exit",
            &[("container_id", id), ("id", id), ("exit_status", "137")],
            Duration::from_secs(30),
        );
        c.wait_status(id, "STOPPED", Duration::from_secs(10));
        let o = c.ctr(&["task", "rm", id]);
        assert!(o.status.success(), "task rm {id}: {}", text(&o));
        events.wait_for(
            "/tasks/delete",
            &[("container_id", id)],
            Duration::from_secs(10),
        );
        let o = c.ctr(&["container", "rm", id]);
        assert!(o.status.success(), "container rm {id}: {}", text(&o));
    }
    for (id, socket) in pods.iter().zip(&sockets) {
        c.assert_no_leftovers(id, Some(socket));
    }
    c.assert_no_leftovers(app, None);
}

/// What to kill under a pod.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Qemu,
    /// virtiofsd's worker (its parent, the sandboxing one, follows it).
    Virtiofsd,
    /// vhost-device-vsock, the hybrid vsock backend.
    VsockBackend,
}

/// SIGKILLs `victim` under a pod with a running task and a running exec:
/// the pod fails as a whole: both exit 255 with a TaskExit each, the pod
/// is removable and leaves nothing.
fn pod_fails_whole(test: &'static str, victim: Victim) {
    let Some(c) = Ctrd::start_or_skip(test) else {
        return;
    };
    let id = match victim {
        Victim::Qemu => "flt-qemu",
        Victim::Virtiofsd => "flt-virtiofsd",
        Victim::VsockBackend => "flt-vsockd",
    };
    let flavour;
    let mut extra = Vec::new();
    if let Victim::VsockBackend = victim {
        // The backend exists only with hybrid vsock: make sure it is used.
        flavour = c.flavour_with_vsock("hybrid");
        extra = vec!["--runtime-config-path", flavour.to_str().unwrap()];
    }
    let events = c.events();
    c.run_d(id, &extra, &["sleep", "1000"]);
    c.wait_status(id, "RUNNING", Duration::from_secs(60));
    let mut exec = c.spawn_ctr(&["task", "exec", "--exec-id", "long", id, "sleep", "1000"]);
    events.wait_for(
        "/tasks/exec-started",
        &[("container_id", id), ("exec_id", "long")],
        Duration::from_secs(30),
    );
    let socket = c.shim_socket(id);
    let shim = c.shim_of(id).expect("shim");
    let pid = match victim {
        Victim::Qemu => c.vm_of(id).expect("QEMU"),
        Victim::Virtiofsd => {
            let all = c.daemons_of(id, "virtiofsd");
            *all.iter()
                .find(|p| parent_of(**p).is_some_and(|pp| all.contains(&pp)))
                .unwrap_or_else(|| panic!("no virtiofsd worker among {all:?}"))
        }
        Victim::VsockBackend => {
            let all = c.daemons_of(id, "vhost-device-vsock");
            assert_eq!(all.len(), 1, "one vsock backend: {all:?}");
            all[0]
        }
    };
    let t = Instant::now();
    sigkill(pid);
    let code = wait_child(&mut exec, Duration::from_secs(60));
    assert_eq!(
        code,
        Some(255),
        "the exec's exit code after {victim:?} was killed"
    );
    c.wait_status(id, "STOPPED", Duration::from_secs(30));
    let stopped_in = t.elapsed();
    for exec_id in ["long", id] {
        events.wait_for(
            "/tasks/exit",
            &[
                ("container_id", id),
                ("id", exec_id),
                ("exit_status", "255"),
            ],
            Duration::from_secs(10),
        );
    }
    assert!(
        alive(shim),
        "the shim outlives its VM until the pod is removed"
    );
    // Nothing of the VM runs on once its tasks are reported ended.
    let vm_left = c.vm_of(id);
    let daemons_left = c.daemons_of(id, "");
    assert!(
        vm_left.is_none() && daemons_left.is_empty(),
        "{victim:?} killed, the tasks ended, yet QEMU {vm_left:?} and daemons {daemons_left:?} run on"
    );
    let o = c.ctr(&["task", "rm", id]);
    assert!(o.status.success(), "task rm {id}: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("255"),
        "ctr task rm reports the exit status: {}",
        text(&o)
    );
    let o = c.ctr(&["container", "rm", id]);
    assert!(o.status.success(), "container rm {id}: {}", text(&o));
    c.assert_no_leftovers(id, Some(&socket));
    say!(
        "{test}: {victim:?} SIGKILLed; task and exec stopped with 255 after {:.1} s",
        stopped_in.as_secs_f64()
    );
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn qemu_killed_ends_task_and_exec_with_255() {
    pod_fails_whole("qemu_killed_ends_task_and_exec_with_255", Victim::Qemu);
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn virtiofsd_killed_fails_the_pod_as_a_whole() {
    pod_fails_whole(
        "virtiofsd_killed_fails_the_pod_as_a_whole",
        Victim::Virtiofsd,
    );
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn vsock_backend_killed_fails_the_pod_as_a_whole() {
    pod_fails_whole(
        "vsock_backend_killed_fails_the_pod_as_a_whole",
        Victim::VsockBackend,
    );
}

/// The shim SIGKILLed while its pod's VM boots (QEMU started, the agent
/// not yet up): the Create fails, and containerd's clean-up (`shim
/// delete`) leaves nothing: no VM, daemon, mount, state or socket.
#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn shim_killed_during_create_leaves_nothing() {
    let Some(c) = Ctrd::start_or_skip("shim_killed_during_create_leaves_nothing") else {
        return;
    };
    let id = "flt-shimboot";
    let mut run = c.spawn_ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "sleep",
        "1000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let qemu = loop {
        if let Some(p) = c.vm_of(id) {
            break p;
        }
        assert!(Instant::now() < deadline, "no QEMU for {id} within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let shim = c.shim_of(id).expect("the shim booting the VM");
    let socket = std::fs::read(format!("/proc/{shim}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .ok()
        .and_then(|c| {
            let mut args = c.split('\0');
            args.find(|a| *a == "-socket")?;
            args.next()
                .map(|s| s.trim_start_matches("unix://").to_string())
        })
        .expect("the shim's -socket");
    let console = c.state.join(id).join("console.log");
    let booted = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        !booted.contains("agent ready"),
        "the agent answered before the shim could be killed: {booted}"
    );
    sigkill(shim);
    let code = wait_child(&mut run, Duration::from_secs(60));
    assert_ne!(code, Some(0), "ctr run succeeded with its shim killed");
    assert!(
        c.status(id).is_empty() || c.status(id) == "UNKNOWN",
        "{:?}",
        c.tasks()
    );
    let _ = c.ctr(&["task", "rm", "-f", id]);
    let o = c.ctr(&["container", "rm", id]);
    assert!(o.status.success(), "container rm {id}: {}", text(&o));
    assert!(!alive(qemu), "QEMU outlived its shim");
    c.assert_no_leftovers(id, Some(Path::new(&socket)));
}

/// What the host holds for the private containerd's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    /// Processes of this containerd: itself, its shims, their VMs and
    /// daemons.
    processes: usize,
    containerd_fds: usize,
    /// The witness pod's shim (it serves through the whole churn).
    shim_fds: usize,
    mounts: usize,
    /// Entries of the pods' state directory.
    state_entries: usize,
    /// Entries of containerd's task state (one bundle per task).
    bundles: usize,
}

/// Memory, compared with a tolerance (see [`churn_leaves_the_host_flat`]).
#[derive(Debug, Clone, Copy)]
struct Memory {
    containerd_kib: u64,
    shim_kib: u64,
}

impl Ctrd {
    fn held(&self, witness_shim: u32) -> Held {
        let dir = format!("{}/", self.dir.display());
        Held {
            processes: processes().iter().filter(|(_, c)| c.contains(&dir)).count(),
            containerd_fds: fd_count(self.pid()),
            shim_fds: fd_count(witness_shim),
            mounts: std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&dir))
                .count(),
            state_entries: std::fs::read_dir(&self.state).map_or(0, |d| d.count()),
            bundles: std::fs::read_dir(self.bundle("x").parent().unwrap()).map_or(0, |d| d.count()),
        }
    }

    fn memory(&self, witness_shim: u32) -> Memory {
        Memory {
            containerd_kib: rss_kib(self.pid()),
            shim_kib: rss_kib(witness_shim),
        }
    }

    /// Waits up to `limit` for what is held to come back to `want`.
    fn settle(&self, want: &Held, witness_shim: u32, limit: Duration) -> Held {
        let deadline = Instant::now() + limit;
        loop {
            let h = self.held(witness_shim);
            if &h == want || Instant::now() > deadline {
                return h;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// One pod's life: run, exec, kill, delete; its shim's socket.
    fn cycle(&self, id: &str) -> PathBuf {
        self.run_d(id, &[], &["sleep", "1000"]);
        self.wait_status(id, "RUNNING", Duration::from_secs(60));
        let socket = self.shim_socket(id);
        let o = self.exec(id, "churn", &["sh", "-c", "echo $((6 * 7))"]);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "42\n", "{}", text(&o));
        let o = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(o.status.success(), "kill {id}: {}", text(&o));
        self.wait_status(id, "STOPPED", Duration::from_secs(30));
        let o = self.ctr(&["task", "rm", id]);
        assert!(o.status.success(), "task rm {id}: {}", text(&o));
        let o = self.ctr(&["container", "rm", id]);
        assert!(o.status.success(), "container rm {id}: {}", text(&o));
        socket
    }
}

/// Churn: sequential pod lives (run, exec, kill, delete) beside a witness
/// pod that gets an exec each time, then rounds of pods started at once;
/// afterwards the host holds what it held before: processes, fds of
/// containerd and of the witness's shim, mounts, state entries, bundles.
/// Memory may grow a little (containerd is a Go program with a garbage
/// collected heap and a bolt database mapped in memory, both of which
/// grow in steps); it is printed, and bounded.
/// `COCOON_CHURN_CYCLES` (10), `COCOON_CHURN_ROUNDS` (2) and
/// `COCOON_CHURN_PARALLEL` (4) set the counts.
#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn churn_leaves_the_host_flat() {
    let Some(c) = Ctrd::start_or_skip("churn_leaves_the_host_flat") else {
        return;
    };
    let cycles = tunable("COCOON_CHURN_CYCLES", 10);
    let rounds = tunable("COCOON_CHURN_ROUNDS", 2);
    let parallel = tunable("COCOON_CHURN_PARALLEL", 4);
    let witness = "flt-witness";
    c.run_d(witness, &[], &["sleep", "100000"]);
    c.wait_status(witness, "RUNNING", Duration::from_secs(60));
    let wshim = c.shim_of(witness).expect("witness shim");
    let mut sockets = BTreeSet::new();
    let witness_exec = |n: usize| {
        let o = c.exec(witness, &format!("w{n}"), &["echo", "still here"]);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "still here\n",
            "{}",
            text(&o)
        );
    };
    // A first life loads what containerd loads once.
    sockets.insert(c.cycle("flt-warmup"));
    witness_exec(0);
    std::thread::sleep(Duration::from_secs(2));
    let before = c.held(wshim);
    let mem_before = c.memory(wshim);
    let host_before = processes().len();
    say!("churn: before {before:?} {mem_before:?}, {host_before} host processes");

    let t = Instant::now();
    for i in 0..cycles {
        sockets.insert(c.cycle(&format!("flt-churn-{i}")));
        witness_exec(i + 1);
    }
    let sequential = t.elapsed();
    let t = Instant::now();
    for r in 0..rounds {
        let ids: Vec<String> = (0..parallel).map(|p| format!("flt-par-{r}-{p}")).collect();
        let got: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = ids.iter().map(|id| s.spawn(|| c.cycle(id))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        sockets.extend(got);
        witness_exec(cycles + 1 + r);
    }
    let concurrent = t.elapsed();

    let after = c.settle(&before, wshim, Duration::from_secs(15));
    let mem_after = c.memory(wshim);
    let host_after = processes().len();
    say!(
        "churn: {cycles} sequential lives in {:.1} s ({:.1} s each), {rounds} rounds of {parallel} at once in {:.1} s",
        sequential.as_secs_f64(),
        sequential.as_secs_f64() / cycles.max(1) as f64,
        concurrent.as_secs_f64()
    );
    say!("churn: after  {after:?} {mem_after:?}, {host_after} host processes");
    let left: Vec<&PathBuf> = sockets.iter().filter(|s| s.exists()).collect();
    assert!(left.is_empty(), "shim sockets left: {left:?}");
    assert_eq!(after, before, "what the host holds after the churn");
    // Bounds for the garbage-collected heaps (see above): a leak of a few
    // KiB per pod life shows over 50 lives, not over 10; these catch a
    // leak of MiBs per life.
    let grown = mem_after
        .containerd_kib
        .saturating_sub(mem_before.containerd_kib);
    assert!(
        grown < 16 * 1024,
        "containerd grew by {grown} KiB: {mem_before:?} -> {mem_after:?}"
    );
    let grown = mem_after.shim_kib.saturating_sub(mem_before.shim_kib);
    assert!(
        grown < 8 * 1024,
        "the witness's shim grew by {grown} KiB: {mem_before:?} -> {mem_after:?}"
    );
    c.remove(witness);
    c.assert_no_leftovers(witness, None);
}
