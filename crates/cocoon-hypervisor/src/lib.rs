//! Booting and owning a pod VM.
//!
//! [`Hypervisor::launch`] turns a [`VmSpec`] into a running [`Vm`] handle, or
//! fails having released everything it started. The handle owns QEMU and its
//! helper daemons (virtiofsd, and vhost-device-vsock on hosts without kernel
//! vhost-vsock); dropping it kills them, [`Vm::shutdown`] stops them in order.

pub mod host;
mod logfile;
mod process;
pub mod qemu;
pub mod qmp;
pub mod vsock;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use host::{HostCaps, KvmKind};
pub use logfile::{LOG_CAP, TAIL_MAX_BYTES};
pub use qemu::{Qemu, MEMORY_SLOTS};
pub use vsock::{VsockConnector, VsockStream, CONNECT_TIMEOUT};

/// The accelerator a VM really runs with (after `auto` is resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

/// The vsock transport a VM really uses (after `auto` is resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedVsock {
    /// Kernel vhost-vsock; the host connects to `cid:port` with AF_VSOCK.
    Vhost { guest_cid: u32 },
    /// vhost-device-vsock; the host connects to a unix socket.
    Hybrid,
}

/// Everything needed to start one VM: the resolved configuration plus the
/// places this VM's sockets and logs go.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub config: cocoon_config::Config,
    pub accel: ResolvedAccel,
    pub vsock: ResolvedVsock,
    /// The VM's private directory (sockets, logs).
    pub run_dir: PathBuf,
    /// The host directory shared with the guest over virtio-fs.
    pub shared_dir: PathBuf,
    /// The virtio-fs tag the guest mounts the shared directory by.
    pub share_tag: String,
    /// The guest's TSC rate, where the guest cannot calibrate it reliably
    /// (see [`host::tsc_khz`]).
    pub tsc_khz: Option<u32>,
    /// The guest's NICs, in the order the guest enumerates them.
    pub nics: Vec<Nic>,
    /// The `cgroup.procs` files (one per hierarchy, open for writing) of
    /// the cgroup the VM's processes run in: QEMU and every helper daemon
    /// write `0` into each between `fork` and `exec`, so they are in it
    /// before they run a single instruction of their own, and every page
    /// they touch is charged there. Empty: they stay in the caller's.
    pub cgroup_procs: Vec<Arc<OwnedFd>>,
}

/// A guest NIC: a tap device the caller opened on the host (in the pod's
/// network namespace), and the MAC the guest's virtio-net device gets.
///
/// QEMU inherits the tap under the same fd number. A tap made without
/// `TUNSETPERSIST` exists while some fd holds it, so once the caller drops
/// its copies (every clone of the spec) after [`Hypervisor::launch`], the
/// tap lives exactly as long as QEMU.
#[derive(Debug, Clone)]
pub struct Nic {
    pub mac: [u8; 6],
    pub tap: Arc<OwnedFd>,
}

impl VmSpec {
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn virtiofs_socket(&self) -> PathBuf {
        self.run_dir.join("virtiofs.sock")
    }
    pub fn vsock_backend_socket(&self) -> PathBuf {
        self.run_dir.join("vhost-vsock.sock")
    }
    /// The hybrid vsock's host-side unix socket.
    pub fn vsock_uds(&self) -> PathBuf {
        self.run_dir.join("vsock.sock")
    }
    /// The guest console, capped at [`LOG_CAP`] with `console.log.1`; so
    /// are the daemons' logs below.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }
    pub fn virtiofsd_log(&self) -> PathBuf {
        self.run_dir.join("virtiofsd.log")
    }
    pub fn vsock_backend_log(&self) -> PathBuf {
        self.run_dir.join("vhost-device-vsock.log")
    }
}

/// Why a VM could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} not found: {path}")]
    NotFound { what: &'static str, path: PathBuf },
    #[error("failed to start {what} ({path})")]
    Spawn {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} exited during start-up ({status}); last log lines:\n{log}")]
    EarlyExit {
        what: &'static str,
        status: String,
        log: String,
    },
    #[error("{what} did not create {path} within {timeout:?}")]
    SocketTimeout {
        what: &'static str,
        path: PathBuf,
        timeout: Duration,
    },
    #[error("QMP on {path}")]
    Qmp {
        path: PathBuf,
        #[source]
        source: qmp::QmpError,
    },
    #[error("cannot grow the VM to {want}: its ceiling is {max}")]
    Ceiling { want: VmSize, max: VmSize },
    #[error("hotplug of {what}")]
    Hotplug {
        what: String,
        #[source]
        source: qmp::QmpError,
    },
    #[error("vsock port {port}")]
    Vsock {
        port: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("{action} on {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A hypervisor backend: starts VMs.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Starts a VM. On error, every process it started has been killed and
    /// reaped.
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>>;
}

/// What a VM has plugged: vCPUs and memory present in the machine (the
/// guest onlines them; see the agent's `OnlineResources`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl std::fmt::Display for VmSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPUs, {} MiB", self.vcpus, self.memory_mib)
    }
}

/// A running VM.
#[async_trait]
pub trait Vm: Send + Sync {
    /// The host pid of the VMM process.
    fn pid(&self) -> u32;
    /// Every process the VM owns (VMM and daemons), by name.
    fn pids(&self) -> Vec<(&'static str, u32)>;
    /// How to reach the guest's vsock ports.
    fn vsock(&self) -> &VsockConnector;
    /// What is plugged now.
    fn size(&self) -> VmSize;
    /// The most the VM can grow to (the flavour's ceilings).
    fn max_size(&self) -> VmSize;
    /// Hotplugs vCPUs and memory until at least `to` is plugged (memory
    /// may overshoot: it comes in steps that reach the ceiling within the
    /// machine's hotplug slots). Never shrinks. Fails with
    /// [`Error::Ceiling`] past [`Vm::max_size`]; a failure leaves what was
    /// plugged before it plugged.
    async fn grow(&mut self, to: VmSize) -> Result<VmSize>;
    /// Pauses every vCPU.
    async fn pause(&mut self) -> Result<()>;
    /// Resumes every vCPU.
    async fn resume(&mut self) -> Result<()>;
    /// Waits until the VM ends by itself: the VMM exits (the guest powered
    /// off or died), or a helper daemon it cannot run without does (the
    /// guest has lost its share or its vsock; the VMM may run on, and
    /// [`Vm::shutdown`] ends it). Says which, and how.
    async fn wait(&mut self) -> String;
    /// `Some(status)` once the VM has ended, as [`Vm::wait`] says.
    fn try_wait(&mut self) -> Option<String>;
    /// The last lines of the guest console, for error reports. Reads a
    /// bounded amount ([`TAIL_MAX_BYTES`]) whatever `lines` is; control
    /// characters the guest printed are replaced.
    fn console_tail(&self, lines: usize) -> String;
    /// The last lines of each helper daemon's log, for error reports
    /// (bounded like [`Vm::console_tail`]).
    fn daemons_tail(&self, lines: usize) -> String;
    /// Stops the VM: waits up to `grace` for the VMM to exit (the guest was
    /// asked to power off), then quits or kills it; then stops the helper
    /// daemons. Every process is reaped, and every log thread joined, when
    /// this returns.
    async fn shutdown(&mut self, grace: Duration);
}
