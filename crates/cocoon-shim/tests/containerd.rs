//! End-to-end tests: a private containerd 1.6 (started by
//! `scripts/containerd.sh`, its socket in `COCOON_TEST_CONTAINERD`) driven
//! with the real `ctr`, running the offline busybox image on the Cocoon
//! runtime. `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` starts
//! containerd and runs them.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;

use common::{socket, IMAGE};

const RUNTIME: &str = "io.containerd.cocoon.v2";
const NS: &str = "cocoon-e2e";

fn ctr(args: &[&str]) -> Output {
    common::ctr(NS)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ctr")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn import_image() {
    common::import_image(NS);
}

fn run_rm(id: &str, extra: &[&str], cmd: &[&str]) -> Output {
    import_image();
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id]);
    args.extend_from_slice(cmd);
    ctr(&args)
}

/// A detached task; removed (with its container) when dropped.
struct Task {
    id: String,
}

impl Task {
    fn start(id: &str, extra: &[&str], cmd: &[&str]) -> Self {
        import_image();
        // A container left by an earlier, failed run of this test.
        let _ = ctr(&["task", "rm", "-f", id]);
        let _ = ctr(&["container", "rm", id]);
        let mut args = vec!["run", "-d", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        let o = ctr(&args);
        assert!(o.status.success(), "ctr run -d {id}: {:?}", text(&o));
        Self { id: id.into() }
    }

    fn status(&self) -> String {
        let o = ctr(&["task", "ls"]);
        let (out, _) = text(&o);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(&self.id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_string()
    }

    fn wait_status(&self, want: &str) {
        for _ in 0..100 {
            if self.status() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "task {} never reached {want} (is {})",
            self.id,
            self.status()
        );
    }

    fn exec(&self, exec_id: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["task", "exec", "--exec-id", exec_id, &self.id];
        args.extend_from_slice(cmd);
        ctr(&args)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", &self.id]);
        for _ in 0..50 {
            if ctr(&["task", "rm", &self.id]).status.success() || self.status().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = ctr(&["container", "rm", &self.id]);
        // A test that already failed reports its own failure: a second
        // panic here would abort the whole test binary.
        if !std::thread::panicking() {
            assert_no_leftovers(&self.id);
        }
    }
}

/// No VMM, daemon, mount or state of sandbox `id` is left on the host.
fn assert_no_leftovers(id: &str) {
    let marker = format!("/run/cocoon/{id}/");
    let vm_name = format!("cocoon-{id} ");
    for _ in 0..50 {
        let mut left = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                if c.contains(&marker) || c.contains(&vm_name) {
                    left.push(c);
                }
            }
        }
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&marker))
            .map(str::to_string)
            .collect();
        let dir = PathBuf::from(format!("/run/cocoon/{id}"));
        if left.is_empty() && mounts.is_empty() && !dir.exists() {
            return;
        }
        if std::env::var("COCOON_LEFTOVER_DEBUG").is_ok() {
            eprintln!("{left:?} {mounts:?} {}", dir.exists());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("sandbox {id} left processes, mounts or {marker}");
}

fn flavour(name: &str, memory_mib: u32) -> PathBuf {
    let dir = std::env::temp_dir().join("cocoon-e2e-flavours");
    std::fs::create_dir_all(&dir).unwrap();
    let guest =
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into());
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("[hypervisor]\nmemory_mib = {memory_mib}\nboot_timeout_secs = 60\n[guest]\ndir = {guest:?}\n")).unwrap();
    path
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn run_rm_echo() {
    let o = run_rm("e2e-echo", &[], &["echo", "hello from cocoon"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out, "hello from cocoon\n");
    assert_no_leftovers("e2e-echo");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn run_rm_exit_code() {
    let o = run_rm(
        "e2e-exit3",
        &[],
        &["sh", "-c", "echo out $HOME; echo err >&2; exit 3"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    // The spec has no HOME: the runtime takes root's from the image's
    // /etc/passwd.
    assert_eq!(out, "out /root\n");
    assert!(err.contains("err"), "{err}");
    assert_no_leftovers("e2e-exit3");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn exec_ps_pause_resume_metrics() {
    let t = Task::start("e2e-life", &[], &["sleep", "1000"]);
    t.wait_status("RUNNING");

    let o = t.exec("x1", &["sh", "-c", "echo exec-out $HOME; exit 5"]);
    assert_eq!(o.status.code(), Some(5), "{:?}", text(&o));
    assert_eq!(text(&o).0, "exec-out /root\n");
    // A uid the image's /etc/passwd does not list gets no HOME.
    let o = ctr(&[
        "task",
        "exec",
        "--user",
        "1000",
        "--exec-id",
        "x1u",
        "e2e-life",
        "sh",
        "-c",
        "echo $(id -u) ${HOME-unset}",
    ]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(text(&o).0, "1000 unset\n");

    // A duplicate exec id is refused with AlreadyExists.
    let long = Command::new("ctr")
        .args([
            "--address",
            &socket(),
            "--namespace",
            NS,
            "task",
            "exec",
            "--exec-id",
            "x2",
            "e2e-life",
            "sleep",
            "5",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let dup = t.exec("x2", &["true"]);
    assert!(!dup.status.success());
    assert!(text(&dup).1.contains("already exists"), "{:?}", text(&dup));
    let _ = long.wait_with_output();

    // With a terminal (ctr needs one itself: `script` gives it a pty).
    let cmd = format!(
        "ctr --address {} --namespace {NS} task exec -t --exec-id x3 e2e-life sh -c 'tty; echo tty-exec; exit 7'",
        socket()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(7), "{:?}", text(&o));
    let (out, _) = text(&o);
    assert!(out.contains("tty-exec"), "{out:?}");
    assert!(
        out.contains("/dev/pts/"),
        "the exec has a terminal of its own: {out:?}"
    );

    let o = ctr(&["task", "ps", "e2e-life"]);
    let (out, _) = text(&o);
    let pids: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!pids.is_empty(), "{out}");

    assert!(ctr(&["task", "pause", "e2e-life"]).status.success());
    t.wait_status("PAUSED");
    assert!(ctr(&["task", "resume", "e2e-life"]).status.success());
    t.wait_status("RUNNING");

    let o = ctr(&["task", "metrics", "e2e-life"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let usage: u64 = out
        .lines()
        .find(|l| l.starts_with("memory.usage_in_bytes"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memory usage in {out}"));
    assert!(usage > 0, "{out}");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn kill_with_sigterm_and_sigkill() {
    let t = Task::start(
        "e2e-term",
        &[],
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; while true; do sleep 0.2; done",
        ],
    );
    t.wait_status("RUNNING");
    std::thread::sleep(Duration::from_millis(500));
    assert!(ctr(&["task", "kill", "-s", "SIGTERM", "e2e-term"])
        .status
        .success());
    t.wait_status("STOPPED");
    drop(t);

    let t = Task::start("e2e-kill", &[], &["sleep", "1000"]);
    t.wait_status("RUNNING");
    assert!(ctr(&["task", "kill", "-s", "SIGKILL", "e2e-kill"])
        .status
        .success());
    t.wait_status("STOPPED");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn runtime_config_path_selects_the_flavour() {
    let small = flavour("small", 256);
    let large = flavour("large", 768);
    let mem = |id: &str, f: &PathBuf| {
        let o = run_rm(
            id,
            &["--runtime-config-path", f.to_str().unwrap()],
            &["grep", "MemTotal", "/proc/meminfo"],
        );
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        let kib: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert_no_leftovers(id);
        kib
    };
    let a = mem("e2e-small", &small);
    let b = mem("e2e-large", &large);
    assert!(
        a < 256 * 1024 && b > 512 * 1024 && b < 768 * 1024,
        "small {a} kB, large {b} kB"
    );
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn missing_runtime_config_path_names_the_file() {
    let o = run_rm(
        "e2e-nocfg",
        &["--runtime-config-path", "/nonexistent/cocoon-flavour.toml"],
        &["true"],
    );
    assert!(!o.status.success());
    let (_, err) = text(&o);
    assert!(err.contains("/nonexistent/cocoon-flavour.toml"), "{err}");
    let _ = ctr(&["container", "rm", "e2e-nocfg"]);
    assert_no_leftovers("e2e-nocfg");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn killed_shim_is_cleaned_up() {
    let t = Task::start("e2e-shimkill", &[], &["sleep", "1000"]);
    t.wait_status("RUNNING");
    let shim = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            (c.contains("containerd-shim-cocoon-v2") && c.contains("-id e2e-shimkill"))
                .then(|| e.file_name().to_string_lossy().into_owned())
        })
        .next()
        .expect("shim process of e2e-shimkill");
    Command::new("kill").args(["-9", &shim]).status().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..50 {
        if ctr(&["task", "rm", "-f", "e2e-shimkill"]).status.success() || t.status().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = ctr(&["container", "rm", "e2e-shimkill"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert_no_leftovers("e2e-shimkill");
    std::mem::forget(t);
}

/// `ctr` 1.6 has no `task update`; call the shim's Task service on its own
/// socket (the one containerd uses) and read the limit back through
/// `ctr task metrics`, which the guest cgroup answers.
#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn update_memory_limit_reaches_the_guest_cgroup() {
    use containerd_shim_protos::api::UpdateTaskRequest;
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::shim_async::TaskClient;

    let t = Task::start("e2e-update", &[], &["sleep", "1000"]);
    t.wait_status("RUNNING");
    let state = PathBuf::from(socket())
        .parent()
        .unwrap()
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join("e2e-update/address");
    let address =
        std::fs::read_to_string(&state).unwrap_or_else(|e| panic!("{}: {e}", state.display()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ok, wrong) = rt.block_on(async {
        let client = TaskClient::new(
            ttrpc::r#async::Client::connect(address.trim())
                .await
                .unwrap(),
        );
        let mut ctx = ttrpc::context::with_timeout(30_000_000_000);
        ctx.add("containerd-namespace-ttrpc".into(), NS.into());
        let limit = 96 * 1024 * 1024;
        let req = UpdateTaskRequest {
            id: "e2e-update".into(),
            resources: Some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: serde_json::to_vec(&serde_json::json!({"memory": {"limit": limit}}))
                    .unwrap(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let ok = client.update(ctx.clone(), &req).await;
        let mut bad = req.clone();
        bad.resources.as_mut().unwrap().type_url =
            "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
        let wrong = client.update(ctx, &bad).await;
        (ok, wrong)
    });
    ok.expect("update");
    match wrong {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}")
        }
        other => panic!("a Process payload for Update gave {other:?}"),
    }
    let o = ctr(&["task", "metrics", "e2e-update"]);
    let (out, _) = text(&o);
    let limit: u64 = out
        .lines()
        .find(|l| l.starts_with("memory.limit_in_bytes"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no memory limit in {out}"));
    assert_eq!(limit, 96 * 1024 * 1024, "{out}");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn file_and_binary_log_uris() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out.log");
    let uri = format!("file://{}", log.display());
    let o = run_rm(
        "e2e-logfile",
        &["--log-uri", &uri],
        &["sh", "-c", "echo to-out; echo to-err >&2"],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("to-out") && logged.contains("to-err"),
        "{logged:?}"
    );

    let script = dir.path().join("logger.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n# args: dir DIR; stdout on fd 3, stderr on fd 4, ready on fd 5\ncat <&3 > \"$2/stdout\" &\ncat <&4 > \"$2/stderr\" &\nexec 5>&-\nwait\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?dir={}", script.display(), dir.path().display());
    let o = run_rm(
        "e2e-logbin",
        &["--log-uri", &uri],
        &["sh", "-c", "echo bin-out; echo bin-err >&2"],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    let out = std::fs::read_to_string(dir.path().join("stdout")).unwrap_or_default();
    let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert_eq!(out, "bin-out\n");
    assert_eq!(err, "bin-err\n");
    assert_no_leftovers("e2e-logbin");
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn dead_vm_ends_its_tasks_with_255() {
    let t = Task::start("e2e-vmdies", &[], &["sleep", "1000"]);
    t.wait_status("RUNNING");
    let killed = Command::new("pkill")
        .args(["-9", "-f", "qemu-system-x86_64 -name cocoon-e2e-vmdies "])
        .status()
        .unwrap();
    assert!(killed.success(), "no QEMU for e2e-vmdies");
    t.wait_status("STOPPED");
    let o = ctr(&["task", "rm", "e2e-vmdies"]);
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).1.contains("255"),
        "exit status of a task whose VM died: {:?}",
        text(&o)
    );
    // Drop removes the container and checks that nothing is left.
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn seccomp_profile_is_applied_in_the_guest() {
    let o = run_rm(
        "e2e-seccomp",
        &["--seccomp"],
        &["grep", "^Seccomp:", "/proc/self/status"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        out.split_whitespace().nth(1),
        Some("2"),
        "a filter is installed: {out:?}"
    );
    let o = run_rm(
        "e2e-noseccomp",
        &[],
        &["grep", "^Seccomp:", "/proc/self/status"],
    );
    assert_eq!(
        text(&o).0.split_whitespace().nth(1),
        Some("0"),
        "{:?}",
        text(&o)
    );
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn oom_kill_is_an_event_and_exit_137() {
    let mut events = Command::new("ctr")
        .args(["--address", &socket(), "--namespace", NS, "events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let o = run_rm(
        "e2e-oom",
        &["--memory-limit", "16777216"],
        &[
            "sh",
            "-c",
            "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
        ],
    );
    // The guest's OOM watcher polls every 250 ms; give the event time to land.
    std::thread::sleep(Duration::from_secs(1));
    let _ = events.kill();
    let log = String::from_utf8_lossy(&events.wait_with_output().unwrap().stdout).into_owned();
    assert_eq!(o.status.code(), Some(137), "{:?}", text(&o));
    assert!(!text(&o).0.contains("survived"));
    let oom: Vec<&str> = log.lines().filter(|l| l.contains("/tasks/oom")).collect();
    assert!(
        oom.iter().any(|l| l.contains("e2e-oom")),
        "no /tasks/oom event for e2e-oom in:\n{log}"
    );
    assert_no_leftovers("e2e-oom");
}

/// Processes whose command line names this sandbox's VM.
fn vms_of(sandbox: &str) -> usize {
    let needle = format!("-name cocoon-{sandbox} ");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&needle)
                })
                .unwrap_or(false)
        })
        .count()
}

#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn containers_of_a_pod_share_one_vm() {
    let pod = ["--annotation", "io.kubernetes.cri.sandbox-id=e2e-pod"];
    let sandbox = Task::start(
        "e2e-pod",
        &[
            pod[0],
            pod[1],
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
        ],
        &["sleep", "1000"],
    );
    sandbox.wait_status("RUNNING");
    let app = Task::start(
        "e2e-pod-app",
        &[
            pod[0],
            pod[1],
            "--annotation",
            "io.kubernetes.cri.container-type=container",
        ],
        &["sleep", "1000"],
    );
    app.wait_status("RUNNING");
    assert_eq!(vms_of("e2e-pod"), 1, "one VM for the pod");
    assert_eq!(
        vms_of("e2e-pod-app"),
        0,
        "no VM of its own for the app container"
    );
    let boot_id =
        |t: &Task, x: &str| text(&t.exec(x, &["cat", "/proc/sys/kernel/random/boot_id"])).0;
    let a = boot_id(&sandbox, "b1");
    assert_eq!(a.len(), 37, "{a:?}");
    assert_eq!(
        a,
        boot_id(&app, "b2"),
        "both containers run on one guest kernel"
    );
    // The app goes; the pod's VM stays for the sandbox.
    drop(app);
    assert_eq!(vms_of("e2e-pod"), 1);
    assert_eq!(sandbox.exec("b3", &["true"]).status.code(), Some(0));
}

/// A network namespace made for a test (as CRI makes a pod's); deleted on
/// drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        // One left by an earlier, killed run.
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        let ns = Self(name.into());
        assert!(ns.exec(&["ip", "link", "set", "lo", "up"]).status.success());
        ns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// What containerd's CRI PortForward does — dial `localhost:<port>` inside
/// the pod's network namespace — reaches a server in the pod's VM: the
/// shim listens in the namespace, iptables redirects the loopback to it,
/// and the agent connects to the port in the guest. A closed port fails at
/// once; the redirect goes with the pod.
#[test]
#[ignore = "needs containerd and boots VMs: run by scripts/test.sh"]
fn port_forward_through_the_pod_network_namespace() {
    let ns = Netns::new("cocoon-e2e-pf");
    let with_ns = format!("network:{}", ns.path());
    // No capability to bring the loopback up: the agent has.
    let t = Task::start(
        "e2e-portfwd",
        &["--with-ns", &with_ns],
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo forwarded-page > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
        ],
    );
    t.wait_status("RUNNING");
    // The shim adds the redirect before the task is created.
    let rules = text(&ns.exec(&["iptables", "-t", "nat", "-S", "OUTPUT"])).0;
    assert!(
        rules.contains("cocoon port forward"),
        "redirect in the netns: {rules}"
    );
    let get = |port: u16| {
        ns.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://localhost:{port}/"),
        ])
    };
    let mut o = get(8080);
    for _ in 0..50 {
        if o.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        o = get(8080);
    }
    assert_eq!(text(&o).0, "forwarded-page\n", "{:?}", text(&o));
    // Several at once, each its own stream.
    let many: Vec<_> = (0..4)
        .map(|_| {
            let p = ns.path();
            std::thread::spawn(move || {
                Command::new("nsenter")
                    .arg(format!("--net={p}"))
                    .args(["curl", "-sS", "--max-time", "10", "http://127.0.0.1:8080/"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in many {
        let o = h.join().unwrap();
        assert_eq!(text(&o).0, "forwarded-page\n", "{:?}", text(&o));
    }
    let started = std::time::Instant::now();
    let closed = get(8081);
    assert!(!closed.status.success(), "{:?}", text(&closed));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a closed port failed only after {:?}",
        started.elapsed()
    );
    drop(t);
    let rules = text(&ns.exec(&["iptables", "-t", "nat", "-S", "OUTPUT"])).0;
    assert!(
        !rules.contains("cocoon port forward"),
        "the redirect outlived the pod: {rules}"
    );
}
