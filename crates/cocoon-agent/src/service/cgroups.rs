//! A container's cgroup: its processes, resource updates, statistics and
//! OOM-kill count, all under the agent's cgroup parent.

use std::path::Path;

use cocoon_protocols::agent::{
    BlkioEntry, CpuStats, MemoryStats, PidsStats, StatsContainerResponse,
};
use cocoon_protocols::{Error, Id};
use libcgroups::common::{AnyCgroupManager, CgroupManager, ControllerOpt};

use super::{internal, Result, CGROUP_PARENT};

fn manager(id: &Id) -> Result<AnyCgroupManager> {
    libcgroups::common::create_cgroup_manager(libcgroups::common::CgroupConfig {
        cgroup_path: Path::new(CGROUP_PARENT).join(id.as_str()),
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| Error::Internal(format!("cgroup of container {id}: {e}")))
}

/// Every process in the container's cgroup.
pub fn pids(id: &Id) -> Result<Vec<nix::unistd::Pid>> {
    manager(id)?.get_all_pids().map_err(internal("list pids"))
}

/// Applies new resource limits.
pub fn update(id: &Id, resources: &oci_spec::runtime::LinuxResources) -> Result<()> {
    manager(id)?
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(internal(format!("update container {id}")))
}

/// The OOM kills in the container's cgroup so far (0 if unreadable).
pub fn oom_kills(id: &Id) -> u64 {
    let path = Path::new("/sys/fs/cgroup")
        .join(CGROUP_PARENT.trim_start_matches('/'))
        .join(id.as_str())
        .join("memory.events");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// The container's cgroup statistics, as the protocol carries them.
pub fn stats(id: &Id) -> Result<StatsContainerResponse> {
    let s = manager(id)?
        .stats()
        .map_err(internal(format!("stats of container {id}")))?;
    let cpu = CpuStats {
        usage_usec: s.cpu.usage.usage_total / 1000,
        user_usec: s.cpu.usage.usage_user / 1000,
        system_usec: s.cpu.usage.usage_kernel / 1000,
        nr_periods: s.cpu.throttling.periods,
        nr_throttled: s.cpu.throttling.throttled_periods,
        throttled_usec: s.cpu.throttling.throttled_time / 1000,
        ..Default::default()
    };
    let m = &s.memory;
    let memory = MemoryStats {
        usage_bytes: m.memory.usage,
        max_usage_bytes: m.memory.max_usage,
        limit_bytes: m.memory.limit,
        swap_usage_bytes: m.memswap.usage,
        cache_bytes: m.cache,
        rss_bytes: m.stats.get("anon").copied().unwrap_or_default(),
        oom_kill_count: oom_kills(id),
        raw: m.stats.clone(),
        ..Default::default()
    };
    let pids = PidsStats {
        current: s.pids.current,
        limit: s.pids.limit,
        ..Default::default()
    };
    let blk = |v: &[libcgroups::stats::BlkioDeviceStat]| {
        v.iter()
            .map(|d| BlkioEntry {
                major: d.major,
                minor: d.minor,
                op: d.op_type.clone().unwrap_or_default(),
                value: d.value,
                ..Default::default()
            })
            .collect()
    };
    Ok(StatsContainerResponse {
        cpu: Some(cpu).into(),
        memory: Some(memory).into(),
        pids: Some(pids).into(),
        io_service_bytes: blk(&s.blkio.service_bytes),
        io_serviced: blk(&s.blkio.serviced),
        ..Default::default()
    })
}
