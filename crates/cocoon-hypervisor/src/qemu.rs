//! The QEMU backend.
//!
//! The guest's serial console reaches the host through a pipe QEMU inherits
//! (`-add-fd` + a file chardev on `/dev/fdset/N`), drained by a thread into
//! a size-capped `console.log`: a guest flooding its console costs old log
//! lines, not host disk, and QEMU (which writes to the pipe non-blocking)
//! never waits on our reader.

use std::borrow::Cow;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cocoon_config::Machine;
use tokio::process::Command;

use crate::host::find_binary;
use crate::logfile::{LogPump, LOG_CAP};
use crate::process::{make_private, wait_for_socket, Daemon};
use crate::qmp::{Qmp, QMP_TIMEOUT};
use crate::{
    Error, Hypervisor, ResolvedAccel, ResolvedVsock, Result, Vm, VmSize, VmSpec, VsockConnector,
};

/// Kernel parameters Cocoon always passes; the flavour's own come after them.
const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 reboot=t quiet loglevel=4 \
     tsc=reliable no_timer_check cryptomgr.notests i8042.noaux i8042.nomux i8042.nopnp \
     i8042.dumbkbd rcupdate.rcu_expedited=1";

/// How long a helper daemon may take to create its socket.
const DAEMON_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The fd set QEMU finds the console pipe in (`/dev/fdset/<N>`).
const CONSOLE_FDSET: u32 = 1;

/// Memory hotplug slots (DIMMs) of a VM with room to grow. Every DIMM is
/// one more memory region each vhost-user daemon must map:
/// vhost-device-vsock 0.3 lacks `CONFIGURE_MEM_SLOTS`, so QEMU allows it
/// the protocol's baseline of 8 regions in all, boot RAM included (q35
/// boot RAM takes 2), and refuses a DIMM past that. virtiofsd has the
/// feature (509 regions). The runtime plans its steps so that these slots
/// always reach `max_memory_mib` ([`dimm_mib`]).
pub const MEMORY_SLOTS: u32 = 4;

/// The size of the next DIMM, in MiB, for a VM that has `current` MiB
/// and wants at least `want`: what is missing, in whole blocks, but never
/// less than 1/[`MEMORY_SLOTS`] of the whole room, so that the slots reach
/// `max` however small the steps asked for are; and never past `max`.
pub fn dimm_mib(base: u64, max: u64, current: u64, want: u64) -> u64 {
    let block = u64::from(cocoon_config::HOTPLUG_BLOCK_MIB);
    let up = |n: u64| n.div_ceil(block) * block;
    let room = max.saturating_sub(base);
    let least = up(room.div_ceil(u64::from(MEMORY_SLOTS)));
    up(want.saturating_sub(current))
        .max(least)
        .min(max.saturating_sub(current))
}

/// The hotplug room above the boot memory, in MiB (whole blocks of
/// [`cocoon_config::HOTPLUG_BLOCK_MIB`]); `None` where the VM cannot grow.
pub fn memory_room(h: &cocoon_config::HypervisorConfig) -> Option<u64> {
    let block = u64::from(cocoon_config::HOTPLUG_BLOCK_MIB);
    let room = u64::from(h.max_memory_mib.saturating_sub(h.memory_mib));
    let room = room - room % block;
    (h.machine == Machine::Q35 && room > 0).then_some(room)
}

/// A value for a QEMU option string (`key=value,key=value`): QEMU reads a
/// `,` as the end of the value unless it is doubled. Every name and path
/// interpolated into such a string goes through here.
pub fn opt_value(value: &str) -> Cow<'_, str> {
    if value.contains(',') {
        Cow::Owned(value.replace(',', ",,"))
    } else {
        Cow::Borrowed(value)
    }
}

/// A path as an option value (see [`opt_value`]).
fn opt_path(p: &Path) -> String {
    opt_value(&p.to_string_lossy()).into_owned()
}

/// The QEMU command line for `spec`, without the binary; the guest console
/// goes to `console_fd`, which QEMU must inherit (the write end of a pipe).
/// A pure function of its arguments, so it is tested without spawning
/// anything.
pub fn command_line(spec: &VmSpec, console_fd: RawFd) -> Vec<OsString> {
    let h = &spec.config.hypervisor;
    let mem = h.memory_mib;
    let microvm = h.machine == Machine::Microvm;
    // -kernel and -initrd take a plain path, not an option string.
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    let dev = |pci: &str, mmio: &str| {
        if microvm {
            mmio.to_string()
        } else {
            pci.to_string()
        }
    };
    let machine = if microvm {
        "microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem"
    } else {
        "q35,memory-backend=mem"
    };
    let (accel, cpu) = match spec.accel {
        ResolvedAccel::Kvm => ("kvm", "host"),
        // Without ERMS the guest kernel copies and clears memory with
        // `rep movsq`/`rep stosq` rather than byte-wise `rep movsb`/
        // `stosb`: TCG emulates a string instruction one element at a
        // time, so this makes every copy to and from user memory (pipes,
        // sockets, /dev/zero) 2-3 times cheaper.
        ResolvedAccel::Tcg => ("tcg,thread=multi", "max,erms=off"),
    };
    let mut params = BASE_KERNEL_PARAMS.to_string();
    if let Some(khz) = spec.tsc_khz {
        params.push_str(&format!(" tsc_early_khz={khz}"));
    }
    // CPUs: q35 boots `vcpus` and hotplugs up to `max_vcpus` (ACPI);
    // microvm has no CPU hotplug, so all `max_vcpus` exist from boot and
    // the kernel brings up only `vcpus` of them (`maxcpus=`): the rest wait
    // offline, their vCPU threads halted, until the agent onlines them.
    let smp = if microvm {
        if h.max_vcpus > h.vcpus {
            params.push_str(&format!(" maxcpus={}", h.vcpus));
        }
        h.max_vcpus.to_string()
    } else if h.max_vcpus > h.vcpus {
        format!("{},maxcpus={}", h.vcpus, h.max_vcpus)
    } else {
        h.vcpus.to_string()
    };
    if !h.kernel_params.is_empty() {
        params.push(' ');
        params.push_str(&h.kernel_params);
    }
    // Memory: q35 gets hotplug slots and room up to `max_memory_mib`;
    // microvm (no memory hotplug) is validated to have none.
    let memory = match memory_room(h) {
        Some(room) => format!(
            "{mem}M,slots={MEMORY_SLOTS},maxmem={}M",
            u64::from(mem) + room
        ),
        None => format!("{mem}M"),
    };
    let mut a: Vec<String> = vec![
        "-name".into(),
        opt_value(&spec.name).into_owned(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-machine".into(),
        machine.into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        smp,
        "-m".into(),
        memory,
        // vhost-user devices need guest memory the daemons can map.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-kernel".into(),
        path(spec.config.guest.kernel.clone()),
        "-initrd".into(),
        path(spec.config.guest.initrd.clone()),
        "-append".into(),
        params,
        // The console pipe: QEMU dups it from the fd set (append=on, so it
        // does not try to truncate a pipe) and writes to it non-blocking.
        "-add-fd".into(),
        format!("fd={console_fd},set={CONSOLE_FDSET},opaque=console"),
        "-chardev".into(),
        format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on"),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            opt_path(&spec.qmp_socket())
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-chardev".into(),
        format!("socket,id=fs,path={}", opt_path(&spec.virtiofs_socket())),
        "-device".into(),
        format!(
            "{},chardev=fs,tag={},queue-size=1024",
            dev("vhost-user-fs-pci", "vhost-user-fs-device"),
            opt_value(&spec.share_tag)
        ),
    ];
    match spec.vsock {
        ResolvedVsock::Hybrid => a.extend([
            "-chardev".into(),
            format!(
                "socket,id=vsock,path={}",
                opt_path(&spec.vsock_backend_socket())
            ),
            "-device".into(),
            format!(
                "{},chardev=vsock",
                dev("vhost-user-vsock-pci", "vhost-user-vsock-device")
            ),
        ]),
        ResolvedVsock::Vhost { guest_cid } => a.extend([
            "-device".into(),
            format!(
                "{},guest-cid={guest_cid}",
                dev("vhost-vsock-pci", "vhost-vsock-device")
            ),
        ]),
    }
    // Userspace virtio-net on an inherited tap: QEMU neither opens nor
    // configures the tap (no helper scripts), and vhost-net is not assumed.
    // On PCI, no option ROM: the guest boots from -kernel, not the NIC.
    for (i, nic) in spec.nics.iter().enumerate() {
        let fd = nic.tap.as_raw_fd();
        let m = nic.mac;
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        a.extend([
            "-netdev".into(),
            format!("tap,id=net{i},fd={fd},vhost=off"),
            "-device".into(),
            if microvm {
                format!("virtio-net-device,netdev=net{i},mac={mac}")
            } else {
                format!("virtio-net-pci,netdev=net{i},mac={mac},romfile=")
            },
        ]);
    }
    a.into_iter().map(OsString::from).collect()
}

/// `--flag=<path>` without a lossy conversion.
fn flag_path(flag: &str, p: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push("=");
    s.push(p);
    s
}

/// The virtiofsd command line for `spec`. The sandbox and the seccomp
/// filter are virtiofsd's defaults, spelled out so that a change of default
/// cannot silently drop them: the guest drives this daemon
/// (GHSA-2gv2-cffp-j227).
pub fn virtiofsd_args(spec: &VmSpec) -> Vec<OsString> {
    vec![
        flag_path("--socket-path", &spec.virtiofs_socket()),
        flag_path("--shared-dir", &spec.shared_dir),
        format!("--cache={}", spec.config.virtiofs.cache).into(),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
        "--announce-submounts".into(),
        "--inode-file-handles=never".into(),
        "--xattr".into(),
    ]
}

/// The credit vhost-device-vsock grants each guest connection, and the
/// most it buffers for one when the host side reads slower (its
/// `--tx-buffer-size`). The default, 64 KiB, made the guest stop and wait
/// for a credit update after every 48 KiB of output. No larger than the
/// guest's own vsock socket buffer (256 KiB by default): Linux sends at
/// most that much unacknowledged whatever the peer grants, while the
/// backend sends a credit update only once 3/4 of its grant has been
/// forwarded, so a larger grant stalls a connection for ever.
pub const VSOCK_BACKEND_TX_BUFFER: u32 = 256 * 1024;

/// The vhost-device-vsock command line for `spec` (hybrid vsock only).
/// Separate flags rather than `--vm key=value,...`, which has no way to
/// escape a `,` in a path.
pub fn vsock_backend_args(spec: &VmSpec) -> Vec<OsString> {
    vec![
        "--guest-cid=3".into(),
        flag_path("--socket", &spec.vsock_backend_socket()),
        flag_path("--uds-path", &spec.vsock_uds()),
        format!("--tx-buffer-size={VSOCK_BACKEND_TX_BUFFER}").into(),
    ]
}

/// Starts VMs with QEMU.
#[derive(Debug, Default)]
pub struct Qemu;

#[async_trait]
impl Hypervisor for Qemu {
    async fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        let cfg = &spec.config;
        let need = |what: &'static str, p: &std::path::Path| {
            find_binary(p).ok_or_else(|| Error::NotFound {
                what,
                path: p.into(),
            })
        };
        let qemu = need("QEMU binary (hypervisor.path)", &cfg.hypervisor.path)?;
        let virtiofsd = need("virtiofsd binary (virtiofs.path)", &cfg.virtiofs.path)?;
        for (what, p) in [
            ("guest kernel (guest.kernel)", &cfg.guest.kernel),
            ("guest initrd (guest.initrd)", &cfg.guest.initrd),
        ] {
            if !p.is_file() {
                return Err(Error::NotFound {
                    what,
                    path: p.clone(),
                });
            }
        }
        let backend = match spec.vsock {
            ResolvedVsock::Hybrid => Some(need(
                "vhost-device-vsock binary (vsock.backend_path)",
                &cfg.vsock.backend_path,
            )?),
            ResolvedVsock::Vhost { .. } => None,
        };

        // Each daemon is owned by `vm` as soon as it exists, so an early
        // return drops (kills) everything started so far.
        let h = &cfg.hypervisor;
        let base = VmSize {
            vcpus: h.vcpus,
            memory_mib: u64::from(h.memory_mib),
        };
        let mut vm = QemuVm {
            size: base,
            max: VmSize {
                // microvm: every vCPU exists from boot (`maxcpus=`).
                vcpus: h.max_vcpus,
                memory_mib: base.memory_mib + memory_room(h).unwrap_or(0),
            },
            base,
            hotplug: h.machine == Machine::Q35,
            dimms: 0,
            qemu: None,
            helpers: Vec::new(),
            console: None,
            qmp_path: spec.qmp_socket(),
            connector: match spec.vsock {
                ResolvedVsock::Hybrid => VsockConnector::Hybrid {
                    uds: spec.vsock_uds(),
                },
                ResolvedVsock::Vhost { guest_cid } => VsockConnector::Vhost { guest_cid },
            },
            pid: 0,
        };

        let join: Vec<BorrowedFd<'_>> = spec.cgroup_procs.iter().map(|f| f.as_fd()).collect();
        let mut cmd = Command::new(&virtiofsd);
        cmd.args(virtiofsd_args(spec));
        let mut d = Daemon::spawn(
            "virtiofsd",
            cmd,
            &spec.virtiofsd_log(),
            Vec::new(),
            &[],
            &join,
        )?;
        let r = wait_for_socket(&mut d, &spec.virtiofs_socket(), DAEMON_SOCKET_TIMEOUT).await;
        vm.helpers.push(d);
        r?;

        if let Some(backend) = backend {
            let mut cmd = Command::new(&backend);
            cmd.args(vsock_backend_args(spec));
            let mut d = Daemon::spawn(
                "vhost-device-vsock",
                cmd,
                &spec.vsock_backend_log(),
                Vec::new(),
                &[],
                &join,
            )?;
            let r =
                wait_for_socket(&mut d, &spec.vsock_backend_socket(), DAEMON_SOCKET_TIMEOUT).await;
            vm.helpers.push(d);
            r?;
            // The socket Cocoon connects to; bound before the vhost-user one.
            let uds = spec.vsock_uds();
            if uds.exists() {
                make_private(&uds)?;
            }
        }

        tracing::debug!(phase = "daemons-up", "helper daemons ready");
        // The console pipe exists, and is drained, before QEMU starts: no
        // early boot output is lost.
        let (console, console_w) = LogPump::start("console", &spec.console_log(), LOG_CAP, true)?;
        vm.console = Some(console);
        let mut cmd = Command::new(&qemu);
        cmd.args(command_line(spec, console_w.as_raw_fd()));
        tracing::debug!(cmd = ?cmd.as_std(), "starting QEMU");
        let taps: Vec<BorrowedFd<'_>> = spec.nics.iter().map(|n| n.tap.as_fd()).collect();
        let mut d = Daemon::spawn("QEMU", cmd, &spec.qemu_log(), vec![console_w], &taps, &join)?;
        let r = wait_for_socket(&mut d, &spec.qmp_socket(), DAEMON_SOCKET_TIMEOUT).await;
        vm.pid = d.pid();
        vm.qemu = Some(d);
        r?;
        // A QMP round trip proves QEMU came up. The socket file exists from
        // bind(2), a moment before QEMU listens: retry a refused connect.
        let deadline = tokio::time::Instant::now() + DAEMON_SOCKET_TIMEOUT;
        let mut qmp = loop {
            match vm.qmp().await {
                Ok(q) => break q,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    vm.exited_early()?;
                    tracing::trace!("QMP not ready: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let status = qmp.status().await.map_err(|source| Error::Qmp {
            path: vm.qmp_path.clone(),
            source,
        })?;
        tracing::debug!(pid = vm.pid, %status, phase = "qemu-running", "QEMU running");
        vm.exited_early()?;
        Ok(Box::new(vm))
    }
}

/// How often [`Vm::wait`] looks at the helper daemons.
const HELPER_POLL: Duration = Duration::from_millis(200);

/// A helper daemon that has exited, said as the end of its VM: QEMU runs
/// on without it, but its guest has lost its share or its vsock.
fn helper_exited(d: &mut Daemon) -> Option<String> {
    let status = d.try_exited()?;
    let log = d.last_words(5);
    Some(format!(
        "{} exited ({status}); last log lines:\n{log}",
        d.what
    ))
}

/// A VM started by [`Qemu`].
pub struct QemuVm {
    /// Boot size, plugged size, ceiling.
    base: VmSize,
    size: VmSize,
    max: VmSize,
    /// Whether vCPUs and memory are hotplugged (q35), or exist from boot
    /// (microvm's vCPUs; it has no memory to grow).
    hotplug: bool,
    /// DIMMs plugged so far.
    dimms: u32,
    qemu: Option<Daemon>,
    helpers: Vec<Daemon>,
    /// Drains the console pipe; after `qemu` so that, on drop, QEMU is
    /// killed before the pump is told to finish.
    console: Option<LogPump>,
    qmp_path: PathBuf,
    connector: VsockConnector,
    pid: u32,
}

impl QemuVm {
    /// An error with QEMU's last words if it has already exited.
    fn exited_early(&mut self) -> Result<()> {
        if let Some(q) = self.qemu.as_mut() {
            if let Some(status) = q.try_exited() {
                return Err(Error::EarlyExit {
                    what: "QEMU",
                    status,
                    log: q.last_words(20),
                });
            }
        }
        Ok(())
    }

    async fn qmp(&self) -> Result<Qmp> {
        Qmp::connect(&self.qmp_path, QMP_TIMEOUT)
            .await
            .map_err(|source| Error::Qmp {
                path: self.qmp_path.clone(),
                source,
            })
    }

    async fn qmp_do(
        &self,
        f: impl AsyncFnOnce(&mut Qmp) -> Result<(), crate::qmp::QmpError>,
    ) -> Result<()> {
        let mut qmp = self.qmp().await?;
        f(&mut qmp).await.map_err(|source| Error::Qmp {
            path: self.qmp_path.clone(),
            source,
        })
    }
}

impl QemuVm {
    async fn plug_vcpus(&mut self, qmp: &mut Qmp, want: u32) -> Result<()> {
        let hotplug = |what: String| {
            move |source| Error::Hotplug {
                what: what.clone(),
                source,
            }
        };
        let slots = qmp
            .free_cpu_slots()
            .await
            .map_err(hotplug("vCPUs: query-hotpluggable-cpus".into()))?;
        let missing = (want - self.size.vcpus) as usize;
        if slots.len() < missing {
            return Err(Error::Hotplug {
                what: format!("{missing} vCPUs"),
                source: crate::qmp::QmpError::Malformed(format!(
                    "only {} free CPU slots",
                    slots.len()
                )),
            });
        }
        for slot in &slots[..missing] {
            let id = format!("cpu{}", self.size.vcpus);
            let t = std::time::Instant::now();
            qmp.add_cpu(&id, slot)
                .await
                .map_err(hotplug(format!("vCPU {id}")))?;
            self.size.vcpus += 1;
            tracing::debug!(%id, ms = t.elapsed().as_millis() as u64, "vCPU plugged");
        }
        Ok(())
    }

    async fn plug_memory(&mut self, qmp: &mut Qmp, want: u64) -> Result<()> {
        while self.size.memory_mib < want {
            let mib = dimm_mib(
                self.base.memory_mib,
                self.max.memory_mib,
                self.size.memory_mib,
                want,
            );
            let id = format!("dimm{}", self.dimms);
            let t = std::time::Instant::now();
            qmp.add_dimm(&id, mib << 20)
                .await
                .map_err(|source| Error::Hotplug {
                    what: format!("{mib} MiB of memory ({id})"),
                    source,
                })?;
            self.dimms += 1;
            self.size.memory_mib += mib;
            tracing::debug!(%id, mib, ms = t.elapsed().as_millis() as u64, "memory plugged");
        }
        Ok(())
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn size(&self) -> VmSize {
        self.size
    }

    fn max_size(&self) -> VmSize {
        self.max
    }

    async fn grow(&mut self, to: VmSize) -> Result<VmSize> {
        if to.vcpus > self.max.vcpus || to.memory_mib > self.max.memory_mib {
            return Err(Error::Ceiling {
                want: to,
                max: self.max,
            });
        }
        if !self.hotplug {
            // microvm: the vCPUs are all there; the memory cannot grow and
            // `max` says so.
            self.size.vcpus = self.size.vcpus.max(to.vcpus);
            return Ok(self.size);
        }
        if to.vcpus <= self.size.vcpus && to.memory_mib <= self.size.memory_mib {
            return Ok(self.size);
        }
        let mut qmp = self.qmp().await?;
        if to.vcpus > self.size.vcpus {
            self.plug_vcpus(&mut qmp, to.vcpus).await?;
        }
        if to.memory_mib > self.size.memory_mib {
            self.plug_memory(&mut qmp, to.memory_mib).await?;
        }
        Ok(self.size)
    }

    fn vsock(&self) -> &VsockConnector {
        &self.connector
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        self.qemu
            .iter()
            .chain(&self.helpers)
            .map(|d| (d.what, d.pid()))
            .collect()
    }

    async fn pause(&mut self) -> Result<()> {
        self.qmp_do(async |q| q.stop().await).await
    }

    async fn resume(&mut self) -> Result<()> {
        self.qmp_do(async |q| q.cont().await).await
    }

    async fn wait(&mut self) -> String {
        let Some(q) = self.qemu.as_mut() else {
            return "not started".into();
        };
        let helpers = &mut self.helpers;
        // The daemons are reaped only by polling: none of them is waited
        // on for long, and there are one or two.
        let helper_died = async {
            loop {
                if let Some(ended) = helpers.iter_mut().find_map(helper_exited) {
                    return ended;
                }
                tokio::time::sleep(HELPER_POLL).await;
            }
        };
        tokio::select! {
            status = q.wait() => format!("QEMU exited ({status})"),
            ended = helper_died => ended,
        }
    }

    fn try_wait(&mut self) -> Option<String> {
        let Some(q) = self.qemu.as_mut() else {
            return Some("not started".into());
        };
        if let Some(status) = q.try_exited() {
            return Some(format!("QEMU exited ({status})"));
        }
        self.helpers.iter_mut().find_map(helper_exited)
    }

    fn daemons_tail(&self, lines: usize) -> String {
        self.helpers
            .iter()
            .map(|d| format!("[{}]\n{}", d.what, d.log_tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn console_tail(&self, lines: usize) -> String {
        self.console
            .as_ref()
            .map(|c| c.tail(lines))
            .unwrap_or_default()
    }

    async fn shutdown(&mut self, grace: Duration) {
        if let Some(mut q) = self.qemu.take() {
            if tokio::time::timeout(grace, q.wait()).await.is_err() {
                tracing::debug!("guest did not power off in {grace:?}; QMP quit");
                let quit = async {
                    if let Ok(mut qmp) = self.qmp().await {
                        let _ = qmp.quit().await;
                    }
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), quit).await;
            }
            q.stop(Duration::from_secs(2)).await;
        }
        // QEMU is reaped: the pipe is at EOF, or nearly (bounded drain).
        if let Some(c) = self.console.as_mut() {
            c.finish();
        }
        // With QEMU gone the daemons have nothing left to serve;
        // vhost-device-vsock would wait for a new frontend, so end them now.
        for d in self.helpers.iter_mut().rev() {
            d.stop(Duration::ZERO).await;
        }
        self.helpers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cocoon_config::Config;

    fn spec(machine: Machine, accel: ResolvedAccel, vsock: ResolvedVsock) -> VmSpec {
        let mut config = Config::default();
        config.hypervisor.machine = machine;
        config.hypervisor.vcpus = 2;
        config.hypervisor.memory_mib = 768;
        // No room to grow unless a test gives it.
        config.hypervisor.max_vcpus = 2;
        config.hypervisor.max_memory_mib = 768;
        config.hypervisor.kernel_params = "foo=bar".into();
        VmSpec {
            name: "cocoon-t1".into(),
            config,
            accel,
            vsock,
            run_dir: "/run/cocoon/t1".into(),
            shared_dir: "/run/cocoon/t1/shared".into(),
            share_tag: "cocoon".into(),
            tsc_khz: None,
            nics: Vec::new(),
            cgroup_procs: Vec::new(),
        }
    }

    /// Any fd number: the command line only names it.
    const CONSOLE_FD: RawFd = 7;

    fn joined(spec: &VmSpec) -> String {
        command_line(spec, CONSOLE_FD)
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn arg_after(args: &[OsString], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn q35_tcg_hybrid() {
        let s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        let args = command_line(&s, CONSOLE_FD);
        assert_eq!(arg_after(&args, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(arg_after(&args, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(arg_after(&args, "-cpu"), ["max,erms=off"]);
        assert_eq!(arg_after(&args, "-smp"), ["2"]);
        assert_eq!(arg_after(&args, "-m"), ["768M"]);
        assert_eq!(
            arg_after(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=768M,share=on"]
        );
        assert_eq!(
            arg_after(&args, "-kernel"),
            ["/var/lib/cocoon/guest/vmlinuz"]
        );
        assert_eq!(
            arg_after(&args, "-initrd"),
            ["/var/lib/cocoon/guest/initrd.img"]
        );
        let append = &arg_after(&args, "-append")[0];
        assert!(append.starts_with("console=ttyS0 "), "{append}");
        assert!(append.ends_with(" foo=bar"), "{append}");
        let devices = arg_after(&args, "-device");
        assert_eq!(
            devices,
            [
                "vhost-user-fs-pci,chardev=fs,tag=cocoon,queue-size=1024",
                "vhost-user-vsock-pci,chardev=vsock"
            ]
        );
        let all = joined(&s);
        assert!(
            all.contains("socket,id=vsock,path=/run/cocoon/t1/vhost-vsock.sock"),
            "{all}"
        );
        assert!(
            all.contains("socket,id=qmp,path=/run/cocoon/t1/qmp.sock,server=on,wait=off"),
            "{all}"
        );
        assert_eq!(arg_after(&args, "-add-fd"), ["fd=7,set=1,opaque=console"]);
        assert!(
            all.contains(
                "-chardev file,id=console,path=/dev/fdset/1,append=on -serial chardev:console"
            ),
            "{all}"
        );
        assert!(all.contains("-no-reboot"));
    }

    #[test]
    fn microvm_kvm_vhost() {
        let s = spec(
            Machine::Microvm,
            ResolvedAccel::Kvm,
            ResolvedVsock::Vhost { guest_cid: 42 },
        );
        let args = command_line(&s, CONSOLE_FD);
        assert!(arg_after(&args, "-machine")[0].starts_with("microvm,"));
        assert_eq!(arg_after(&args, "-accel"), ["kvm"]);
        assert_eq!(arg_after(&args, "-cpu"), ["host"]);
        assert_eq!(
            arg_after(&args, "-device"),
            [
                "vhost-user-fs-device,chardev=fs,tag=cocoon,queue-size=1024",
                "vhost-vsock-device,guest-cid=42"
            ]
        );
        assert!(!joined(&s).contains("vhost-vsock.sock"));
    }

    #[test]
    fn room_to_grow_on_q35() {
        let mut s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        s.config.hypervisor.max_vcpus = 4;
        s.config.hypervisor.max_memory_mib = 4096;
        let args = command_line(&s, CONSOLE_FD);
        assert_eq!(arg_after(&args, "-smp"), ["2,maxcpus=4"]);
        // The room above the boot memory, in whole 128 MiB blocks.
        assert_eq!(
            arg_after(&args, "-m"),
            [format!("768M,slots={MEMORY_SLOTS},maxmem=4096M")]
        );
        // Boot RAM stays shared memfd (hotplugged DIMMs are too: qmp.rs).
        assert_eq!(
            arg_after(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=768M,share=on"]
        );
        assert!(!arg_after(&args, "-append")[0].contains("maxcpus"));
        s.config.hypervisor.max_memory_mib = 768 + 200;
        assert_eq!(
            arg_after(&command_line(&s, CONSOLE_FD), "-m"),
            [format!("768M,slots={MEMORY_SLOTS},maxmem=896M")]
        );
        s.config.hypervisor.max_memory_mib = 768 + 100;
        assert_eq!(arg_after(&command_line(&s, CONSOLE_FD), "-m"), ["768M"]);
    }

    #[test]
    fn microvm_boots_every_vcpu_and_onlines_the_flavours() {
        let mut s = spec(Machine::Microvm, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        s.config.hypervisor.vcpus = 1;
        s.config.hypervisor.max_vcpus = 4;
        let args = command_line(&s, CONSOLE_FD);
        assert_eq!(arg_after(&args, "-smp"), ["4"]);
        assert_eq!(arg_after(&args, "-m"), ["768M"]);
        let append = &arg_after(&args, "-append")[0];
        assert!(append.contains(" maxcpus=1 "), "{append}");
        assert!(append.ends_with(" foo=bar"), "{append}");
        s.config.hypervisor.max_vcpus = 1;
        let args = command_line(&s, CONSOLE_FD);
        assert_eq!(arg_after(&args, "-smp"), ["1"]);
        assert!(!arg_after(&args, "-append")[0].contains("maxcpus"));
    }

    #[test]
    fn dimm_steps_reach_the_ceiling_within_the_slots() {
        // 512 MiB boot, 4096 MiB ceiling: 3584 MiB of room, 4 slots, so no
        // DIMM is smaller than 896 MiB.
        assert_eq!(dimm_mib(512, 4096, 512, 640), 896);
        assert_eq!(dimm_mib(512, 4096, 512, 512 + 1024), 1024);
        assert_eq!(dimm_mib(512, 4096, 512, 512 + 1000), 1024, "whole blocks");
        assert_eq!(
            dimm_mib(512, 4096, 3584, 4096),
            512,
            "never past the ceiling"
        );
        // However small the steps asked for, the slots reach the ceiling.
        let mut cur = 512;
        let mut n = 0;
        while cur < 4096 {
            cur += dimm_mib(512, 4096, cur, cur + 128);
            n += 1;
        }
        assert_eq!(cur, 4096);
        assert!(n <= MEMORY_SLOTS, "{n} DIMMs");
    }

    #[test]
    fn measured_tsc_rate_reaches_the_kernel() {
        let mut s = spec(Machine::Microvm, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        s.tsc_khz = Some(2_596_118);
        let append = &arg_after(&command_line(&s, CONSOLE_FD), "-append")[0];
        assert!(append.contains(" tsc_early_khz=2596118 "), "{append}");
        assert!(
            append.ends_with(" foo=bar"),
            "user parameters come last: {append}"
        );
    }

    /// A NIC on an fd that is not a tap: the command line only names it.
    fn nic(mac: [u8; 6]) -> crate::Nic {
        let fd = std::fs::File::open("/dev/null").unwrap();
        crate::Nic {
            mac,
            tap: std::sync::Arc::new(fd.into()),
        }
    }

    #[test]
    fn nics_on_inherited_taps() {
        for machine in [Machine::Q35, Machine::Microvm] {
            let mut s = spec(machine, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
            s.nics = vec![
                nic([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
                nic([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]),
            ];
            let fds: Vec<RawFd> = s.nics.iter().map(|n| n.tap.as_raw_fd()).collect();
            let args = command_line(&s, CONSOLE_FD);
            assert_eq!(
                arg_after(&args, "-netdev"),
                [
                    format!("tap,id=net0,fd={},vhost=off", fds[0]),
                    format!("tap,id=net1,fd={},vhost=off", fds[1]),
                ]
            );
            let nets: Vec<String> = arg_after(&args, "-device")
                .into_iter()
                .filter(|d| d.contains("virtio-net"))
                .collect();
            let want = match machine {
                Machine::Q35 => [
                    "virtio-net-pci,netdev=net0,mac=02:42:ac:11:00:02,romfile=",
                    "virtio-net-pci,netdev=net1,mac=aa:bb:cc:dd:ee:0f,romfile=",
                ],
                Machine::Microvm => [
                    "virtio-net-device,netdev=net0,mac=02:42:ac:11:00:02",
                    "virtio-net-device,netdev=net1,mac=aa:bb:cc:dd:ee:0f",
                ],
            };
            assert_eq!(nets, want, "{machine:?}");
        }
        let s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        assert!(arg_after(&command_line(&s, CONSOLE_FD), "-netdev").is_empty());
    }

    #[test]
    fn daemon_args() {
        let s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        let v: Vec<_> = virtiofsd_args(&s)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        for want in [
            "--shared-dir=/run/cocoon/t1/shared",
            "--socket-path=/run/cocoon/t1/virtiofs.sock",
            // The guest drives virtiofsd: its sandbox and seccomp filter stay.
            "--sandbox=namespace",
            "--seccomp=kill",
            "--announce-submounts",
        ] {
            assert!(v.iter().any(|a| a == want), "{want} missing from {v:?}");
        }
        assert!(!v
            .iter()
            .any(|a| a.starts_with("--sandbox=") && a != "--sandbox=namespace"));
        assert!(!v
            .iter()
            .any(|a| a.starts_with("--seccomp=") && a != "--seccomp=kill"));
        let b: Vec<_> = vsock_backend_args(&s)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            b,
            [
                "--guest-cid=3",
                "--socket=/run/cocoon/t1/vhost-vsock.sock",
                "--uds-path=/run/cocoon/t1/vsock.sock",
                "--tx-buffer-size=262144"
            ]
        );
    }

    #[test]
    fn commas_in_option_values_are_doubled() {
        assert_eq!(opt_value("plain"), "plain");
        assert!(matches!(opt_value("plain"), Cow::Borrowed(_)));
        assert_eq!(opt_value("a,b"), "a,,b");
        assert_eq!(opt_value(",a,,b,"), ",,a,,,,b,,");
        assert_eq!(opt_value(""), "");
    }

    #[test]
    fn names_and_paths_cannot_inject_options() {
        let mut s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        s.name = "evil,debug-threads=on".into();
        s.run_dir = "/run/co,coon/t1".into();
        s.share_tag = "tag,x=y".into();
        let args = command_line(&s, CONSOLE_FD);
        assert_eq!(arg_after(&args, "-name"), ["evil,,debug-threads=on"]);
        let all = joined(&s);
        for want in [
            "socket,id=qmp,path=/run/co,,coon/t1/qmp.sock,server=on,wait=off",
            "socket,id=fs,path=/run/co,,coon/t1/virtiofs.sock",
            "socket,id=vsock,path=/run/co,,coon/t1/vhost-vsock.sock",
            "chardev=fs,tag=tag,,x=y,queue-size=1024",
        ] {
            assert!(all.contains(want), "{want} missing from {all}");
        }
        // The daemons take paths as whole arguments: nothing to escape.
        let b = vsock_backend_args(&s);
        assert_eq!(b[2], "--uds-path=/run/co,coon/t1/vsock.sock");
    }
}
