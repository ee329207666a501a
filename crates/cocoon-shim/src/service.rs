//! The containerd Task service of one pod: one VM, its containers and execs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use cocoon_protocols::agent as ag;
use cocoon_protocols::StreamKind;
use cocoon_runtime::{ctx, Channel, CALL_TIMEOUT};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics::*;
use containerd_shim::protos::{api, types::task::ProcessInfo};
use containerd_shim::ExitSignal;
use containerd_shim::TtrpcContext;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::pod::{Events, Launcher, PodHandle};
use crate::state::ProcState;

/// Name of the file in each bundle that points at the pod's state directory,
/// for the `delete` cleanup of a shim that died.
pub const SANDBOX_POINTER: &str = "cocoon-sandbox";

const ANNOTATION_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Exit status of every process when the VM dies under them.
const EXIT_VM_DIED: u32 = 255;

#[derive(Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

struct Proc {
    state: ProcState,
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
    /// The OCI process of an exec, as JSON.
    exec_spec: Option<Vec<u8>>,
    exit: watch::Sender<Option<Exit>>,
    close_stdin: Option<oneshot::Sender<()>>,
    /// Set once TaskStart (or TaskExecStarted) is published: a fast process's
    /// TaskExit must not overtake it.
    started: watch::Sender<bool>,
}

impl Proc {
    fn new(
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
        exec_spec: Option<Vec<u8>>,
    ) -> Self {
        Self {
            state: ProcState::Created,
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
            exec_spec,
            exit: watch::channel(None).0,
            close_stdin: None,
            started: watch::channel(false).0,
        }
    }
}

struct Container {
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
}

/// Shared by the service and its background tasks.
struct Shared {
    namespace: String,
    events: Arc<dyn Events>,
    launcher: Arc<dyn Launcher>,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Option<Box<dyn PodHandle>>>,
    channel: Mutex<Option<Channel>>,
    vmm_pid: Mutex<u32>,
    sandbox_id: Mutex<String>,
    containers: Mutex<HashMap<String, Container>>,
}

#[derive(Clone)]
pub struct Service {
    s: Arc<Shared>,
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn any_json_type(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or("")
}

impl Service {
    pub fn new(
        namespace: &str,
        shim_id: &str,
        events: Arc<dyn Events>,
        launcher: Arc<dyn Launcher>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        Self {
            s: Arc::new(Shared {
                namespace: namespace.into(),
                events,
                launcher,
                exit,
                pod: tokio::sync::Mutex::new(None),
                channel: Mutex::new(None),
                vmm_pid: Mutex::new(0),
                sandbox_id: Mutex::new(shim_id.into()),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.s.events.publish(topic, event).await;
    }

    /// The pod's sandbox id, for log lines.
    fn sandbox(&self) -> String {
        self.s.sandbox_id.lock().unwrap().clone()
    }

    fn channel(&self) -> Result<Channel> {
        self.s
            .channel
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("the pod VM is not running".into()))
    }

    fn vmm_pid(&self) -> u32 {
        *self.s.vmm_pid.lock().unwrap()
    }

    /// The pod's channel, for a request about a known process.
    fn known(&self, id: &str, exec_id: &str) -> Result<Channel> {
        self.with_proc(id, exec_id, |_| Ok(()))?;
        self.channel()
    }

    fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> Result<T>,
    ) -> Result<T> {
        let mut map = self.s.containers.lock().unwrap();
        let c = map
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))?;
        let p = if exec_id.is_empty() {
            &mut c.init
        } else {
            c.execs.get_mut(exec_id).ok_or_else(|| {
                Error::NotFound(format!("exec {exec_id} of container {id} not found"))
            })?
        };
        f(p)
    }

    /// Boots the pod VM for the first container.
    async fn ensure_pod(
        &self,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<Channel> {
        let mut pod = self.s.pod.lock().await;
        if let Some(p) = pod.as_ref() {
            return Ok(p.channel());
        }
        let opts = crate::options::decode(req.options.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("task {}: {e}", req.id)))?;
        let explicit = opts
            .as_ref()
            .map(|o| o.config_path.clone())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let loaded = cocoon_config::load(explicit.as_deref()).map_err(|e| {
            Error::InvalidArgument(format!(
                "task {}: configuration: {}",
                req.id,
                cocoon_runtime::error_chain(&e)
            ))
        })?;
        let sandbox_id = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SANDBOX_ID).cloned())
            .unwrap_or_else(|| req.id.clone());
        *self.s.sandbox_id.lock().unwrap() = sandbox_id.clone();
        tracing::info!(sandbox = %sandbox_id, config = %loaded.source, "booting pod VM");
        let sandbox = self.s.launcher.launch(&sandbox_id, &loaded.config).await?;
        let channel = sandbox.channel();
        *self.s.channel.lock().unwrap() = Some(channel.clone());
        *self.s.vmm_pid.lock().unwrap() = sandbox.vmm_pid();
        let _ = std::fs::write(
            Path::new(&req.bundle).join(SANDBOX_POINTER),
            sandbox.run_dir().as_os_str().as_encoded_bytes(),
        );
        *pod = Some(sandbox);
        drop(pod);
        self.spawn_monitors(channel.clone());
        Ok(channel)
    }

    fn spawn_monitors(&self, channel: Channel) {
        let me = self.clone();
        let ch = channel.clone();
        tokio::spawn(async move {
            loop {
                match ch
                    .agent()
                    .get_oom_event(ttrpc::context::Context::default(), &ag::Empty::new())
                    .await
                {
                    Ok(ev) if !ev.container_id.is_empty() => {
                        let e = TaskOOM {
                            container_id: ev.container_id,
                            ..Default::default()
                        };
                        me.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut pod = me.s.pod.lock().await;
                let Some(p) = pod.as_mut() else { return };
                if let Some(status) = p.try_wait() {
                    tracing::error!(
                        "pod VM exited ({status}); every task exits with {EXIT_VM_DIED}"
                    );
                    drop(pod);
                    me.vm_died().await;
                    return;
                }
            }
        });
    }

    /// Marks every live process exited and tells containerd.
    async fn vm_died(&self) {
        let now = SystemTime::now();
        let mut exits = Vec::new();
        {
            let mut map = self.s.containers.lock().unwrap();
            for (id, c) in map.iter_mut() {
                let procs = std::iter::once(("".to_string(), &mut c.init))
                    .chain(c.execs.iter_mut().map(|(k, v)| (k.clone(), v)));
                for (eid, p) in procs {
                    if p.state != ProcState::Stopped && p.state != ProcState::Created {
                        p.state = ProcState::Stopped;
                        p.exit.send_replace(Some(Exit {
                            status: EXIT_VM_DIED,
                            at: now,
                        }));
                        exits.push((id.clone(), if eid.is_empty() { id.clone() } else { eid }));
                    }
                }
            }
        }
        *self.s.channel.lock().unwrap() = None;
        for (id, eid) in exits {
            let e = TaskExit {
                container_id: id,
                id: eid,
                pid: self.vmm_pid(),
                exit_status: EXIT_VM_DIED,
                exited_at: MessageField::some(ts(now)),
                ..Default::default()
            };
            self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
        }
    }

    async fn create(&self, req: api::CreateTaskRequest) -> Result<api::CreateTaskResponse> {
        let id = req.id.clone();
        if self.s.containers.lock().unwrap().contains_key(&id) {
            return Err(Error::AlreadyExists(format!("task {id} already exists")));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(format!(
                "task {id}: restore from a checkpoint is not supported"
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config_json = bundle.join("config.json");
        let mut spec = oci_spec::runtime::Spec::load(&config_json).map_err(|e| {
            Error::InvalidArgument(format!("task {id}: {}: {e}", config_json.display()))
        })?;
        for m in &req.rootfs {
            let supported = matches!(m.type_.as_str(), "overlay" | "bind" | "rbind")
                || (m.type_ == "none" && m.options.iter().any(|o| o.contains("bind")));
            if !supported {
                return Err(Error::InvalidArgument(format!(
                    "task {id}: rootfs mount type {:?} (source {}) is not supported",
                    m.type_, m.source
                )));
            }
        }
        let channel = self.ensure_pod(&req, &spec).await?;

        let rootfs = bundle.join("rootfs");
        let mut rootfs_mounted = false;
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| Error::Internal(format!("create {}: {e}", rootfs.display())))?;
            for (i, m) in req.rootfs.iter().enumerate() {
                if let Err(e) = mount_one(m, &rootfs) {
                    // Undo the layers already mounted on the rootfs.
                    for _ in 0..i {
                        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
                    }
                    return Err(Error::Internal(format!(
                        "task {id}: mount rootfs {} on {}: {e}",
                        m.source,
                        rootfs.display()
                    )));
                }
            }
            rootfs_mounted = true;
        }
        let result = self
            .create_in_vm(&id, &req, &mut spec, &rootfs, &channel)
            .await;
        if let Err(e) = result {
            if let Some(p) = self.s.pod.lock().await.as_mut() {
                p.unshare_rootfs(&id);
            }
            if rootfs_mounted {
                let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
        self.s.containers.lock().unwrap().insert(
            id.clone(),
            Container {
                bundle: bundle.clone(),
                rootfs_mounted,
                init: Proc::new(&req.stdin, &req.stdout, &req.stderr, req.terminal, None),
                execs: HashMap::new(),
            },
        );
        self.attach_io(
            &channel,
            &id,
            "",
            &req.stdin,
            &req.stdout,
            &req.stderr,
            req.terminal,
        )
        .await?;
        let pid = self.vmm_pid();
        let ev = TaskCreate {
            container_id: id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        tracing::info!(container = %id, "created");
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn create_in_vm(
        &self,
        id: &str,
        req: &api::CreateTaskRequest,
        spec: &mut oci_spec::runtime::Spec,
        rootfs: &Path,
        channel: &Channel,
    ) -> Result<()> {
        let rel = {
            let mut pod = self.s.pod.lock().await;
            let p = pod
                .as_mut()
                .ok_or_else(|| Error::FailedPrecondition("the pod VM is not running".into()))?;
            let src = if req.rootfs.is_empty() {
                spec.root()
                    .as_ref()
                    .map(|r| {
                        let p = r.path();
                        if p.is_absolute() {
                            p.clone()
                        } else {
                            Path::new(&req.bundle).join(p)
                        }
                    })
                    .unwrap_or_else(|| rootfs.to_path_buf())
            } else {
                rootfs.to_path_buf()
            };
            p.share_rootfs(id, &src)?
        };
        adapt_spec(spec, &rel);
        let json = serde_json::to_vec(spec).map_err(|e| Error::Internal(e.to_string()))?;
        let creq = ag::CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: json,
            terminal: req.terminal,
            ..Default::default()
        };
        channel
            .agent()
            .create_container(ctx(CALL_TIMEOUT), &creq)
            .await
            .map_err(|e| Error::from_agent("create container", e))?;
        Ok(())
    }

    /// Connects a process's streams to containerd's stdio.
    #[allow(clippy::too_many_arguments)]
    async fn attach_io(
        &self,
        channel: &Channel,
        id: &str,
        exec_id: &str,
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Result<()> {
        let (out_dest, err_dest, logger) = if stdout.starts_with("binary://") {
            let (o, e, child) = crate::io::spawn_binary(stdout, id, &self.s.namespace).await?;
            (Some(o), Some(e), Some(child))
        } else {
            let o = crate::io::open_output(stdout).await?;
            let e = if terminal {
                None
            } else {
                crate::io::open_output(stderr).await?
            };
            (o, e, None)
        };
        let out = channel.open_stream(StreamKind::Stdout, id, exec_id).await?;
        let mut copies = vec![tokio::spawn(crate::io::copy_out(out, out_dest))];
        if !terminal {
            let err = channel.open_stream(StreamKind::Stderr, id, exec_id).await?;
            copies.push(tokio::spawn(crate::io::copy_out(err, err_dest)));
        }
        if let Some(mut child) = logger {
            // The logger ends when its inputs close; it is reaped here.
            let done = std::mem::take(&mut copies);
            copies.push(tokio::spawn(async move {
                for c in done {
                    let _ = c.await;
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }));
        }
        if stdin.is_empty() {
            let req = ag::ProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            };
            channel
                .agent()
                .close_stdin(ctx(CALL_TIMEOUT), &req)
                .await
                .map_err(|e| Error::from_agent("close stdin", e))?;
        } else {
            let src = crate::io::open_input(stdin)?;
            let s = channel.open_stream(StreamKind::Stdin, id, exec_id).await?;
            let (tx, rx) = oneshot::channel();
            self.with_proc(id, exec_id, |p| {
                p.close_stdin = Some(tx);
                Ok(())
            })?;
            tokio::spawn(crate::io::copy_in(src, s, rx));
        }
        // The waiter publishes the exit only after the output copies end.
        let me = self.clone();
        let (id, exec_id, ch) = (id.to_string(), exec_id.to_string(), channel.clone());
        tokio::spawn(async move { me.wait_exit(ch, id, exec_id, copies).await });
        Ok(())
    }

    async fn wait_exit(
        &self,
        channel: Channel,
        id: String,
        exec_id: String,
        copies: Vec<tokio::task::JoinHandle<()>>,
    ) {
        let req = ag::ProcessRequest {
            container_id: id.clone(),
            exec_id: exec_id.clone(),
            ..Default::default()
        };
        let r = channel
            .agent()
            .wait_process(ttrpc::context::Context::default(), &req)
            .await;
        let (status, at, oom_killed) = match r {
            Ok(w) => (
                w.exit_status as u32,
                SystemTime::UNIX_EPOCH + Duration::from_nanos(w.exited_at_unix_nanos.max(0) as u64),
                w.oom_killed,
            ),
            Err(e) => {
                tracing::warn!(container = %id, exec = %exec_id, "wait: {e}");
                (EXIT_VM_DIED, SystemTime::now(), false)
            }
        };
        // Every byte the process wrote reaches containerd before its exit
        // event. Output of a process's leftover children is not waited for
        // beyond a grace period.
        for c in copies {
            let _ = tokio::time::timeout(
                Duration::from_secs(if exec_id.is_empty() { 30 } else { 2 }),
                c,
            )
            .await;
        }
        // Events stay in order: the start first. A process deleted before it
        // was started (its sender dropped) has nothing to report.
        let Ok(mut started) = self.with_proc(&id, &exec_id, |p| Ok(p.started.subscribe())) else {
            return;
        };
        if started.wait_for(|s| *s).await.is_err() {
            return;
        }
        let already_stopped = self
            .with_proc(&id, &exec_id, |p| Ok(p.state == ProcState::Stopped))
            .unwrap_or(true);
        if already_stopped {
            return;
        }
        let ev = TaskExit {
            container_id: id.clone(),
            id: if exec_id.is_empty() {
                id.clone()
            } else {
                exec_id.clone()
            },
            pid: self.vmm_pid(),
            exit_status: status,
            exited_at: MessageField::some(ts(at)),
            ..Default::default()
        };
        if oom_killed {
            // Before the exit, so that the exit can be put down to it.
            let oom = TaskOOM {
                container_id: id.clone(),
                ..Default::default()
            };
            self.publish(TASK_OOM_EVENT_TOPIC, Box::new(oom)).await;
        }
        // Published before the exit is visible to Wait and State, so that
        // containerd has it before any delete that follows a Wait.
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(ev)).await;
        let _ = self.with_proc(&id, &exec_id, |p| {
            p.state = ProcState::Stopped;
            p.close_stdin.take();
            p.exit.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some(Exit { status, at });
                    true
                } else {
                    false
                }
            });
            Ok(())
        });
        tracing::info!(sandbox = %self.sandbox(), container = %id, exec = %exec_id, status, "exited");
    }

    async fn start(&self, req: api::StartRequest) -> Result<api::StartResponse> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        let channel = self.channel()?;
        let exec = self.with_proc(&id, &eid, |p| {
            p.state.start(&format!("{id}/{eid}"))?;
            Ok((
                p.exec_spec.clone(),
                p.stdin.clone(),
                p.stdout.clone(),
                p.stderr.clone(),
                p.terminal,
            ))
        })?;
        if eid.is_empty() {
            let r = ag::ContainerRequest {
                container_id: id.clone(),
                ..Default::default()
            };
            channel
                .agent()
                .start_container(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("start", e))?;
            self.with_proc(&id, "", |p| {
                // A process that already exited stays stopped.
                if p.state != ProcState::Stopped {
                    p.state = ProcState::Running;
                }
                Ok(())
            })?;
            let ev = TaskStart {
                container_id: id.clone(),
                pid: self.vmm_pid(),
                ..Default::default()
            };
            self.publish(TASK_START_EVENT_TOPIC, Box::new(ev)).await;
            self.with_proc(&id, "", |p| {
                p.started.send_replace(true);
                Ok(())
            })?;
        } else {
            let (spec, stdin, stdout, stderr, terminal) = exec;
            let r = ag::ExecProcessRequest {
                container_id: id.clone(),
                exec_id: eid.clone(),
                oci_process_json: spec.unwrap_or_default(),
                terminal,
                ..Default::default()
            };
            channel
                .agent()
                .exec_process(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("exec", e))?;
            self.with_proc(&id, &eid, |p| {
                // A process that already exited stays stopped.
                if p.state != ProcState::Stopped {
                    p.state = ProcState::Running;
                }
                Ok(())
            })?;
            self.attach_io(&channel, &id, &eid, &stdin, &stdout, &stderr, terminal)
                .await?;
            let ev = TaskExecStarted {
                container_id: id.clone(),
                exec_id: eid.clone(),
                pid: self.vmm_pid(),
                ..Default::default()
            };
            self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                .await;
            self.with_proc(&id, &eid, |p| {
                p.started.send_replace(true);
                Ok(())
            })?;
        }
        Ok(api::StartResponse {
            pid: self.vmm_pid(),
            ..Default::default()
        })
    }

    async fn delete(&self, req: api::DeleteRequest) -> Result<api::DeleteResponse> {
        let (id, eid) = (req.id.clone(), req.exec_id.clone());
        let exit = self.with_proc(&id, &eid, |p| {
            p.state.can_delete(&format!("{id}/{eid}"))?;
            Ok(*p.exit.borrow())
        })?;
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let pid = self.vmm_pid();
        if !eid.is_empty() {
            let mut map = self.s.containers.lock().unwrap();
            if let Some(c) = map.get_mut(&id) {
                c.execs.remove(&eid);
            }
        } else {
            if let Ok(ch) = self.channel() {
                let r = ag::ContainerRequest {
                    container_id: id.clone(),
                    ..Default::default()
                };
                if let Err(e) = ch.agent().remove_container(ctx(CALL_TIMEOUT), &r).await {
                    tracing::warn!(container = %id, "remove in guest: {e}");
                }
            }
            if let Some(p) = self.s.pod.lock().await.as_mut() {
                p.unshare_rootfs(&id);
            }
            let c = self.s.containers.lock().unwrap().remove(&id);
            if let Some(c) = c {
                if c.rootfs_mounted {
                    let _ = nix::mount::umount2(
                        &c.bundle.join("rootfs"),
                        nix::mount::MntFlags::MNT_DETACH,
                    );
                }
                let _ = std::fs::remove_file(c.bundle.join(SANDBOX_POINTER));
            }
            let ev = TaskDelete {
                container_id: id.clone(),
                pid,
                exit_status: exit.status,
                exited_at: MessageField::some(ts(exit.at)),
                ..Default::default()
            };
            self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(ts(exit.at)),
            ..Default::default()
        })
    }

    /// Pause (`true`) or resume (`false`) a container's processes.
    async fn freeze(&self, id: &str, pause: bool) -> Result<api::Empty> {
        self.with_proc(id, "", |p| {
            if pause {
                p.state.pause(id)
            } else {
                p.state.resume(id)
            }
            .map(drop)
        })?;
        let ch = self.channel()?;
        let r = ag::ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let call = if pause {
            ch.agent().pause_container(ctx(CALL_TIMEOUT), &r).await
        } else {
            ch.agent().resume_container(ctx(CALL_TIMEOUT), &r).await
        };
        call.map_err(|e| Error::from_agent(if pause { "pause" } else { "resume" }, e))?;
        self.with_proc(id, "", |p| {
            // A process that exited meanwhile stays stopped.
            if p.state != ProcState::Stopped {
                p.state = if pause {
                    ProcState::Paused
                } else {
                    ProcState::Running
                };
            }
            Ok(())
        })?;
        if pause {
            self.publish(
                TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.into(),
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.into(),
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(api::Empty::new())
    }

    async fn stop_pod(&self) {
        let pod = self.s.pod.lock().await.take();
        *self.s.channel.lock().unwrap() = None;
        if let Some(p) = pod {
            p.stop().await;
        }
    }
}

/// Makes the bundle's spec fit the guest: the rootfs is on the share; host
/// paths of namespaces do not exist there.
fn adapt_spec(spec: &mut oci_spec::runtime::Spec, rootfs_rel: &str) {
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(rootfs_rel.into());
    spec.set_root(Some(root));
    if let Some(mut linux) = spec.linux().clone() {
        if let Some(ns) = linux.namespaces().clone() {
            let ns = ns
                .into_iter()
                .map(|mut n| {
                    n.set_path(None);
                    n
                })
                .collect();
            linux.set_namespaces(Some(ns));
        }
        // Host device nodes and cgroup placement are the host's business;
        // the agent places the container in the guest's cgroups.
        linux.set_cgroups_path(None);
        linux.set_devices(None);
        spec.set_linux(Some(linux));
    }
    // Bind mounts of host paths (volumes) are not shared into the guest yet.
    if let Some(mounts) = spec.mounts().clone() {
        let kept = mounts
            .into_iter()
            .filter(|m| {
                let bind = m.typ().as_deref() == Some("bind")
                    || m.options()
                        .as_ref()
                        .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
                if bind {
                    tracing::warn!(
                        "host bind mount {:?} is not supported yet; skipped",
                        m.destination()
                    );
                }
                !bind
            })
            .collect();
        spec.set_mounts(Some(kept));
    }
}

fn mount_one(m: &api::Mount, target: &Path) -> nix::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other.to_string()),
        }
    }
    let fstype = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(m.type_.as_str())
    };
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        if data.is_empty() {
            None
        } else {
            Some(data.as_str())
        },
    )
}

fn metrics_from(
    s: &ag::StatsContainerResponse,
) -> containerd_shim::protos::cgroups::metrics::Metrics {
    use containerd_shim::protos::cgroups::metrics::*;
    let mut m = Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        let mut cpu = CPUStat::new();
        let mut usage = CPUUsage::new();
        usage.total = c.usage_usec * 1000;
        usage.user = c.user_usec * 1000;
        usage.kernel = c.system_usec * 1000;
        cpu.usage = MessageField::some(usage);
        let mut th = Throttle::new();
        th.periods = c.nr_periods;
        th.throttled_periods = c.nr_throttled;
        th.throttled_time = c.throttled_usec * 1000;
        cpu.throttling = MessageField::some(th);
        m.cpu = MessageField::some(cpu);
    }
    if let Some(mem) = s.memory.as_ref() {
        let mut ms = MemoryStat::new();
        let mut usage = MemoryEntry::new();
        usage.usage = mem.usage_bytes;
        usage.max = mem.max_usage_bytes;
        usage.limit = mem.limit_bytes;
        ms.usage = MessageField::some(usage);
        let mut swap = MemoryEntry::new();
        swap.usage = mem.swap_usage_bytes;
        ms.swap = MessageField::some(swap);
        ms.cache = mem.cache_bytes;
        ms.rss = mem.rss_bytes;
        let raw = |k: &str| mem.raw.get(k).copied().unwrap_or(0);
        ms.mapped_file = raw("file_mapped");
        ms.dirty = raw("file_dirty");
        ms.writeback = raw("file_writeback");
        ms.pg_fault = raw("pgfault");
        ms.pg_maj_fault = raw("pgmajfault");
        ms.inactive_anon = raw("inactive_anon");
        ms.active_anon = raw("active_anon");
        ms.inactive_file = raw("inactive_file");
        ms.active_file = raw("active_file");
        ms.unevictable = raw("unevictable");
        ms.total_rss = mem.rss_bytes;
        ms.total_cache = mem.cache_bytes;
        m.memory = MessageField::some(ms);
        let mut oom = MemoryOomControl::new();
        oom.oom_kill = mem.oom_kill_count;
        m.memory_oom_control = MessageField::some(oom);
    }
    if let Some(p) = s.pids.as_ref() {
        let mut ps = PidsStat::new();
        ps.current = p.current;
        ps.limit = p.limit;
        m.pids = MessageField::some(ps);
    }
    let blk = |v: &[ag::BlkioEntry]| {
        v.iter()
            .map(|e| {
                let mut b = BlkIOEntry::new();
                b.major = e.major;
                b.minor = e.minor;
                b.op = e.op.clone();
                b.value = e.value;
                b
            })
            .collect::<Vec<_>>()
    };
    let mut io = BlkIOStat::new();
    io.io_service_bytes_recursive = blk(&s.io_service_bytes);
    io.io_serviced_recursive = blk(&s.io_serviced);
    m.blkio = MessageField::some(io);
    m
}

fn ok<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!("{e}");
        e.into()
    })
}

#[async_trait]
impl Task for Service {
    #[tracing::instrument(name = "state", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        let pid = self.vmm_pid();
        let r = {
            let bundle = {
                let map = self.s.containers.lock().unwrap();
                map.get(&req.id)
                    .map(|c| c.bundle.display().to_string())
                    .unwrap_or_default()
            };
            self.with_proc(&req.id, &req.exec_id, |p| {
                let exit = *p.exit.borrow();
                Ok(api::StateResponse {
                    id: if req.exec_id.is_empty() {
                        req.id.clone()
                    } else {
                        req.exec_id.clone()
                    },
                    bundle,
                    pid,
                    status: p.state.status().into(),
                    stdin: p.stdin.clone(),
                    stdout: p.stdout.clone(),
                    stderr: p.stderr.clone(),
                    terminal: p.terminal,
                    exit_status: exit.map(|e| e.status).unwrap_or(0),
                    exited_at: exit.map(|e| ts(e.at)).into(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                })
            })
        };
        ok(r)
    }

    #[tracing::instrument(name = "create", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        ok(self.create(req).await)
    }

    #[tracing::instrument(name = "start", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        ok(self.start(req).await)
    }

    #[tracing::instrument(name = "delete", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        ok(self.delete(req).await)
    }

    #[tracing::instrument(name = "pids", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let r = async {
            let ch = self.known(&req.id, "")?;
            let r = ag::ContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let l = ch
                .agent()
                .list_processes(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("pids", e))?;
            let processes = l
                .pids
                .iter()
                .map(|p| ProcessInfo {
                    pid: *p,
                    ..Default::default()
                })
                .collect();
            Ok(api::PidsResponse {
                processes,
                ..Default::default()
            })
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "pause", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<api::Empty> {
        ok(self.freeze(&req.id, true).await)
    }

    #[tracing::instrument(name = "resume", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<api::Empty> {
        ok(self.freeze(&req.id, false).await)
    }

    #[tracing::instrument(name = "checkpoint", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        ok(Err(Error::Unimplemented(format!(
            "checkpoint of task {}: not supported by Cocoon",
            req.id
        ))))
    }

    #[tracing::instrument(name = "kill", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<api::Empty> {
        let r = async {
            let state = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.state))?;
            if state == ProcState::Stopped && !req.all {
                return Err(Error::NotFound(format!(
                    "process {}/{} has already exited",
                    req.id, req.exec_id
                )));
            }
            let ch = self.channel()?;
            let r = ag::SignalProcessRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                signal: req.signal,
                all: req.all,
                ..Default::default()
            };
            ch.agent()
                .signal_process(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("kill", e))?;
            Ok(api::Empty::new())
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "exec", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            let spec = req.spec.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("exec {}: no process spec", req.exec_id))
            })?;
            if !any_json_type(spec).ends_with("Process") {
                return Err(Error::InvalidArgument(format!(
                    "exec {}: spec of type {:?} is not an OCI process",
                    req.exec_id, spec.type_url
                )));
            }
            {
                let mut map = self.s.containers.lock().unwrap();
                let c = map
                    .get_mut(&req.id)
                    .ok_or_else(|| Error::NotFound(format!("container {} not found", req.id)))?;
                c.init.state.can_exec(&req.id)?;
                if c.execs.contains_key(&req.exec_id) {
                    return Err(Error::AlreadyExists(format!(
                        "exec {} already exists in container {}",
                        req.exec_id, req.id
                    )));
                }
                c.execs.insert(
                    req.exec_id.clone(),
                    Proc::new(
                        &req.stdin,
                        &req.stdout,
                        &req.stderr,
                        req.terminal,
                        Some(spec.value.clone()),
                    ),
                );
            }
            let ev = TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            };
            self.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
                .await;
            Ok(api::Empty::new())
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "resize_pty", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            let ch = self.known(&req.id, &req.exec_id)?;
            let r = ag::ResizeTtyRequest {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                rows: req.height,
                columns: req.width,
                ..Default::default()
            };
            ch.agent()
                .resize_tty(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("resize pty", e))?;
            Ok(api::Empty::new())
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "close_io", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = self.with_proc(&req.id, &req.exec_id, |p| {
            if req.stdin {
                if let Some(tx) = p.close_stdin.take() {
                    let _ = tx.send(());
                }
            }
            Ok(api::Empty::new())
        });
        ok(r)
    }

    #[tracing::instrument(name = "update", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn update(
        &self,
        _: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            self.with_proc(&req.id, "", |_| Ok(()))?;
            let res = req.resources.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("update of task {}: no resources", req.id))
            })?;
            if !any_json_type(res).ends_with("LinuxResources") {
                return Err(Error::InvalidArgument(format!(
                    "update of task {}: resources of type {:?} are not OCI LinuxResources",
                    req.id, res.type_url
                )));
            }
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&res.value)
                .map_err(|e| Error::InvalidArgument(format!("update of task {}: {e}", req.id)))?;
            let ch = self.channel()?;
            let r = ag::UpdateContainerRequest {
                container_id: req.id.clone(),
                oci_resources_json: res.value.clone(),
                ..Default::default()
            };
            ch.agent()
                .update_container(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("update", e))?;
            Ok(api::Empty::new())
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "wait", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let r = async {
            let mut rx = self.with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.subscribe()))?;
            let exit = *rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Error::Internal("process watch closed".into()))?;
            let exit = exit.unwrap_or(Exit {
                status: EXIT_VM_DIED,
                at: SystemTime::now(),
            });
            Ok(api::WaitResponse {
                exit_status: exit.status,
                exited_at: MessageField::some(ts(exit.at)),
                ..Default::default()
            })
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "stats", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let r = async {
            let ch = self.known(&req.id, "")?;
            let r = ag::ContainerRequest {
                container_id: req.id.clone(),
                ..Default::default()
            };
            let s = ch
                .agent()
                .stats_container(ctx(CALL_TIMEOUT), &r)
                .await
                .map_err(|e| Error::from_agent("stats", e))?;
            let m = metrics_from(&s);
            let any = Any {
                type_url: "io.containerd.cgroups.v1.Metrics".into(),
                value: containerd_shim::protos::protobuf::Message::write_to_bytes(&m)
                    .map_err(|e| Error::Internal(e.to_string()))?,
                ..Default::default()
            };
            Ok(api::StatsResponse {
                stats: MessageField::some(any),
                ..Default::default()
            })
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "connect", skip_all, fields(sandbox = %self.sandbox()))]
    async fn connect(
        &self,
        _: &TtrpcContext,
        _: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.vmm_pid(),
            ..Default::default()
        })
    }

    #[tracing::instrument(name = "shutdown", skip_all, fields(sandbox = %self.sandbox()))]
    async fn shutdown(
        &self,
        _: &TtrpcContext,
        _: api::ShutdownRequest,
    ) -> ttrpc::Result<api::Empty> {
        if !self.s.containers.lock().unwrap().is_empty() {
            return Ok(api::Empty::new());
        }
        tracing::info!("last task gone; stopping the pod VM");
        self.stop_pod().await;
        self.s.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeEvents, FakeLauncher};

    fn tctx() -> TtrpcContext {
        TtrpcContext {
            mh: ttrpc::MessageHeader {
                length: 0,
                stream_id: 0,
                type_: 0,
                flags: 0,
            },
            metadata: Default::default(),
            timeout_nano: 0,
        }
    }

    struct Env {
        svc: Service,
        events: Arc<FakeEvents>,
        launcher: Arc<FakeLauncher>,
        exit: Arc<ExitSignal>,
        dir: tempfile::TempDir,
    }

    fn env() -> Env {
        let events = Arc::new(FakeEvents::default());
        let launcher = Arc::new(FakeLauncher::default());
        let exit = Arc::new(ExitSignal::default());
        let svc = Service::new("ns", "shim", events.clone(), launcher.clone(), exit.clone());
        Env {
            svc,
            events,
            launcher,
            exit,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    impl Env {
        fn bundle(&self, id: &str, args: &[&str]) -> String {
            let b = self.dir.path().join(id);
            std::fs::create_dir_all(b.join("rootfs")).unwrap();
            let mut spec = oci_spec::runtime::Spec::default();
            let mut p = spec.process().clone().unwrap();
            p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
            spec.set_process(Some(p));
            spec.save(b.join("config.json")).unwrap();
            b.display().to_string()
        }

        async fn create(&self, id: &str, args: &[&str]) -> ttrpc::Result<api::CreateTaskResponse> {
            let out = format!("file://{}/{id}.out", self.dir.path().display());
            let req = api::CreateTaskRequest {
                id: id.into(),
                bundle: self.bundle(id, args),
                stdout: out,
                ..Default::default()
            };
            Task::create(&self.svc, &tctx(), req).await
        }

        async fn wait(&self, id: &str, exec: &str) -> u32 {
            let req = api::WaitRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            };
            Task::wait(&self.svc, &tctx(), req)
                .await
                .unwrap()
                .exit_status
        }

        fn topics(&self) -> Vec<String> {
            self.events.topics.lock().unwrap().clone()
        }
    }

    fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
        match r {
            Err(ttrpc::Error::RpcStatus(s)) => s.code(),
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn lifecycle_publishes_events_in_order_and_output_before_exit() {
        let e = env();
        let created = e.create("c1", &["exit", "3"]).await.unwrap();
        assert_eq!(created.pid, 4242, "task pid is the VMM's");
        let start = api::StartRequest {
            id: "c1".into(),
            ..Default::default()
        };
        Task::start(&e.svc, &tctx(), start).await.unwrap();
        let (a, b) = tokio::join!(e.wait("c1", ""), e.wait("c1", ""));
        assert_eq!((a, b), (3, 3), "every waiter gets the status");
        let out = std::fs::read_to_string(e.dir.path().join("c1.out")).unwrap();
        assert_eq!(
            out, "out:c1/\n",
            "output reached its destination before the exit"
        );
        let state = Task::state(
            &e.svc,
            &tctx(),
            api::StateRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(state.status.enum_value().unwrap(), api::Status::STOPPED);
        assert_eq!(state.exit_status, 3);
        let del = Task::delete(
            &e.svc,
            &tctx(),
            api::DeleteRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(del.exit_status, 3);
        assert_eq!(
            e.topics(),
            [
                TASK_CREATE_EVENT_TOPIC,
                TASK_START_EVENT_TOPIC,
                TASK_EXIT_EVENT_TOPIC,
                TASK_DELETE_EVENT_TOPIC
            ]
        );
        Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default())
            .await
            .unwrap();
        assert!(
            *e.launcher.stopped.lock().unwrap(),
            "the pod VM is stopped with the last task"
        );
        tokio::time::timeout(Duration::from_secs(1), e.exit.wait())
            .await
            .expect("shim exit signalled");
    }

    #[tokio::test]
    async fn one_vm_per_pod_and_shutdown_waits_for_the_last_task() {
        let e = env();
        e.create("c1", &["sleep"]).await.unwrap();
        e.create("c2", &["sleep"]).await.unwrap();
        assert_eq!(*e.launcher.launches.lock().unwrap(), ["c1"]);
        assert_eq!(
            code(e.create("c2", &["sleep"]).await),
            ttrpc::Code::ALREADY_EXISTS
        );
        Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default())
            .await
            .unwrap();
        assert!(!*e.launcher.stopped.lock().unwrap());
    }

    #[tokio::test]
    async fn exec_kill_and_their_errors() {
        let e = env();
        e.create("c1", &["sleep"]).await.unwrap();
        let spec = |args: &[&str]| {
            let mut p = oci_spec::runtime::Process::default();
            p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
            Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: serde_json::to_vec(&p).unwrap(),
                ..Default::default()
            }
        };
        let exec = |id: &str, args: &[&str]| api::ExecProcessRequest {
            id: "c1".into(),
            exec_id: id.into(),
            spec: MessageField::some(spec(args)),
            ..Default::default()
        };
        // Exec needs a running container.
        assert_eq!(
            code(Task::exec(&e.svc, &tctx(), exec("x1", &["exit", "0"])).await),
            ttrpc::Code::FAILED_PRECONDITION
        );
        Task::start(
            &e.svc,
            &tctx(),
            api::StartRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Task::exec(&e.svc, &tctx(), exec("x1", &["exit", "5"]))
            .await
            .unwrap();
        assert_eq!(
            code(Task::exec(&e.svc, &tctx(), exec("x1", &["true"])).await),
            ttrpc::Code::ALREADY_EXISTS
        );
        Task::start(
            &e.svc,
            &tctx(),
            api::StartRequest {
                id: "c1".into(),
                exec_id: "x1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(e.wait("c1", "x1").await, 5);
        // A running init cannot be deleted; killed, it reports 128 + 9.
        assert_eq!(
            code(
                Task::delete(
                    &e.svc,
                    &tctx(),
                    api::DeleteRequest {
                        id: "c1".into(),
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::FAILED_PRECONDITION
        );
        Task::kill(
            &e.svc,
            &tctx(),
            api::KillRequest {
                id: "c1".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(e.wait("c1", "").await, 137);
        assert_eq!(
            code(
                Task::kill(
                    &e.svc,
                    &tctx(),
                    api::KillRequest {
                        id: "c1".into(),
                        signal: 9,
                        ..Default::default()
                    }
                )
                .await
            ),
            ttrpc::Code::NOT_FOUND
        );
        let topics = e.topics();
        assert!(
            topics.contains(&TASK_EXEC_ADDED_EVENT_TOPIC.to_string())
                && topics.contains(&TASK_EXEC_STARTED_EVENT_TOPIC.to_string()),
            "{topics:?}"
        );
    }

    #[tokio::test]
    async fn bad_requests_get_their_codes() {
        let e = env();
        let st = Task::state(
            &e.svc,
            &tctx(),
            api::StateRequest {
                id: "nope".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(code(st), ttrpc::Code::NOT_FOUND);
        let cp = Task::checkpoint(
            &e.svc,
            &tctx(),
            api::CheckpointTaskRequest {
                id: "x".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(code(cp), ttrpc::Code::UNIMPLEMENTED);
        let mut req = api::CreateTaskRequest {
            id: "c9".into(),
            bundle: e.bundle("c9", &["sleep"]),
            ..Default::default()
        };
        req.rootfs.push(api::Mount {
            type_: "tmpfs".into(),
            source: "tmpfs".into(),
            ..Default::default()
        });
        assert_eq!(
            code(Task::create(&e.svc, &tctx(), req).await),
            ttrpc::Code::INVALID_ARGUMENT
        );
        let mut req = api::CreateTaskRequest {
            id: "c8".into(),
            bundle: e.bundle("c8", &["sleep"]),
            ..Default::default()
        };
        req.options = MessageField::some(Any {
            type_url: "containerd.runc.v1.Options".into(),
            ..Default::default()
        });
        assert_eq!(
            code(Task::create(&e.svc, &tctx(), req).await),
            ttrpc::Code::INVALID_ARGUMENT
        );
        e.create("c1", &["sleep"]).await.unwrap();
        let upd = api::UpdateTaskRequest {
            id: "c1".into(),
            resources: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            code(Task::update(&e.svc, &tctx(), upd).await),
            ttrpc::Code::INVALID_ARGUMENT
        );
        let stats = Task::stats(
            &e.svc,
            &tctx(),
            api::StatsRequest {
                id: "c1".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v1.Metrics");
    }
}
