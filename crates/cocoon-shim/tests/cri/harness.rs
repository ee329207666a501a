//! A CRI client for the end-to-end tests: containerd's CRI plugin on the
//! private containerd of `scripts/containerd.sh` (socket in
//! `COCOON_TEST_CONTAINERD`), with pods and containers as guards that stop
//! and remove what they made, and a check that a removed pod left nothing
//! on the host: no shim, VMM or helper daemon, no state directory, no
//! mount, no process in its network namespace, no tap or tc filter in it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

/// The busybox image `scripts/containerd.sh` imports into `k8s.io`.
pub const BUSYBOX: &str = "docker.io/library/busybox:cocoon";
/// The offline pause image (the CRI `sandbox_image`).
pub const PAUSE: &str = "localhost/cocoon/pause:offline";
/// The q35 and microvm flavours, and the runc baseline.
pub const COCOON: &str = "cocoon";
pub const COCOON_MICROVM: &str = "cocoon-microvm";
pub const RUNC: &str = "runc";

/// The handler most tests run on: `cocoon`, or `COCOON_CRI_HANDLER` (running
/// the suite on `runc` tells harness bugs from runtime bugs).
pub fn handler() -> String {
    std::env::var("COCOON_CRI_HANDLER").unwrap_or_else(|_| COCOON.into())
}

/// Tests that look at the whole host (what appeared anywhere while they
/// ran, timings) run alone; the others share the host.
static HOST: RwLock<()> = RwLock::new(());

enum HostGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Connects, or says why this test is skipped. With `COCOON_TEST_REQUIRE`
/// set (as `scripts/test.sh` does) a missing requirement fails the test.
pub fn cri_or_skip(test: &str) -> Option<Cri> {
    let guard = HostGuard::Shared(HOST.read().unwrap_or_else(|e| e.into_inner()));
    connect_or_skip(test, guard)
}

/// As [`cri_or_skip`], for a test that must be the only one running.
pub fn cri_alone_or_skip(test: &str) -> Option<Cri> {
    let guard = HostGuard::Alone(HOST.write().unwrap_or_else(|e| e.into_inner()));
    connect_or_skip(test, guard)
}

fn connect_or_skip(test: &str, guard: HostGuard) -> Option<Cri> {
    match Cri::connect(guard) {
        Ok(c) => Some(c),
        Err(why) => {
            if std::env::var_os("COCOON_TEST_REQUIRE").is_some() {
                panic!("{test}: {why}");
            }
            // Straight to the process's stderr: the test harness captures
            // `eprintln!` of a passing test, and a skip must be seen.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            None
        }
    }
}

pub type Error = tonic::Status;

/// A CRI client with its own runtime: the tests are plain functions and the
/// guards clean up from `Drop`, where nothing can be awaited.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    pub socket: PathBuf,
    // Last: released after everything else of the test.
    _host: HostGuard,
}

impl Cri {
    fn connect(host: HostGuard) -> Result<Self, String> {
        let socket = std::env::var("COCOON_TEST_CONTAINERD").map_err(|_| {
            "COCOON_TEST_CONTAINERD is not set: start containerd with scripts/containerd.sh \
             (scripts/test.sh does)"
                .to_string()
        })?;
        let socket = PathBuf::from(socket);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let path = socket.clone();
        let channel = rt
            .block_on(
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_timeout(Duration::from_secs(5))
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            )
            .map_err(|e| format!("connect to {}: {e}", socket.display()))?;
        let mut cri = Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket,
            _host: host,
        };
        let v = cri
            .rt
            .block_on(cri.runtime.version(VersionRequest::default()))
            .map_err(|e| format!("CRI Version on {}: {e}", cri.socket.display()))?;
        let v = v.into_inner();
        if v.runtime_api_version != "v1" {
            return Err(format!("CRI speaks {}, not v1", v.runtime_api_version));
        }
        for image in [BUSYBOX, PAUSE] {
            if !cri.image_present(image)? {
                return Err(format!(
                    "image {image} is not in containerd's k8s.io namespace \
                     (scripts/containerd.sh imports it)"
                ));
            }
        }
        if let Ok(dir) = std::env::var("COCOON_GUEST_DIR") {
            if !Path::new(&dir).join("initrd.img").is_file() {
                return Err(format!("no guest image in {dir}: run `cocoon image build`"));
            }
        }
        Ok(cri)
    }

    fn image_present(&mut self, image: &str) -> Result<bool, String> {
        let r = self
            .rt
            .block_on(self.images.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            }))
            .map_err(|e| format!("ImageStatus {image}: {e}"))?;
        Ok(r.into_inner().image.is_some())
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn rs(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// RunPodSandbox. The pod is a guard: dropped, it is stopped and removed.
    pub fn run_pod(&self, handler: &str, mut config: PodSandboxConfig) -> Result<Pod<'_>, Error> {
        let logs = tempfile::Builder::new()
            .prefix("cocoon-cri-logs.")
            .tempdir()
            .expect("log directory");
        config.log_directory = logs.path().to_string_lossy().into_owned();
        let t = Instant::now();
        let id = self
            .block_on(self.rs().run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            }))?
            .into_inner()
            .pod_sandbox_id;
        let started_in = t.elapsed();
        let mut pod = Pod {
            cri: self,
            id,
            config,
            netns: None,
            netns_ino: None,
            netns_file: None,
            logs,
            started_in,
            removed: false,
        };
        let (_, info) = pod.status()?;
        pod.netns = info
            .pointer("/runtimeSpec/linux/namespaces")
            .and_then(|n| n.as_array())
            .and_then(|n| {
                n.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
            })
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        pod.netns_ino = pod
            .netns
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()));
        // Held open, the namespace outlives StopPodSandbox (which removes
        // it), so the leftovers check can look inside after the pod.
        pod.netns_file = pod.netns.as_ref().and_then(|p| std::fs::File::open(p).ok());
        Ok(pod)
    }

    pub fn exec_sync(
        &self,
        container: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<Exec, Error> {
        let r = self.block_on(self.rs().exec_sync(ExecSyncRequest {
            container_id: container.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout.as_secs() as i64,
        }))?;
        let r = r.into_inner();
        Ok(Exec {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            code: r.exit_code,
        })
    }

    pub fn container_status(
        &self,
        id: &str,
    ) -> Result<(ContainerStatus, serde_json::Value), Error> {
        let r = self
            .block_on(self.rs().container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let info = r
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok((r.status.unwrap_or_default(), info))
    }

    pub fn container_stats(&self, id: &str) -> Result<ContainerStats, Error> {
        Ok(self
            .block_on(self.rs().container_stats(ContainerStatsRequest {
                container_id: id.into(),
            }))?
            .into_inner()
            .stats
            .unwrap_or_default())
    }

    pub fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), Error> {
        self.block_on(self.rs().stop_container(StopContainerRequest {
            container_id: id.into(),
            timeout: timeout.as_secs() as i64,
        }))?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<(), Error> {
        self.block_on(self.rs().remove_container(RemoveContainerRequest {
            container_id: id.into(),
        }))?;
        Ok(())
    }

    /// UpdateContainerResources.
    pub fn update_resources(&self, id: &str, linux: LinuxContainerResources) -> Result<(), Error> {
        self.block_on(
            self.rs()
                .update_container_resources(UpdateContainerResourcesRequest {
                    container_id: id.into(),
                    linux: Some(linux),
                    ..Default::default()
                }),
        )?;
        Ok(())
    }

    /// The streaming URL of an interactive exec.
    pub fn exec_url(&self, req: ExecRequest) -> Result<String, Error> {
        Ok(self.block_on(self.rs().exec(req))?.into_inner().url)
    }

    /// The streaming URL of a port forward.
    pub fn port_forward_url(&self, pod: &str, ports: &[i32]) -> Result<String, Error> {
        Ok(self
            .block_on(self.rs().port_forward(PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: ports.to_vec(),
            }))?
            .into_inner()
            .url)
    }

    pub fn list_pods(&self) -> Result<Vec<PodSandbox>, Error> {
        Ok(self
            .block_on(
                self.rs()
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
            )?
            .into_inner()
            .items)
    }

    fn stop_pod(&self, id: &str) -> Result<(), Error> {
        self.block_on(self.rs().stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))?;
        Ok(())
    }

    fn remove_pod(&self, id: &str) -> Result<(), Error> {
        self.block_on(self.rs().remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))?;
        Ok(())
    }

    /// Whether sandbox `id` is served by a shim of another containerd.
    pub fn foreign_sandbox(&self, id: &str) -> bool {
        let sock = self.socket.to_string_lossy().into_owned();
        let shim_id = format!("-id {id} ");
        processes().into_iter().any(|(_, c)| {
            c.contains("containerd-shim") && c.contains(&shim_id) && !c.contains(&sock)
        })
    }

    /// Shims of this containerd (their command line names its socket).
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket.to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(_, c)| c.contains("containerd-shim") && c.contains(&sock))
            .map(|(p, _)| p)
            .collect()
    }
}

/// What ExecSync returned.
#[derive(Debug)]
pub struct Exec {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

/// Namespace modes of a pod and its containers.
#[derive(Clone, Copy)]
pub struct Namespaces {
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
}

impl Default for Namespaces {
    /// What the kubelet sets by default: the pod's network and IPC, a PID
    /// namespace per container.
    fn default() -> Self {
        Self {
            network: NamespaceMode::Pod,
            pid: NamespaceMode::Container,
            ipc: NamespaceMode::Pod,
        }
    }
}

impl Namespaces {
    fn option(self) -> NamespaceOption {
        NamespaceOption {
            network: self.network as i32,
            pid: self.pid as i32,
            ipc: self.ipc as i32,
            ..Default::default()
        }
    }
}

/// A pod config as the kubelet would send it (unique name and uid).
pub fn pod_config(name: &str, ns: Namespaces) -> PodSandboxConfig {
    let uid = format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid,
            namespace: "cocoon-test".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(ns.option()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A busybox container config running `cmd`; its log at `<name>.log`.
pub fn container_config(name: &str, cmd: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// A pod sandbox; stopped and removed on drop.
pub struct Pod<'a> {
    pub cri: &'a Cri,
    pub id: String,
    pub config: PodSandboxConfig,
    /// The network namespace CRI made for the pod, and its identity.
    pub netns: Option<PathBuf>,
    netns_ino: Option<(u64, u64)>,
    netns_file: Option<std::fs::File>,
    pub logs: tempfile::TempDir,
    /// How long RunPodSandbox took.
    pub started_in: Duration,
    removed: bool,
}

impl Pod<'_> {
    /// PodSandboxStatus, and the verbose `info` (containerd's sandbox info:
    /// `runtimeSpec`, `pid`, ...).
    pub fn status(&self) -> Result<(PodSandboxStatus, serde_json::Value), Error> {
        let r = self
            .cri
            .block_on(self.cri.rs().pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: self.id.clone(),
                verbose: true,
            }))?
            .into_inner();
        let info = r
            .info
            .get("info")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        Ok((r.status.unwrap_or_default(), info))
    }

    pub fn ip(&self) -> String {
        let (s, _) = self.status().expect("PodSandboxStatus");
        s.network.map(|n| n.ip).unwrap_or_default()
    }

    /// CreateContainer with the pod's namespace modes, then StartContainer.
    pub fn start(&self, mut config: ContainerConfig) -> Result<String, Error> {
        let ns = self
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let linux = config.linux.get_or_insert_with(Default::default);
        let sc = linux.security_context.get_or_insert_with(Default::default);
        if sc.namespace_options.is_none() {
            sc.namespace_options = ns;
        }
        let id = self
            .cri
            .block_on(self.cri.rs().create_container(CreateContainerRequest {
                pod_sandbox_id: self.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.config.clone()),
            }))?
            .into_inner()
            .container_id;
        let started = self
            .cri
            .block_on(self.cri.rs().start_container(StartContainerRequest {
                container_id: id.clone(),
            }));
        if let Err(e) = started {
            let _ = self.cri.remove_container(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// StopPodSandbox + RemovePodSandbox, then checks that nothing is left.
    pub fn remove(self) {
        self.remove_tolerating(&[]);
    }

    /// [`Pod::remove`], where a leftover whose description contains one of
    /// `known` (a gap known and tracked apart) is printed, not failed.
    pub fn remove_tolerating(mut self, known: &[&str]) {
        self.removed = true;
        let stop = self.cri.stop_pod(&self.id);
        let rm = self.cri.remove_pod(&self.id);
        stop.unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", self.id));
        rm.unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", self.id));
        let (tolerated, left): (Vec<String>, Vec<String>) = leftovers(
            &self.id,
            self.netns.as_deref(),
            self.netns_ino,
            self.netns_file.as_ref(),
        )
        .into_iter()
        .partition(|l| known.iter().any(|k| l.contains(k)));
        if !tolerated.is_empty() {
            eprintln!("KNOWN LEFTOVER of pod {}: {tolerated:#?}", self.id);
        }
        assert!(left.is_empty(), "pod {} left: {left:#?}", self.id);
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let stop = self.cri.stop_pod(&self.id);
        let rm = self.cri.remove_pod(&self.id);
        let left = leftovers(
            &self.id,
            self.netns.as_deref(),
            self.netns_ino,
            self.netns_file.as_ref(),
        );
        // A test that already failed reports its own failure: a second
        // panic here would abort the whole test binary.
        if std::thread::panicking() {
            if let Err(e) = stop.and(rm) {
                eprintln!("cleanup of pod {}: {e}", self.id);
            }
            if !left.is_empty() {
                eprintln!("pod {} left: {left:#?}", self.id);
            }
            return;
        }
        stop.unwrap_or_else(|e| panic!("StopPodSandbox {}: {e}", self.id));
        rm.unwrap_or_else(|e| panic!("RemovePodSandbox {}: {e}", self.id));
        assert!(left.is_empty(), "pod {} left: {left:#?}", self.id);
    }
}

pub use crate::common::processes;

/// What sandbox `id` left on the host, waiting up to 10 s for it to go.
fn leftovers(
    id: &str,
    netns: Option<&Path>,
    netns_ino: Option<(u64, u64)>,
    netns_file: Option<&std::fs::File>,
) -> Vec<String> {
    let state = format!("/run/cocoon/{id}");
    let vm_name = format!("cocoon-{id} ");
    let shim_id = format!("-id {id}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = Vec::new();
        for (pid, c) in processes() {
            if c.contains(&format!("{state}/"))
                || c.contains(&vm_name)
                || (c.contains("containerd-shim") && c.contains(&shim_id))
            {
                left.push(format!("process {pid}: {c}"));
                continue;
            }
            if let Some((dev, ino)) = netns_ino {
                let held = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| m.dev() == dev && m.ino() == ino);
                if held {
                    left.push(format!("process {pid} in the pod's netns: {c}"));
                }
            }
        }
        left.extend(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(id))
                .map(|l| format!("mount: {l}")),
        );
        if Path::new(&state).exists() {
            left.push(format!("directory {state}"));
        }
        if let Some(ns) = netns.filter(|p| p.exists()) {
            left.push(format!("network namespace {}", ns.display()));
        }
        // Inside the namespace, through the fd held since RunPodSandbox
        // (its path is gone once CRI removed it): no tap, no tc filter, no
        // port-forward redirect.
        let inside = netns_file
            // This process's pid, not `self`: that would be nsenter's.
            .map(|f| PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd())))
            .or_else(|| netns.filter(|p| p.exists()).map(Path::to_path_buf));
        if let Some(ns) = inside {
            let o = std::process::Command::new("nsenter")
                .arg(format!("--net={}", ns.display()))
                .args([
                    "sh",
                    "-c",
                    "ip -d -o link show; tc qdisc show; iptables -t nat -S OUTPUT",
                ])
                .output();
            match &o {
                Ok(o) if o.status.success() => {}
                // A check that cannot look must not pass.
                _ => left.push(format!(
                    "could not look inside the netns {}: {o:?}",
                    ns.display()
                )),
            }
            if let Ok(o) = o {
                for l in String::from_utf8_lossy(&o.stdout).lines() {
                    if l.contains(" tun ")
                        || l.contains("tap")
                        || l.contains("ingress")
                        || l.contains("REDIRECT")
                    {
                        left.push(format!("in the netns: {l}"));
                    }
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for a container to reach `want` (ContainerState), up to `limit`.
pub fn wait_state(cri: &Cri, id: &str, want: ContainerState, limit: Duration) -> ContainerStatus {
    let deadline = Instant::now() + limit;
    loop {
        let (s, _) = cri.container_status(id).expect("ContainerStatus");
        if s.state == want as i32 || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd` in the container until `ok` accepts its result, up to `limit`
/// (servers take a moment to listen, files to appear).
pub fn exec_until(
    cri: &Cri,
    container: &str,
    cmd: &[&str],
    limit: Duration,
    ok: impl Fn(&Exec) -> bool,
) -> Exec {
    let deadline = Instant::now() + limit;
    loop {
        let r = cri.exec_sync(container, cmd, Duration::from_secs(30));
        match r {
            Ok(e) if ok(&e) || Instant::now() > deadline => return e,
            Err(e) if Instant::now() > deadline => panic!("ExecSync {cmd:?}: {e}"),
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// The median of some durations.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
