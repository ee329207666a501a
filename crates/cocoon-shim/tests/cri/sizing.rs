//! The VM grows with its containers' limits: memory and CPU limits given
//! through CRI (CreateContainer, UpdateContainerResources) hotplug memory
//! and vCPUs into the pod's q35 VM, which the guest sees; past the
//! flavour's ceiling the request fails before anything changes; on
//! microvm the vCPUs grow (onlined) and the memory does not.
//! The flavours are the ones `scripts/containerd.sh` writes, read here.

use std::time::Duration;

use k8s_cri::v1::{LinuxContainerConfig, LinuxContainerResources};
use tonic::Code;

use crate::harness::*;

const SLEEPER: &[&str] = &["sleep", "100000"];
const MIB: i64 = 1 << 20;

/// The flavour a handler boots, from the containerd directory's
/// `flavours/` (beside the socket).
fn flavour(cri: &Cri, machine: &str) -> cocoon_config::HypervisorConfig {
    let path = cri
        .socket
        .parent()
        .unwrap()
        .join(format!("flavours/{machine}.toml"));
    cocoon_config::load_file(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .hypervisor
}

/// A container whose CPU limit is `cpus` vCPUs and memory limit `mem_mib`.
fn limited(name: &str, cpus: i64, mem_mib: i64) -> k8s_cri::v1::ContainerConfig {
    let mut c = container_config(name, SLEEPER);
    c.linux = Some(LinuxContainerConfig {
        resources: Some(resources(cpus, mem_mib)),
        ..Default::default()
    });
    c
}

fn resources(cpus: i64, mem_mib: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: if cpus > 0 { 100_000 } else { 0 },
        cpu_quota: cpus * 100_000,
        memory_limit_in_bytes: mem_mib * MIB,
        ..Default::default()
    }
}

/// What the guest shows a container: MemTotal (KiB), the online CPU list
/// and the CPUs the container may run on.
#[derive(Debug)]
struct Seen {
    mem_total_kib: i64,
    online: String,
    nproc: u32,
}

fn seen(cri: &Cri, container: &str) -> Seen {
    let e = cri
        .exec_sync(
            container,
            &[
                "sh",
                "-c",
                "grep MemTotal /proc/meminfo; cat /sys/devices/system/cpu/online; nproc",
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("ExecSync in {container}: {e}"));
    let l: Vec<&str> = e.stdout.lines().collect();
    assert_eq!(l.len(), 3, "{e:?}");
    Seen {
        mem_total_kib: l[0]
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{e:?}")),
        online: l[1].trim().to_string(),
        nproc: l[2].trim().parse().unwrap_or_else(|_| panic!("{e:?}")),
    }
}

/// `0-2` for 3 CPUs, `0` for one.
fn cpu_range(n: u32) -> String {
    if n == 1 {
        "0".into()
    } else {
        format!("0-{}", n - 1)
    }
}

/// On q35: a container with limits above the flavour's size grows the VM
/// (MemTotal and the online CPUs in the guest, read inside the
/// container), UpdateContainerResources grows it further, a limit past the
/// ceiling is refused with InvalidArgument naming the ceiling, and removing
/// the container offlines its CPUs; the pod leaves nothing behind.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn q35_vm_grows_with_its_containers_limits() {
    let cri = cri_or_skip!("q35_vm_grows_with_its_containers_limits");
    let f = flavour(&cri, "q35");
    assert!(
        f.vcpus == 1 && f.max_vcpus >= 4 && f.max_memory_mib >= f.memory_mib + 2560,
        "the test wants a 1-vCPU flavour with room for 3 more vCPUs and 2.5 GiB: {f:?}"
    );
    let pod = cri
        .run_pod(COCOON, pod_config("sizing", Namespaces::default()))
        .expect("RunPodSandbox");
    // No limits: the flavour's size.
    let plain = pod
        .start(container_config("plain", SLEEPER))
        .expect("plain");
    let s0 = seen(&cri, &plain);
    assert_eq!((s0.online.as_str(), s0.nproc), ("0", 1), "{s0:?}");

    // 1 GiB and 2 vCPUs above a 512 MiB, 1-vCPU flavour: the VM gets the
    // flavour's memory plus the limit, and the 2 vCPUs of the CPU limit.
    let big = pod.start(limited("big", 2, 1024)).expect("big");
    let s1 = seen(&cri, &big);
    let grown_mib = (s1.mem_total_kib - s0.mem_total_kib) / 1024;
    eprintln!("after 1 GiB + 2 vCPUs: {s1:?}, MemTotal +{grown_mib} MiB");
    assert!(
        (1024..1024 + 1024).contains(&grown_mib) && grown_mib % 128 == 0,
        "MemTotal grew {grown_mib} MiB for a 1 GiB limit: {s0:?} -> {s1:?}"
    );
    assert_eq!((s1.online.as_str(), s1.nproc), ("0-1", 2), "{s1:?}");
    // Every container of the pod sees the same (grown) guest.
    assert_eq!(seen(&cri, &plain).mem_total_kib, s1.mem_total_kib);
    // The limits apply in the guest's cgroups as before.
    let e = cri
        .exec_sync(
            &big,
            &["cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes"],
            Duration::from_secs(30),
        )
        .expect("ExecSync");
    let limit = e.stdout.trim();
    // cgroup v1 or v2 in the guest: either file says 1 GiB.
    let limit = if limit.is_empty() {
        cri.exec_sync(
            &big,
            &["cat", "/sys/fs/cgroup/memory.max"],
            Duration::from_secs(30),
        )
        .expect("ExecSync")
        .stdout
        .trim()
        .to_string()
    } else {
        limit.to_string()
    };
    assert_eq!(limit, (1024 * MIB).to_string(), "{e:?}");

    // UpdateContainerResources: 2 GiB, 3 vCPUs.
    cri.update_resources(&big, resources(3, 2048))
        .expect("UpdateContainerResources to 2 GiB, 3 vCPUs");
    let s2 = seen(&cri, &big);
    let grown_mib = (s2.mem_total_kib - s0.mem_total_kib) / 1024;
    eprintln!("after the update to 2 GiB + 3 vCPUs: {s2:?}, MemTotal +{grown_mib} MiB");
    assert!(
        (2048..2048 + 1024).contains(&grown_mib),
        "MemTotal grew {grown_mib} MiB for a 2 GiB limit: {s0:?} -> {s2:?}"
    );
    assert_eq!((s2.online.as_str(), s2.nproc), ("0-2", 3), "{s2:?}");

    // Past the ceiling: an update and a new container are refused, and
    // the VM is as it was.
    let err = cri
        .update_resources(&big, resources(f.max_vcpus as i64 + 1, 2048))
        .expect_err("an update past max_vcpus");
    eprintln!("update past the ceiling: {err}");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let ceiling = format!("max_vcpus is {}", f.max_vcpus);
    assert!(err.message().contains(&ceiling), "{err}");
    let err = pod
        .start(limited("huge", 0, i64::from(f.max_memory_mib)))
        .expect_err("a container past max_memory_mib");
    eprintln!("container past the ceiling: {err}");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains(&format!("max_memory_mib allows {} MiB", f.max_memory_mib)),
        "{err}"
    );
    let s3 = seen(&cri, &big);
    assert_eq!(
        (s3.mem_total_kib, s3.online.as_str()),
        (s2.mem_total_kib, "0-2")
    );

    // Removing the container: its CPUs go offline; memory stays plugged
    // (memory is not unplugged: docs/sizing.md).
    cri.stop_container(&big, Duration::from_secs(5))
        .expect("StopContainer");
    cri.remove_container(&big).expect("RemoveContainer");
    let s4 = seen(&cri, &plain);
    assert_eq!((s4.online.as_str(), s4.nproc), ("0", 1), "{s4:?}");
    assert_eq!(s4.mem_total_kib, s2.mem_total_kib, "{s4:?}");
    pod.remove();
}

/// On microvm: vCPUs grow (all are there from boot, onlined by the agent),
/// memory does not (no hotplug on QEMU's microvm): a memory limit within
/// the VM is the guest cgroup's alone, one past it is refused.
#[test]
#[ignore = "needs containerd with CRI and boots VMs: run by scripts/test.sh"]
fn microvm_grows_cpus_not_memory() {
    let cri = cri_or_skip!("microvm_grows_cpus_not_memory");
    let f = flavour(&cri, "microvm");
    assert!(
        f.vcpus == 1 && f.max_vcpus >= 3 && f.max_memory_mib == f.memory_mib,
        "{f:?}"
    );
    let pod = cri
        .run_pod(
            COCOON_MICROVM,
            pod_config("sizing-microvm", Namespaces::default()),
        )
        .expect("RunPodSandbox");
    let plain = pod
        .start(container_config("plain", SLEEPER))
        .expect("plain");
    let s0 = seen(&cri, &plain);
    assert_eq!(s0.online, "0", "{s0:?}");
    let half = i64::from(f.memory_mib) / 2;
    let c = pod
        .start(limited("cpus", 2, half))
        .expect("2 vCPUs, half the memory");
    let s1 = seen(&cri, &c);
    eprintln!("microvm after 2 vCPUs and {half} MiB: {s1:?}");
    assert_eq!(
        (s1.online.as_str(), s1.nproc),
        (cpu_range(2).as_str(), 2),
        "{s1:?}"
    );
    assert_eq!(
        s1.mem_total_kib, s0.mem_total_kib,
        "microvm memory does not grow"
    );
    let err = pod
        .start(limited("huge", 0, i64::from(f.memory_mib) + 128))
        .expect_err("a memory limit past the microvm's memory");
    eprintln!("microvm past its memory: {err}");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("cannot grow"), "{err}");
    cri.stop_container(&c, Duration::from_secs(5))
        .expect("StopContainer");
    cri.remove_container(&c).expect("RemoveContainer");
    assert_eq!(seen(&cri, &plain).online, "0");
    pod.remove();
}
