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
    // TOML that loads back as this flavour; what `auto` means here is a
    // comment.
    let text = c.to_toml(|key| match key {
        "hypervisor.accel" => Some(format!(
            "resolves to {:?} on this host",
            caps.resolve_accel(c.hypervisor.accel)
        )),
        "vsock.transport" => Some(format!(
            "resolves to {} on this host",
            if caps.vhost_vsock { "vhost" } else { "hybrid" }
        )),
        _ => None,
    });
    print!("{text}");
    0
}
