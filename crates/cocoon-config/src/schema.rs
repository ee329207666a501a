//! The schema: raw (as written) and resolved (validated) forms.

use std::path::PathBuf;

use serde::Deserialize;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where the host has hardware-backed KVM (`kvm_intel`/`kvm_amd`), TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    Q35,
    Microvm,
}

/// How the host reaches the guest's vsock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VsockTransport {
    /// Kernel vhost-vsock where `/dev/vhost-vsock` exists, hybrid otherwise.
    Auto,
    /// Kernel vhost-vsock (`vhost-vsock-pci`).
    Vhost,
    /// `vhost-device-vsock` behind a unix socket (`CONNECT <port>`).
    Hybrid,
}

/// A fully resolved configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub virtiofs: VirtiofsConfig,
    pub vsock: VsockConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HypervisorConfig {
    /// QEMU binary; a bare name is looked up on `PATH`.
    pub path: PathBuf,
    pub accel: Accel,
    pub machine: Machine,
    /// vCPUs the VM boots with.
    pub vcpus: u32,
    /// Memory the VM boots with.
    pub memory_mib: u32,
    /// The most vCPUs the VM may grow to, by hotplug, for its containers'
    /// CPU limits (at least `vcpus`).
    pub max_vcpus: u32,
    /// The most memory the VM may grow to, by hotplug, for its containers'
    /// memory limits (at least `memory_mib`; on microvm, which has no
    /// memory hotplug, exactly `memory_mib`).
    pub max_memory_mib: u32,
    /// Extra kernel parameters, appended after Cocoon's own.
    pub kernel_params: String,
    /// How long the guest agent may take to answer after QEMU starts.
    pub boot_timeout: std::time::Duration,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        let host = HostSize::probe();
        Self {
            path: "qemu-system-x86_64".into(),
            accel: Accel::Auto,
            machine: Machine::Q35,
            vcpus: 1,
            memory_mib: 512,
            max_vcpus: host.default_max_vcpus(),
            max_memory_mib: host.default_max_memory_mib(),
            kernel_params: String::new(),
            boot_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// The default ceilings: the host's size, capped.
pub const DEFAULT_MAX_VCPUS_CAP: u32 = 16;
pub const DEFAULT_MAX_MEMORY_MIB_CAP: u32 = 16 * 1024;

/// The host's CPUs and memory, which bound the default ceilings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSize {
    pub cpus: u32,
    pub memory_mib: u32,
}

impl HostSize {
    /// This host: the CPUs this process may run on, and `MemTotal`.
    pub fn probe() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kib| u32::try_from(kib / 1024).unwrap_or(u32::MAX))
            .unwrap_or(DEFAULT_MAX_MEMORY_MIB_CAP);
        Self { cpus, memory_mib }
    }

    /// `max_vcpus` when the file names none: the host's CPUs, at most
    /// [`DEFAULT_MAX_VCPUS_CAP`].
    pub fn default_max_vcpus(self) -> u32 {
        self.cpus.clamp(1, DEFAULT_MAX_VCPUS_CAP)
    }

    /// `max_memory_mib` when the file names none: the host's memory
    /// (whole hotplug blocks), at most [`DEFAULT_MAX_MEMORY_MIB_CAP`].
    pub fn default_max_memory_mib(self) -> u32 {
        let m = self.memory_mib.min(DEFAULT_MAX_MEMORY_MIB_CAP);
        m - m % crate::HOTPLUG_BLOCK_MIB
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GuestConfig {
    /// The directory `cocoon image build` writes.
    pub dir: PathBuf,
    /// Kernel image; defaults to `<dir>/vmlinuz` (bzImage) on q35 and to
    /// `<dir>/vmlinux` (the uncompressed kernel, booted through its PVH
    /// entry) on microvm.
    pub kernel: PathBuf,
    /// Initrd; defaults to `<dir>/initrd.img`.
    pub initrd: PathBuf,
}

impl GuestConfig {
    pub const DEFAULT_DIR: &'static str = "/var/lib/cocoon/guest";

    /// The kernel image `cocoon image build` writes for `machine`.
    pub fn kernel_file(machine: Machine) -> &'static str {
        match machine {
            Machine::Q35 => "vmlinuz",
            Machine::Microvm => "vmlinux",
        }
    }

    fn in_dir(dir: PathBuf, machine: Machine) -> Self {
        Self {
            kernel: dir.join(Self::kernel_file(machine)),
            initrd: dir.join("initrd.img"),
            dir,
        }
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self::in_dir(Self::DEFAULT_DIR.into(), Machine::Q35)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VirtiofsConfig {
    pub path: PathBuf,
    /// virtiofsd `--cache`: `auto`, `always` or `never`.
    pub cache: String,
}

impl Default for VirtiofsConfig {
    fn default() -> Self {
        Self {
            path: "virtiofsd".into(),
            cache: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VsockConfig {
    pub transport: VsockTransport,
    /// `vhost-device-vsock` binary, for the hybrid transport.
    pub backend_path: PathBuf,
}

impl Default for VsockConfig {
    fn default() -> Self {
        Self {
            transport: VsockTransport::Auto,
            backend_path: "vhost-device-vsock".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Per-sandbox state lives in `<state_dir>/<sandbox-id>/`.
    pub state_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: "/run/cocoon".into(),
        }
    }
}

/// The file as written: everything optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub hypervisor: RawHypervisor,
    #[serde(default)]
    pub guest: RawGuest,
    #[serde(default)]
    pub virtiofs: RawVirtiofs,
    #[serde(default)]
    pub vsock: RawVsock,
    #[serde(default)]
    pub runtime: RawRuntime,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHypervisor {
    pub path: Option<PathBuf>,
    pub accel: Option<Accel>,
    pub machine: Option<Machine>,
    pub vcpus: Option<i64>,
    pub memory_mib: Option<i64>,
    pub max_vcpus: Option<i64>,
    pub max_memory_mib: Option<i64>,
    pub kernel_params: Option<String>,
    pub boot_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGuest {
    pub dir: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVirtiofs {
    pub path: Option<PathBuf>,
    pub cache: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVsock {
    pub transport: Option<VsockTransport>,
    pub backend_path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    pub state_dir: Option<PathBuf>,
}

/// A validation failure before the file and line are attached.
pub(crate) struct Invalid {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        message: message.into(),
    }
}

impl RawConfig {
    /// Validates the raw file into a resolved [`Config`]. Relative paths in
    /// the file are taken relative to `base` (the file's directory).
    pub(crate) fn validate(self, base: &std::path::Path) -> Result<Config, Invalid> {
        let d = Config::default();
        let rel = |p: PathBuf| {
            if p.is_relative() && p.components().count() > 1 {
                base.join(p)
            } else {
                p
            }
        };
        let abs = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let h = self.hypervisor;
        let vcpus = match h.vcpus {
            None => d.hypervisor.vcpus,
            Some(n) if (1..=255).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "hypervisor.vcpus",
                    format!("{n} is not between 1 and 255"),
                ))
            }
        };
        let memory_mib = match h.memory_mib {
            None => d.hypervisor.memory_mib,
            Some(n) if (64..=1_048_576).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "hypervisor.memory_mib",
                    format!("{n} is not between 64 and 1048576"),
                ))
            }
        };
        let machine = h.machine.unwrap_or(d.hypervisor.machine);
        let max_vcpus = match h.max_vcpus {
            // Never below the boot size, whatever the host.
            None => d.hypervisor.max_vcpus.max(vcpus),
            Some(n) if (vcpus as i64..=255).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "hypervisor.max_vcpus",
                    format!("{n} is not between vcpus ({vcpus}) and 255"),
                ))
            }
        };
        let max_memory_mib = match (machine, h.max_memory_mib) {
            // microvm has no memory hotplug: its size is its ceiling.
            (Machine::Microvm, None) => memory_mib,
            (Machine::Microvm, Some(n)) if n == memory_mib as i64 => memory_mib,
            (Machine::Microvm, Some(n)) => {
                return Err(invalid(
                    "hypervisor.max_memory_mib",
                    format!(
                        "{n}: a microvm cannot grow its memory (QEMU's microvm has no memory \
                         hotplug); it must equal memory_mib ({memory_mib}), or be left out"
                    ),
                ))
            }
            (Machine::Q35, None) => d.hypervisor.max_memory_mib.max(memory_mib),
            (Machine::Q35, Some(n)) if (memory_mib as i64..=1_048_576).contains(&n) => n as u32,
            (Machine::Q35, Some(n)) => {
                return Err(invalid(
                    "hypervisor.max_memory_mib",
                    format!("{n} is not between memory_mib ({memory_mib}) and 1048576"),
                ))
            }
        };
        let boot_timeout = match h.boot_timeout_secs {
            None => d.hypervisor.boot_timeout,
            Some(s) if s > 0.0 && s <= 3600.0 => std::time::Duration::from_secs_f64(s),
            Some(s) => {
                return Err(invalid(
                    "hypervisor.boot_timeout_secs",
                    format!("{s} is not in (0, 3600]"),
                ))
            }
        };
        let kernel_params = h.kernel_params.unwrap_or_default();
        if kernel_params.contains('\n') {
            return Err(invalid("hypervisor.kernel_params", "must be one line"));
        }
        let hypervisor = HypervisorConfig {
            path: h.path.map(rel).unwrap_or(d.hypervisor.path),
            accel: h.accel.unwrap_or(d.hypervisor.accel),
            machine,
            vcpus,
            memory_mib,
            max_vcpus,
            max_memory_mib,
            kernel_params,
            boot_timeout,
        };

        let g = self.guest;
        let mut guest = GuestConfig::in_dir(g.dir.map(abs).unwrap_or(d.guest.dir), machine);
        if let Some(k) = g.kernel {
            guest.kernel = abs(k);
        }
        if let Some(i) = g.initrd {
            guest.initrd = abs(i);
        }

        let cache = self.virtiofs.cache.unwrap_or(d.virtiofs.cache);
        if !["auto", "always", "never", "metadata"].contains(&cache.as_str()) {
            return Err(invalid(
                "virtiofs.cache",
                format!("`{cache}` is not one of auto, always, never, metadata"),
            ));
        }
        let virtiofs = VirtiofsConfig {
            path: self.virtiofs.path.map(rel).unwrap_or(d.virtiofs.path),
            cache,
        };
        let vsock = VsockConfig {
            transport: self.vsock.transport.unwrap_or(d.vsock.transport),
            backend_path: self
                .vsock
                .backend_path
                .map(rel)
                .unwrap_or(d.vsock.backend_path),
        };
        let state_dir = self.runtime.state_dir.unwrap_or(d.runtime.state_dir);
        if state_dir.is_relative() {
            return Err(invalid("runtime.state_dir", "must be an absolute path"));
        }
        Ok(Config {
            hypervisor,
            guest,
            virtiofs,
            vsock,
            runtime: RuntimeConfig { state_dir },
        })
    }
}
