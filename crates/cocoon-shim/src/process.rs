//! The operations on a known process or container that are one call into
//! the guest each: exec (recorded here, started by `start`), kill, resize,
//! close stdin, update, pause/resume, pids, stats.

use cocoon_protocols::Id;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskExecAdded, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::{
    TASK_EXEC_ADDED_EVENT_TOPIC, TASK_PAUSED_EVENT_TOPIC, TASK_RESUMED_EVENT_TOPIC,
};
use containerd_shim::protos::types::task::ProcessInfo;

use crate::error::{Error, Result};
use crate::service::Service;
use crate::state::ProcState;
use crate::table::{Proc, Stdio};

fn any_type(any: &Any) -> &str {
    any.type_url.rsplit('/').next().unwrap_or("")
}

impl Service {
    pub(crate) async fn exec(&self, id: Id, exec: Id, req: api::ExecProcessRequest) -> Result<()> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("exec {exec}: no process spec")))?;
        if !any_type(spec).ends_with("Process") {
            return Err(Error::InvalidArgument(format!(
                "exec {exec}: spec of type {:?} is not an OCI process",
                spec.type_url
            )));
        }
        {
            let mut table = self.s.table.lock().unwrap();
            let c = table.container(&id)?;
            c.init.state.can_exec(&id)?;
            if c.execs.contains_key(&exec) {
                return Err(Error::AlreadyExists(format!(
                    "exec {exec} already exists in container {id}"
                )));
            }
            let stdio = Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            c.execs
                .insert(exec.clone(), Proc::new(stdio, Some(spec.value.clone())));
        }
        let ev = TaskExecAdded {
            container_id: id.to_string(),
            exec_id: exec.to_string(),
            ..Default::default()
        };
        self.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev))
            .await;
        Ok(())
    }

    pub(crate) async fn kill(
        &self,
        id: Id,
        exec: Option<Id>,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let state = self.with_proc(&id, exec.as_ref(), |p| Ok(p.state))?;
        // With `all`, an exited init may still have processes to signal in
        // the container, unless the VM is gone with them: then, as for runc,
        // NotFound (containerd's CRI kills every process of an exited task
        // before deleting it, and accepts nothing else).
        if state == ProcState::Stopped && (!all || self.vm_dead()) {
            return Err(Error::NotFound(format!(
                "process {id}/{} has already exited",
                exec.as_ref().map_or("", |e| e.as_str())
            )));
        }
        let c = self.known(&id, exec.as_ref())?;
        c.signal(exec.as_ref(), signal, all).await
    }

    pub(crate) async fn resize(
        &self,
        id: Id,
        exec: Option<Id>,
        rows: u32,
        cols: u32,
    ) -> Result<()> {
        let c = self.known(&id, exec.as_ref())?;
        c.resize(exec.as_ref(), rows, cols).await
    }

    pub(crate) fn close_io(&self, id: Id, exec: Option<Id>, stdin: bool) -> Result<()> {
        self.with_proc(&id, exec.as_ref(), |p| {
            if stdin {
                if let Some(tx) = p.close_stdin.take() {
                    let _ = tx.send(());
                }
            }
            Ok(())
        })
    }

    pub(crate) async fn update(&self, id: Id, resources: Option<&Any>) -> Result<()> {
        self.known(&id, None)?;
        let res = resources
            .ok_or_else(|| Error::InvalidArgument(format!("update of task {id}: no resources")))?;
        if !any_type(res).ends_with("LinuxResources") {
            return Err(Error::InvalidArgument(format!(
                "update of task {id}: resources of type {:?} are not OCI LinuxResources",
                res.type_url
            )));
        }
        let parsed: oci_spec::runtime::LinuxResources = serde_json::from_slice(&res.value)
            .map_err(|e| Error::InvalidArgument(format!("update of task {id}: {e}")))?;
        // A VM that has exited has no task to update (nor an agent that
        // would answer within the deadline).
        if self.vm_dead() {
            return Err(Error::NotFound(format!(
                "update of task {id}: its pod VM has exited"
            )));
        }
        // Through the pod: the VM may have to grow for the new limits.
        let mut guard = self.s.pod.lock().await;
        let pod = guard.as_mut().ok_or_else(|| {
            Error::Unavailable(format!("update of task {id}: the pod VM is not running"))
        })?;
        pod.update_container(&id, &parsed).await
    }

    /// Pause (`true`) or resume (`false`) a container's processes.
    pub(crate) async fn freeze(&self, id: Id, pause: bool) -> Result<()> {
        self.with_proc(&id, None, |p| {
            if pause {
                p.state.pause(&id)
            } else {
                p.state.resume(&id)
            }
            .map(drop)
        })?;
        let c = self.known(&id, None)?;
        c.freeze(pause).await?;
        self.with_proc(&id, None, |p| {
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
            let ev = TaskPaused {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(TASK_PAUSED_EVENT_TOPIC, Box::new(ev)).await;
        } else {
            let ev = TaskResumed {
                container_id: id.to_string(),
                ..Default::default()
            };
            self.publish(TASK_RESUMED_EVENT_TOPIC, Box::new(ev)).await;
        }
        Ok(())
    }

    pub(crate) async fn pids(&self, id: Id) -> Result<api::PidsResponse> {
        let pids = self.known(&id, None)?.pids().await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    pub(crate) async fn stats(&self, id: Id) -> Result<api::StatsResponse> {
        let s = self.known(&id, None)?.stats().await?;
        let m = crate::metrics::from_guest(&s);
        let any = Any {
            type_url: "io.containerd.cgroups.v1.Metrics".into(),
            value: containerd_shim::protos::protobuf::Message::write_to_bytes(&m)
                .map_err(|e| Error::Internal(format!("stats of {id}: {e}")))?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }
}
