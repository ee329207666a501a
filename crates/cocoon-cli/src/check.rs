//! `cocoon check` and `cocoon env`.

use std::path::Path;

use cocoon_hypervisor::host::find_binary;
use cocoon_hypervisor::{HostCaps, KvmKind, ResolvedAccel, ResolvedVsock};

fn load(config: Option<&Path>) -> Option<cocoon_config::Loaded> {
    match cocoon_config::load(config) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("configuration: {e}");
            None
        }
    }
}

pub fn check(config: Option<&Path>) -> i32 {
    let Some(loaded) = load(config) else { return 1 };
    let c = &loaded.config;
    let caps = HostCaps::probe();
    let mut ok = true;
    let mut line = |good: bool, what: &str, detail: String| {
        ok &= good;
        println!("{} {what}: {detail}", if good { "ok  " } else { "FAIL" });
    };
    println!("configuration: {}", loaded.source);
    let qemu = find_binary(&c.hypervisor.path);
    line(
        qemu.is_some(),
        "qemu",
        qemu.map_or(format!("{} not found", c.hypervisor.path.display()), |p| {
            p.display().to_string()
        }),
    );
    let kvm = match caps.kvm {
        KvmKind::Hardware => "hardware-backed (kvm_intel/kvm_amd)",
        KvmKind::Pvm => "PVM (kvm_pvm): stock guest kernels hang under it",
        KvmKind::Unknown => "present, backend unknown",
        KvmKind::None => "none",
    };
    let accel = caps.resolve_accel(c.hypervisor.accel);
    let accel_s = match accel {
        ResolvedAccel::Kvm => "kvm",
        ResolvedAccel::Tcg => "tcg (software emulation: slower boots)",
    };
    line(
        !(accel == ResolvedAccel::Kvm && caps.kvm != KvmKind::Hardware),
        "accelerator",
        format!(
            "/dev/kvm {kvm}; {:?} in the configuration → {accel_s}",
            c.hypervisor.accel
        ),
    );
    let vsock = caps.resolve_vsock(c.vsock.transport);
    match vsock {
        ResolvedVsock::Vhost { .. } => line(
            caps.vhost_vsock,
            "vsock",
            "kernel vhost-vsock (/dev/vhost-vsock)".into(),
        ),
        ResolvedVsock::Hybrid => {
            let b = find_binary(&c.vsock.backend_path);
            line(
                b.is_some(),
                "vsock",
                format!(
                    "hybrid through {} ({})",
                    c.vsock.backend_path.display(),
                    b.map_or("not found".into(), |p| p.display().to_string())
                ),
            )
        }
    }
    let v = find_binary(&c.virtiofs.path);
    line(
        v.is_some(),
        "virtiofsd",
        v.map_or(format!("{} not found", c.virtiofs.path.display()), |p| {
            p.display().to_string()
        }),
    );
    for (what, p) in [
        ("guest kernel", &c.guest.kernel),
        ("guest initrd", &c.guest.initrd),
    ] {
        line(
            p.is_file(),
            what,
            if p.is_file() {
                p.display().to_string()
            } else {
                format!("{} missing (run: cocoon image build)", p.display())
            },
        );
    }
    println!(
        "{}",
        if ok {
            "this host can run Cocoon"
        } else {
            "this host cannot run Cocoon as configured"
        }
    );
    if ok {
        0
    } else {
        1
    }
}

pub fn env(config: Option<&Path>) -> i32 {
    let Some(loaded) = load(config) else { return 1 };
    let c = &loaded.config;
    let caps = HostCaps::probe();
    println!("# source: {}", loaded.source);
    println!("[hypervisor]");
    println!("path = {:?}", c.hypervisor.path);
    println!(
        "accel = {:?}  # resolves to {:?} on this host",
        c.hypervisor.accel,
        caps.resolve_accel(c.hypervisor.accel)
    );
    println!("machine = {:?}", c.hypervisor.machine);
    println!("vcpus = {}", c.hypervisor.vcpus);
    println!("memory_mib = {}", c.hypervisor.memory_mib);
    println!("kernel_params = {:?}", c.hypervisor.kernel_params);
    println!(
        "boot_timeout_secs = {}",
        c.hypervisor.boot_timeout.as_secs_f64()
    );
    println!("[guest]");
    println!("dir = {:?}", c.guest.dir);
    println!("kernel = {:?}", c.guest.kernel);
    println!("initrd = {:?}", c.guest.initrd);
    println!("[virtiofs]");
    println!("path = {:?}", c.virtiofs.path);
    println!("cache = {:?}", c.virtiofs.cache);
    println!("[vsock]");
    println!(
        "transport = {:?}  # resolves to {:?} on this host",
        c.vsock.transport,
        if caps.vhost_vsock { "vhost" } else { "hybrid" }
    );
    println!("backend_path = {:?}", c.vsock.backend_path);
    println!("[runtime]");
    println!("state_dir = {:?}", c.runtime.state_dir);
    0
}
