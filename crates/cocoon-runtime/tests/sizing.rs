//! Hotplug on a real q35 VM (QEMU, the guest image), driven through
//! `Sandbox`: how long one vCPU and 1 GiB of memory take from the QMP
//! command to online in the guest, and that the guest onlines them.
//! `#[ignore]`d; run by name:
//!   cargo test --release -p cocoon-runtime --test sizing -- --ignored --nocapture bench_hotplug
//! (`COCOON_BENCH_ROUNDS` VMs, 2 by default; each plugs 4 vCPUs and 4 GiB.)

use std::time::{Duration, Instant};

use cocoon_config::{Config, Machine};
use cocoon_hypervisor::VmSize;
use cocoon_protocols::agent::OnlineResourcesRequest;
use cocoon_runtime::{ctx, Sandbox};

fn config(state: &std::path::Path) -> Config {
    let guest =
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into());
    let guest = std::path::PathBuf::from(guest);
    let mut c = Config::default();
    c.guest.kernel = guest.join("vmlinuz");
    c.guest.initrd = guest.join("initrd.img");
    c.guest.dir = guest;
    c.runtime.state_dir = state.to_path_buf();
    c.hypervisor.machine = Machine::Q35;
    c.hypervisor.boot_timeout = Duration::from_secs(60);
    c.hypervisor.vcpus = 1;
    c.hypervisor.memory_mib = 512;
    // Four hotplug slots of exactly 1 GiB each.
    c.hypervisor.max_vcpus = 5;
    c.hypervisor.max_memory_mib = 512 + 4 * 1024;
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Plugs `to` and has the guest online it; (QMP time, time to online).
async fn step(sb: &mut Sandbox, to: VmSize) -> (Duration, Duration) {
    let t = Instant::now();
    let plugged = sb.vm().grow(to).await.expect("hotplug");
    let qmp = t.elapsed();
    assert_eq!(plugged, to, "whole 1 GiB DIMMs");
    let req = OnlineResourcesRequest {
        vcpus: to.vcpus,
        memory_mib: to.memory_mib,
        timeout_ms: 30_000,
        ..Default::default()
    };
    let r = sb
        .agent()
        .online_resources(ctx(Duration::from_secs(35)), &req)
        .await
        .expect("online in the guest");
    let online = t.elapsed();
    assert_eq!(r.online_vcpus, to.vcpus);
    assert!(r.online_memory_mib >= to.memory_mib, "{r:?} for {to}");
    (qmp, online)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots VMs and measures: run by name"]
async fn bench_hotplug() {
    let rounds: usize = std::env::var("COCOON_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let state = tempfile::tempdir().unwrap();
    let config = config(state.path());
    let (mut cpu_qmp, mut cpu_online, mut mem_qmp, mut mem_online) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let id = cocoon_protocols::Id::sandbox(&format!("bench-hotplug-{round}")).unwrap();
        let mut sb = Sandbox::start(&id, &config).await.expect("boot");
        let mut size = sb.size();
        for _ in 0..4 {
            size.vcpus += 1;
            let (q, o) = step(&mut sb, size).await;
            cpu_qmp.push(q);
            cpu_online.push(o);
            size.memory_mib += 1024;
            let (q, o) = step(&mut sb, size).await;
            mem_qmp.push(q);
            mem_online.push(o);
        }
        assert_eq!(
            sb.size(),
            VmSize {
                vcpus: 5,
                memory_mib: 512 + 4096
            }
        );
        sb.stop().await;
    }
    let n = cpu_qmp.len();
    eprintln!(
        "hotplug on q35 ({:?}), median of {n}:\n  \
         1 vCPU: QMP device_add {}, to online in the guest {}\n  \
         1 GiB:  QMP object-add + device_add pc-dimm {}, to online in the guest {}",
        cocoon_hypervisor::HostCaps::probe().resolve_accel(config.hypervisor.accel),
        ms(median(cpu_qmp)),
        ms(median(cpu_online)),
        ms(median(mem_qmp)),
        ms(median(mem_online)),
    );
}
