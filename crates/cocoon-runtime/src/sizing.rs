//! The VM's size follows its containers' limits: memory as Kata sizes
//! it, the flavour's memory plus each container's memory limit (rounded
//! up to the hotplug block), since the guest's kernel and agent need
//! theirs besides; vCPUs as many as the containers' CPU limits together
//! (`ceil(quota / period)` each), at least the flavour's, since a limit
//! of N CPUs can use no more than N and the guest's own work is the
//! RuntimeClass overhead's (Kata adds them to its default vCPUs, which
//! gives a container limited to 2 CPUs a VM of 3). Never past the
//! flavour's ceiling. [`Sizing`] is that arithmetic, kept
//! apart from the hotplug that carries it out ([`crate::Sandbox`]).

use std::collections::BTreeMap;

use cocoon_hypervisor::VmSize;
use cocoon_protocols::{Error, Id};

/// What one container adds to the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl Demand {
    /// A container's demand from its OCI resources: a CPU limit of
    /// `quota/period` needs `ceil(quota/period)` vCPUs, a memory limit
    /// its bytes in whole hotplug blocks. No limit (absent, 0 or negative,
    /// as OCI and CRI spell "unlimited") asks for nothing.
    pub fn of(resources: Option<&oci_spec::runtime::LinuxResources>) -> Self {
        let Some(r) = resources else {
            return Self::default();
        };
        let vcpus = r
            .cpu()
            .as_ref()
            .and_then(|c| match (c.quota(), c.period()) {
                (Some(q), Some(p)) if q > 0 && p > 0 => {
                    Some((q as u64).div_ceil(p).min(u64::from(u32::MAX)) as u32)
                }
                _ => None,
            })
            .unwrap_or(0);
        let block = u64::from(cocoon_config::HOTPLUG_BLOCK_MIB) << 20;
        let memory_mib = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map(|l| (l as u64).div_ceil(block) * (block >> 20))
            .unwrap_or(0);
        Self { vcpus, memory_mib }
    }
}

/// The flavour's size and ceiling, and what each container adds.
#[derive(Debug, Clone)]
pub struct Sizing {
    base: VmSize,
    max: VmSize,
    demands: BTreeMap<Id, Demand>,
}

impl Sizing {
    pub fn new(base: VmSize, max: VmSize) -> Self {
        Self {
            base,
            max,
            demands: BTreeMap::new(),
        }
    }

    pub fn max(&self) -> VmSize {
        self.max
    }

    fn sum<'a>(&self, demands: impl Iterator<Item = &'a Demand>) -> VmSize {
        let limits = demands.fold(Demand::default(), |s, d| Demand {
            vcpus: s.vcpus.saturating_add(d.vcpus),
            memory_mib: s.memory_mib.saturating_add(d.memory_mib),
        });
        VmSize {
            vcpus: self.base.vcpus.max(limits.vcpus),
            memory_mib: self.base.memory_mib.saturating_add(limits.memory_mib),
        }
    }

    /// The size the VM needs for its containers as they are.
    pub fn target(&self) -> VmSize {
        self.sum(self.demands.values())
    }

    /// Whether the VM's memory can grow at all (not on microvm).
    fn memory_grows(&self) -> bool {
        self.max.memory_mib > self.base.memory_mib
    }

    /// The size the VM needs if container `id` (new or not) has `demand`;
    /// past the ceiling, InvalidArgument naming the container and the
    /// ceiling. (InvalidArgument rather than ResourceExhausted: containerd
    /// 1.6 passes the former on to CRI and flattens the latter to Unknown;
    /// and the limit is what the caller must change.)
    ///
    /// A VM whose memory cannot grow (microvm) keeps its size: the
    /// containers' memory limits are the guest cgroups' business only, and
    /// only a container whose own limit is more than the whole VM is
    /// refused.
    pub fn target_with(&self, id: &Id, demand: Demand) -> Result<VmSize, Error> {
        let others = self
            .demands
            .iter()
            .filter(|(k, _)| *k != id)
            .map(|(_, d)| d);
        let mut t = self.sum(others.chain(std::iter::once(&demand)));
        let (max, base) = (self.max, self.base);
        if !self.memory_grows() {
            if demand.memory_mib > max.memory_mib {
                return Err(Error::InvalidArgument(format!(
                    "container {id}: its memory limit needs {} MiB, more than the VM's {} MiB, \
                     which this machine type cannot grow (max_memory_mib is memory_mib)",
                    demand.memory_mib, max.memory_mib
                )));
            }
            t.memory_mib = base.memory_mib;
        }
        if t.vcpus > max.vcpus {
            return Err(Error::InvalidArgument(format!(
                "container {id}: its CPU limit needs {} vCPUs, which would make the pod's \
                 containers' limits {} vCPUs; the flavour's max_vcpus is {}",
                demand.vcpus, t.vcpus, max.vcpus
            )));
        }
        if t.memory_mib > max.memory_mib {
            return Err(Error::InvalidArgument(format!(
                "container {id}: its memory limit needs {} MiB, which would make the VM \
                 {} MiB ({} of the flavour and {} of the pod's containers); the \
                 flavour's max_memory_mib allows {} MiB",
                demand.memory_mib,
                t.memory_mib,
                base.memory_mib,
                t.memory_mib - base.memory_mib,
                max.memory_mib
            )));
        }
        Ok(t)
    }

    /// Records container `id`'s demand (a new one, or a changed one).
    pub fn set(&mut self, id: &Id, demand: Demand) {
        self.demands.insert(id.clone(), demand);
    }

    /// Forgets container `id`.
    pub fn remove(&mut self, id: &Id) {
        self.demands.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder};

    fn res(
        quota: Option<i64>,
        period: Option<u64>,
        mem: Option<i64>,
    ) -> oci_spec::runtime::LinuxResources {
        let mut cpu = LinuxCpuBuilder::default();
        if let Some(q) = quota {
            cpu = cpu.quota(q);
        }
        if let Some(p) = period {
            cpu = cpu.period(p);
        }
        let mut m = LinuxMemoryBuilder::default();
        if let Some(l) = mem {
            m = m.limit(l);
        }
        LinuxResourcesBuilder::default()
            .cpu(cpu.build().unwrap())
            .memory(m.build().unwrap())
            .build()
            .unwrap()
    }

    fn id(s: &str) -> Id {
        Id::container(s).unwrap()
    }

    const MIB: i64 = 1 << 20;

    fn size(vcpus: u32, memory_mib: u64) -> VmSize {
        VmSize { vcpus, memory_mib }
    }

    fn demand(vcpus: u32, memory_mib: u64) -> Demand {
        Demand { vcpus, memory_mib }
    }

    #[test]
    fn demands_as_kata_computes_them() {
        let d = |q, p, m| Demand::of(Some(&res(q, p, m)));
        assert_eq!(Demand::of(None), Demand::default());
        assert_eq!(d(None, None, None), Demand::default());
        // ceil(quota / period)
        assert_eq!(d(Some(200_000), Some(100_000), None).vcpus, 2);
        assert_eq!(d(Some(150_000), Some(100_000), None).vcpus, 2);
        assert_eq!(d(Some(50_000), Some(100_000), None).vcpus, 1);
        assert_eq!(d(Some(-1), Some(100_000), None).vcpus, 0, "unlimited");
        assert_eq!(d(Some(100_000), None, None).vcpus, 0, "no period");
        // Whole 128 MiB blocks.
        assert_eq!(d(None, None, Some(128 * MIB)).memory_mib, 128);
        assert_eq!(d(None, None, Some(128 * MIB + 1)).memory_mib, 256);
        assert_eq!(d(None, None, Some(1)).memory_mib, 128);
        assert_eq!(d(None, None, Some(1000 * MIB)).memory_mib, 1024);
        assert_eq!(d(None, None, Some(0)).memory_mib, 0);
        assert_eq!(d(None, None, Some(-1)).memory_mib, 0, "unlimited");
    }

    #[test]
    fn target_is_the_containers_limits_up_to_the_ceiling() {
        let base = size(1, 512);
        let max = size(4, 4096);
        let mut s = Sizing::new(base, max);
        assert_eq!(s.target(), base);
        let a = demand(2, 1024);
        // vCPUs: the limits (at least the flavour's); memory: the flavour's
        // plus the limits.
        assert_eq!(s.target_with(&id("a"), a).unwrap(), size(2, 1536));
        s.set(&id("a"), a);
        // A second container adds to the first.
        let b = demand(2, 2560);
        assert_eq!(s.target_with(&id("b"), b).unwrap(), max);
        // One without limits needs nothing more.
        assert_eq!(
            s.target_with(&id("b"), Demand::default()).unwrap(),
            s.target()
        );
        // An update replaces a container's own demand, not adds to it.
        let a2 = demand(3, 128);
        assert_eq!(s.target_with(&id("a"), a2).unwrap(), size(3, 640));
        // Past the ceiling: the container and the ceiling are named.
        let err = s.target_with(&id("c"), demand(3, 0)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("container c") && msg.contains("max_vcpus is 4"),
            "{msg}"
        );
        let err = s.target_with(&id("c"), demand(0, 3072)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("container c") && msg.contains("allows 4096 MiB"),
            "{msg}"
        );
        s.remove(&id("a"));
        assert_eq!(s.target(), base);
    }

    #[test]
    fn memory_that_cannot_grow_is_not_summed() {
        // microvm: CPUs grow (onlined), memory is the VM's size.
        let base = size(1, 512);
        let max = size(4, 512);
        let mut s = Sizing::new(base, max);
        let a = demand(2, 384);
        assert_eq!(s.target_with(&id("a"), a).unwrap(), size(2, 512));
        s.set(&id("a"), a);
        assert_eq!(
            s.target_with(&id("b"), demand(0, 512)).unwrap(),
            size(2, 512)
        );
        let msg = s
            .target_with(&id("b"), demand(0, 640))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("container b") && msg.contains("cannot grow"),
            "{msg}"
        );
    }
}
