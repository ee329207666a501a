//! containerd's `Task` service: each call parses its ids once, into
//! [`Id`]s (an invalid one is InvalidArgument before anything is done),
//! delegates to the operation, and turns the error into its gRPC code.

use async_trait::async_trait;
use cocoon_protocols::Id;
use containerd_shim::protos::api;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::TtrpcContext;

use crate::error::{Error, Result};
use crate::service::{ts, Service};

fn ok<T>(r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!("{e}");
        e.into()
    })
}

fn ids(id: &str, exec: &str) -> Result<(Id, Option<Id>)> {
    Ok((Id::container(id)?, Id::exec_or_init(exec)?))
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
        ok((|| {
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            let mut table = self.s.table.lock().unwrap();
            let bundle = table.container(&id)?.bundle.display().to_string();
            let p = table.proc(&id, exec.as_ref())?;
            let exit = *p.exit.borrow();
            Ok(api::StateResponse {
                id: crate::table::event_id(&id, exec.as_ref()),
                bundle,
                pid,
                status: p.state.status().into(),
                stdin: p.stdio.stdin.clone(),
                stdout: p.stdio.stdout.clone(),
                stderr: p.stdio.stderr.clone(),
                terminal: p.stdio.terminal,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: exit.map(|e| ts(e.at)).into(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
        })())
    }

    #[tracing::instrument(name = "create", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        let r = async {
            let id = Id::container(&req.id)?;
            self.to_completion(|s| async move { s.create(id, req).await })
                .await
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "start", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        let r = async {
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            self.to_completion(|s| async move { s.start(id, exec).await })
                .await
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "delete", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let r = async {
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            self.to_completion(|s| async move { s.delete(id, exec).await })
                .await
        };
        ok(r.await)
    }

    #[tracing::instrument(name = "pids", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let r = async { self.pids(Id::container(&req.id)?).await };
        ok(r.await)
    }

    #[tracing::instrument(name = "pause", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn pause(&self, _: &TtrpcContext, req: api::PauseRequest) -> ttrpc::Result<api::Empty> {
        let r = async { self.freeze(Id::container(&req.id)?, true).await };
        ok(r.await.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "resume", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn resume(&self, _: &TtrpcContext, req: api::ResumeRequest) -> ttrpc::Result<api::Empty> {
        let r = async { self.freeze(Id::container(&req.id)?, false).await };
        ok(r.await.map(|()| api::Empty::new()))
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
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            self.to_completion(|s| async move { s.kill(id, exec, req.signal, req.all).await })
                .await
        };
        ok(r.await.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "exec", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn exec(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            let id = Id::container(&req.id)?;
            let exec = Id::exec(&req.exec_id)?;
            self.to_completion(|s| async move { s.exec(id, exec, req).await })
                .await
        };
        ok(r.await.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "resize_pty", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            self.resize(id, exec, req.height, req.width).await
        };
        ok(r.await.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "close_io", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn close_io(
        &self,
        _: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<api::Empty> {
        let r =
            ids(&req.id, &req.exec_id).and_then(|(id, exec)| self.close_io(id, exec, req.stdin));
        ok(r.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "update", skip_all, fields(sandbox = %self.sandbox(), container = %req.id))]
    async fn update(
        &self,
        _: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<api::Empty> {
        let r = async {
            let id = Id::container(&req.id)?;
            self.to_completion(|s| async move { s.update(id, req.resources.as_ref()).await })
                .await
        };
        ok(r.await.map(|()| api::Empty::new()))
    }

    #[tracing::instrument(name = "wait", skip_all, fields(sandbox = %self.sandbox(), container = %req.id, exec = %req.exec_id))]
    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let r = async {
            let (id, exec) = ids(&req.id, &req.exec_id)?;
            let mut rx = self.with_proc(&id, exec.as_ref(), |p| Ok(p.exit.subscribe()))?;
            let exit = rx
                .wait_for(Option::is_some)
                .await
                .map(|e| *e)
                .map_err(|_| Error::NotFound(format!("task {id} was deleted")))?;
            let exit = exit.ok_or_else(|| Error::Internal("exit without status".into()))?;
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
        let r = async { self.stats(Id::container(&req.id)?).await };
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
        if !self.s.table.lock().unwrap().containers.is_empty() {
            return Ok(api::Empty::new());
        }
        tracing::info!("last task gone; stopping the pod VM");
        // containerd gives up after 3 s, which stopping a VM on a loaded
        // host can take; dropped half way, the shim would never exit.
        self.to_completion(|s| async move {
            s.stop_pod().await;
            s.s.exit.signal();
        })
        .await;
        Ok(api::Empty::new())
    }
}
