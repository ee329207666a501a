//! End-to-end tests through Kubernetes' CRI: containerd's CRI plugin (on
//! the private containerd of `scripts/containerd.sh`, socket in
//! `COCOON_TEST_CONTAINERD`) runs pods on the Cocoon runtime handlers
//! `cocoon` (q35) and `cocoon-microvm`, beside `runc` as the baseline, with
//! the offline pause and busybox images and a private CNI bridge.
//! `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs them.
//! `COCOON_CRI_HANDLER=runc` runs the feature tests on runc instead, which
//! tells a harness problem from a runtime one.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod stream;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use harness::*;
use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{
    Capability, ContainerState, DnsConfig, ExecRequest, Int64Value, NamespaceMode, SecurityProfile,
};

macro_rules! cri_or_skip {
    ($name:expr) => {
        match cri_or_skip($name) {
            Some(c) => c,
            None => return,
        }
    };
}

/// For tests that must run alone (they watch the whole host, or time).
macro_rules! cri_alone_or_skip {
    ($name:expr) => {
        match cri_alone_or_skip($name) {
            Some(c) => c,
            None => return,
        }
    };
}

// The test modules, after the macros they use.
mod cgroups;
mod overhead;
mod sizing;
mod volumes;

const SLEEPER: &[&str] = &["sleep", "100000"];

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

/// One line of each probe: the kernel, the DMI product (q35 has one), and
/// how many PCI devices there are (microvm has none).
const FLAVOUR_PROBE: &str =
    "uname -r; cat /sys/class/dmi/id/product_name 2>/dev/null || echo no-dmi; \
     ls /sys/bus/pci/devices 2>/dev/null | wc -l";

/// RunPodSandbox on each handler, a container started in it; the guest
/// shows which flavour it booted. Prints the time to the running container.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn pod_runs_on_each_handler_with_its_flavour() {
    let cri = cri_alone_or_skip!("pod_runs_on_each_handler_with_its_flavour");
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for handler in [RUNC, COCOON, COCOON_MICROVM] {
        let t = Instant::now();
        let pod = cri
            .run_pod(handler, pod_config("flavour", Namespaces::default()))
            .unwrap_or_else(|e| panic!("RunPodSandbox on {handler}: {e}"));
        let c = pod
            .start(container_config("probe", SLEEPER))
            .unwrap_or_else(|e| panic!("container on {handler}: {e}"));
        let running = t.elapsed();
        let e = cri
            .exec_sync(&c, &sh(FLAVOUR_PROBE), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("ExecSync on {handler}: {e}"));
        eprintln!(
            "{handler}: RunPodSandbox {:?}, first container running after {running:?}; probe {:?}",
            pod.started_in, e.stdout
        );
        let lines: Vec<&str> = e.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{handler}: {e:?}");
        let (kernel, product, pci) = (lines[0], lines[1], lines[2]);
        match handler {
            RUNC => assert_eq!(kernel, host_kernel.trim(), "runc runs on the host kernel"),
            COCOON => {
                assert_ne!(kernel, host_kernel.trim(), "{handler} runs a guest kernel");
                assert!(
                    product.contains("Q35"),
                    "{handler}: DMI product {product:?}"
                );
                assert_ne!(pci, "0", "{handler}: a q35 guest has PCI devices");
            }
            _ => {
                assert_ne!(kernel, host_kernel.trim(), "{handler} runs a guest kernel");
                assert!(
                    !product.contains("Q35"),
                    "{handler}: DMI product {product:?}"
                );
                assert_eq!(pci, "0", "{handler}: a microvm guest has no PCI bus");
            }
        }
        pod.remove();
    }
}

/// What a container prints lands in its CRI log file, in CRI format:
/// `<RFC 3339 time> <stdout|stderr> <F|P> <text>`.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn container_output_is_in_its_cri_log() {
    let cri = cri_or_skip!("container_output_is_in_its_cri_log");
    let pod = cri
        .run_pod(&handler(), pod_config("logs", Namespaces::default()))
        .expect("RunPodSandbox");
    let _talker = pod
        .start(container_config(
            "talker",
            &sh("echo out-line-1; echo err-line >&2; echo out-line-2; exec sleep 100000"),
        ))
        .expect("container");
    let log = pod.logs.path().join("talker.log");
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 3 || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut seen = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(4, ' ');
        let (time, stream, tag, body) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        assert!(
            time.len() >= 20 && time.as_bytes()[10] == b'T' && time.starts_with("20"),
            "time of {line:?}"
        );
        assert!(matches!(stream, "stdout" | "stderr"), "stream of {line:?}");
        assert!(matches!(tag, "F" | "P"), "tag of {line:?}");
        seen.push(format!("{stream} {tag} {body}"));
    }
    for want in [
        "stdout F out-line-1",
        "stderr F err-line",
        "stdout F out-line-2",
    ] {
        assert!(
            seen.iter().any(|s| s == want),
            "{want:?} not in {log:?}:\n{text}"
        );
    }
    pod.remove();
}

/// ExecSync: stdout and stderr apart, the exit code, and the timeout
/// honoured (the process is killed, the call fails naming the timeout).
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn exec_sync_output_exit_code_and_timeout() {
    let cri = cri_or_skip!("exec_sync_output_exit_code_and_timeout");
    let pod = cri
        .run_pod(&handler(), pod_config("execsync", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(container_config("box", SLEEPER))
        .expect("container");
    let e = cri
        .exec_sync(
            &c,
            &sh("echo to-out; echo to-err >&2; exit 7"),
            Duration::from_secs(30),
        )
        .expect("ExecSync");
    assert_eq!(
        (e.stdout.as_str(), e.stderr.as_str(), e.code),
        ("to-out\n", "to-err\n", 7)
    );

    let e = cri
        .exec_sync(&c, &["true"], Duration::from_secs(30))
        .expect("ExecSync true");
    assert_eq!(e.code, 0, "{e:?}");

    let t = Instant::now();
    let r = cri.exec_sync(&c, &["sleep", "60"], Duration::from_secs(2));
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "ExecSync with a 2 s timeout took {took:?}"
    );
    match r {
        Err(s) => assert!(s.message().contains("timeout"), "{s:?}"),
        Ok(e) => panic!("a 60 s sleep under a 2 s timeout returned {e:?}"),
    }
    // The timed-out process is gone from the container.
    let ps = exec_until(
        &cri,
        &c,
        &["ps", "-o", "args"],
        Duration::from_secs(10),
        |e| !e.stdout.contains("sleep 60"),
    );
    assert!(!ps.stdout.contains("sleep 60"), "{ps:?}");
    pod.remove();
}

/// ContainerStats: CPU time and memory working set are real figures.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn container_stats_are_not_zero() {
    let cri = cri_or_skip!("container_stats_are_not_zero");
    let pod = cri
        .run_pod(&handler(), pod_config("stats", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(container_config(
            "busy",
            &sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; x=$(head -c 4000000 /dev/zero | tr '\\0' a); exec sleep 100000"),
        ))
        .expect("container");
    std::thread::sleep(Duration::from_secs(3));
    let s = cri.container_stats(&c).expect("ContainerStats");
    let cpu = s
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    let mem = s
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    eprintln!("stats: cpu {cpu} ns, working set {mem} bytes");
    assert!(cpu > 0, "no CPU time in {s:?}");
    assert!(mem > 0, "no memory working set in {s:?}");
    pod.remove();
}

/// Reads a namespace link (`/proc/self/ns/<kind>`) in a container.
fn ns_of(cri: &Cri, c: &str, kind: &str) -> String {
    let e = cri
        .exec_sync(
            c,
            &["readlink", &format!("/proc/self/ns/{kind}")],
            Duration::from_secs(30),
        )
        .expect("readlink");
    assert_eq!(e.code, 0, "{e:?}");
    e.stdout.trim().to_string()
}

/// Two containers of one pod share the network (HTTP on 127.0.0.1), the
/// hostname and IPC (a file in /dev/shm, the same IPC namespace).
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn containers_of_a_pod_share_network_uts_and_ipc() {
    let cri = cri_or_skip!("containers_of_a_pod_share_network_uts_and_ipc");
    let pod = cri
        .run_pod(&handler(), pod_config("sharing", Namespaces::default()))
        .expect("RunPodSandbox");
    let server = pod
        .start(container_config(
            "server",
            &sh("mkdir -p /www && echo served-on-localhost > /www/index.html && echo from-server > /dev/shm/cocoon-ipc && exec httpd -f -p 127.0.0.1:8080 -h /www"),
        ))
        .expect("server container");
    let client = pod
        .start(container_config("client", SLEEPER))
        .expect("client container");
    let got = exec_until(
        &cri,
        &client,
        &[
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ],
        Duration::from_secs(20),
        |e| e.code == 0,
    );
    assert_eq!(got.stdout, "served-on-localhost\n", "{got:?}");
    for c in [&server, &client] {
        let e = cri
            .exec_sync(c, &["hostname"], Duration::from_secs(30))
            .expect("hostname");
        assert_eq!(e.stdout.trim(), "sharing", "hostname of {c}");
    }
    let shm = exec_until(
        &cri,
        &client,
        &["cat", "/dev/shm/cocoon-ipc"],
        Duration::from_secs(10),
        |e| e.code == 0,
    );
    assert_eq!(
        shm.stdout, "from-server\n",
        "/dev/shm is the pod's: {shm:?}"
    );
    for kind in ["net", "uts", "ipc"] {
        assert_eq!(
            ns_of(&cri, &server, kind),
            ns_of(&cri, &client, kind),
            "{kind} namespace shared"
        );
    }
    assert_ne!(
        ns_of(&cri, &server, "pid"),
        ns_of(&cri, &client, "pid"),
        "PID namespaces are per container by default"
    );
    pod.remove();
}

/// With `shareProcessNamespace` (PID mode POD) a container sees the other's
/// processes and the pause process is PID 1.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn shared_pid_namespace_has_pause_as_pid_1() {
    let cri = cri_or_skip!("shared_pid_namespace_has_pause_as_pid_1");
    let ns = Namespaces {
        pid: NamespaceMode::Pod,
        ..Default::default()
    };
    let pod = cri
        .run_pod(&handler(), pod_config("sharedpid", ns))
        .expect("RunPodSandbox");
    let _a = pod
        .start(container_config("a", &["sleep", "424242"]))
        .expect("container a");
    let b = pod
        .start(container_config("b", SLEEPER))
        .expect("container b");
    let ps = exec_until(
        &cri,
        &b,
        &["ps", "-o", "pid,args"],
        Duration::from_secs(10),
        |e| e.stdout.contains("sleep 424242"),
    );
    assert!(
        ps.stdout.contains("sleep 424242"),
        "b sees a's process: {ps:?}"
    );
    let one = cri
        .exec_sync(&b, &["cat", "/proc/1/cmdline"], Duration::from_secs(30))
        .expect("cmdline of PID 1");
    assert!(
        one.stdout.starts_with("/pause"),
        "PID 1 is the pause process: {one:?}"
    );
    pod.remove();
}

/// With PID mode CONTAINER a container sees only its own processes.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn container_pid_namespace_is_private() {
    let cri = cri_or_skip!("container_pid_namespace_is_private");
    let pod = cri
        .run_pod(&handler(), pod_config("privatepid", Namespaces::default()))
        .expect("RunPodSandbox");
    let _a = pod
        .start(container_config("a", &["sleep", "424242"]))
        .expect("container a");
    let b = pod
        .start(container_config("b", SLEEPER))
        .expect("container b");
    let ps = cri
        .exec_sync(&b, &["ps", "-o", "pid,args"], Duration::from_secs(30))
        .expect("ps");
    assert!(
        !ps.stdout.contains("sleep 424242"),
        "b sees a's process: {ps:?}"
    );
    assert!(
        !ps.stdout.contains("pause"),
        "b sees the pause process: {ps:?}"
    );
    let one = cri
        .exec_sync(&b, &["cat", "/proc/1/cmdline"], Duration::from_secs(30))
        .expect("cmdline of PID 1");
    assert!(
        one.stdout.starts_with("sleep"),
        "PID 1 is b's own init: {one:?}"
    );
    pod.remove();
}

// busybox wget -T crashes (Debian 1.35 static): `timeout` bounds it instead.

/// An HTTP GET from the host to `ip:port`, retried until it answers.
fn http_get(ip: &str, port: u16, limit: Duration) -> Result<String, String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}")
        .parse()
        .map_err(|e| format!("{ip}:{port}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        })();
        match attempt {
            Ok(r) if r.starts_with("HTTP/1.") => return Ok(r),
            Ok(r) if Instant::now() > deadline => return Err(format!("answer {r:?}")),
            Err(e) if Instant::now() > deadline => return Err(format!("{addr}: {e}")),
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

const WEB_SERVER: &str =
    "mkdir -p /www && echo pod-web-page > /www/index.html && exec httpd -f -p 8080 -h /www";

/// The pod's IP (PodSandboxStatus) serves HTTP to the host and to another
/// pod on the bridge; resolv.conf, hosts and hostname are the pod's.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn pod_ip_serves_host_and_pods_with_the_pods_dns_and_hostname() {
    let cri = cri_or_skip!("pod_ip_serves_host_and_pods_with_the_pods_dns_and_hostname");
    let mut config = pod_config("webpod", Namespaces::default());
    config.dns_config = Some(DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec!["pods.cocoon.test".into()],
        options: vec!["ndots:3".into()],
    });
    let pod = cri.run_pod(&handler(), config).expect("RunPodSandbox");
    let web = pod
        .start(container_config("web", &sh(WEB_SERVER)))
        .expect("web");
    let ip = pod.ip();
    assert!(!ip.is_empty(), "PodSandboxStatus has no IP");
    eprintln!("pod IP {ip}");

    let answer = http_get(&ip, 8080, Duration::from_secs(20)).expect("HTTP from the host");
    assert!(answer.contains("pod-web-page"), "{answer:?}");

    let peer = cri
        .run_pod(&handler(), pod_config("peerpod", Namespaces::default()))
        .expect("RunPodSandbox of the peer");
    let client = peer
        .start(container_config("client", SLEEPER))
        .expect("client");
    let url = format!("http://{ip}:8080/");
    let got = exec_until(
        &cri,
        &client,
        &["timeout", "10", "wget", "-q", "-O", "-", &url],
        Duration::from_secs(20),
        |e| e.code == 0,
    );
    assert_eq!(got.stdout, "pod-web-page\n", "from the peer pod: {got:?}");

    let resolv = cri
        .exec_sync(&web, &["cat", "/etc/resolv.conf"], Duration::from_secs(30))
        .expect("resolv.conf");
    for want in [
        "nameserver 192.0.2.53",
        "search pods.cocoon.test",
        "options ndots:3",
    ] {
        assert!(
            resolv.stdout.lines().any(|l| l.trim() == want),
            "{want:?} not in resolv.conf:\n{}",
            resolv.stdout
        );
    }
    let hostname = cri
        .exec_sync(&web, &["hostname"], Duration::from_secs(30))
        .expect("hostname");
    assert_eq!(hostname.stdout.trim(), "webpod");
    // /etc/hosts, /etc/hostname and /etc/resolv.conf are the files
    // containerd wrote for the pod (as its runtime spec says).
    let (_, info) = cri.container_status(&web).expect("ContainerStatus");
    let mounts = info
        .pointer("/runtimeSpec/mounts")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    for file in ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"] {
        let src = mounts
            .iter()
            .find(|m| m["destination"] == file)
            .and_then(|m| m["source"].as_str())
            .unwrap_or_else(|| panic!("no {file} mount in the container's spec"));
        let host = std::fs::read_to_string(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let inside = cri
            .exec_sync(&web, &["cat", file], Duration::from_secs(30))
            .expect("cat");
        assert_eq!(
            inside.stdout, host,
            "{file} in the container is the pod's {src}"
        );
    }
    peer.remove();
    pod.remove();
}

/// The pod's sysctls (IPC and network namespace ones) are what its
/// containers read.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn pod_sysctls_reach_containers() {
    let cri = cri_or_skip!("pod_sysctls_reach_containers");
    let mut config = pod_config("sysctls", Namespaces::default());
    let linux = config.linux.as_mut().unwrap();
    linux
        .sysctls
        .insert("kernel.shm_rmid_forced".into(), "1".into());
    linux
        .sysctls
        .insert("fs.mqueue.msg_max".into(), "42".into());
    // Network namespace ones, dotted and slashed.
    linux
        .sysctls
        .insert("net.ipv4.ip_unprivileged_port_start".into(), "80".into());
    linux
        .sysctls
        .insert("net/core/somaxconn".into(), "1234".into());
    let pod = cri.run_pod(&handler(), config).expect("RunPodSandbox");
    let c = pod
        .start(container_config("reader", SLEEPER))
        .expect("container");
    let e = cri
        .exec_sync(
            &c,
            &sh(
                "cd /proc/sys && cat kernel/shm_rmid_forced fs/mqueue/msg_max \
                 net/ipv4/ip_unprivileged_port_start net/core/somaxconn",
            ),
            Duration::from_secs(30),
        )
        .expect("ExecSync");
    assert_eq!(e.stdout, "1\n42\n80\n1234\n", "{e:?}");
    pod.remove();
}

/// StopContainer with a long grace period returns as soon as the process
/// exits on SIGTERM (busybox `top` does), not after the grace period, and
/// not by SIGKILL.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn stop_container_ends_on_sigterm() {
    let cri = cri_or_skip!("stop_container_ends_on_sigterm");
    let pod = cri
        .run_pod(&handler(), pod_config("stopper", Namespaces::default()))
        .expect("RunPodSandbox");
    // Batch and interactive `top` (no terminal: CRI's benchmark case).
    for (name, args) in [("top-b", &["top", "-b"][..]), ("top", &["top"][..])] {
        let c = pod.start(container_config(name, args)).expect("container");
        std::thread::sleep(Duration::from_secs(1));
        let t = Instant::now();
        cri.stop_container(&c, Duration::from_secs(60))
            .expect("StopContainer");
        let took = t.elapsed();
        let s = wait_state(
            &cri,
            &c,
            ContainerState::ContainerExited,
            Duration::from_secs(5),
        );
        eprintln!(
            "{name}: StopContainer took {took:?}, exit code {}",
            s.exit_code
        );
        assert!(
            took < Duration::from_secs(10),
            "{name}: StopContainer took {took:?}"
        );
        assert_eq!(
            s.state,
            ContainerState::ContainerExited as i32,
            "{name}: {s:?}"
        );
        assert_ne!(
            s.exit_code, 137,
            "{name}: killed, not stopped by SIGTERM: {s:?}"
        );
    }
    pod.remove();
}

/// Reads a `/proc/<pid>/status` field.
fn status_field(text: &str, field: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The identity and confinement lines of a `/proc/<pid>/status`.
fn confinement(text: &str) -> String {
    text.lines()
        .filter(|l| {
            ["Uid:", "Gid:", "Cap", "NoNewPrivs:", "Seccomp"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether capability `bit` is set in a `Cap*` mask of /proc/<pid>/status.
fn has_cap(mask: &str, bit: u32) -> bool {
    u64::from_str_radix(mask, 16).is_ok_and(|m| m & (1 << bit) != 0)
}

const CAP_CHOWN: u32 = 0;
const CAP_SYS_TIME: u32 = 25;

/// An exec'd process runs with its container's seccomp filter, user and
/// capabilities: a container as uid 1000 under RuntimeDefault seccomp, and
/// one as root with capabilities added and dropped.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn exec_has_the_containers_seccomp_user_and_capabilities() {
    let cri = cri_or_skip!("exec_has_the_containers_seccomp_user_and_capabilities");
    let pod = cri
        .run_pod(&handler(), pod_config("execsec", Namespaces::default()))
        .expect("RunPodSandbox");
    let mut config = container_config("confined", SLEEPER);
    let sc = config
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .get_or_insert_with(Default::default);
    sc.seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        ..Default::default()
    });
    sc.run_as_user = Some(Int64Value { value: 1000 });
    let confined = pod.start(config).expect("confined container");

    let mut config = container_config("capable", SLEEPER);
    config
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .get_or_insert_with(Default::default)
        .capabilities = Some(Capability {
        add_capabilities: vec!["SYS_TIME".into()],
        drop_capabilities: vec!["CHOWN".into()],
        ..Default::default()
    });
    let capable = pod.start(config).expect("capable container");

    let status = |c: &str, pid: &str| {
        let e = cri
            .exec_sync(
                c,
                &["cat", &format!("/proc/{pid}/status")],
                Duration::from_secs(30),
            )
            .expect("ExecSync cat status");
        assert_eq!(e.code, 0, "{e:?}");
        e.stdout
    };
    let init = status(&confined, "1");
    let exec = status(&confined, "self");
    let (i, e) = (confinement(&init), confinement(&exec));
    assert_eq!(status_field(&init, "Seccomp"), "2", "init: {i}");
    assert_eq!(status_field(&exec, "Seccomp"), "2", "exec: {e} (init: {i})");
    assert_eq!(
        status_field(&exec, "Uid").split_whitespace().next(),
        Some("1000"),
        "exec: {e}"
    );
    let id = cri
        .exec_sync(&confined, &["id", "-u"], Duration::from_secs(30))
        .expect("id");
    assert_eq!(id.stdout.trim(), "1000", "{id:?}");

    let init = status(&capable, "1");
    let exec = status(&capable, "self");
    let caps = status_field(&init, "CapEff");
    assert!(
        has_cap(&caps, CAP_SYS_TIME) && !has_cap(&caps, CAP_CHOWN),
        "init's CapEff {caps} has SYS_TIME added and CHOWN dropped"
    );
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            status_field(&exec, field),
            status_field(&init, field),
            "exec's {field}: exec {}, init {}",
            confinement(&exec),
            confinement(&init)
        );
    }
    pod.remove();
}

/// An interactive exec with a terminal and stdin through CRI's streaming
/// server (WebSocket, `v4.channel.k8s.io`): the shell has a tty of the
/// size sent, reads its input, and its exit code comes back.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn interactive_exec_with_a_terminal() {
    let cri = cri_or_skip!("interactive_exec_with_a_terminal");
    let pod = cri
        .run_pod(&handler(), pod_config("ttyexec", Namespaces::default()))
        .expect("RunPodSandbox");
    let c = pod
        .start(container_config("box", SLEEPER))
        .expect("container");
    let url = cri
        .exec_url(ExecRequest {
            container_id: c.clone(),
            cmd: vec!["sh".into()],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .expect("Exec");
    let out = cri
        .block_on(stream::exec(
            &url,
            Some((91, 33)),
            b"tty; stty size; echo marker-$((6*7)); exit 3\n",
            Duration::from_secs(30),
        ))
        .expect("exec session");
    let text = out.stdout();
    assert!(text.contains("/dev/pts/"), "a terminal: {out:?}");
    assert!(text.contains("33 91"), "the size sent: {text:?}");
    assert!(text.contains("marker-42"), "the shell read stdin: {text:?}");
    assert_eq!(out.exit_code(), Some(3), "{:?}", out.status);
    pod.remove();
}

/// CRI PortForward through the streaming server (WebSocket): containerd
/// dials localhost:<port> in the pod's network namespace, which for a VM
/// pod the shim forwards into the guest. A closed port is an error, not an
/// empty answer.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn port_forward_reaches_a_pod_port() {
    let cri = cri_or_skip!("port_forward_reaches_a_pod_port");
    let pod = cri
        .run_pod(&handler(), pod_config("portfwd", Namespaces::default()))
        .expect("RunPodSandbox");
    let web = pod
        .start(container_config("web", &sh(WEB_SERVER)))
        .expect("web");
    // Served inside the pod before anything is forwarded.
    exec_until(
        &cri,
        &web,
        &[
            "timeout",
            "10",
            "wget",
            "-q",
            "-O",
            "-",
            "http://127.0.0.1:8080/",
        ],
        Duration::from_secs(20),
        |e| e.code == 0,
    );
    let forward = |port: u16| {
        let url = cri
            .port_forward_url(&pod.id, &[i32::from(port)])
            .expect("PortForward");
        cri.block_on(stream::port_forward(
            &url,
            port,
            b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n",
            Duration::from_secs(30),
        ))
        .expect("port-forward session")
    };
    let got = forward(8080);
    let text = String::from_utf8_lossy(&got.data);
    assert!(text.starts_with("HTTP/1."), "{got:?}");
    assert!(text.contains("pod-web-page"), "{got:?}");
    assert!(got.error.is_empty(), "{got:?}");
    let closed = forward(8081);
    assert!(closed.data.is_empty(), "{closed:?}");
    assert!(
        !closed.error.is_empty(),
        "a closed port reports an error: {closed:?}"
    );
    pod.remove();
}

/// A pod that asks for one of the host's namespaces cannot be a VM:
/// RunPodSandbox fails naming why, and nothing is left.
fn host_namespace_is_refused(test: &str, ns: Namespaces, kind: &str) {
    let cri = cri_alone_or_skip!(test);
    let shims = cri.shim_pids();
    let state: Vec<_> = std::fs::read_dir("/run/cocoon")
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let before = cri.list_pods().expect("ListPodSandbox").len();
    let mut config = pod_config(&format!("host{kind}"), ns);
    if ns.network == NamespaceMode::Node {
        // As the kubelet: a host-network pod has the host's name.
        config.hostname.clear();
    }
    let r = cri.run_pod(&handler(), config);
    if handler() == RUNC {
        // The baseline: the same request is valid for a container runtime.
        r.unwrap_or_else(|e| panic!("runc refused a host {kind} pod: {e}"))
            .remove();
        return;
    }
    match r {
        Ok(pod) => {
            let id = pod.id.clone();
            drop(pod);
            panic!(
                "a pod with the host's {kind} namespace ran on {} ({id})",
                handler()
            );
        }
        Err(e) => {
            let m = e.message().to_lowercase();
            eprintln!("refused: {}", e.message());
            assert!(
                m.contains("host") && m.contains(kind),
                "the error names the host {kind} namespace: {e:?}"
            );
        }
    }
    // containerd cleans up after the failed RunPodSandbox on its own
    // time: poll (under load it takes more than a moment).
    let left = || -> Option<String> {
        let pods = cri.list_pods().expect("ListPodSandbox").len();
        if pods != before {
            return Some(format!("{} pods left", pods - before));
        }
        let new_shims: Vec<_> = cri
            .shim_pids()
            .into_iter()
            .filter(|p| !shims.contains(p))
            .collect();
        if !new_shims.is_empty() {
            return Some(format!("shims left: {new_shims:?}"));
        }
        // Pods of other containerds on this host come and go meanwhile: a
        // state directory whose shim serves another containerd is not ours.
        let new_state: Vec<_> = std::fs::read_dir("/run/cocoon")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| !state.contains(n))
                    .filter(|n| !cri.foreign_sandbox(&n.to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        (!new_state.is_empty()).then(|| format!("state left: {new_state:?}"))
    };
    let until = Instant::now() + Duration::from_secs(30);
    let mut found = left();
    while found.is_some() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(250));
        found = left();
    }
    assert_eq!(found, None, "after 30 s");
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn host_network_pod_is_refused() {
    host_namespace_is_refused(
        "host_network_pod_is_refused",
        Namespaces {
            network: NamespaceMode::Node,
            ..Default::default()
        },
        "network",
    );
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn host_pid_pod_is_refused() {
    host_namespace_is_refused(
        "host_pid_pod_is_refused",
        Namespaces {
            pid: NamespaceMode::Node,
            ..Default::default()
        },
        "pid",
    );
}

#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn host_ipc_pod_is_refused() {
    host_namespace_is_refused(
        "host_ipc_pod_is_refused",
        Namespaces {
            ipc: NamespaceMode::Node,
            ..Default::default()
        },
        "ipc",
    );
}

/// StopPodSandbox then RemovePodSandbox of a pod with a running container
/// leave nothing: no shim, VM or daemon, state, mount, or anything in or
/// holding the pod's network namespace.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn stop_and_remove_pod_leave_nothing() {
    let cri = cri_or_skip!("stop_and_remove_pod_leave_nothing");
    let pod = cri
        .run_pod(&handler(), pod_config("leaver", Namespaces::default()))
        .expect("RunPodSandbox");
    pod.start(container_config("box", SLEEPER))
        .expect("container");
    assert!(pod.netns.is_some(), "CRI gave the pod a network namespace");
    let id = pod.id.clone();
    pod.remove();
    assert!(
        !cri.list_pods()
            .expect("ListPodSandbox")
            .iter()
            .any(|p| p.id == id),
        "pod {id} still listed"
    );
}

/// Time from RunPodSandbox to the first container running, per handler,
/// beside runc; median of `COCOON_BENCH_RUNS` (5) interleaved runs.
#[test]
#[ignore = "a benchmark: run it by name"]
fn bench_pod_to_first_container() {
    let cri = cri_alone_or_skip!("bench_pod_to_first_container");
    let runs: usize = std::env::var("COCOON_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let handlers = [RUNC, COCOON, COCOON_MICROVM];
    let mut times = vec![Vec::new(); handlers.len()];
    for _ in 0..runs {
        for (i, handler) in handlers.iter().enumerate() {
            let t = Instant::now();
            let pod = cri
                .run_pod(handler, pod_config("bench", Namespaces::default()))
                .unwrap_or_else(|e| panic!("RunPodSandbox on {handler}: {e}"));
            pod.start(container_config("first", SLEEPER))
                .unwrap_or_else(|e| panic!("container on {handler}: {e}"));
            times[i].push(t.elapsed());
            pod.remove();
        }
    }
    for (handler, t) in handlers.iter().zip(times) {
        let min = *t.iter().min().unwrap();
        let max = *t.iter().max().unwrap();
        println!(
            "{handler:>15}: median {:?} (min {min:?}, max {max:?}, {runs} runs)",
            median(t)
        );
    }
}
