//! Pod networking on the host, Kata's tc-filter model.
//!
//! CNI has put a veth (say `eth0`) in the pod's network namespace. For each
//! such interface, [`Network::setup`] creates a tap beside it and two tc
//! ingress filters that redirect every frame, veth → tap and tap → veth;
//! QEMU serves the tap to the guest as a virtio-net NIC with the veth's
//! MAC, and the agent gives the guest the addresses, routes and neighbours
//! read here ([`Plan`]). The pod's IP stack is the guest's; the netns only
//! relays frames.
//!
//! What this module creates is released on every path: the taps vanish
//! with the last fd (QEMU's, or ours if QEMU never started), and the veths'
//! ingress qdiscs (their filters go with them) are deleted by
//! [`Network::teardown`], or by drop. The netns itself, and the veths, are
//! CRI's: never deleted here. So that an owner killed outright can be
//! cleaned up after, [`Network::record`] says what teardown would undo, for
//! the sandbox's state directory, and [`teardown_recorded`] undoes it.
//!
//! Nothing here is the guest's to influence: everything is read from the
//! netns, which CNI configured, before the VM starts.

pub mod netns;
mod scan;
mod tap;
mod tc;

use std::ffi::OsStr;
use std::fmt;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocoon_hypervisor::Nic;
use cocoon_protocols::agent as ag;
use cocoon_protocols::network::MacAddr;

/// How long one batch of netlink work in the netns may take.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the pod's network could not be set up or torn down. Every message
/// names the netns; the action names the interface.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {}: {action}", netns.display())]
    Netns {
        netns: PathBuf,
        action: String,
        #[source]
        source: Cause,
    },
    #[error("network namespace {} is the host's own: a VM cannot serve a host-network pod", netns.display())]
    HostNetns { netns: PathBuf },
}

/// The cause under an [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Boxed: a netlink error can carry a whole message.
    #[error(transparent)]
    Netlink(Box<rtnetlink::Error>),
    #[error("{0}")]
    Invalid(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// A missing netns is the caller's mistake, not ours.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Netns { source: Cause::Io(e), .. } if e.kind() == std::io::ErrorKind::NotFound)
    }
}

/// One step that failed inside the netns; [`netns`] adds the path.
#[derive(Debug)]
pub(crate) struct Failed {
    action: String,
    cause: Cause,
}

impl Failed {
    fn new(action: impl Into<String>, cause: impl Into<Cause>) -> Self {
        Self {
            action: action.into(),
            cause: cause.into(),
        }
    }
}

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An interface of the pod, as CNI left it in the netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// Its index in the netns.
    pub index: u32,
    pub mac: MacAddr,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// How far a route reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Universe,
    Site,
    Link,
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    pub scope: Scope,
    pub metric: u32,
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: MacAddr,
    pub device: String,
}

/// What the guest is to be given: the netns's interfaces (but `lo`), the
/// routes of its main table that the kernel did not derive from an
/// address, and its permanent neighbours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

impl Plan {
    /// The agent request that configures this plan in the guest.
    pub fn to_request(&self) -> ag::ConfigureNetworkRequest {
        let net = |n: &IpNet| ag::IpNetwork {
            address: n.addr.to_string(),
            prefix_len: n.prefix.into(),
            ..Default::default()
        };
        ag::ConfigureNetworkRequest {
            interfaces: self
                .interfaces
                .iter()
                .map(|i| ag::NetworkInterface {
                    name: i.name.clone(),
                    mac: i.mac.to_string(),
                    mtu: i.mtu,
                    addresses: i.addresses.iter().map(net).collect(),
                    ..Default::default()
                })
                .collect(),
            routes: self
                .routes
                .iter()
                .map(|r| ag::Route {
                    destination: Some(net(&r.destination)).into(),
                    gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                    device: r.device.clone(),
                    scope: match r.scope {
                        Scope::Universe => ag::RouteScope::ROUTE_SCOPE_UNIVERSE,
                        Scope::Site => ag::RouteScope::ROUTE_SCOPE_SITE,
                        Scope::Link => ag::RouteScope::ROUTE_SCOPE_LINK,
                        Scope::Host => ag::RouteScope::ROUTE_SCOPE_HOST,
                    }
                    .into(),
                    metric: r.metric,
                    ..Default::default()
                })
                .collect(),
            neighbours: self
                .neighbours
                .iter()
                .map(|n| ag::Neighbour {
                    address: n.address.to_string(),
                    mac: n.mac.to_string(),
                    device: n.device.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// A veth whose ingress now goes to a tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redirected {
    pub index: u32,
    pub name: String,
}

/// The pod's network, set up in its netns: the plan for the guest, the
/// taps for QEMU, and what teardown has to undo.
#[derive(Debug)]
pub struct Network {
    netns: PathBuf,
    plan: Plan,
    /// One per interface of the plan, in its order, until [`Network::nics`]
    /// hands them over.
    taps: Vec<OwnedFd>,
    redirected: Vec<Redirected>,
}

impl Network {
    /// Reads the pod's interfaces in `netns` and connects a new tap to
    /// each. On error nothing of it is left.
    pub async fn setup(netns: &Path) -> Result<Self, Error> {
        let path = netns.to_path_buf();
        // The result is a `Network` as soon as it exists, so that a caller
        // that stops waiting (a cancelled start) still drops, and so tears
        // down, what was set up.
        let network = tokio::task::spawn_blocking(move || {
            let (plan, taps, redirected) = netns::run(&path, |h| async move { setup_in(h).await })?;
            Ok::<_, Error>(Network {
                netns: path,
                plan,
                taps,
                redirected,
            })
        })
        .await
        .map_err(|e| Error::Netns {
            netns: netns.to_path_buf(),
            action: "set up".into(),
            source: Cause::Io(std::io::Error::other(e)),
        })??;
        for (i, iface) in network.plan.interfaces.iter().enumerate() {
            tracing::info!(
                netns = %netns.display(),
                interface = %iface.name,
                mac = %iface.mac,
                mtu = iface.mtu,
                tap = %tap::name(i),
                "pod interface redirected to a tap"
            );
        }
        Ok(network)
    }

    /// The netns this network lives in.
    pub fn netns(&self) -> &Path {
        &self.netns
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The guest NICs: the taps, handed over for QEMU (once; later calls
    /// return none). Dropping every copy closes a tap, and so removes it.
    pub fn nics(&mut self) -> Vec<Nic> {
        std::mem::take(&mut self.taps)
            .into_iter()
            .zip(&self.plan.interfaces)
            .map(|(fd, iface)| Nic {
                mac: iface.mac.0,
                tap: Arc::new(fd),
            })
            .collect()
    }

    /// What [`teardown_recorded`] needs to undo this setup: the netns path,
    /// then one line per redirected veth. `None` for a path that cannot be
    /// written on one line.
    pub fn record(&self) -> Option<Vec<u8>> {
        let path = self.netns.as_os_str().as_bytes();
        if path.contains(&b'\n') {
            return None;
        }
        let mut out = path.to_vec();
        out.push(b'\n');
        for r in &self.redirected {
            out.extend_from_slice(format!("{} {}\n", r.index, r.name).as_bytes());
        }
        Some(out)
    }

    /// Removes the veths' ingress qdiscs (and so their filters). The taps
    /// go with QEMU: call this once the VM is gone.
    pub async fn teardown(mut self) -> Result<(), Error> {
        let netns = self.netns.clone();
        let redirected = std::mem::take(&mut self.redirected);
        drop(std::mem::take(&mut self.taps));
        tokio::task::spawn_blocking(move || teardown_blocking(&netns, redirected))
            .await
            .map_err(|e| Error::Netns {
                netns: self.netns.clone(),
                action: "tear down".into(),
                source: Cause::Io(std::io::Error::other(e)),
            })?
    }
}

impl Drop for Network {
    /// A network dropped without [`Network::teardown`] (an error path, a
    /// panic) is torn down here; the work is a few netlink messages.
    fn drop(&mut self) {
        let redirected = std::mem::take(&mut self.redirected);
        if redirected.is_empty() {
            return;
        }
        if let Err(e) = teardown_blocking(&self.netns, redirected) {
            tracing::warn!("{}", crate::error_chain(&e));
        }
    }
}

/// Undoes what [`Network::record`] recorded, for an owner that died
/// without tearing down (its VM, and so the taps, already gone). A record
/// that does not parse is left alone.
pub async fn teardown_recorded(record: &[u8]) -> Result<(), Error> {
    let Some((netns, redirected)) = parse_record(record) else {
        tracing::warn!("unreadable network record: nothing torn down");
        return Ok(());
    };
    let shown = netns.clone();
    tokio::task::spawn_blocking(move || teardown_blocking(&netns, redirected))
        .await
        .map_err(|e| Error::Netns {
            netns: shown,
            action: "tear down".into(),
            source: Cause::Io(std::io::Error::other(e)),
        })?
}

fn parse_record(record: &[u8]) -> Option<(PathBuf, Vec<Redirected>)> {
    let mut lines = record.split(|&b| b == b'\n');
    let netns = PathBuf::from(OsStr::from_bytes(lines.next()?));
    if !netns.is_absolute() {
        return None;
    }
    let mut redirected = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (index, name) = std::str::from_utf8(l).ok()?.split_once(' ')?;
        if !cocoon_protocols::network::valid_ifname(name) {
            return None;
        }
        redirected.push(Redirected {
            index: index.parse().ok()?,
            name: name.to_string(),
        });
    }
    Some((netns, redirected))
}

fn teardown_blocking(netns: &Path, redirected: Vec<Redirected>) -> Result<(), Error> {
    if redirected.is_empty() {
        return Ok(());
    }
    let r = netns::run(
        netns,
        |h| async move { tc::unredirect(&h, &redirected).await },
    );
    match r {
        // CRI removed the netns first: nothing of ours is left in it.
        Err(e) if e.is_not_found() => {
            tracing::debug!("{}: already gone", netns.display());
            Ok(())
        }
        r => r,
    }
}

/// Inside the netns: read the plan, then give each interface a tap and
/// the two redirects. On error, what was done is undone before returning.
async fn setup_in(h: rtnetlink::Handle) -> Result<(Plan, Vec<OwnedFd>, Vec<Redirected>), Failed> {
    let plan = scan::read(&h).await?;
    let mut taps = Vec::new();
    let mut redirected = Vec::new();
    for (i, iface) in plan.interfaces.iter().enumerate() {
        match tc::connect(&h, iface, i, &mut redirected).await {
            Ok(fd) => taps.push(fd),
            Err(e) => {
                drop(taps);
                if let Err(u) = tc::unredirect(&h, &redirected).await {
                    tracing::warn!("undo after a failed setup: {}: {}", u.action, u.cause);
                }
                return Err(e);
            }
        }
    }
    Ok((plan, taps, redirected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let n = Network {
            netns: "/var/run/netns/cni-1".into(),
            plan: Plan::default(),
            taps: Vec::new(),
            redirected: vec![
                Redirected {
                    index: 2,
                    name: "eth0".into(),
                },
                Redirected {
                    index: 7,
                    name: "net1".into(),
                },
            ],
        };
        let rec = n.record().unwrap();
        assert_eq!(rec, b"/var/run/netns/cni-1\n2 eth0\n7 net1\n");
        let (netns, r) = parse_record(&rec).unwrap();
        assert_eq!(netns, Path::new("/var/run/netns/cni-1"));
        assert_eq!(r, n.redirected);
        for bad in [
            &b"relative\n2 eth0\n"[..],
            b"/n\nx eth0\n",
            b"/n\n2 a/b\n",
            b"/n\n2\n",
        ] {
            assert_eq!(
                parse_record(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A made-up network: nothing for its drop to undo.
        let mut n = n;
        n.redirected.clear();
    }

    #[test]
    fn plan_to_request() {
        let mac: MacAddr = "02:42:0a:01:02:02".parse().unwrap();
        let plan = Plan {
            interfaces: vec![Interface {
                name: "eth0".into(),
                index: 2,
                mac,
                mtu: 1450,
                addresses: vec![IpNet {
                    addr: "10.1.2.2".parse().unwrap(),
                    prefix: 24,
                }],
            }],
            routes: vec![Route {
                destination: IpNet {
                    addr: "0.0.0.0".parse().unwrap(),
                    prefix: 0,
                },
                gateway: Some("10.1.2.1".parse().unwrap()),
                device: "eth0".into(),
                scope: Scope::Universe,
                metric: 0,
            }],
            neighbours: vec![Neighbour {
                address: "10.1.2.1".parse().unwrap(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                device: "eth0".into(),
            }],
        };
        let r = plan.to_request();
        assert_eq!(r.interfaces.len(), 1);
        let i = &r.interfaces[0];
        assert_eq!(
            (i.name.as_str(), i.mac.as_str(), i.mtu),
            ("eth0", "02:42:0a:01:02:02", 1450)
        );
        assert_eq!(i.addresses[0].address, "10.1.2.2");
        assert_eq!(i.addresses[0].prefix_len, 24);
        let rt = &r.routes[0];
        assert_eq!(rt.destination.address, "0.0.0.0");
        assert_eq!(rt.destination.prefix_len, 0);
        assert_eq!(rt.gateway, "10.1.2.1");
        assert_eq!(
            rt.scope.enum_value(),
            Ok(ag::RouteScope::ROUTE_SCOPE_UNIVERSE)
        );
        assert_eq!(r.neighbours[0].mac, "02:00:00:00:00:01");
    }
}
