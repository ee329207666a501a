//! A sandbox is one pod VM: its state directory, the directory it shares
//! with the guest, the VM, and a connected agent. [`Sandbox::start`] returns
//! a ready sandbox or fails having released everything it created;
//! [`Sandbox::stop`] releases it all in order, and dropping a sandbox kills
//! and removes what is left.

mod rundir;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_config::Config;
use cocoon_hypervisor::{HostCaps, Hypervisor, Vm, VmSpec, VsockStream};
use cocoon_protocols::agent::{CreateSandboxRequest, Empty};
use cocoon_protocols::agent_ttrpc::AgentClient;
use cocoon_protocols::{StreamHeader, StreamKind};
use tokio::io::AsyncWriteExt;

pub use rundir::{cleanup_dead, owned_processes, RunDir};

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid sandbox id {0:?}")]
    InvalidId(String),
    #[error("sandbox {id} is already running ({path})")]
    Running { id: String, path: PathBuf },
    #[error("sandbox {id}")]
    Hypervisor {
        id: String,
        #[source]
        source: cocoon_hypervisor::Error,
    },
    #[error("sandbox {id}: the guest agent did not answer within {timeout:?} ({attempts} attempts, the last: {last}); last console lines:\n{console}")]
    BootTimeout {
        id: String,
        timeout: Duration,
        attempts: u32,
        last: String,
        console: String,
    },
    #[error("sandbox {id}: the VM exited during boot ({status}); last console lines:\n{console}")]
    VmExited {
        id: String,
        status: String,
        console: String,
    },
    #[error("sandbox {id}: agent {call}")]
    Agent {
        id: String,
        call: &'static str,
        #[source]
        source: ttrpc::Error,
    },
    #[error("sandbox {id}: {action} {path}")]
    Host {
        id: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox {id}: stream {what}")]
    Stream {
        id: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its causes on one line: `what failed: why: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A timeout context for one agent call.
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

/// Default timeout of short agent calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running pod VM with a connected agent.
pub struct Sandbox {
    id: String,
    // Field order is drop order: the VM (and its daemons) goes before the
    // mounts and directories it uses.
    vm: Box<dyn Vm>,
    agent: AgentClient,
    kernel_release: String,
    dir: RunDir,
}

impl Sandbox {
    /// Boots the VM for sandbox `id` and waits for its agent.
    pub async fn start(id: &str, config: &Config, hypervisor: &dyn Hypervisor) -> Result<Self> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') || id.len() > 128 {
            return Err(Error::InvalidId(id.into()));
        }
        let caps = HostCaps::probe();
        let accel = caps.resolve_accel(config.hypervisor.accel);
        let vsock = caps.resolve_vsock(config.vsock.transport);
        tracing::info!(sandbox = id, ?accel, ?vsock, machine = ?config.hypervisor.machine, "starting VM");
        // State left by an owner that died with its VM (a killed shim whose
        // containerd never ran `delete`) is cleaned; a live sandbox is not.
        let stale = config.runtime.state_dir.join(id);
        if stale.exists() {
            if !owned_processes(&stale).is_empty() {
                return Err(Error::Running {
                    id: id.into(),
                    path: stale,
                });
            }
            tracing::info!(
                sandbox = id,
                "removing the state of a previous owner: {}",
                stale.display()
            );
            cleanup_dead(&stale).await;
        }
        let dir = RunDir::create(id, &config.runtime.state_dir)?;
        let spec = VmSpec {
            name: format!("cocoon-{id}"),
            config: config.clone(),
            accel,
            vsock,
            run_dir: dir.path().to_path_buf(),
            shared_dir: dir.shared().to_path_buf(),
            share_tag: cocoon_protocols::SHARE_TAG.into(),
            tsc_khz: match accel {
                cocoon_hypervisor::ResolvedAccel::Tcg => cocoon_hypervisor::host::tsc_khz(),
                cocoon_hypervisor::ResolvedAccel::Kvm => None,
            },
        };
        let hv_err = |source| Error::Hypervisor {
            id: id.into(),
            source,
        };
        let mut vm = hypervisor.launch(&spec).await.map_err(hv_err)?;
        for (name, pid) in vm.pids() {
            dir.record_pid(name, pid);
        }
        let timeout = config.hypervisor.boot_timeout;
        let (agent, kernel_release) = match connect_agent(id, vm.as_mut(), timeout).await {
            Ok(a) => a,
            Err(e) => {
                vm.shutdown(Duration::ZERO).await;
                return Err(e);
            }
        };
        let sandbox = Self {
            id: id.into(),
            vm,
            agent,
            kernel_release,
            dir,
        };
        let req = CreateSandboxRequest {
            hostname: id.chars().take(63).collect(),
            share_tag: cocoon_protocols::SHARE_TAG.into(),
            ..Default::default()
        };
        if let Err(source) = sandbox.agent.create_sandbox(ctx(CALL_TIMEOUT), &req).await {
            let mut s = sandbox;
            s.vm.shutdown(Duration::ZERO).await;
            return Err(Error::Agent {
                id: id.into(),
                call: "CreateSandbox",
                source,
            });
        }
        Ok(sandbox)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The guest agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The host pid of the VMM.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// The guest kernel's release, as the agent reported it.
    pub fn kernel_release(&self) -> &str {
        &self.kernel_release
    }

    /// The VM handle (pause, resume, wait).
    pub fn vm(&mut self) -> &mut dyn Vm {
        self.vm.as_mut()
    }

    /// Shares host directory `rootfs` with the guest as the root filesystem
    /// of `container_id`; returns its path relative to the guest's share.
    pub fn share_rootfs(&mut self, container_id: &str, rootfs: &Path) -> Result<String> {
        self.dir.bind_rootfs(container_id, rootfs)
    }

    /// Stops sharing the root filesystem of `container_id`.
    pub fn unshare_rootfs(&mut self, container_id: &str) {
        self.dir.unbind_rootfs(container_id)
    }

    /// A cloneable handle on the agent and the stream port.
    pub fn channel(&self) -> Channel {
        Channel {
            id: self.id.clone(),
            agent: self.agent.clone(),
            vsock: self.vm.vsock().clone(),
        }
    }

    /// The state directory of this sandbox.
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Powers the guest off and releases every host resource.
    pub async fn stop(mut self) {
        // The agent flushes the guest's caches before it answers; after the
        // answer nothing in the guest is worth waiting for (a guest reboot
        // under TCG takes a second), so QEMU is told to quit right away.
        // Without an answer, the guest gets a few seconds to power off.
        let destroyed = tokio::time::timeout(
            Duration::from_secs(2),
            self.agent
                .destroy_sandbox(ctx(Duration::from_secs(2)), &Empty::new()),
        )
        .await;
        let grace = match destroyed {
            Ok(Ok(_)) => Duration::ZERO,
            _ => Duration::from_secs(3),
        };
        self.vm.shutdown(grace).await;
        tracing::info!(sandbox = %self.id, "stopped");
    }
}

/// The agent and the stream port of a sandbox, cheap to clone.
#[derive(Clone)]
pub struct Channel {
    id: String,
    agent: AgentClient,
    vsock: cocoon_hypervisor::VsockConnector,
}

impl Channel {
    /// A channel to the agent behind `vsock` (tests put a fake guest there).
    pub fn new(id: &str, agent: AgentClient, vsock: cocoon_hypervisor::VsockConnector) -> Self {
        Self {
            id: id.into(),
            agent,
            vsock,
        }
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Opens one stdio stream of a process (`exec_id` empty for the init).
    pub async fn open_stream(
        &self,
        kind: StreamKind,
        container_id: &str,
        exec_id: &str,
    ) -> Result<VsockStream> {
        let what = format!("{} of {container_id}/{exec_id}", kind.as_str());
        let err = |source| Error::Stream {
            id: self.id.clone(),
            what: what.clone(),
            source,
        };
        let mut s = self
            .vsock
            .connect(cocoon_protocols::STREAM_PORT)
            .await
            .map_err(err)?;
        let header = StreamHeader {
            kind,
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        };
        s.write_all(header.encode().as_bytes()).await.map_err(err)?;
        Ok(s)
    }
}

/// Connects to the agent, retrying until it answers a ping or `timeout` passes.
async fn connect_agent(
    id: &str,
    vm: &mut dyn Vm,
    timeout: Duration,
) -> Result<(AgentClient, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let start = std::time::Instant::now();
    let mut attempts = 0;
    let mut last = String::from("none");
    loop {
        attempts += 1;
        if let Some(status) = vm.try_wait() {
            return Err(Error::VmExited {
                id: id.into(),
                status,
                console: vm.console_tail(30),
            });
        }
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            vm.vsock().connect(cocoon_protocols::AGENT_PORT),
        )
        .await;
        match &attempt {
            Ok(Err(e)) => last = format!("connect: {e}"),
            Err(_) => last = "connect: no answer in 500ms".into(),
            Ok(Ok(_)) => {}
        }
        if let Ok(Ok(stream)) = attempt {
            let client = AgentClient::new(ttrpc::r#async::Client::new(
                ttrpc::r#async::transport::Socket::new(stream),
            ));
            let pong = client
                .ping(ctx(Duration::from_secs(2)), &Empty::new())
                .await;
            if let Err(e) = &pong {
                last = format!("ping: {e}");
            }
            if let Ok(pong) = pong {
                tracing::info!(
                    sandbox = id,
                    boot_ms = start.elapsed().as_millis() as u64,
                    "agent answered"
                );
                return Ok((client, pong.kernel_release));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::BootTimeout {
                id: id.into(),
                timeout,
                attempts,
                last,
                console: vm.console_tail(30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
