//! A real VM whose guest floods its serial console: the console log stays
//! within its cap, QEMU keeps answering QMP meanwhile, the last lines are
//! there, and shutdown leaves nothing running.
//!
//! Boots QEMU (TCG), so it is ignored by default. Run it with
//! `COCOON_TEST_KERNEL=/path/to/vmlinuz cargo test --release -p
//! cocoon-hypervisor --test console_flood -- --ignored`; it needs
//! `qemu-system-x86_64`, `virtiofsd`, `vhost-device-vsock`, `cpio` and a
//! static `/bin/busybox`, and fails (never silently passes) without them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cocoon_config::{Config, Machine};
use cocoon_hypervisor::{Hypervisor, Qemu, ResolvedAccel, ResolvedVsock, VmSpec, LOG_CAP};

/// Lines of ~100 bytes the guest prints: several times the cap.
const LINES: u32 = 40_000;

fn initrd(dir: &Path) -> PathBuf {
    let root = dir.join("initrd-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("a static /bin/busybox (Debian busybox-static)");
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         pad=$(/bin/busybox printf '%080d' 0)\n\
         i=0\n\
         while [ $i -lt {LINES} ]; do echo \"flood $i $pad\"; i=$((i+1)); done\n\
         echo 'flood done'\n\
         /bin/busybox poweroff -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio");
    assert!(status.success());
    out
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; needs COCOON_TEST_KERNEL, QEMU, virtiofsd, vhost-device-vsock"]
async fn a_console_flood_is_capped_and_qemu_stays_responsive() {
    let kernel = std::env::var_os("COCOON_TEST_KERNEL")
        .map(PathBuf::from)
        .expect("COCOON_TEST_KERNEL must name a guest kernel (vmlinuz) for this test");
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    let mut config = Config::default();
    config.hypervisor.path = "qemu-system-x86_64".into();
    config.hypervisor.machine = Machine::Q35;
    config.hypervisor.vcpus = 1;
    config.hypervisor.memory_mib = 256;
    config.guest.kernel = kernel;
    config.guest.initrd = initrd(tmp.path());
    config.virtiofs.path = "virtiofsd".into();
    config.vsock.backend_path = "vhost-device-vsock".into();
    let spec = VmSpec {
        name: "flood".into(),
        config,
        accel: ResolvedAccel::Tcg,
        vsock: ResolvedVsock::Hybrid,
        run_dir: run_dir.clone(),
        shared_dir: shared,
        share_tag: "cocoon".into(),
        tsc_khz: None,
        nics: Vec::new(),
        cgroup_procs: Vec::new(),
    };

    let mut vm = Qemu.launch(&spec).await.expect("launch");
    let console = spec.console_log();
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while vm.try_wait().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "guest still flooding after 300s; console:\n{}",
            vm.console_tail(5)
        );
        // QMP round trips while the guest floods.
        let t = Instant::now();
        let probe = async {
            vm.pause().await?;
            vm.resume().await
        }
        .await;
        if let Err(e) = probe {
            // The guest may have powered off between try_wait and the
            // probe: QEMU closes QMP as it begins to exit, a moment before
            // it has exited.
            let exiting = Instant::now();
            while vm.try_wait().is_none() && exiting.elapsed() < Duration::from_secs(10) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if vm.try_wait().is_some() {
                break;
            }
            panic!(
                "QMP during the flood: {e:#}; console:\n{}",
                vm.console_tail(5)
            );
        }
        slowest = slowest.max(t.elapsed());
        probes += 1;
        let total = size(&console) + size(&run_dir.join("console.log.1"));
        assert!(total <= LOG_CAP, "console log at {total} bytes");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "flood of {LINES} lines took {:?}; {probes} QMP probes, slowest {slowest:?}",
        t0.elapsed()
    );
    assert!(slowest < Duration::from_secs(2), "QMP took {slowest:?}");
    let status = vm.wait().await;
    let pids = vm.pids();
    vm.shutdown(Duration::ZERO).await;
    // The kernel's "reboot: Power down" may follow.
    let tail = vm.console_tail(3);
    let want = format!("flood {} {:080}\nflood done", LINES - 1, 0);
    assert!(
        tail.contains(&want),
        "status {status}, console tail:\n{tail}"
    );
    let total = size(&console) + size(&run_dir.join("console.log.1"));
    assert!(total <= LOG_CAP, "console log at {total} bytes");
    assert!(total >= LOG_CAP / 2, "console log at only {total} bytes");
    for log in [
        "console.log",
        "console.log.1",
        "qemu.log",
        "virtiofsd.log",
        "vhost-device-vsock.log",
    ] {
        assert_eq!(mode(&run_dir.join(log)), 0o600, "{log}");
    }
    for sock in [
        "qmp.sock",
        "virtiofs.sock",
        "vhost-vsock.sock",
        "vsock.sock",
    ] {
        let p = run_dir.join(sock);
        // A daemon may re-bind its socket after QEMU left (umask 077: 0700).
        if p.exists() {
            assert_eq!(mode(&p) & 0o077, 0, "{sock} is {:o}", mode(&p));
        }
    }
    assert!(vm.pids().is_empty(), "{:?}", vm.pids());
    for (what, pid) in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{what} ({pid}) still there after shutdown"
        );
    }
}
