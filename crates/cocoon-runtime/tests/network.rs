//! Pod networking with real parts: network namespaces made with `ip
//! netns`, a veth pair between a pod netns (`eth0`, as CNI leaves it) and
//! a peer netns standing in for the node, and, in the test that boots a
//! VM, a container in the guest that serves HTTP on the pod's address and
//! reaches the peer. Both ends live in namespaces the test makes, so
//! nothing of the host's own network is touched. The tests that boot a VM
//! are `#[ignore]`d in a plain `cargo test`; the others need root only.
//! A host without what they need (root, `ip`, `tc`, `/dev/net/tun`) skips
//! them, saying so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cocoon_protocols::Id;
use cocoon_runtime::network::Network;
use cocoon_runtime::{Sandbox, SandboxOptions};
use oci_spec::runtime::{Capability, LinuxCapabilitiesBuilder, Spec};

/// Why this host cannot run these tests, if it cannot.
fn missing_requirement() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, taps, tc)".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("needs iproute2's `{tool}`"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun".into());
    }
    None
}

macro_rules! require_host {
    () => {
        if let Some(why) = missing_requirement() {
            // scripts/test.sh provides everything: there, a missing
            // requirement is a failure, not a skip.
            if std::env::var_os("COCOON_TEST_REQUIRE").is_some() {
                panic!("requirement missing: {why}");
            }
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
            return;
        }
    };
}

/// Runs a command; its stdout, or a panic with its stderr.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A pod netns with `eth0` (10.X.Y.2/24, fd00:X:Y::2/64, MTU 1400, default
/// routes via the peer, one permanent neighbour) and a peer netns with
/// the other end (10.X.Y.1, fd00:X:Y::1). Both are deleted on drop, which
/// also removes the veth pair, whatever the test did.
struct TestNet {
    pod: String,
    peer: String,
    prefix: String,
    prefix6: String,
}

impl TestNet {
    fn create() -> Self {
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        // Each run has its own namespaces, so the subnet cannot collide;
        // it varies anyway, to tell runs apart in logs.
        let (x, y) = (100 + (pid % 100) as u8, 1 + (n % 200) as u8);
        let net = Self {
            pod: format!("cocoon-test-{pid}-{n}-pod"),
            peer: format!("cocoon-test-{pid}-{n}-peer"),
            prefix: format!("10.{x}.{y}"),
            prefix6: format!("fd00:{x}:{y}"),
        };
        run("ip", &["netns", "add", &net.pod]);
        run("ip", &["netns", "add", &net.peer]);
        let (pod, peer) = (net.pod.as_str(), net.peer.as_str());
        let (p4, p6) = (net.prefix.as_str(), net.prefix6.as_str());
        let cmds: Vec<Vec<String>> = [
            format!("-n {pod} link add eth0 type veth peer name peer0 netns {peer}"),
            format!("-n {pod} link set eth0 mtu 1400"),
            format!("-n {peer} link set peer0 mtu 1400"),
            format!("-n {pod} addr add {p4}.2/24 dev eth0"),
            format!("-n {pod} addr add {p6}::2/64 dev eth0 nodad"),
            format!("-n {peer} addr add {p4}.1/24 dev peer0"),
            format!("-n {peer} addr add {p6}::1/64 dev peer0 nodad"),
            format!("-n {pod} link set lo up"),
            format!("-n {pod} link set eth0 up"),
            format!("-n {peer} link set lo up"),
            format!("-n {peer} link set peer0 up"),
            format!("-n {pod} route add default via {p4}.1"),
            format!("-n {pod} -6 route add default via {p6}::1"),
            format!("-n {pod} neigh add {p4}.77 lladdr 02:00:00:00:00:77 dev eth0 nud permanent"),
        ]
        .iter()
        .map(|c| c.split(' ').map(str::to_string).collect())
        .collect();
        for c in cmds {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            run("ip", &args);
        }
        net
    }

    fn pod_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.pod)
    }

    fn peer_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.peer)
    }

    /// `ip -n <pod> <args>`
    fn ip(&self, args: &str) -> String {
        let mut a = vec!["-n", &self.pod];
        a.extend(args.split(' '));
        run("ip", &a)
    }

    /// `tc -n <pod> <args>`
    fn tc(&self, args: &str) -> String {
        let mut a = vec!["-n", &self.pod];
        a.extend(args.split(' '));
        run("tc", &a)
    }

    /// Nothing of ours is left in the pod netns, and CNI's eth0 is.
    fn assert_as_found(&self) {
        let links = self.ip("link show");
        assert!(!links.contains("_cocoon"), "a tap is left:\n{links}");
        assert!(links.contains("eth0"), "eth0 is gone:\n{links}");
        let qdiscs = self.tc("qdisc show");
        assert!(
            !qdiscs.contains("ingress"),
            "an ingress qdisc is left:\n{qdiscs}"
        );
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread inside `netns` (setns moves one thread only).
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

#[test]
fn setup_redirects_both_ways_and_teardown_leaves_the_netns_as_found() {
    require_host!();
    let net = TestNet::create();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    let mut network = rt.block_on(Network::setup(&net.pod_path())).unwrap();
    eprintln!("network set up in {:?}", t.elapsed());

    let plan = network.plan().clone();
    assert_eq!(plan.interfaces.len(), 1, "{plan:?}");
    let eth0 = &plan.interfaces[0];
    assert_eq!((eth0.name.as_str(), eth0.mtu), ("eth0", 1400));
    let addrs: Vec<String> = eth0.addresses.iter().map(ToString::to_string).collect();
    assert_eq!(
        addrs,
        [
            format!("{}.2/24", net.prefix),
            format!("{}::2/64", net.prefix6)
        ]
    );
    let routes: Vec<String> = plan
        .routes
        .iter()
        .map(|r| {
            format!(
                "{} via {:?}",
                r.destination,
                r.gateway.map(|g| g.to_string())
            )
        })
        .collect();
    assert_eq!(
        routes,
        [
            format!("0.0.0.0/0 via Some(\"{}.1\")", net.prefix),
            format!("::/0 via Some(\"{}::1\")", net.prefix6),
        ],
        "kernel routes are the guest kernel's to make"
    );
    assert_eq!(plan.neighbours.len(), 1);
    assert_eq!(plan.neighbours[0].mac.to_string(), "02:00:00:00:00:77");

    let tap = net.ip("link show tap0_cocoon");
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    for (dev, to) in [("eth0", "tap0_cocoon"), ("tap0_cocoon", "eth0")] {
        let f = net.tc(&format!("filter show dev {dev} ingress"));
        assert!(f.contains("protocol all"), "{dev}: {f}");
        assert!(
            f.contains(&format!("mirred (Egress Redirect to device {to})")),
            "{dev}: {f}"
        );
    }

    // A second pod on the same interfaces is refused, and harms nothing.
    let e = rt.block_on(Network::setup(&net.pod_path())).unwrap_err();
    let msg = cocoon_runtime::error_chain(&e);
    assert!(msg.contains(&net.pod) && msg.contains("eth0"), "{msg}");
    assert!(net
        .tc("filter show dev eth0 ingress")
        .contains("tap0_cocoon"));

    // The taps go with their last fd (QEMU's, in a real pod).
    drop(network.nics());
    assert!(!net.ip("link show").contains("tap0_cocoon"));
    let t = Instant::now();
    rt.block_on(network.teardown()).unwrap();
    eprintln!("network torn down in {:?}", t.elapsed());
    net.assert_as_found();

    // Dropped without a teardown (an error path): the same.
    let network = rt.block_on(Network::setup(&net.pod_path())).unwrap();
    drop(network);
    net.assert_as_found();

    // An owner killed outright: its VM (so the taps) died with it, and its
    // record in the state directory is what the next owner undoes.
    let mut network = rt.block_on(Network::setup(&net.pod_path())).unwrap();
    let record = network.record().unwrap();
    drop(network.nics());
    std::mem::forget(network);
    assert!(net.tc("qdisc show dev eth0").contains("ingress"));
    rt.block_on(cocoon_runtime::network::teardown_recorded(&record))
        .unwrap();
    net.assert_as_found();
}

#[test]
fn the_hosts_own_netns_and_a_missing_one_are_refused() {
    require_host!();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(Network::setup(Path::new("/proc/self/ns/net")))
        .unwrap_err();
    assert!(
        matches!(e, cocoon_runtime::network::Error::HostNetns { .. }),
        "{e:?}"
    );
    let missing = Path::new("/run/netns/cocoon-test-no-such-netns");
    let e = rt.block_on(Network::setup(missing)).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");

    // Through the sandbox: an error before any VM, and no state left.
    let state = tempfile::tempdir().unwrap();
    let mut config = cocoon_config::Config::default();
    config.runtime.state_dir = state.path().to_path_buf();
    let options = SandboxOptions {
        netns: Some(missing.to_path_buf()),
        ..Default::default()
    };
    let id = Id::sandbox("net-missing").unwrap();
    let hv = cocoon_runtime::hypervisor(&config);
    let e = match rt.block_on(Sandbox::start_with(&id, &config, &options, hv.as_ref())) {
        Ok(_) => panic!("a sandbox started on a missing netns"),
        Err(e) => e,
    };
    let p: cocoon_protocols::Error = e.into();
    assert!(
        matches!(p, cocoon_protocols::Error::FailedPrecondition(_)),
        "{p:?}"
    );
    let left: Vec<_> = std::fs::read_dir(state.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "state left: {left:?}");
}

const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "mkdir", "ip", "ping", "nc", "httpd", "sleep",
];

fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "www"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("static busybox at /bin/busybox (apt-get install busybox-static)");
    for a in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    root
}

/// The guest's side: records its network, pings the peer, tells the peer
/// it is there over TCP, then serves HTTP on the pod's addresses.
fn server_spec(net: &TestNet) -> Spec {
    let p4 = &net.prefix;
    let script = format!(
        r#"
{{ ip addr; ip route; ip -6 route; ip neigh; cat /sys/class/net/eth0/mtu; }} > /www/net.txt 2>&1
ping -c 3 -W 5 {p4}.1 > /www/ping.txt 2>&1 && echo ping-ok >> /www/ping.txt
echo hello-from-the-guest > /www/index.html
i=0
while [ $i -lt 150 ]; do echo guest-was-here | nc {p4}.1 9000 && break; i=$((i+1)); sleep 0.2; done
exec httpd -f -p 8080 -h /www
"#
    );
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec!["sh".into(), "-c".into(), script]));
    // ping needs a raw socket.
    let caps: std::collections::HashSet<Capability> = [
        Capability::NetRaw,
        Capability::NetBindService,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    process.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .build()
            .unwrap(),
    ));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec
}

/// One HTTP/1.0 GET; the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run with --include-ignored"]
async fn a_pod_serves_and_reaches_the_node_through_its_taps() {
    require_host!();
    let net = TestNet::create();
    let tmp = tempfile::tempdir().unwrap();
    let guest = PathBuf::from(
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into()),
    );
    let mut config = cocoon_config::Config::default();
    config.guest.kernel = guest.join("vmlinuz");
    config.guest.initrd = guest.join("initrd.img");
    config.guest.dir = guest;
    config.hypervisor.boot_timeout = Duration::from_secs(90);
    config.runtime.state_dir = tmp.path().join("state");

    // The node's side listens before the guest exists.
    let listen: SocketAddr = format!("{}.1:9000", net.prefix).parse().unwrap();
    let listener = in_netns(&net.peer_path(), move || TcpListener::bind(listen).unwrap());
    listener.set_nonblocking(true).unwrap();
    let heard = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            match listener.accept() {
                Ok((mut c, from)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut b = [0u8; 64];
                    let n = c.read(&mut b).unwrap_or(0);
                    return Some((from, String::from_utf8_lossy(&b[..n]).into_owned()));
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(_) => return None,
            }
        }
    });

    let options = SandboxOptions {
        netns: Some(net.pod_path()),
        ..Default::default()
    };
    let id = Id::sandbox(&format!("net-e2e-{}", std::process::id())).unwrap();
    let hv = cocoon_runtime::hypervisor(&config);
    let t = Instant::now();
    let mut sandbox = Sandbox::start_with(&id, &config, &options, hv.as_ref())
        .await
        .expect("sandbox starts with the pod network");
    eprintln!("sandbox with network up in {:?}", t.elapsed());
    // While the VM runs, QEMU holds the tap.
    assert!(net.ip("link show").contains("tap0_cocoon"));

    let cid = Id::container("web").unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let c = sandbox
        .create_container(&cid, server_spec(&net), &rootfs, false)
        .await
        .expect("container created");
    c.close_stdin(None).await.unwrap();
    c.start().await.expect("container started");

    // The node fetches from the pod's address, through veth and tap.
    let pod_addr: SocketAddr = format!("{}.2:8080", net.prefix).parse().unwrap();
    let first = in_netns(&net.peer_path(), move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            match http_get(pod_addr, "/index.html") {
                Ok(body) if body.contains("hello") => return Ok(body),
                r if Instant::now() >= deadline => return Err(format!("{r:?}")),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    let net_txt = std::fs::read_to_string(rootfs.join("www/net.txt")).unwrap_or_default();
    let ping_txt = std::fs::read_to_string(rootfs.join("www/ping.txt")).unwrap_or_default();
    let body = first.unwrap_or_else(|e| {
        panic!(
            "no HTTP answer from the pod: {e}\nguest network:\n{net_txt}\nguest ping:\n{ping_txt}"
        )
    });
    assert_eq!(body.trim(), "hello-from-the-guest");

    // What the guest was given.
    for want in [
        format!("inet {}.2/24", net.prefix),
        format!("inet6 {}::2/64", net.prefix6),
        format!("default via {}.1 dev eth0", net.prefix),
        format!("default via {}::1 dev eth0", net.prefix6),
        "mtu 1400".into(),
        "lo: <LOOPBACK,UP".into(),
    ] {
        assert!(
            net_txt.contains(&want),
            "{want:?} not in the guest's network:\n{net_txt}"
        );
    }
    let neighbour = format!("{}.77 dev eth0 lladdr 02:00:00:00:00:77 ", net.prefix);
    assert!(
        net_txt
            .lines()
            .any(|l| l.starts_with(&neighbour) && l.trim_end().ends_with("PERMANENT")),
        "no permanent neighbour {neighbour:?} in the guest's network:\n{net_txt}"
    );
    // The guest reaches the node: ICMP, and TCP from the pod's address.
    assert!(ping_txt.contains("ping-ok"), "guest ping:\n{ping_txt}");
    let (from, said) = heard
        .join()
        .unwrap()
        .expect("the guest connected to the node");
    assert_eq!(from.ip().to_string(), format!("{}.2", net.prefix));
    assert_eq!(said.trim(), "guest-was-here");

    // Measures: HTTP fetches (v4, v6) and ping RTT from the node.
    let pod6: SocketAddr = format!("[{}::2]:8080", net.prefix6).parse().unwrap();
    let times = in_netns(&net.peer_path(), move || {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            assert!(http_get(pod_addr, "/index.html").unwrap().contains("hello"));
            v4.push(t.elapsed());
            let t = Instant::now();
            assert!(http_get(pod6, "/index.html").unwrap().contains("hello"));
            v6.push(t.elapsed());
        }
        (v4, v6)
    });
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "HTTP GET through the taps, median of 20: IPv4 {:?}, IPv6 {:?}",
        median(times.0),
        median(times.1)
    );
    let ping = run(
        "ip",
        &[
            "netns",
            "exec",
            &net.peer,
            "busybox",
            "ping",
            "-c",
            "5",
            "-W",
            "2",
            &format!("{}.2", net.prefix),
        ],
    );
    eprintln!(
        "node -> guest ping: {}",
        ping.lines().last().unwrap_or_default()
    );

    sandbox.remove_container(&cid).await;
    sandbox.stop().await;
    net.assert_as_found();
    let left: Vec<_> = std::fs::read_dir(&config.runtime.state_dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left behind: {left:?}");
}
