//! [`Container`]: every operation the front ends (the shim, `cocoon run`)
//! need on a container of a running sandbox. Each one is a call into the
//! guest with a deadline, except [`Container::wait`], an intentional
//! long-poll that shares the connection with (and never blocks) other calls.
//! What the guest answers is parsed into our own types here, at the edge.

use std::time::{Duration, SystemTime};

use cocoon_hypervisor::VsockStream;
use cocoon_protocols::agent as ag;
use cocoon_protocols::{Error, Id, StreamHeader, StreamKind};
use tokio::io::AsyncWriteExt;

use crate::{ctx, Channel, CALL_TIMEOUT};

type Result<T, E = Error> = std::result::Result<T, E>;

/// How a process ended, as the guest reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exit code, or 128 + the signal that killed the process.
    pub status: u32,
    pub at: SystemTime,
    /// The container's init was killed by the OOM killer.
    pub oom_killed: bool,
}

/// A handle on one container of a sandbox; cheap to clone.
#[derive(Clone)]
pub struct Container {
    id: Id,
    channel: Channel,
}

impl Container {
    /// A handle on container `id` (which the guest may or may not know).
    pub fn new(channel: Channel, id: Id) -> Self {
        Self { id, channel }
    }

    pub fn id(&self) -> &Id {
        &self.id
    }

    fn req(&self) -> ag::ContainerRequest {
        ag::ContainerRequest {
            container_id: self.id.to_string(),
            ..Default::default()
        }
    }

    fn process(&self, exec: Option<&Id>) -> ag::ProcessRequest {
        ag::ProcessRequest {
            container_id: self.id.to_string(),
            exec_id: exec.map(Id::to_string).unwrap_or_default(),
            ..Default::default()
        }
    }

    fn err(&self, what: &str, exec: Option<&Id>) -> impl FnOnce(ttrpc::Error) -> Error + '_ {
        let what = match exec {
            Some(e) => format!("{what} exec {e} of container {}", self.id),
            None => format!("{what} container {}", self.id),
        };
        move |e| Error::from_ttrpc(what, e)
    }

    /// Creates the container in the guest from `spec` (already adapted to
    /// the guest: see [`crate::spec::adapt`]).
    pub(crate) async fn create(
        channel: Channel,
        id: Id,
        spec: &oci_spec::runtime::Spec,
        terminal: bool,
    ) -> Result<Self> {
        let c = Self::new(channel, id);
        let json = serde_json::to_vec(spec)
            .map_err(|e| Error::InvalidArgument(format!("spec of container {}: {e}", c.id)))?;
        let req = ag::CreateContainerRequest {
            container_id: c.id.to_string(),
            oci_spec_json: json,
            terminal,
            ..Default::default()
        };
        c.channel
            .agent()
            .create_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(c.err("create", None))?;
        tracing::debug!(sandbox = %c.channel.id, container = %c.id, phase = "container-created", "container created");
        Ok(c)
    }

    /// Starts the container's init.
    pub async fn start(&self) -> Result<()> {
        self.channel
            .agent()
            .start_container(ctx(CALL_TIMEOUT), &self.req())
            .await
            .map_err(self.err("start", None))?;
        tracing::debug!(sandbox = %self.channel.id, container = %self.id, phase = "container-started", "container started");
        Ok(())
    }

    /// Removes the container from the guest.
    pub async fn remove(&self) -> Result<()> {
        self.channel
            .agent()
            .remove_container(ctx(CALL_TIMEOUT), &self.req())
            .await
            .map_err(self.err("remove", None))?;
        Ok(())
    }

    /// Starts process `exec` (an OCI process, as JSON) in the container.
    pub async fn exec(&self, exec: &Id, process_json: Vec<u8>, terminal: bool) -> Result<()> {
        let req = ag::ExecProcessRequest {
            container_id: self.id.to_string(),
            exec_id: exec.to_string(),
            oci_process_json: process_json,
            terminal,
            ..Default::default()
        };
        self.channel
            .agent()
            .exec_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(self.err("start", Some(exec)))?;
        Ok(())
    }

    /// Waits for the init (`exec` None) or an exec to exit. No deadline:
    /// a process may run for ever; the caller races this against the VM.
    pub async fn wait(&self, exec: Option<&Id>) -> Result<ProcessExit> {
        let w = self
            .channel
            .agent()
            .wait_process(ttrpc::context::Context::default(), &self.process(exec))
            .await
            .map_err(self.err("wait for", exec))?;
        // The guest's numbers are input: a negative status or time is not
        // passed on as a huge unsigned one.
        let status = u32::try_from(w.exit_status).unwrap_or(255).min(255);
        let nanos = u64::try_from(w.exited_at_unix_nanos).unwrap_or(0);
        tracing::debug!(
            sandbox = %self.channel.id,
            container = %self.id,
            exec = exec.map(Id::as_str),
            status,
            phase = "process-exited",
            "process exited"
        );
        Ok(ProcessExit {
            status,
            at: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
            oom_killed: w.oom_killed,
        })
    }

    /// Sends `signal` to a process, or to every process of the container.
    pub async fn signal(&self, exec: Option<&Id>, signal: u32, all: bool) -> Result<()> {
        let req = ag::SignalProcessRequest {
            container_id: self.id.to_string(),
            exec_id: exec.map(Id::to_string).unwrap_or_default(),
            signal,
            all,
            ..Default::default()
        };
        self.channel
            .agent()
            .signal_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(self.err("signal", exec))?;
        Ok(())
    }

    /// Closes a process's stdin (it has no stdin stream).
    pub async fn close_stdin(&self, exec: Option<&Id>) -> Result<()> {
        self.channel
            .agent()
            .close_stdin(ctx(CALL_TIMEOUT), &self.process(exec))
            .await
            .map_err(self.err("close stdin of", exec))?;
        Ok(())
    }

    /// Resizes a process's terminal.
    pub async fn resize(&self, exec: Option<&Id>, rows: u32, columns: u32) -> Result<()> {
        let req = ag::ResizeTtyRequest {
            container_id: self.id.to_string(),
            exec_id: exec.map(Id::to_string).unwrap_or_default(),
            rows,
            columns,
            ..Default::default()
        };
        self.channel
            .agent()
            .resize_tty(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(self.err("resize the terminal of", exec))?;
        Ok(())
    }

    /// Freezes (`true`) or thaws (`false`) every process of the container.
    pub async fn freeze(&self, pause: bool) -> Result<()> {
        let agent = self.channel.agent();
        let r = if pause {
            agent.pause_container(ctx(CALL_TIMEOUT), &self.req()).await
        } else {
            agent.resume_container(ctx(CALL_TIMEOUT), &self.req()).await
        };
        r.map_err(self.err(if pause { "pause" } else { "resume" }, None))?;
        Ok(())
    }

    /// Applies new resource limits.
    pub async fn update(&self, resources: &oci_spec::runtime::LinuxResources) -> Result<()> {
        let json = serde_json::to_vec(resources)
            .map_err(|e| Error::InvalidArgument(format!("resources of {}: {e}", self.id)))?;
        let req = ag::UpdateContainerRequest {
            container_id: self.id.to_string(),
            oci_resources_json: json,
            ..Default::default()
        };
        self.channel
            .agent()
            .update_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(self.err("update", None))?;
        Ok(())
    }

    /// The guest cgroup's statistics, as the agent reports them.
    pub async fn stats(&self) -> Result<ag::StatsContainerResponse> {
        self.channel
            .agent()
            .stats_container(ctx(CALL_TIMEOUT), &self.req())
            .await
            .map_err(self.err("stats of", None))
    }

    /// The guest pids of the container's processes (at most [`MAX_PIDS`]).
    pub async fn pids(&self) -> Result<Vec<u32>> {
        let mut l = self
            .channel
            .agent()
            .list_processes(ctx(CALL_TIMEOUT), &self.req())
            .await
            .map_err(self.err("list the processes of", None))?;
        l.pids.truncate(MAX_PIDS);
        Ok(l.pids)
    }

    /// Opens one stdio stream of a process, within the channel's stream
    /// deadline: a guest that never accepts cannot hang the caller.
    pub async fn open_stream(&self, kind: StreamKind, exec: Option<&Id>) -> Result<VsockStream> {
        let header = StreamHeader {
            kind,
            container_id: self.id.clone(),
            exec_id: exec.cloned(),
        };
        let deadline = self.channel.stream_timeout;
        let what = || match exec {
            Some(e) => format!("{} of exec {e} of container {}", kind.as_str(), self.id),
            None => format!("{} of container {}", kind.as_str(), self.id),
        };
        let open = async {
            let mut s = self
                .channel
                .vsock
                .connect(cocoon_protocols::STREAM_PORT)
                .await?;
            s.write_all(header.encode().as_bytes()).await?;
            Ok::<_, std::io::Error>(s)
        };
        match tokio::time::timeout(deadline, open).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                Err(Error::DeadlineExceeded(format!("open the {}: {e}", what())))
            }
            Ok(Err(e)) => Err(Error::Unavailable(format!("open the {}: {e}", what()))),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "open the {}: the guest did not accept it within {deadline:?}",
                what()
            ))),
        }
    }
}

/// The most pids a `pids` answer is trusted with.
pub const MAX_PIDS: usize = 65_536;
