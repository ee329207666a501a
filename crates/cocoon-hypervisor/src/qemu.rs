//! The QEMU backend.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use cocoon_config::Machine;
use tokio::process::Command;

use crate::host::find_binary;
use crate::process::{tail, wait_for_socket, Daemon};
use crate::qmp::Qmp;
use crate::{Error, Hypervisor, ResolvedAccel, ResolvedVsock, Result, Vm, VmSpec, VsockConnector};

/// Kernel parameters Cocoon always passes; the flavour's own come after them.
const BASE_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 reboot=t quiet loglevel=4 \
     tsc=reliable no_timer_check cryptomgr.notests i8042.noaux i8042.nomux i8042.nopnp \
     i8042.dumbkbd rcupdate.rcu_expedited=1";

/// How long a helper daemon may take to create its socket.
const DAEMON_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The QEMU command line for `spec`, without the binary. A pure function of
/// the spec, so it is tested without spawning anything.
pub fn command_line(spec: &VmSpec) -> Vec<OsString> {
    let h = &spec.config.hypervisor;
    let mem = h.memory_mib;
    let microvm = h.machine == Machine::Microvm;
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
        ResolvedAccel::Tcg => ("tcg,thread=multi", "max"),
    };
    let mut params = BASE_KERNEL_PARAMS.to_string();
    if let Some(khz) = spec.tsc_khz {
        params.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !h.kernel_params.is_empty() {
        params.push(' ');
        params.push_str(&h.kernel_params);
    }
    let mut a: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
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
        h.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // vhost-user devices need guest memory the daemons can map.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-kernel".into(),
        path(spec.config.guest.kernel.clone()),
        "-initrd".into(),
        path(spec.config.guest.initrd.clone()),
        "-append".into(),
        params,
        "-chardev".into(),
        format!("file,id=console,path={}", path(spec.console_log())),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path(spec.qmp_socket())
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        "-chardev".into(),
        format!("socket,id=fs,path={}", path(spec.virtiofs_socket())),
        "-device".into(),
        format!(
            "{},chardev=fs,tag={},queue-size=1024",
            dev("vhost-user-fs-pci", "vhost-user-fs-device"),
            spec.share_tag
        ),
    ];
    match spec.vsock {
        ResolvedVsock::Hybrid => a.extend([
            "-chardev".into(),
            format!("socket,id=vsock,path={}", path(spec.vsock_backend_socket())),
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
    a.into_iter().map(OsString::from).collect()
}

/// The virtiofsd command line for `spec`.
pub fn virtiofsd_args(spec: &VmSpec) -> Vec<OsString> {
    vec![
        format!("--socket-path={}", spec.virtiofs_socket().display()).into(),
        format!("--shared-dir={}", spec.shared_dir.display()).into(),
        format!("--cache={}", spec.config.virtiofs.cache).into(),
        "--sandbox=namespace".into(),
        "--announce-submounts".into(),
        "--inode-file-handles=never".into(),
        "--xattr".into(),
    ]
}

/// The vhost-device-vsock command line for `spec` (hybrid vsock only).
pub fn vsock_backend_args(spec: &VmSpec) -> Vec<OsString> {
    vec![
        "--vm".into(),
        format!(
            "guest-cid=3,socket={},uds-path={}",
            spec.vsock_backend_socket().display(),
            spec.vsock_uds().display()
        )
        .into(),
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
        let mut vm = QemuVm {
            qemu: None,
            helpers: Vec::new(),
            qmp_path: spec.qmp_socket(),
            console_log: spec.console_log(),
            connector: match spec.vsock {
                ResolvedVsock::Hybrid => VsockConnector::Hybrid {
                    uds: spec.vsock_uds(),
                },
                ResolvedVsock::Vhost { guest_cid } => VsockConnector::Vhost { guest_cid },
            },
            pid: 0,
        };

        let mut cmd = Command::new(&virtiofsd);
        cmd.args(virtiofsd_args(spec));
        let mut d = Daemon::spawn("virtiofsd", cmd, &spec.virtiofsd_log())?;
        let r = wait_for_socket(
            &mut d,
            &spec.virtiofs_socket(),
            &spec.virtiofsd_log(),
            DAEMON_SOCKET_TIMEOUT,
        )
        .await;
        vm.helpers.push(d);
        r?;

        if let Some(backend) = backend {
            let mut cmd = Command::new(&backend);
            cmd.args(vsock_backend_args(spec));
            let mut d = Daemon::spawn("vhost-device-vsock", cmd, &spec.vsock_backend_log())?;
            let r = wait_for_socket(
                &mut d,
                &spec.vsock_backend_socket(),
                &spec.vsock_backend_log(),
                DAEMON_SOCKET_TIMEOUT,
            )
            .await;
            vm.helpers.push(d);
            r?;
        }

        let mut cmd = Command::new(&qemu);
        cmd.args(command_line(spec));
        tracing::debug!(cmd = ?cmd.as_std(), "starting QEMU");
        let mut d = Daemon::spawn("QEMU", cmd, &spec.qemu_log())?;
        let r = wait_for_socket(
            &mut d,
            &spec.qmp_socket(),
            &spec.qemu_log(),
            DAEMON_SOCKET_TIMEOUT,
        )
        .await;
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
                    if let Some(status) = vm.qemu.as_mut().and_then(Daemon::try_exited) {
                        return Err(Error::EarlyExit {
                            what: "QEMU",
                            status,
                            log: tail(&spec.qemu_log(), 20),
                        });
                    }
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
        tracing::debug!(pid = vm.pid, %status, "QEMU running");
        if let Some(status) = vm.qemu.as_mut().and_then(Daemon::try_exited) {
            return Err(Error::EarlyExit {
                what: "QEMU",
                status,
                log: tail(&spec.qemu_log(), 20),
            });
        }
        Ok(Box::new(vm))
    }
}

/// A VM started by [`Qemu`].
pub struct QemuVm {
    qemu: Option<Daemon>,
    helpers: Vec<Daemon>,
    qmp_path: PathBuf,
    console_log: PathBuf,
    connector: VsockConnector,
    pid: u32,
}

impl QemuVm {
    async fn qmp(&self) -> Result<Qmp> {
        Qmp::connect(&self.qmp_path)
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

#[async_trait]
impl Vm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
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
        match self.qemu.as_mut() {
            Some(q) => q.wait().await,
            None => "not started".into(),
        }
    }

    fn try_wait(&mut self) -> Option<String> {
        self.qemu
            .as_mut()
            .map_or(Some("not started".into()), Daemon::try_exited)
    }

    fn console_tail(&self, lines: usize) -> String {
        tail(&self.console_log, lines)
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
        }
    }

    fn joined(spec: &VmSpec) -> String {
        command_line(spec)
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
        let args = command_line(&s);
        assert_eq!(arg_after(&args, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(arg_after(&args, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(arg_after(&args, "-cpu"), ["max"]);
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
        assert!(
            all.contains("file,id=console,path=/run/cocoon/t1/console.log"),
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
        let args = command_line(&s);
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
    fn measured_tsc_rate_reaches_the_kernel() {
        let mut s = spec(Machine::Microvm, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        s.tsc_khz = Some(2_596_118);
        let append = &arg_after(&command_line(&s), "-append")[0];
        assert!(append.contains(" tsc_early_khz=2596118 "), "{append}");
        assert!(
            append.ends_with(" foo=bar"),
            "user parameters come last: {append}"
        );
    }

    #[test]
    fn daemon_args() {
        let s = spec(Machine::Q35, ResolvedAccel::Tcg, ResolvedVsock::Hybrid);
        let v: Vec<_> = virtiofsd_args(&s)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(v.contains(&"--shared-dir=/run/cocoon/t1/shared".to_string()));
        assert!(v.contains(&"--socket-path=/run/cocoon/t1/virtiofs.sock".to_string()));
        let b: Vec<_> = vsock_backend_args(&s)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            b[1],
            "guest-cid=3,socket=/run/cocoon/t1/vhost-vsock.sock,uds-path=/run/cocoon/t1/vsock.sock"
        );
    }
}
