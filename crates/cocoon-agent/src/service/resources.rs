//! The guest's share of VM sizing: the host hotplugs vCPUs and memory
//! (QMP), the kernel learns of them by ACPI a moment later and leaves them
//! offline (the Debian kernel does not online hot-added memory by default,
//! and never onlines CPUs by itself); this module waits for them and
//! onlines them. CPUs beyond the count the host asks for are offlined
//! (their vCPU threads halt), which is how the VM shrinks its CPUs.
//! Memory is onlined to the kernel's default zone and never offlined: the
//! host does not unplug memory (see docs/sizing.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_protocols::Error;

use super::Result;

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";

/// The longest a host may ask the agent to wait.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How often sysfs is looked at while waiting.
const POLL: Duration = Duration::from_millis(5);

/// What the guest has online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Online {
    pub vcpus: u32,
    pub memory_mib: u64,
}

/// A sysfs CPU list (`0`, `0-3`, `0,2-3`): the CPU numbers in it.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b): (u32, u32) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n = part.parse().ok()?;
                (n, n)
            }
        };
        if b < a || b - a > 4096 {
            return None;
        }
        cpus.extend(a..=b);
    }
    Some(cpus)
}

/// The sysfs trees this works on; tests point them at a scratch directory.
pub struct Sysfs {
    pub cpu: PathBuf,
    pub memory: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self {
            cpu: CPU_DIR.into(),
            memory: MEMORY_DIR.into(),
        }
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Internal(format!("read {}: {e}", path.display())))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|e| Error::Internal(format!("write {value:?} to {}: {e}", path.display())))
}

impl Sysfs {
    fn present_cpus(&self) -> Result<Vec<u32>> {
        let path = self.cpu.join("present");
        let text = read(&path)?;
        parse_cpu_list(&text)
            .ok_or_else(|| Error::Internal(format!("{}: unreadable list {text:?}", path.display())))
    }

    /// Whether CPU `n` is online; `None` while a hotplugged CPU has no
    /// `online` file yet. (cpu0 has none at all: it cannot be offlined,
    /// and is online.)
    fn cpu_online(&self, n: u32) -> Result<Option<bool>> {
        let path = self.cpu.join(format!("cpu{n}/online"));
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim() == "1")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((n == 0).then_some(true)),
            Err(e) => Err(Error::Internal(format!("read {}: {e}", path.display()))),
        }
    }

    /// Onlines the first `want` present CPUs and offlines the rest; the
    /// number online after (a CPU not ready yet is not counted: the
    /// caller polls again).
    fn set_cpus(&self, present: &[u32], want: u32) -> Result<u32> {
        let mut online = 0;
        for (i, &n) in present.iter().enumerate() {
            let should = (i as u32) < want || n == 0;
            let Some(is) = self.cpu_online(n)? else {
                continue;
            };
            if should != is {
                write(
                    &self.cpu.join(format!("cpu{n}/online")),
                    if should { "1" } else { "0" },
                )?;
            }
            online += u32::from(should);
        }
        Ok(online)
    }

    fn block_bytes(&self) -> Result<u64> {
        let path = self.memory.join("block_size_bytes");
        let text = read(&path)?;
        u64::from_str_radix(text.trim(), 16)
            .map_err(|_| Error::Internal(format!("{}: {text:?} is not hex", path.display())))
    }

    /// Onlines offline memory blocks, lowest first, until `want_mib` are
    /// online (what is plugged beyond stays offline: the host's cgroup
    /// covers what the pod asked for, not the hotplug step); the MiB online
    /// after.
    fn online_memory(&self, block: u64, want_mib: u64) -> Result<u64> {
        let dir = std::fs::read_dir(&self.memory)
            .map_err(|e| Error::Internal(format!("read {}: {e}", self.memory.display())))?;
        let mut online = 0u64;
        let mut offline = Vec::new();
        for e in dir.flatten() {
            let name = e.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix("memory"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let state = e.path().join("state");
            // A block that has only just appeared may not have its
            // `state` yet: the next poll sees it.
            let now = match std::fs::read_to_string(&state) {
                Ok(now) => now,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(Error::Internal(format!("read {}: {e}", state.display())));
                }
            };
            match now.trim() {
                "online" => online += 1,
                "offline" => offline.push((n, state)),
                // going-offline: not ours to touch.
                _ => {}
            }
        }
        offline.sort();
        for (_, state) in offline {
            if (online * block) >> 20 >= want_mib {
                break;
            }
            write(&state, "online")?;
            online += 1;
        }
        Ok((online * block) >> 20)
    }

    /// Onlines what the host asks for: waits up to `timeout` for `vcpus`
    /// CPUs to be present and `memory_mib` of memory blocks to be online.
    pub fn online(&self, vcpus: u32, memory_mib: u64, timeout: Duration) -> Result<Online> {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        let block = self.block_bytes()?;
        let block_mib = (block >> 20).max(1);
        // Whole blocks: a boot size that is not a multiple of the block
        // still ends in a (partly populated) block of its own.
        let want_mib = memory_mib - memory_mib % block_mib;
        loop {
            let present = self.present_cpus()?;
            let vcpus_online = self.set_cpus(&present, vcpus)?;
            let memory_online = self.online_memory(block, want_mib)?;
            let done = vcpus_online >= vcpus && memory_online >= want_mib;
            if done {
                return Ok(Online {
                    vcpus: vcpus_online,
                    memory_mib: memory_online,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::DeadlineExceeded(format!(
                    "within {timeout:?} the guest had {vcpus_online} of {vcpus} vCPUs online \
                     ({} present) and {memory_online} of {want_mib} MiB of memory",
                    present.len()
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

/// [`Sysfs::online`] on the guest's sysfs, off the async runtime.
pub async fn online(vcpus: u32, memory_mib: u64, timeout: Duration) -> Result<Online> {
    let t = Instant::now();
    let r =
        tokio::task::spawn_blocking(move || Sysfs::default().online(vcpus, memory_mib, timeout))
            .await
            .map_err(|e| Error::Internal(format!("online resources: {e}")))?;
    if let Ok(o) = &r {
        tracing::info!(
            vcpus = o.vcpus,
            memory_mib = o.memory_mib,
            ms = t.elapsed().as_millis() as u64,
            "resources online"
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0,2-3"), Some(vec![0, 2, 3]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list("0-4294967295"), None);
    }

    /// A fake sysfs: `cpus` present (cpu0 without an `online` file),
    /// `blocks` memory blocks of 128 MiB, the first `online_blocks` online.
    fn fake(cpus: u32, blocks: u32, online_blocks: u32) -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().unwrap();
        let s = Sysfs {
            cpu: dir.path().join("cpu"),
            memory: dir.path().join("memory"),
        };
        std::fs::create_dir_all(&s.cpu).unwrap();
        std::fs::write(s.cpu.join("present"), format!("0-{}\n", cpus - 1)).unwrap();
        for n in 0..cpus {
            let d = s.cpu.join(format!("cpu{n}"));
            std::fs::create_dir_all(&d).unwrap();
            if n > 0 {
                std::fs::write(d.join("online"), "0\n").unwrap();
            }
        }
        std::fs::create_dir_all(&s.memory).unwrap();
        std::fs::write(s.memory.join("block_size_bytes"), "8000000\n").unwrap();
        for b in 0..blocks {
            let d = s.memory.join(format!("memory{b}"));
            std::fs::create_dir_all(&d).unwrap();
            let st = if b < online_blocks {
                "online"
            } else {
                "offline"
            };
            std::fs::write(d.join("state"), format!("{st}\n")).unwrap();
        }
        (dir, s)
    }

    #[test]
    fn onlines_what_was_plugged_and_offlines_cpus_past_the_count() {
        let (_d, s) = fake(4, 12, 4);
        let o = s.online(3, 512 + 1024, Duration::from_secs(1)).unwrap();
        assert_eq!(
            o,
            Online {
                vcpus: 3,
                memory_mib: 1536
            }
        );
        let state = |n: u32| std::fs::read_to_string(s.cpu.join(format!("cpu{n}/online"))).unwrap();
        assert_eq!(
            (state(1), state(2), state(3)),
            ("1".into(), "1".into(), "0\n".into())
        );
        assert_eq!(
            std::fs::read_to_string(s.memory.join("memory11/state")).unwrap(),
            "online"
        );
        // Shrinking CPUs: cpu0 stays, the highest go.
        let o = s.online(1, 0, Duration::from_secs(1)).unwrap();
        assert_eq!(o.vcpus, 1);
        assert_eq!((state(1), state(2)), ("0".into(), "0".into()));
    }

    #[test]
    fn a_cpu_without_its_online_file_yet_is_not_counted() {
        let (_d, s) = fake(3, 4, 4);
        std::fs::remove_file(s.cpu.join("cpu2/online")).unwrap();
        let err = s.online(3, 512, Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("2 of 3 vCPUs"), "{err}");
        // It appears: the next call onlines it.
        std::fs::write(s.cpu.join("cpu2/online"), "0\n").unwrap();
        assert_eq!(s.online(3, 512, Duration::from_secs(1)).unwrap().vcpus, 3);
    }

    #[test]
    fn what_never_appears_is_a_deadline_error() {
        let (_d, s) = fake(2, 4, 4);
        let t = Instant::now();
        let err = s.online(3, 1024, Duration::from_millis(50)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("2 of 3 vCPUs") && msg.contains("512 of 1024 MiB"),
            "{msg}"
        );
    }
}
