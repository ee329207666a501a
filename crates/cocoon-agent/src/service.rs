//! The agent service: containers and processes, driven over ttrpc.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use cocoon_protocols::agent::*;
use cocoon_protocols::agent_ttrpc;
use libcgroups::common::{CgroupManager, ControllerOpt};
use libcontainer::container::Container;
use tokio::sync::{mpsc, watch};
use ttrpc::r#async::TtrpcContext;

use crate::reaper::Reaper;
use crate::stdio::{self, StdioTable};

/// libcontainer's state directory.
const CONTAINER_ROOT: &str = "/run/cocoon/containers";
/// Where bundles (config.json, exec process files) are written.
const BUNDLE_ROOT: &str = "/run/cocoon/bundles";
/// Parent cgroup of every container.
const CGROUP_PARENT: &str = "/cocoon";

/// An error with the gRPC code the host should see.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        let code = match e {
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => ttrpc::Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

type AResult<T> = Result<T, AgentError>;

fn internal(what: impl std::fmt::Display) -> impl FnOnce(String) -> AgentError {
    move |e| AgentError::Internal(format!("{what}: {e}"))
}

/// How a process ended.
#[derive(Clone, Copy)]
struct Exit {
    status: i32,
    at_nanos: i64,
    oom_killed: bool,
}

/// OOM kills already reported, per container: the poller and the exit path
/// each report a kill once.
#[derive(Clone, Default)]
struct OomLedger(Arc<Mutex<HashMap<String, u64>>>);

impl OomLedger {
    /// Whether the container has OOM kills not yet reported (and marks them reported).
    fn take_new(&self, id: &str) -> bool {
        let n = read_oom_kills(id);
        let mut m = self.0.lock().unwrap();
        let before = m.insert(id.to_string(), n).unwrap_or(0);
        n > before
    }

    fn retain(&self, ids: &[String]) {
        self.0.lock().unwrap().retain(|k, _| ids.contains(k));
    }
}

/// One process: a container's init (exec id "") or an exec.
struct Process {
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    pty_master: Option<Arc<OwnedFd>>,
}

struct ContainerEntry {
    bundle: PathBuf,
    processes: HashMap<String, Process>,
}

pub struct AgentService {
    reaper: Reaper,
    stdio: StdioTable,
    containers: Mutex<HashMap<String, ContainerEntry>>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    oom_tx: mpsc::Sender<String>,
    oom_ledger: OomLedger,
}

/// Starts the reaper and serves the agent and stream ports until powered off.
pub async fn serve() -> anyhow::Result<()> {
    let reaper = Reaper::default();
    reaper.start()?;
    let stdio = StdioTable::default();
    let (oom_tx, oom_rx) = mpsc::channel(64);
    let service = Arc::new(AgentService {
        reaper,
        stdio: stdio.clone(),
        containers: Mutex::new(HashMap::new()),
        oom_rx: tokio::sync::Mutex::new(oom_rx),
        oom_tx,
        oom_ledger: OomLedger::default(),
    });
    tokio::spawn(stdio.serve(cocoon_protocols::STREAM_PORT));
    tokio::spawn(watch_oom(service.clone()));
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        libc::VMADDR_CID_ANY,
        cocoon_protocols::AGENT_PORT,
    ))?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::from(listener))
        .register_service(agent_ttrpc::create_agent(service));
    server.start().await?;
    tracing::info!("agent ready on vsock port {}", cocoon_protocols::AGENT_PORT);
    std::future::pending::<()>().await;
    Ok(())
}

fn check_id(kind: &str, id: &str) -> AResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "invalid {kind} id {id:?}"
        )))
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn cgroup_manager(container_id: &str) -> AResult<libcgroups::common::AnyCgroupManager> {
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: Path::new(CGROUP_PARENT).join(container_id),
        systemd_cgroup: false,
        container_name: container_id.into(),
    })
    .map_err(|e| AgentError::Internal(format!("cgroup of container {container_id}: {e}")))
}

/// Runs a libcontainer operation on a loaded container, off the async threads.
async fn with_container<T: Send + 'static>(
    id: &str,
    what: &'static str,
    f: impl FnOnce(&mut Container) -> Result<T, libcontainer::error::LibcontainerError> + Send + 'static,
) -> AResult<T> {
    let root = Path::new(CONTAINER_ROOT).join(id);
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = Container::load(root)
            .map_err(|e| AgentError::NotFound(format!("container {id}: {e}")))?;
        f(&mut c).map_err(|e| AgentError::FailedPrecondition(format!("{what} container {id}: {e}")))
    })
    .await
    .map_err(|e| AgentError::Internal(e.to_string()))?
}

impl AgentService {
    /// Runs the helper with the container's stdio on fds 3-5; returns the
    /// pid it prints.
    async fn run_helper(
        &self,
        op: &str,
        id: &str,
        path: &Path,
        fds: [OwnedFd; 3],
        console: Option<&Path>,
    ) -> AResult<i32> {
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg(crate::helper::ARG)
            .arg(op)
            .arg(id)
            .arg(path)
            .arg(CONTAINER_ROOT);
        if let Some(c) = console {
            cmd.arg(c);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: dup2 is async-signal-safe; the source fds stay open in the
        // parent (owned by `fds`) until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                for (src, dst) in raw.iter().zip(crate::helper::STDIO_FDS) {
                    if libc::dup2(*src, dst) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let (mut child, status) = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|e| AgentError::Internal(format!("spawn helper: {e}")))?;
        drop(fds);
        let out = child.stdout.take();
        let err = child.stderr.take();
        let (stdout, stderr) = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut o = String::new();
            let mut e = String::new();
            if let Some(mut s) = out {
                let _ = s.read_to_string(&mut o);
            }
            if let Some(mut s) = err {
                let _ = s.read_to_string(&mut e);
            }
            (o, e)
        })
        .await
        .map_err(|e| AgentError::Internal(e.to_string()))?;
        let code = status.await.unwrap_or(-1);
        if code != 0 {
            return Err(AgentError::Internal(stderr.trim().to_string()));
        }
        stdout
            .trim()
            .parse()
            .map_err(|_| AgentError::Internal(format!("helper printed {stdout:?}")))
    }

    /// Creates a process through the helper: with pipes, or with a terminal
    /// made in the container and received on `console`.
    async fn start_process(
        &self,
        op: &str,
        id: &str,
        path: &Path,
        terminal: bool,
        console: PathBuf,
    ) -> AResult<(i32, stdio::HostEnds, Option<OwnedFd>)> {
        if !terminal {
            let made = stdio::pipes().map_err(|e| internal("stdio pipes")(e.to_string()))?;
            let pid = self.run_helper(op, id, path, made.container, None).await?;
            return Ok((pid, made.host, None));
        }
        let socket = stdio::ConsoleSocket::listen(console.clone()).map_err(|e| {
            internal(format!("console socket {}", console.display()))(e.to_string())
        })?;
        let null = || {
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| internal("/dev/null")(e.to_string()))
        };
        let pid = self
            .run_helper(
                op,
                id,
                path,
                [null()?, null()?, null()?],
                Some(socket.path()),
            )
            .await?;
        let made = tokio::task::spawn_blocking(move || socket.receive())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?
            .map_err(|e| internal(format!("terminal of {id}"))(e.to_string()))?;
        Ok((pid, made.host, made.pty_master))
    }

    /// Starts watching `pid` and records the process.
    fn track(&self, container_id: &str, exec_id: &str, pid: i32, pty: Option<OwnedFd>) {
        let (tx, rx) = watch::channel(None);
        let exited = self.reaper.watch(pid);
        let ledger = self.oom_ledger.clone();
        let init_of = exec_id.is_empty().then(|| container_id.to_string());
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(255);
            let at_nanos = now_nanos();
            // Read before anything can remove the cgroup; the poller may
            // not have looked since the kill.
            let oom_killed = init_of.is_some_and(|id| ledger.take_new(&id));
            let _ = tx.send(Some(Exit {
                status,
                at_nanos,
                oom_killed,
            }));
        });
        let mut map = self.containers.lock().unwrap();
        if let Some(c) = map.get_mut(container_id) {
            c.processes.insert(
                exec_id.into(),
                Process {
                    pid,
                    exit: rx,
                    pty_master: pty.map(Arc::new),
                },
            );
        }
    }

    fn process<T>(
        &self,
        container_id: &str,
        exec_id: &str,
        f: impl FnOnce(&Process) -> T,
    ) -> AResult<T> {
        let map = self.containers.lock().unwrap();
        let c = map
            .get(container_id)
            .ok_or_else(|| AgentError::NotFound(format!("container {container_id} not found")))?;
        let p = c.processes.get(exec_id).ok_or_else(|| {
            AgentError::NotFound(format!(
                "process {exec_id:?} of container {container_id} not found"
            ))
        })?;
        Ok(f(p))
    }

    fn exists(&self, container_id: &str) -> AResult<()> {
        self.process(container_id, "", |_| ())
    }

    async fn create_container(
        &self,
        req: CreateContainerRequest,
    ) -> AResult<CreateContainerResponse> {
        let id = req.container_id.clone();
        check_id("container", &id)?;
        let mut spec: oci_spec::runtime::Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI spec of container {id}: {e}")))?;
        let root = spec.root().clone().ok_or_else(|| {
            AgentError::InvalidArgument(format!("OCI spec of container {id} has no root"))
        })?;
        let rootfs = Path::new(cocoon_protocols::GUEST_SHARE_DIR)
            .join(root.path().strip_prefix("/").unwrap_or(root.path()));
        if !rootfs.is_dir() {
            return Err(AgentError::InvalidArgument(format!(
                "rootfs {} of container {id} is not a directory",
                rootfs.display()
            )));
        }
        let mut root = root;
        root.set_path(rootfs);
        spec.set_root(Some(root));
        if let Some(p) = spec.process().clone() {
            let mut p = p;
            p.set_terminal(Some(req.terminal));
            spec.set_process(Some(p));
        }
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(Some(Path::new(CGROUP_PARENT).join(&id)));
        // The guest runs cgroup v2 whatever the host runs; with a cgroup
        // namespace the container sees its own cgroup at /sys/fs/cgroup.
        let mut namespaces = linux.namespaces().clone().unwrap_or_default();
        if !namespaces
            .iter()
            .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup)
        {
            let mut ns = oci_spec::runtime::LinuxNamespace::default();
            ns.set_typ(oci_spec::runtime::LinuxNamespaceType::Cgroup);
            namespaces.push(ns);
        }
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
        // A spec written for a cgroup v1 host asks for a v1 `cgroup` mount;
        // the guest has only the v2 hierarchy.
        if let Some(mounts) = spec.mounts().clone() {
            let mounts = mounts
                .into_iter()
                .map(|mut m| {
                    if m.typ().as_deref() == Some("cgroup") {
                        m.set_typ(Some("cgroup2".into()));
                        m.set_source(Some("cgroup2".into()));
                    }
                    m
                })
                .collect();
            spec.set_mounts(Some(mounts));
        }

        {
            let mut map = self.containers.lock().unwrap();
            if map.contains_key(&id) {
                return Err(AgentError::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
            map.insert(
                id.clone(),
                ContainerEntry {
                    bundle: Path::new(BUNDLE_ROOT).join(&id),
                    processes: HashMap::new(),
                },
            );
        }
        let result = self.create_in_bundle(&id, &spec, req.terminal).await;
        if result.is_err() {
            self.containers.lock().unwrap().remove(&id);
            let _ = std::fs::remove_dir_all(Path::new(BUNDLE_ROOT).join(&id));
            let _ = std::fs::remove_dir_all(Path::new(CONTAINER_ROOT).join(&id));
        }
        result
    }

    async fn create_in_bundle(
        &self,
        id: &str,
        spec: &oci_spec::runtime::Spec,
        terminal: bool,
    ) -> AResult<CreateContainerResponse> {
        let bundle = Path::new(BUNDLE_ROOT).join(id);
        std::fs::create_dir_all(&bundle)
            .map_err(|e| internal(format!("create {}", bundle.display()))(e.to_string()))?;
        std::fs::create_dir_all(CONTAINER_ROOT)
            .map_err(|e| internal(CONTAINER_ROOT)(e.to_string()))?;
        spec.save(bundle.join("config.json"))
            .map_err(|e| internal("write config.json")(e.to_string()))?;
        let console = bundle.join("console.sock");
        let (pid, host, pty) = self
            .start_process("create", id, &bundle, terminal, console)
            .await?;
        self.stdio.insert(id, "", host);
        self.track(id, "", pid, pty);
        tracing::info!(container = id, pid, "created");
        Ok(CreateContainerResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn exec_process(&self, req: ExecProcessRequest) -> AResult<ExecProcessResponse> {
        let (cid, eid) = (req.container_id.clone(), req.exec_id.clone());
        check_id("exec", &eid)?;
        let bundle = {
            let map = self.containers.lock().unwrap();
            let c = map
                .get(&cid)
                .ok_or_else(|| AgentError::NotFound(format!("container {cid} not found")))?;
            if c.processes.contains_key(&eid) {
                return Err(AgentError::AlreadyExists(format!(
                    "exec {eid} already exists in container {cid}"
                )));
            }
            if c.processes
                .get("")
                .is_some_and(|p| p.exit.borrow().is_some())
            {
                return Err(AgentError::FailedPrecondition(format!(
                    "container {cid} is not running"
                )));
            }
            c.bundle.clone()
        };
        let mut process: oci_spec::runtime::Process = serde_json::from_slice(&req.oci_process_json)
            .map_err(|e| AgentError::InvalidArgument(format!("OCI process of exec {eid}: {e}")))?;
        process.set_terminal(Some(req.terminal));
        let path = bundle.join(format!("exec-{eid}.json"));
        std::fs::write(&path, serde_json::to_vec(&process).unwrap_or_default())
            .map_err(|e| internal(format!("write {}", path.display()))(e.to_string()))?;
        let console = bundle.join(format!("console-{eid}.sock"));
        let started = self
            .start_process("exec", &cid, &path, req.terminal, console)
            .await;
        let _ = std::fs::remove_file(&path);
        let (pid, host, pty) = started?;
        self.stdio.insert(&cid, &eid, host);
        self.track(&cid, &eid, pid, pty);
        tracing::info!(container = %cid, exec = %eid, pid, "exec");
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn wait_process(&self, req: ProcessRequest) -> AResult<WaitProcessResponse> {
        let mut rx = self.process(&req.container_id, &req.exec_id, |p| p.exit.clone())?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| AgentError::Internal("process watch closed".into()))?
            .unwrap_or(Exit {
                status: 255,
                at_nanos: 0,
                oom_killed: false,
            });
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: exit.at_nanos,
            oom_killed: exit.oom_killed,
            ..Default::default()
        })
    }

    async fn signal_process(&self, req: SignalProcessRequest) -> AResult<()> {
        let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
            .map_err(|_| AgentError::InvalidArgument(format!("invalid signal {}", req.signal)))?;
        let (pid, exited) = self.process(&req.container_id, &req.exec_id, |p| {
            (p.pid, p.exit.borrow().is_some())
        })?;
        if req.all {
            let pids = cgroup_manager(&req.container_id)?
                .get_all_pids()
                .map_err(|e| internal("list pids")(e.to_string()))?;
            for p in pids {
                let _ = nix::sys::signal::kill(p, sig);
            }
            return Ok(());
        }
        if exited {
            return Err(AgentError::NotFound(format!(
                "process {pid} of container {} has exited",
                req.container_id
            )));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| AgentError::Internal(format!("signal {sig} to pid {pid}: {e}")))
    }

    /// A libcontainer lifecycle operation on a known container.
    async fn lifecycle(
        &self,
        id: &str,
        what: &'static str,
        f: impl FnOnce(&mut Container) -> Result<(), libcontainer::error::LibcontainerError>
            + Send
            + 'static,
    ) -> AResult<Empty> {
        self.exists(id)?;
        with_container(id, what, f).await.map(|_| Empty::new())
    }

    async fn remove_container(&self, id: &str) -> AResult<()> {
        self.exists(id)?;
        let root = Path::new(CONTAINER_ROOT).join(id);
        if root.exists() {
            with_container(id, "remove", |c| c.delete(true)).await?;
        }
        let entry = self.containers.lock().unwrap().remove(id);
        self.stdio.remove_container(id);
        if let Some(e) = entry {
            let _ = std::fs::remove_dir_all(e.bundle);
        }
        tracing::info!(container = id, "removed");
        Ok(())
    }

    fn stats(&self, id: &str) -> AResult<StatsContainerResponse> {
        self.exists(id)?;
        let s = cgroup_manager(id)?
            .stats()
            .map_err(|e| internal(format!("stats of container {id}"))(e.to_string()))?;
        let cpu = CpuStats {
            usage_usec: s.cpu.usage.usage_total / 1000,
            user_usec: s.cpu.usage.usage_user / 1000,
            system_usec: s.cpu.usage.usage_kernel / 1000,
            nr_periods: s.cpu.throttling.periods,
            nr_throttled: s.cpu.throttling.throttled_periods,
            throttled_usec: s.cpu.throttling.throttled_time / 1000,
            ..Default::default()
        };
        let m = &s.memory;
        let memory = MemoryStats {
            usage_bytes: m.memory.usage,
            max_usage_bytes: m.memory.max_usage,
            limit_bytes: m.memory.limit,
            swap_usage_bytes: m.memswap.usage,
            cache_bytes: m.cache,
            rss_bytes: m.stats.get("anon").copied().unwrap_or_default(),
            oom_kill_count: read_oom_kills(id),
            raw: m.stats.clone(),
            ..Default::default()
        };
        let pids = PidsStats {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        };
        let blk = |v: &[libcgroups::stats::BlkioDeviceStat]| {
            v.iter()
                .map(|d| BlkioEntry {
                    major: d.major,
                    minor: d.minor,
                    op: d.op_type.clone().unwrap_or_default(),
                    value: d.value,
                    ..Default::default()
                })
                .collect()
        };
        Ok(StatsContainerResponse {
            cpu: Some(cpu).into(),
            memory: Some(memory).into(),
            pids: Some(pids).into(),
            io_service_bytes: blk(&s.blkio.service_bytes),
            io_serviced: blk(&s.blkio.serviced),
            ..Default::default()
        })
    }
}

fn read_oom_kills(id: &str) -> u64 {
    let path = Path::new("/sys/fs/cgroup")
        .join(CGROUP_PARENT.trim_start_matches('/'))
        .join(id)
        .join("memory.events");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Polls each container's `memory.events` and reports new OOM kills.
async fn watch_oom(service: Arc<AgentService>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let ids: Vec<String> = service.containers.lock().unwrap().keys().cloned().collect();
        service.oom_ledger.retain(&ids);
        for id in ids {
            if service.oom_ledger.take_new(&id) {
                tracing::info!(container = %id, "OOM kill");
                let _ = service.oom_tx.send(id).await;
            }
        }
    }
}

fn mount_share(tag: &str) -> AResult<()> {
    let target = cocoon_protocols::GUEST_SHARE_DIR;
    std::fs::create_dir_all(target)
        .map_err(|e| internal(format!("create {target}"))(e.to_string()))?;
    nix::mount::mount(
        Some(tag),
        target,
        Some("virtiofs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| AgentError::Internal(format!("mount virtio-fs {tag} on {target}: {e}")))
}

fn ok<T>(r: AResult<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!("request failed: {e}");
        e.into()
    })
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: release,
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        if !req.hostname.is_empty() {
            let _ = nix::unistd::sethostname(&req.hostname);
        }
        ok(mount_share(&req.share_tag).map(|_| Empty::new()))
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        tracing::info!("powering off");
        // Flush before replying: the host may end the VM as soon as it has
        // the reply.
        tokio::task::spawn_blocking(nix::unistd::sync).await.ok();
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            crate::init::power_off();
        });
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        ok(self.create_container(req).await)
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        ok(self
            .lifecycle(&req.container_id, "start", |c| c.start())
            .await)
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        ok(self
            .remove_container(&req.container_id)
            .await
            .map(|_| Empty::new()))
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        ok(self
            .lifecycle(&req.container_id, "pause", |c| c.pause())
            .await)
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        ok(self
            .lifecycle(&req.container_id, "resume", |c| c.resume())
            .await)
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = (|| {
            self.exists(&req.container_id)?;
            let resources: oci_spec::runtime::LinuxResources =
                serde_json::from_slice(&req.oci_resources_json).map_err(|e| {
                    AgentError::InvalidArgument(format!(
                        "resources of container {}: {e}",
                        req.container_id
                    ))
                })?;
            cgroup_manager(&req.container_id)?
                .apply(&ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| {
                    AgentError::Internal(format!("update container {}: {e}", req.container_id))
                })
        })();
        ok(r.map(|_| Empty::new()))
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        ok(self.stats(&req.container_id))
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let r = (|| {
            self.exists(&req.container_id)?;
            let pids = cgroup_manager(&req.container_id)?
                .get_all_pids()
                .map_err(|e| internal("list pids")(e.to_string()))?;
            Ok(ListProcessesResponse {
                pids: pids.iter().map(|p| p.as_raw() as u32).collect(),
                ..Default::default()
            })
        })();
        ok(r)
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        ok(self.exec_process(req).await)
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        ok(self.wait_process(req).await)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        ok(self.signal_process(req).await.map(|_| Empty::new()))
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let r = self.process(&req.container_id, &req.exec_id, |_| ());
        self.stdio.close_stdin(&req.container_id, &req.exec_id);
        ok(r.map(|_| Empty::new()))
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let r = (|| {
            let pty = self
                .process(&req.container_id, &req.exec_id, |p| p.pty_master.clone())?
                .ok_or_else(|| {
                    AgentError::FailedPrecondition(format!(
                        "process {:?} of container {} has no terminal",
                        req.exec_id, req.container_id
                    ))
                })?;
            let ws = libc::winsize {
                ws_row: req.rows as u16,
                ws_col: req.columns as u16,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
            // outlives the call; the fd is a pty master we own.
            let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
            if rc < 0 {
                return Err(AgentError::Internal(format!(
                    "resize tty: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(Empty::new())
        })();
        ok(r)
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        let id = self.oom_rx.lock().await.recv().await.unwrap_or_default();
        Ok(OomEvent {
            container_id: id,
            ..Default::default()
        })
    }
}
