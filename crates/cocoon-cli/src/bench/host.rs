//! The host's side of the figures: the machine description of the report's
//! header, and what /proc says about processes (PSS, resident memory, CPU
//! time, who is whose child).

use std::collections::BTreeMap;
use std::process::Command;

use super::report::Header;

/// The first line of `cmd`'s output, or "unknown".
fn first_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines().next().map(|l| l.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{cmd}: unknown"))
}

pub fn header(qemu: &std::path::Path, accel: &str, runs: usize, sections: Vec<String>) -> Header {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    Header {
        date,
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel,
        accel: accel.into(),
        qemu: first_line(&qemu.to_string_lossy(), &["--version"]),
        containerd: first_line("containerd", &["--version"]),
        runs,
        sections,
    }
}

/// One field of /proc/PID/status or smaps_rollup, in KiB.
fn kib_field(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Proportional set size of `pid`, in MiB (0 for a process gone).
pub fn pss_mib(pid: u32) -> f64 {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    kib_field(&t, "Pss:").unwrap_or(0.0) / 1024.0
}

/// Resident anonymous and shared memory of `pid` in MiB. For QEMU the
/// shared part is the guest memory the guest has touched (the memfd), the
/// anonymous part QEMU's own (heap, TCG's translation cache).
pub fn rss_anon_shmem_mib(pid: u32) -> (f64, f64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        kib_field(&t, "RssAnon:").unwrap_or(0.0) / 1024.0,
        kib_field(&t, "RssShmem:").unwrap_or(0.0) / 1024.0,
    )
}

/// User plus system CPU seconds of `pid` (0 for a process gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[end + 2..].split(' ').collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    let ticks = field(14).unwrap_or(0) + field(15).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// Every process: pid → (parent, command line with spaces).
pub fn processes() -> BTreeMap<u32, (u32, String)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|end| stat[end + 2..].split(' ').nth(1))
            .and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.insert(pid, (ppid, cmd));
    }
    out
}

/// `root` and its descendants in `all`.
pub fn tree(all: &BTreeMap<u32, (u32, String)>, root: u32) -> Vec<u32> {
    all.keys()
        .copied()
        .filter(|&p| {
            let mut p = p;
            for _ in 0..64 {
                if p == root {
                    return true;
                }
                match all.get(&p) {
                    Some((pp, _)) if *pp > 1 => p = *pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// The shim that serves task `id` of the containerd at `address`.
pub fn shim_of(all: &BTreeMap<u32, (u32, String)>, address: &str, id: &str) -> Option<u32> {
    let id_flag = format!("-id {id} ");
    let addr_flag = format!("-address {address}");
    all.iter()
        .find(|(_, (_, c))| {
            c.contains("containerd-shim") && c.contains(&id_flag) && c.contains(&addr_flag)
        })
        .map(|(p, _)| *p)
}

/// What a process of a pod is, for the memory table.
pub fn kind(cmdline: &str) -> &'static str {
    let exe = cmdline.split(' ').next().unwrap_or("");
    let exe = exe.rsplit('/').next().unwrap_or(exe);
    if exe.starts_with("containerd-shim") {
        "shim"
    } else if exe.starts_with("qemu") {
        "QEMU"
    } else if exe.starts_with("virtiofsd") {
        "virtiofsd"
    } else if exe.starts_with("vhost-device-vsock") {
        "vsock backend"
    } else {
        "container"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_shims_and_kinds() {
        let mut all = BTreeMap::new();
        all.insert(
            10,
            (
                1,
                "/usr/bin/containerd-shim-cocoon-v2 -namespace b -id pod1 -address /x/c.sock"
                    .into(),
            ),
        );
        all.insert(
            11,
            (10, "/usr/bin/qemu-system-x86_64 -name cocoon-pod1".into()),
        );
        all.insert(12, (10, "virtiofsd --socket-path=/run/s".into()));
        all.insert(13, (12, "virtiofsd --socket-path=/run/s".into()));
        all.insert(
            20,
            (
                1,
                "/usr/bin/containerd-shim-runc-v2 -namespace b -id pod2 -address /x/c.sock".into(),
            ),
        );
        let mut t = tree(&all, 10);
        t.sort();
        assert_eq!(t, vec![10, 11, 12, 13]);
        assert_eq!(shim_of(&all, "/x/c.sock", "pod2"), Some(20));
        assert_eq!(shim_of(&all, "/y/c.sock", "pod2"), None);
        assert_eq!(kind(&all[&11].1), "QEMU");
        assert_eq!(kind("vhost-device-vsock --guest-cid=3"), "vsock backend");
        assert_eq!(kind("sleep 3600"), "container");
    }

    #[test]
    fn this_process_has_memory_and_time() {
        let me = std::process::id();
        assert!(pss_mib(me) > 0.0);
        assert!(rss_anon_shmem_mib(me).0 > 0.0);
        assert!(cpu_secs(me) >= 0.0);
        assert_eq!(pss_mib(u32::MAX), 0.0);
    }
}
