//! The agent service: the table of containers and their processes that
//! every operation shares, and serving it on vsock.
//!
//! One module per job: [`rpc`] is the ttrpc trampoline (ids parsed, sizes
//! bounded, then delegated), [`spec`] rewrites the OCI spec the host sends,
//! [`sandbox`], [`containers`] and [`processes`] are the operations,
//! [`network`] configures the pod's NICs,
//! [`cgroups`] reads and updates a container's cgroup, [`oom`] reports OOM
//! kills, [`resources`] onlines the CPUs and memory the host hotplugged.

mod cgroups;
mod containers;
mod network;
mod oom;
mod portforward;
mod processes;
mod resources;
mod rpc;
mod sandbox;
mod spec;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cocoon_protocols::{agent_ttrpc, Error, Id};
use tokio::sync::watch;

use crate::reaper::Reaper;
use crate::stdio::StdioTable;

/// libcontainer's state directory.
const CONTAINER_ROOT: &str = "/run/cocoon/containers";
/// Where bundles (config.json, exec process files) are written.
const BUNDLE_ROOT: &str = "/run/cocoon/bundles";
/// Parent cgroup of every container.
const CGROUP_PARENT: &str = "/cocoon";

type Result<T, E = Error> = std::result::Result<T, E>;

/// An Internal error: `what` failed because of `e`.
fn internal<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// `e` and its causes, for errors that keep their causes as sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    status: i32,
    at_nanos: i64,
    oom_killed: bool,
}

/// One process: a container's init (exec id `None`) or an exec.
struct Process {
    pid: i32,
    exit: watch::Receiver<Option<Exit>>,
    pty_master: Option<Arc<OwnedFd>>,
}

struct ContainerEntry {
    bundle: PathBuf,
    processes: HashMap<Option<Id>, Process>,
}

/// Names a process in messages.
fn process_name(container_id: &Id, exec_id: Option<&Id>) -> String {
    match exec_id {
        Some(e) => format!("exec {e} of container {container_id}"),
        None => format!("init process of container {container_id}"),
    }
}

/// The agent's state.
pub struct Agent {
    reaper: Reaper,
    stdio: StdioTable,
    containers: Mutex<HashMap<Id, ContainerEntry>>,
    oom: oom::Oom,
}

impl Agent {
    fn new(reaper: Reaper, stdio: StdioTable) -> Self {
        Self {
            reaper,
            stdio,
            containers: Mutex::new(HashMap::new()),
            oom: oom::Oom::default(),
        }
    }

    /// Runs `f` on a known process.
    fn process<T>(
        &self,
        container_id: &Id,
        exec_id: Option<&Id>,
        f: impl FnOnce(&Process) -> T,
    ) -> Result<T> {
        let map = self.containers.lock().unwrap();
        let c = map
            .get(container_id)
            .ok_or_else(|| Error::NotFound(format!("container {container_id} not found")))?;
        let p = c.processes.get(&exec_id.cloned()).ok_or_else(|| {
            Error::NotFound(format!("{} not found", process_name(container_id, exec_id)))
        })?;
        Ok(f(p))
    }

    /// NotFound unless the container exists (and has its init).
    fn exists(&self, container_id: &Id) -> Result<()> {
        self.process(container_id, None, |_| ())
    }

    fn container_ids(&self) -> Vec<Id> {
        self.containers.lock().unwrap().keys().cloned().collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("start the reaper")]
    Reaper(#[source] std::io::Error),
    #[error("listen on vsock port {port}")]
    Listen {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("start the ttrpc server")]
    Ttrpc(#[source] ttrpc::Error),
}

/// Starts the reaper and serves the agent and stream ports until powered off.
pub async fn serve() -> Result<(), ServeError> {
    let reaper = Reaper::default();
    reaper.start().map_err(ServeError::Reaper)?;
    if let Err(e) = network::loopback_up().await {
        tracing::warn!("{e}");
    }
    let stdio = StdioTable::default();
    let agent = Arc::new(Agent::new(reaper, stdio.clone()));
    tokio::spawn(stdio.serve(cocoon_protocols::STREAM_PORT));
    tokio::spawn(oom::watch(agent.clone()));
    let forwarding = agent.clone();
    tokio::spawn(async move {
        let port = cocoon_protocols::PORT_FORWARD_PORT;
        if let Err(e) = portforward::serve(forwarding, port).await {
            tracing::error!("port forwarding on vsock port {port}: {e}");
        }
    });
    let port = cocoon_protocols::AGENT_PORT;
    let listener =
        tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(|source| ServeError::Listen { port, source })?;
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::r#async::transport::Listener::from(listener))
        .register_service(agent_ttrpc::create_agent(Arc::new(rpc::Rpc::new(agent))));
    server.start().await.map_err(ServeError::Ttrpc)?;
    tracing::info!(
        "{} {port}, {} ms after the kernel started",
        cocoon_protocols::AGENT_READY,
        crate::init::uptime_ms()
    );
    std::future::pending::<()>().await;
    Ok(())
}
