//! The containerd Task service of one pod: what it holds, and the pieces
//! every operation shares. The operations live one per file (`create`,
//! `start`, `delete`, `process`), the `Task` trampolines in `task`.
//!
//! Three locks, each with one job: `pod` owns the VM (boot, container
//! create/remove, stop) and is held across those awaits only; `info` is the
//! booted pod's identity and liveness; `table` is the process table. The
//! last two are never held across an await.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cocoon_protocols::Id;
use cocoon_runtime::{Channel, Container};
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::{TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC};
use containerd_shim::ExitSignal;

use crate::error::{Error, Result};
use crate::pod::{Events, Launcher, PodHandle};
use crate::table::{event_id, Exit, Proc, Table};

/// Name of the file in each bundle that points at the pod's state directory,
/// for the `delete` cleanup of a shim that died.
pub const SANDBOX_POINTER: &str = "cocoon-sandbox";

/// Exit status of every process when the VM dies under them.
pub const EXIT_VM_DIED: u32 = 255;

/// Exit status of a process whose start failed.
pub const EXIT_START_FAILED: u32 = 255;

/// The pod, once booted.
#[derive(Clone)]
pub(crate) struct PodInfo {
    pub sandbox_id: Id,
    pub channel: Channel,
    /// Kept after the VM died: containerd still asks for the task pid.
    pub vmm_pid: u32,
    /// The VM has died.
    pub dead: bool,
}

pub(crate) struct Shared {
    pub namespace: String,
    pub shim_id: String,
    pub events: Arc<dyn Events>,
    pub launcher: Arc<dyn Launcher>,
    pub exit: Arc<ExitSignal>,
    pub pod: tokio::sync::Mutex<Option<Box<dyn PodHandle>>>,
    pub info: Mutex<Option<PodInfo>>,
    pub table: Mutex<Table>,
    /// Port forwarding into the pod, when its sandbox has a network namespace.
    pub forwarder: tokio::sync::Mutex<Option<crate::portforward::PortForwarder>>,
}

#[derive(Clone)]
pub struct Service {
    pub(crate) s: Arc<Shared>,
}

pub(crate) fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
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
                shim_id: shim_id.into(),
                events,
                launcher,
                exit,
                pod: tokio::sync::Mutex::new(None),
                info: Mutex::new(None),
                table: Mutex::new(Table::default()),
                forwarder: tokio::sync::Mutex::new(None),
            }),
        }
    }

    pub(crate) async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        self.s.events.publish(topic, event).await;
    }

    /// The pod's sandbox id, for log lines.
    pub(crate) fn sandbox(&self) -> String {
        self.s
            .info
            .lock()
            .unwrap()
            .as_ref()
            .map_or_else(|| self.s.shim_id.clone(), |i| i.sandbox_id.to_string())
    }

    pub(crate) fn vmm_pid(&self) -> u32 {
        self.s
            .info
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, |i| i.vmm_pid)
    }

    fn channel(&self) -> Result<Channel> {
        match self.s.info.lock().unwrap().as_ref() {
            Some(i) if !i.dead => Ok(i.channel.clone()),
            Some(_) => Err(Error::Unavailable("the pod VM has died".into())),
            None => Err(Error::FailedPrecondition(
                "the pod VM is not running".into(),
            )),
        }
    }

    pub(crate) fn vm_dead(&self) -> bool {
        self.s.info.lock().unwrap().as_ref().is_some_and(|i| i.dead)
    }

    /// Publishes a process's exit (after its OOM kill, if any), then makes
    /// it visible to Wait and State, so that containerd has the event before
    /// any Delete that follows a Wait. The caller has claimed the exit.
    pub(crate) async fn publish_exit(&self, id: &Id, exec: Option<&Id>, exit: Exit, oom: bool) {
        if oom {
            let e = TaskOOM {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
        }
        let e = TaskExit {
            container_id: id.to_string(),
            id: event_id(id, exec),
            pid: self.vmm_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(ts(exit.at)),
            ..Default::default()
        };
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
        let _ = self.with_proc(id, exec, |p| {
            p.exited(exit);
            Ok(())
        });
    }

    /// Runs `f` on a process of the table.
    pub(crate) fn with_proc<T>(
        &self,
        id: &Id,
        exec: Option<&Id>,
        f: impl FnOnce(&mut Proc) -> Result<T>,
    ) -> Result<T> {
        let mut table = self.s.table.lock().unwrap();
        f(table.proc(id, exec)?)
    }

    /// The container handle for a request about a known process.
    pub(crate) fn known(&self, id: &Id, exec: Option<&Id>) -> Result<Container> {
        self.with_proc(id, exec, |_| Ok(()))?;
        Ok(self.channel()?.container(id))
    }

    /// Boots the pod VM for the first container; returns the pod.
    pub(crate) async fn ensure_pod(
        &self,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<PodInfo> {
        let mut pod = self.s.pod.lock().await;
        if pod.is_some() {
            return match self.s.info.lock().unwrap().clone() {
                Some(info) if !info.dead => Ok(info),
                _ => Err(Error::Unavailable("the pod VM has died".into())),
            };
        }
        let opts = crate::options::decode(req.options.as_ref())
            .map_err(|e| Error::InvalidArgument(format!("task {}: {e}", req.id)))?;
        let explicit = opts
            .as_ref()
            .map(|o| o.config_path.clone())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from);
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
            .and_then(|a| a.get(cocoon_protocols::cri::SANDBOX_ID).cloned())
            .unwrap_or_else(|| req.id.clone());
        let sandbox_id = Id::sandbox(&sandbox_id)?;
        let options = cocoon_runtime::SandboxOptions {
            // Written as soon as the pod has a state directory: a shim
            // killed while the VM boots is cleaned up by `delete` too.
            pointer: Some(Path::new(&req.bundle).join(SANDBOX_POINTER)),
            ..cocoon_runtime::SandboxOptions::from_spec(spec)
                .map_err(|e| Error::InvalidArgument(format!("task {}: {e}", req.id)))?
        };
        tracing::info!(
            sandbox = %sandbox_id,
            config = %loaded.source,
            netns = ?options.netns,
            cgroup = ?options.cgroup.as_ref().map(ToString::to_string),
            "booting pod VM"
        );
        let sandbox = self
            .s
            .launcher
            .launch(&sandbox_id, &loaded.config, &options)
            .await?;
        let info = PodInfo {
            sandbox_id,
            channel: sandbox.channel(),
            vmm_pid: sandbox.vmm_pid(),
            dead: false,
        };
        *self.s.info.lock().unwrap() = Some(info.clone());
        // Under the pod lock, so that a stop_pod (which takes it first)
        // finds the forwarder with the pod.
        if let Some(netns) = options.netns {
            let id = Id::container(&req.id)?;
            match crate::portforward::PortForwarder::start(&netns, id, info.channel.clone()).await {
                Ok(f) => *self.s.forwarder.lock().await = Some(f),
                Err(e) => tracing::warn!("no port forwarding: {}", cocoon_runtime::error_chain(&e)),
            }
        }
        *pod = Some(sandbox);
        drop(pod);
        crate::monitor::spawn(self.clone(), info.channel.clone());
        Ok(info)
    }

    /// Runs `f` to completion on a task of its own, in the caller's span.
    /// ttrpc drops a handler whose connection closes (containerd closes
    /// it when its deadline passes, or when it restarts); a create, delete
    /// or shutdown dropped half way would leave the table, the guest and
    /// the host out of step, or a shim that never exits.
    pub(crate) async fn to_completion<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce(Service) -> Fut,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        use tracing::Instrument;
        match tokio::spawn(f(self.clone()).in_current_span()).await {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime itself shuts down.
            Err(e) => panic!("shim task cancelled: {e}"),
        }
    }

    pub(crate) async fn stop_pod(&self) {
        // The pod lock first: an ensure_pod in flight has set both by then.
        let pod = self.s.pod.lock().await.take();
        if let Some(f) = self.s.forwarder.lock().await.take() {
            f.stop().await;
        }
        *self.s.info.lock().unwrap() = None;
        if let Some(p) = pod {
            p.stop().await;
        }
    }
}
