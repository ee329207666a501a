//! Start: the container's init, or an exec (which is created in the guest
//! only now, then attached). A failed start leaves the process stopped with
//! an exit, so that every `Wait` on it returns.

use std::time::SystemTime;

use cocoon_protocols::Id;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskExecStarted, TaskStart};
use containerd_shim::protos::topics::{TASK_EXEC_STARTED_EVENT_TOPIC, TASK_START_EVENT_TOPIC};

use crate::error::Result;
use crate::service::{Service, EXIT_START_FAILED, EXIT_VM_DIED};
use crate::state::ProcState;
use crate::table::Exit;

impl Service {
    pub(crate) async fn start(&self, id: Id, exec: Option<Id>) -> Result<api::StartResponse> {
        let name = format!(
            "{id}{}",
            exec.as_ref().map(|e| format!("/{e}")).unwrap_or_default()
        );
        let c = self.known(&id, exec.as_ref())?;
        let (spec, stdio) = self.with_proc(&id, exec.as_ref(), |p| {
            p.state = p.state.start(&name)?;
            Ok((p.exec_spec.clone(), p.stdio.clone()))
        })?;
        let result = match &exec {
            None => c.start().await,
            Some(e) => match c.exec(e, spec.unwrap_or_default(), stdio.terminal).await {
                Ok(()) => match self.attach_io(&c, Some(e), &stdio).await {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        // The process runs in the guest with nowhere to
                        // write: end it.
                        let _ = c.signal(Some(e), libc::SIGKILL as u32, false).await;
                        Err(err)
                    }
                },
                Err(err) => Err(err),
            },
        };
        if let Err(e) = result {
            // Nothing runs: the process ends here, so every Wait returns.
            self.end(&id, exec.as_ref(), EXIT_START_FAILED).await;
            return Err(e);
        }
        self.with_proc(&id, exec.as_ref(), |p| {
            // A process that already exited stays stopped.
            if p.state != ProcState::Stopped {
                p.state = ProcState::Running;
            }
            Ok(())
        })?;
        let pid = self.vmm_pid();
        match &exec {
            None => {
                let ev = TaskStart {
                    container_id: id.to_string(),
                    pid,
                    ..Default::default()
                };
                self.publish(TASK_START_EVENT_TOPIC, Box::new(ev)).await;
            }
            Some(e) => {
                let ev = TaskExecStarted {
                    container_id: id.to_string(),
                    exec_id: e.to_string(),
                    pid,
                    ..Default::default()
                };
                self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(ev))
                    .await;
            }
        }
        self.with_proc(&id, exec.as_ref(), |p| {
            p.started.send_replace(true);
            Ok(())
        })?;
        // The VM died while this start was in flight: the monitor left the
        // process to us.
        if self.vm_dead() {
            self.end(&id, exec.as_ref(), EXIT_VM_DIED).await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// Ends a process with `status` now, unless another path has claimed
    /// its exit.
    async fn end(&self, id: &Id, exec: Option<&Id>, status: u32) {
        let claimed = self
            .with_proc(id, exec, |p| Ok(p.claim_exit()))
            .unwrap_or(false);
        if claimed {
            let exit = Exit {
                status,
                at: SystemTime::now(),
            };
            self.publish_exit(id, exec, exit, false).await;
        }
    }
}
