//! The guest cgroup's statistics as containerd's cgroups v1 `Metrics`.
//! The numbers are the guest's: converted without overflow.

use cocoon_protocols::agent as ag;
use containerd_shim::protos::protobuf::MessageField;

/// Microseconds to nanoseconds, saturating.
fn us(v: u64) -> u64 {
    v.saturating_mul(1000)
}

pub fn from_guest(
    s: &ag::StatsContainerResponse,
) -> containerd_shim::protos::cgroups::metrics::Metrics {
    use containerd_shim::protos::cgroups::metrics::*;
    let mut m = Metrics::new();
    if let Some(c) = s.cpu.as_ref() {
        let mut cpu = CPUStat::new();
        let mut usage = CPUUsage::new();
        usage.total = us(c.usage_usec);
        usage.user = us(c.user_usec);
        usage.kernel = us(c.system_usec);
        cpu.usage = MessageField::some(usage);
        let mut th = Throttle::new();
        th.periods = c.nr_periods;
        th.throttled_periods = c.nr_throttled;
        th.throttled_time = us(c.throttled_usec);
        cpu.throttling = MessageField::some(th);
        m.cpu = MessageField::some(cpu);
    }
    if let Some(mem) = s.memory.as_ref() {
        let mut ms = MemoryStat::new();
        let mut usage = MemoryEntry::new();
        usage.usage = mem.usage_bytes;
        usage.max = mem.max_usage_bytes;
        usage.limit = mem.limit_bytes;
        ms.usage = MessageField::some(usage);
        let mut swap = MemoryEntry::new();
        swap.usage = mem.swap_usage_bytes;
        ms.swap = MessageField::some(swap);
        ms.cache = mem.cache_bytes;
        ms.rss = mem.rss_bytes;
        let raw = |k: &str| mem.raw.get(k).copied().unwrap_or(0);
        ms.mapped_file = raw("file_mapped");
        ms.dirty = raw("file_dirty");
        ms.writeback = raw("file_writeback");
        ms.pg_fault = raw("pgfault");
        ms.pg_maj_fault = raw("pgmajfault");
        ms.inactive_anon = raw("inactive_anon");
        ms.active_anon = raw("active_anon");
        ms.inactive_file = raw("inactive_file");
        ms.active_file = raw("active_file");
        ms.unevictable = raw("unevictable");
        ms.total_rss = mem.rss_bytes;
        ms.total_cache = mem.cache_bytes;
        m.memory = MessageField::some(ms);
        let mut oom = MemoryOomControl::new();
        oom.oom_kill = mem.oom_kill_count;
        m.memory_oom_control = MessageField::some(oom);
    }
    if let Some(p) = s.pids.as_ref() {
        let mut ps = PidsStat::new();
        ps.current = p.current;
        ps.limit = p.limit;
        m.pids = MessageField::some(ps);
    }
    let blk = |v: &[ag::BlkioEntry]| {
        v.iter()
            .map(|e| {
                let mut b = BlkIOEntry::new();
                b.major = e.major;
                b.minor = e.minor;
                b.op = e.op.clone();
                b.value = e.value;
                b
            })
            .collect::<Vec<_>>()
    };
    let mut io = BlkIOStat::new();
    io.io_service_bytes_recursive = blk(&s.io_service_bytes);
    io.io_serviced_recursive = blk(&s.io_serviced);
    m.blkio = MessageField::some(io);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_guest_numbers_saturate() {
        let mut s = ag::StatsContainerResponse::new();
        let mut cpu = ag::CpuStats::new();
        cpu.usage_usec = u64::MAX;
        cpu.user_usec = 7;
        s.cpu = MessageField::some(cpu);
        let m = from_guest(&s);
        let usage = m.cpu.usage.as_ref().unwrap();
        assert_eq!(usage.total, u64::MAX);
        assert_eq!(usage.user, 7000);
    }
}
