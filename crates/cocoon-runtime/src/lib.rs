//! A sandbox is one pod VM: its state directory, the directory it shares
//! with the guest, the VM, and a connected agent. [`Sandbox::start`] returns
//! a ready sandbox or fails having released everything it created;
//! [`Sandbox::stop`] releases it all in order, and dropping a sandbox kills
//! and removes what is left. A [`Container`] is one container of a
//! sandbox, with every operation the front ends need. A sandbox started
//! with a network namespace ([`SandboxOptions`]) gives the guest that
//! namespace's interfaces ([`network`]); one with a cgroup path runs its
//! VM and daemons in that host cgroup ([`cgroup`]).

pub mod cgroup;
mod container;
pub mod network;
mod portforward;
mod rundir;
pub mod sizing;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cgroup::{CgroupPath, HostCgroup};
use cocoon_config::Config;
use cocoon_hypervisor::{HostCaps, Hypervisor, Vm, VmSize, VmSpec};
use cocoon_protocols::agent::{CreateSandboxRequest, Empty, OnlineResourcesRequest};
use cocoon_protocols::agent_ttrpc::AgentClient;
use cocoon_protocols::Id;
use network::Network;
use sizing::{Demand, Sizing};

pub use container::{Container, ProcessExit};
/// The host's mount points, unescaped (`/proc/self/mountinfo`).
pub use rundir::mountinfo::mount_points;
pub use rundir::{cleanup_dead, owned_processes, sandbox_id_of, Access, RunDir, ShareName};

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidId(#[from] cocoon_protocols::InvalidId),
    #[error("sandbox {id} is already running ({path})")]
    Running { id: String, path: PathBuf },
    #[error("sandbox {id}")]
    Hypervisor {
        id: String,
        #[source]
        source: cocoon_hypervisor::Error,
    },
    #[error("sandbox {id}: the guest agent did not answer within {timeout:?} ({attempts} attempts, the last: {last}); last console lines:\n{console}\nlast lines of the helper daemons:\n{daemons}")]
    BootTimeout {
        id: String,
        timeout: Duration,
        attempts: u32,
        last: String,
        console: String,
        daemons: String,
    },
    #[error("sandbox {id}: the VM ended during boot: {status}; last console lines:\n{console}")]
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
    #[error("sandbox {id}: pod network")]
    Network {
        id: String,
        #[source]
        source: network::Error,
    },
    #[error("sandbox {id}: pod cgroup")]
    Cgroup {
        id: String,
        #[source]
        source: cgroup::Error,
    },
    #[error("sandbox {id}: {action} {path}")]
    Host {
        id: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC code a caller of the runtime should see for each failure.
impl From<Error> for cocoon_protocols::Error {
    fn from(e: Error) -> Self {
        use cocoon_protocols::Error as P;
        let msg = error_chain(&e);
        match &e {
            Error::InvalidId(_) => P::InvalidArgument(msg),
            Error::Running { .. } => P::AlreadyExists(msg),
            Error::Hypervisor { source, .. } => match source {
                cocoon_hypervisor::Error::NotFound { .. } => P::FailedPrecondition(msg),
                _ => P::Internal(msg),
            },
            Error::BootTimeout { .. } => P::DeadlineExceeded(msg),
            Error::VmExited { .. } => P::Unavailable(msg),
            Error::Agent { call, source, .. } => P::from_ttrpc(
                format!("sandbox {}: agent {call}", e_id(&e)),
                source.clone(),
            ),
            Error::Network { source, .. } => match source {
                network::Error::HostNetns { .. } => P::InvalidArgument(msg),
                e if e.is_not_found() => P::FailedPrecondition(msg),
                _ => P::Internal(msg),
            },
            Error::Cgroup { .. } | Error::Host { .. } => P::Internal(msg),
        }
    }
}

fn e_id(e: &Error) -> &str {
    match e {
        Error::Running { id, .. }
        | Error::Hypervisor { id, .. }
        | Error::BootTimeout { id, .. }
        | Error::VmExited { id, .. }
        | Error::Agent { id, .. }
        | Error::Network { id, .. }
        | Error::Cgroup { id, .. }
        | Error::Host { id, .. } => id,
        Error::InvalidId(e) => &e.id,
    }
}

/// The size of the tmpfs at `path`, if it is one.
fn tmpfs_size(path: &Path) -> Option<u64> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .then(|| st.blocks() * st.block_size() as u64)
        .map(|size| {
            if size == 0 {
                spec::DEFAULT_SHM_SIZE
            } else {
                size
            }
        })
}

/// A bind mount source of container `id` that could not be shared: a
/// missing path is the caller's NotFound, anything else (EACCES, EIO, a
/// failed mount) the host's Internal.
fn bind_error(id: &Id, source: &Path, e: Error) -> cocoon_protocols::Error {
    let missing =
        matches!(&e, Error::Host { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
    let msg = format!(
        "container {id}: bind mount source {}: {}",
        source.display(),
        error_chain(&e)
    );
    if missing {
        cocoon_protocols::Error::NotFound(msg)
    } else {
        cocoon_protocols::Error::Internal(msg)
    }
}

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

/// How long one attempt to reach the booting agent may take.
const CONNECT_ATTEMPT: Duration = Duration::from_millis(500);

/// How long the guest has to accept a stdio stream.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// The hypervisor a configuration asks for (QEMU is the one backend).
pub fn hypervisor(_config: &Config) -> Box<dyn Hypervisor> {
    Box::new(cocoon_hypervisor::Qemu)
}

/// How a sandbox is started, beyond its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxOptions {
    /// The pod's network namespace, where CNI has put its interfaces: each
    /// becomes a NIC of the guest ([`network`]). `None`: the guest has
    /// loopback only.
    pub netns: Option<PathBuf>,
    /// The pod's host cgroup, which QEMU and its daemons join from their
    /// start ([`cgroup`]). `None`: they stay in the caller's.
    pub cgroup: Option<CgroupPath>,
    /// A file outside the state directory (the shim's bundle) that the
    /// start writes the sandbox's state directory path into as soon as
    /// that directory is this sandbox's, before anything runs in it, and
    /// removes if the start fails: an owner killed while the VM boots is
    /// cleaned up from it ([`cleanup_dead`]) like one killed later.
    pub pointer: Option<PathBuf>,
}

impl SandboxOptions {
    /// What the OCI spec of a pod's first (sandbox) container asks for:
    /// the network namespace it names by path, and its cgroup
    /// (`linux.cgroupsPath`, in cgroupfs or systemd spelling). A spec that
    /// asks for a new, unnamed network namespace (`ctr run`) gets no
    /// network. (One with none, a host-network pod, is refused by the
    /// front ends before this.) A cgroup path that is not valid is an
    /// error naming the key.
    pub fn from_spec(spec: &oci_spec::runtime::Spec) -> Result<Self, cgroup::InvalidCgroupPath> {
        let linux = spec.linux().as_ref();
        let cgroup = linux
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy())
            .filter(|p| !p.is_empty())
            .map(|p| CgroupPath::parse(&p))
            .transpose()?;
        let netns = linux
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
            })
            .and_then(|n| n.path().clone())
            .filter(|p| !p.as_os_str().is_empty());
        Ok(Self {
            netns,
            cgroup,
            pointer: None,
        })
    }
}

/// The state directory's path in [`SandboxOptions::pointer`]; removed on
/// drop unless the sandbox started.
struct Pointer(Option<PathBuf>);

impl Pointer {
    fn write(id: &Id, file: Option<&Path>, dir: &Path) -> Self {
        let Some(file) = file else { return Self(None) };
        match std::fs::write(file, dir.as_os_str().as_encoded_bytes()) {
            Ok(()) => Self(Some(file.to_path_buf())),
            Err(e) => {
                // The sandbox runs all the same; only the clean-up after a
                // dead owner will not find it.
                tracing::warn!(sandbox = %id, "write {}: {e}", file.display());
                Self(None)
            }
        }
    }

    /// The sandbox started: the file stays, for its owner's clean-up.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Pointer {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A running pod VM with a connected agent.
pub struct Sandbox {
    id: Id,
    // Field order is drop order: the VM (and its daemons) goes before the
    // cgroup it runs in, the mounts and directories it uses, and the
    // network whose taps it holds.
    vm: Box<dyn Vm>,
    cgroup: Option<HostCgroup>,
    network: Option<Network>,
    agent: AgentClient,
    kernel_release: String,
    /// What the containers ask of the VM, and what the guest was last
    /// told to have online.
    sizing: Sizing,
    online: VmSize,
    dir: RunDir,
}

/// How long the guest has to online hotplugged vCPUs and memory.
pub const ONLINE_TIMEOUT: Duration = Duration::from_secs(30);

impl Sandbox {
    /// Boots the VM for sandbox `id` with the hypervisor `config` names,
    /// and waits for its agent.
    pub async fn start(id: &Id, config: &Config) -> Result<Self> {
        let options = SandboxOptions::default();
        Self::start_with(id, config, &options, hypervisor(config).as_ref()).await
    }

    /// [`Sandbox::start`] with `options`, on a given hypervisor.
    pub async fn start_with(
        id: &Id,
        config: &Config,
        options: &SandboxOptions,
        hypervisor: &dyn Hypervisor,
    ) -> Result<Self> {
        let caps = HostCaps::probe();
        let accel = caps.resolve_accel(config.hypervisor.accel);
        let vsock = caps.resolve_vsock(config.vsock.transport);
        tracing::info!(sandbox = %id, phase = "vm-starting", ?accel, ?vsock, machine = ?config.hypervisor.machine, "starting VM");
        // State left by an owner that died with its VM (a killed shim whose
        // containerd never ran `delete`) is cleaned; a live sandbox is not.
        let stale = config.runtime.state_dir.join(id.as_str());
        if stale.exists() {
            if !owned_processes(&config.runtime.state_dir, id).is_empty() {
                return Err(Error::Running {
                    id: id.to_string(),
                    path: stale,
                });
            }
            tracing::info!(
                sandbox = %id,
                "removing the state of a previous owner: {}",
                stale.display()
            );
            cleanup_dead(&config.runtime.state_dir, id).await?;
        }
        let dir = RunDir::create(&config.runtime.state_dir, id)?;
        let pointer = Pointer::write(id, options.pointer.as_deref(), dir.path());
        let mut network = match &options.netns {
            Some(netns) => {
                let t = std::time::Instant::now();
                let n = Network::setup(netns)
                    .await
                    .map_err(|source| Error::Network {
                        id: id.to_string(),
                        source,
                    })?;
                tracing::info!(
                    sandbox = %id,
                    netns = %netns.display(),
                    interfaces = n.plan().interfaces.len(),
                    setup_ms = t.elapsed().as_millis() as u64,
                    "pod network ready"
                );
                Some(n)
            }
            None => None,
        };
        if let Some(record) = network.as_ref().and_then(Network::record) {
            if let Err(e) = dir.record_network(&record) {
                release_network(id, network).await;
                return Err(e);
            }
        }
        let cgroup = match &options.cgroup {
            Some(path) => {
                let made = HostCgroup::create(path)
                    .map_err(|source| Error::Cgroup {
                        id: id.to_string(),
                        source,
                    })
                    .and_then(|cg| dir.record_cgroup(&cg.record()).map(|()| cg));
                match made {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        release_network(id, network).await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
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
            nics: network.as_mut().map(Network::nics).unwrap_or_default(),
            cgroup_procs: cgroup.as_ref().map(HostCgroup::procs).unwrap_or_default(),
        };
        let launched = hypervisor.launch(&spec).await;
        // QEMU holds its own copies of the taps now (or never will): ours
        // go, so that the taps live exactly as long as QEMU.
        drop(spec);
        let mut vm = match launched {
            Ok(vm) => vm,
            Err(source) => {
                release_cgroup(id, cgroup).await;
                release_network(id, network).await;
                return Err(Error::Hypervisor {
                    id: id.to_string(),
                    source,
                });
            }
        };
        for (name, pid) in vm.pids() {
            if let Err(e) = dir.record_pid(name, pid) {
                vm.shutdown(Duration::ZERO).await;
                release_cgroup(id, cgroup).await;
                release_network(id, network).await;
                return Err(e);
            }
        }
        let timeout = config.hypervisor.boot_timeout;
        let (agent, kernel_release) = match connect_agent(id, vm.as_mut(), timeout).await {
            Ok(a) => a,
            Err(e) => {
                vm.shutdown(Duration::ZERO).await;
                release_cgroup(id, cgroup).await;
                release_network(id, network).await;
                return Err(e);
            }
        };
        let base = VmSize {
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib.into(),
        };
        let sandbox = Self {
            id: id.clone(),
            sizing: Sizing::new(base, vm.max_size()),
            online: base,
            vm,
            cgroup,
            network,
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
            sandbox.abandon().await;
            return Err(Error::Agent {
                id: id.to_string(),
                call: "CreateSandbox",
                source,
            });
        }
        if let Some(n) = &sandbox.network {
            let req = n.plan().to_request();
            if let Err(source) = sandbox
                .agent
                .configure_network(ctx(CALL_TIMEOUT), &req)
                .await
            {
                sandbox.abandon().await;
                return Err(Error::Agent {
                    id: id.to_string(),
                    call: "ConfigureNetwork",
                    source,
                });
            }
        }
        pointer.keep();
        tracing::debug!(sandbox = %id, phase = "sandbox-created", "sandbox created");
        Ok(sandbox)
    }

    /// Ends a sandbox that failed to start: the VM at once, then its
    /// cgroup and the network.
    async fn abandon(mut self) {
        self.vm.shutdown(Duration::ZERO).await;
        release_cgroup(&self.id, self.cgroup.take()).await;
        release_network(&self.id, self.network.take()).await;
    }

    pub fn id(&self) -> &Id {
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

    /// What the VM has plugged (vCPUs and memory).
    pub fn size(&self) -> VmSize {
        self.vm.size()
    }

    /// What the guest has online, as it last reported it.
    pub fn online(&self) -> VmSize {
        self.online
    }

    /// Sizes the VM for container `id` having `resources` (a new
    /// container, or new limits of one): the flavour's size plus every
    /// container's limits ([`sizing`]), grown by hotplug and onlined in the
    /// guest before this returns. InvalidArgument, before anything
    /// changes, if that is past the flavour's ceiling.
    pub async fn resize_for(
        &mut self,
        id: &Id,
        resources: Option<&oci_spec::runtime::LinuxResources>,
    ) -> Result<(), cocoon_protocols::Error> {
        let demand = Demand::of(resources);
        let target = self.sizing.target_with(id, demand)?;
        self.resize_to(target).await?;
        self.sizing.set(id, demand);
        Ok(())
    }

    /// Back to what the recorded containers need: CPUs no container
    /// needs any more are offlined; memory stays (it is not unplugged).
    /// A failure is logged: the VM is only bigger than it needs to be.
    async fn fit(&mut self) {
        let target = self.sizing.target();
        if let Err(e) = self.resize_to(target).await {
            tracing::warn!(sandbox = %self.id, "resize to {target}: {e}");
        }
    }

    /// Plugs what `target` needs beyond what is plugged, then has the
    /// guest online `target`'s vCPUs (offlining any beyond) and `target`'s
    /// memory (a DIMM larger than the step stays partly offline, so the
    /// guest does not outgrow the pod's host cgroup), within
    /// [`ONLINE_TIMEOUT`].
    async fn resize_to(&mut self, target: VmSize) -> Result<(), cocoon_protocols::Error> {
        use cocoon_protocols::Error as P;
        let before = self.vm.size();
        let t = std::time::Instant::now();
        let plugged = self.vm.grow(target).await.map_err(|e| {
            let msg = format!("sandbox {}: {}", self.id, error_chain(&e));
            match e {
                cocoon_hypervisor::Error::Ceiling { .. } => P::InvalidArgument(msg),
                _ => P::Internal(msg),
            }
        })?;
        let want = VmSize {
            vcpus: target.vcpus,
            // Memory once online stays online (it is never unplugged).
            memory_mib: target
                .memory_mib
                .min(plugged.memory_mib)
                .max(self.online.memory_mib),
        };
        if want == self.online {
            return Ok(());
        }
        let req = OnlineResourcesRequest {
            vcpus: want.vcpus,
            memory_mib: want.memory_mib,
            timeout_ms: ONLINE_TIMEOUT.as_millis() as u32,
            ..Default::default()
        };
        let r = self
            .agent
            .online_resources(ctx(ONLINE_TIMEOUT + Duration::from_secs(5)), &req)
            .await
            .map_err(|e| {
                P::from_ttrpc(
                    format!("sandbox {}: online {want} in the guest", self.id),
                    e,
                )
            })?;
        // The guest's numbers are only reported, never trusted for sizing.
        self.online = VmSize {
            vcpus: r.online_vcpus.min(want.vcpus.max(1)),
            memory_mib: want.memory_mib,
        };
        tracing::info!(
            sandbox = %self.id,
            %before,
            %plugged,
            online_vcpus = r.online_vcpus,
            online_memory_mib = r.online_memory_mib,
            ms = t.elapsed().as_millis() as u64,
            "resized"
        );
        Ok(())
    }

    /// Applies new resource limits to container `id`: the VM grows first
    /// (or the update is refused, past the ceiling), then the guest's
    /// cgroup changes; CPUs an update no longer needs are offlined after.
    pub async fn update_container(
        &mut self,
        id: &Id,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<(), cocoon_protocols::Error> {
        let previous = self.sizing.clone();
        self.resize_for(id, Some(resources)).await?;
        let r = self.container(id).update(resources).await;
        if r.is_err() {
            self.sizing = previous;
        }
        self.fit().await;
        r
    }

    /// Creates container `id` in the guest: shares host directory `rootfs`
    /// as its root filesystem and each host bind mount of `spec` (files
    /// and directories, with the spec's ro/rw), rewrites `spec` for the
    /// guest and creates it there. On failure nothing of it is left: the
    /// shares are undone. A namespace type missing from `spec` is the
    /// guest's (the VM's); a front end serving a request for the host's
    /// refuses it first ([`spec::check_namespaces`]).
    pub async fn create_container(
        &mut self,
        id: &Id,
        mut spec: oci_spec::runtime::Spec,
        rootfs: &Path,
        terminal: bool,
    ) -> Result<Container, cocoon_protocols::Error> {
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        // Shared first: a spec that cannot be served (a bind source that
        // is not there) must not grow the VM, whose memory is not given back.
        let created = match self.share_container(id, &mut spec, rootfs) {
            Ok(()) => match self.resize_for(id, resources.as_ref()).await {
                Ok(()) => self.channel().create_container(id, &spec, terminal).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if created.is_err() {
            if let Err(u) = self.dir.unshare_container(id) {
                tracing::warn!(sandbox = %self.id, container = %id, "{}", error_chain(&u));
            }
            self.sizing.remove(id);
            self.fit().await;
        }
        created
    }

    /// Shares what container `id` needs of the host and points `spec` at it.
    fn share_container(
        &mut self,
        id: &Id,
        spec: &mut oci_spec::runtime::Spec,
        rootfs: &Path,
    ) -> Result<(), cocoon_protocols::Error> {
        let rel = self.dir.share_rootfs(id, rootfs)?;
        let mut guest = std::collections::BTreeMap::new();
        for bind in spec::host_binds(spec, tmpfs_size) {
            let source = match bind.pod_shm {
                Some(size) => spec::GuestSource::PodShm { size },
                None => {
                    let name = rundir::ShareName::Volume(bind.index as u32);
                    let rel = self
                        .dir
                        .share(id, name, &bind.source, bind.access, bind.propagation)
                        .map_err(|e| bind_error(id, &bind.source, e))?;
                    spec::GuestSource::Shared(rel)
                }
            };
            guest.insert(bind.index, source);
        }
        spec::adapt(spec, &rel, &guest);
        Ok(())
    }

    /// Removes container `id` from the guest (if it is still there) and
    /// stops sharing its root filesystem.
    pub async fn remove_container(&mut self, id: &Id) {
        // A dead VM has nothing to remove (and may not close the
        // connection, which would cost the whole call deadline).
        if self.vm.try_wait().is_none() {
            let c = Container::new(self.channel(), id.clone());
            if let Err(e) = c.remove().await {
                tracing::warn!(sandbox = %self.id, container = %id, "{e}");
            }
        }
        if let Err(e) = self.dir.unshare_container(id) {
            tracing::warn!(sandbox = %self.id, container = %id, "{}", error_chain(&e));
        }
        self.sizing.remove(id);
        if self.vm.try_wait().is_none() {
            self.fit().await;
        }
    }

    /// A handle on container `id` of this sandbox.
    pub fn container(&self, id: &Id) -> Container {
        Container::new(self.channel(), id.clone())
    }

    /// A cloneable handle on the agent and the stream port.
    pub fn channel(&self) -> Channel {
        Channel::new(&self.id, self.agent.clone(), self.vm.vsock().clone())
    }

    /// The state directory of this sandbox.
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Ends a VM that can no longer serve its pod (its VMM or a helper
    /// daemon has exited: [`Vm::try_wait`]): whatever of it still runs is
    /// stopped at once, without asking the guest. The host resources it
    /// used (shares, network) stay until [`Sandbox::stop`].
    pub async fn end_vm(&mut self) {
        self.vm.shutdown(Duration::ZERO).await;
    }

    /// Powers the guest off and releases every host resource.
    pub async fn stop(mut self) {
        // The agent flushes the guest's caches before it answers; after the
        // answer nothing in the guest is worth waiting for (a guest reboot
        // under TCG takes a second), so QEMU is told to quit right away.
        // Without an answer, the guest gets a few seconds to power off. A
        // VM that has ended is not asked.
        let grace = if self.vm.try_wait().is_some() {
            Duration::ZERO
        } else {
            let destroyed = tokio::time::timeout(
                Duration::from_secs(2),
                self.agent
                    .destroy_sandbox(ctx(Duration::from_secs(2)), &Empty::new()),
            )
            .await;
            match destroyed {
                Ok(Ok(_)) => Duration::ZERO,
                _ => Duration::from_secs(3),
            }
        };
        self.vm.shutdown(grace).await;
        release_cgroup(&self.id, self.cgroup.take()).await;
        release_network(&self.id, self.network.take()).await;
        tracing::info!(sandbox = %self.id, phase = "vm-stopped", "stopped");
    }
}

/// Removes the pod's cgroup (after the VM's processes are reaped). A
/// failure is logged: the caller is already on its way out.
async fn release_cgroup(id: &Id, cgroup: Option<HostCgroup>) {
    if let Some(cg) = cgroup {
        if let Err(e) = cg.remove().await {
            tracing::warn!(sandbox = %id, "{}", error_chain(&e));
        }
    }
}

/// Tears the pod network down (after the VM is gone: the taps went with
/// QEMU). A failure is logged: the caller is already on its way out.
async fn release_network(id: &Id, network: Option<Network>) {
    if let Some(n) = network {
        if let Err(e) = n.teardown().await {
            tracing::warn!(sandbox = %id, "{}", error_chain(&e));
        }
    }
}

/// The agent and the stream port of a sandbox, cheap to clone.
#[derive(Clone)]
pub struct Channel {
    id: Id,
    agent: AgentClient,
    vsock: cocoon_hypervisor::VsockConnector,
    stream_timeout: Duration,
}

impl Channel {
    /// A channel to the agent behind `vsock` (tests put a fake guest there).
    pub fn new(id: &Id, agent: AgentClient, vsock: cocoon_hypervisor::VsockConnector) -> Self {
        Self {
            id: id.clone(),
            agent,
            vsock,
            stream_timeout: STREAM_TIMEOUT,
        }
    }

    /// The same channel with another deadline for opening streams.
    pub fn with_stream_timeout(mut self, timeout: Duration) -> Self {
        self.stream_timeout = timeout;
        self
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// A handle on container `id`.
    pub fn container(&self, id: &Id) -> Container {
        Container::new(self.clone(), id.clone())
    }

    /// Creates container `id` in the guest from `spec`, already adapted to
    /// the guest ([`spec::adapt`]) and its rootfs shared.
    pub async fn create_container(
        &self,
        id: &Id,
        spec: &oci_spec::runtime::Spec,
        terminal: bool,
    ) -> Result<Container, cocoon_protocols::Error> {
        Container::create(self.clone(), id.clone(), spec, terminal).await
    }

    /// Long-polls the guest for the next OOM kill. `Ok(None)` is an answer
    /// that names no valid container: the caller counts it, backs off and
    /// asks again. Whether the container is one of ours is the caller's to
    /// check.
    pub async fn next_oom(&self) -> Result<Option<Id>, cocoon_protocols::Error> {
        let ev = self
            .agent
            .get_oom_event(ttrpc::context::Context::default(), &Empty::new())
            .await
            .map_err(|e| {
                cocoon_protocols::Error::from_ttrpc(format!("sandbox {}: OOM events", self.id), e)
            })?;
        Ok(Id::container(&ev.container_id).ok())
    }
}

/// Connects to the agent, retrying until it answers a ping or `timeout` passes.
/// Waits (at most `limit`) until the console shows the agent's ready line,
/// or the VM exits: a CONNECT sent earlier waits in the hybrid vsock backend
/// until the guest's vsock driver is up and then its listener, and the
/// attempts that time out meanwhile only add work for a busy guest. (Such
/// attempts once made boots time out with the agent ready: closed before
/// the guest's late answer, they crashed vhost-device-vsock 0.3's worker;
/// an attempt's stream now stays open until the answer, see
/// `cocoon_hypervisor::vsock`.) Past `limit` (a console that says nothing,
/// or a flood that hides the line), connecting starts anyway.
async fn wait_for_ready_line(id: &Id, vm: &mut dyn Vm, limit: Duration) {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if vm.try_wait().is_some() || vm.console_tail(40).contains(cocoon_protocols::AGENT_READY) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(sandbox = %id, "no agent ready line on the console after {limit:?}; connecting anyway");
}

async fn connect_agent(
    id: &Id,
    vm: &mut dyn Vm,
    timeout: Duration,
) -> Result<(AgentClient, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let start = std::time::Instant::now();
    let mut attempts = 0;
    let mut last = String::from("none");
    wait_for_ready_line(id, vm, timeout / 2).await;
    loop {
        attempts += 1;
        if let Some(status) = vm.try_wait() {
            return Err(Error::VmExited {
                id: id.to_string(),
                status,
                console: vm.console_tail(30),
            });
        }
        // A short attempt: each new CONNECT also has the backend look at
        // its queues again. One given up on is not closed before the
        // backend answers it (the connector keeps it open until then).
        let wait =
            CONNECT_ATTEMPT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let attempt = tokio::time::timeout(
            wait.max(Duration::from_millis(100)),
            vm.vsock().connect(cocoon_protocols::AGENT_PORT),
        )
        .await;
        match &attempt {
            Ok(Err(e)) => last = format!("connect: {e}"),
            Err(_) => last = format!("connect: no answer in {wait:?}"),
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
                    sandbox = %id,
                    phase = "agent-ready",
                    boot_ms = start.elapsed().as_millis() as u64,
                    attempts,
                    "agent answered"
                );
                // Shown to users and logged: the guest's text, bounded.
                let release = cocoon_protocols::error::peer_text(&pong.kernel_release, 128);
                return Ok((client, release));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::BootTimeout {
                id: id.to_string(),
                timeout,
                attempts,
                last,
                console: vm.console_tail(30),
                daemons: vm.daemons_tail(15),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
