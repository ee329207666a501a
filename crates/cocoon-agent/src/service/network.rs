//! The pod's network in the guest. The host found the pod's interfaces in
//! its network namespace and gave QEMU a tap for each, with the same MAC;
//! here each virtio-net NIC is found by that MAC, takes the host
//! interface's name, MTU and addresses, then the routes (directly attached
//! ones first, so that gateways are reachable) and the permanent
//! neighbours. Every container shares the guest's network namespace.
//! Loopback is brought up at start, with or without a network.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use cocoon_protocols::agent::{self as ag, ConfigureNetworkRequest};
use cocoon_protocols::network::{
    valid_ifname, MacAddr, MAX_ADDRESSES, MAX_INTERFACES, MAX_NEIGHBOURS, MAX_ROUTES,
};
use cocoon_protocols::Error;
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressHeaderFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::RouteScope;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::Result;

/// How long the NICs may take to appear after the agent starts (their
/// driver is loaded before, but probing may finish later).
const NIC_WAIT: Duration = Duration::from_secs(5);

/// The lowest MTU an IPv4 interface can have; the highest an Ethernet
/// frame length field allows.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// A NIC to configure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: MacAddr,
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: (IpAddr, u8),
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub scope: RouteScope,
    pub metric: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub address: IpAddr,
    pub mac: MacAddr,
    pub device: String,
}

/// A validated `ConfigureNetwork` request; routes in the order to add them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbours: Vec<Neighbour>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

fn cap(what: &str, n: usize, max: usize) -> Result<()> {
    if n > max {
        return Err(invalid(format!("{n} {what}, more than the {max} accepted")));
    }
    Ok(())
}

fn ip(what: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| invalid(format!("{what}: invalid IP address {:?}", short(s))))
}

/// The start of a string the host sent, for a message.
fn short(s: &str) -> String {
    s.chars().take(64).collect()
}

fn network(what: &str, n: &ag::IpNetwork) -> Result<(IpAddr, u8)> {
    let addr = ip(what, &n.address)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    match u8::try_from(n.prefix_len) {
        Ok(p) if p <= max => Ok((addr, p)),
        _ => Err(invalid(format!(
            "{what}: prefix length {} is out of range for {addr}",
            n.prefix_len
        ))),
    }
}

fn mac(what: &str, s: &str) -> Result<MacAddr> {
    let m: MacAddr = s.parse().map_err(|e| invalid(format!("{what}: {e}")))?;
    if !m.is_unicast() || m.0 == [0; 6] {
        return Err(invalid(format!("{what}: {m} is not a unicast address")));
    }
    Ok(m)
}

/// Checks a request against the protocol's bounds and its own
/// consistency (each route and neighbour names one of its interfaces; no
/// name or MAC twice), and orders the routes: link scope first.
pub fn parse(req: &ConfigureNetworkRequest) -> Result<Config> {
    cap("interfaces", req.interfaces.len(), MAX_INTERFACES)?;
    cap("routes", req.routes.len(), MAX_ROUTES)?;
    cap("neighbours", req.neighbours.len(), MAX_NEIGHBOURS)?;
    let mut interfaces = Vec::new();
    let mut names = HashSet::new();
    let mut macs = HashSet::new();
    for i in &req.interfaces {
        if !valid_ifname(&i.name) || i.name == "lo" {
            return Err(invalid(format!(
                "invalid interface name {:?}",
                short(&i.name)
            )));
        }
        let name = &i.name;
        let mac = mac(&format!("interface {name}"), &i.mac)?;
        if !names.insert(name.clone()) || !macs.insert(mac) {
            return Err(invalid(format!(
                "interface {name} ({mac}): name or MAC given twice"
            )));
        }
        if !MTU_RANGE.contains(&i.mtu) {
            return Err(invalid(format!(
                "interface {name}: MTU {} is out of range",
                i.mtu
            )));
        }
        cap(
            &format!("addresses on {name}"),
            i.addresses.len(),
            MAX_ADDRESSES,
        )?;
        let addresses = i
            .addresses
            .iter()
            .map(|a| network(&format!("interface {name}"), a))
            .collect::<Result<_>>()?;
        interfaces.push(Interface {
            name: name.clone(),
            mac,
            mtu: i.mtu,
            addresses,
        });
    }
    let device = |what: &str, d: &str| {
        if names.contains(d) {
            Ok(d.to_string())
        } else {
            Err(invalid(format!(
                "{what}: device {:?} is not one of the request's interfaces",
                short(d)
            )))
        }
    };
    let mut routes = Vec::new();
    for r in &req.routes {
        let dst = r
            .destination
            .as_ref()
            .ok_or_else(|| invalid("a route has no destination".into()))?;
        let what = format!("route to {}/{}", short(&dst.address), dst.prefix_len);
        let destination = network(&what, dst)?;
        let gateway = if r.gateway.is_empty() {
            None
        } else {
            let g = ip(&what, &r.gateway)?;
            if g.is_ipv4() != destination.0.is_ipv4() {
                return Err(invalid(format!("{what}: gateway {g} is of another family")));
            }
            Some(g)
        };
        let scope = match r.scope.enum_value() {
            Ok(ag::RouteScope::ROUTE_SCOPE_UNIVERSE) => RouteScope::Universe,
            Ok(ag::RouteScope::ROUTE_SCOPE_SITE) => RouteScope::Site,
            Ok(ag::RouteScope::ROUTE_SCOPE_LINK) => RouteScope::Link,
            Ok(ag::RouteScope::ROUTE_SCOPE_HOST) => RouteScope::Host,
            Err(n) => return Err(invalid(format!("{what}: unknown scope {n}"))),
        };
        routes.push(Route {
            destination,
            gateway,
            device: device(&what, &r.device)?,
            scope,
            metric: r.metric,
        });
    }
    // A gateway must be reachable when its route is added: directly
    // attached routes go first (a stable sort keeps the host's order).
    routes.sort_by_key(|r| r.gateway.is_some());
    let mut neighbours = Vec::new();
    for n in &req.neighbours {
        let address = ip("neighbour", &n.address)?;
        let what = format!("neighbour {address}");
        neighbours.push(Neighbour {
            address,
            mac: mac(&what, &n.mac)?,
            device: device(&what, &n.device)?,
        });
    }
    Ok(Config {
        interfaces,
        routes,
        neighbours,
    })
}

/// A netlink connection on the guest's network namespace, for one job.
struct Netlink {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Netlink {
    fn open() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| Error::Internal(format!("open a netlink socket: {e}")))?;
        Ok(Self {
            handle,
            conn: tokio::spawn(conn),
        })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn nl(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |e| match e {
        rtnetlink::Error::NetlinkError(m) => Error::Internal(format!("{what}: {}", m.to_io())),
        e => Error::Internal(format!("{what}: {e}")),
    }
}

fn is_exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if -m.raw_code() == libc::EEXIST)
}

/// Brings `lo` up, so that a pod's containers reach each other on
/// localhost whether or not the pod has a network.
pub async fn loopback_up() -> Result<()> {
    let nl_ = Netlink::open()?;
    nl_.handle
        .link()
        .set(LinkUnspec::new_with_name("lo").up().build())
        .execute()
        .await
        .map_err(nl("set lo up"))
}

/// Configures the guest's NICs, routes and neighbours as `cfg` says.
pub async fn configure(cfg: &Config) -> Result<()> {
    let nl_ = Netlink::open()?;
    let h = &nl_.handle;
    let index = find_nics(h, &cfg.interfaces).await?;
    // Free every target name first: a NIC may hold the name another is to
    // take (the kernel named them eth0, eth1 in its own order).
    // A link is renamed only while down; the kernel applies a name before
    // flags, so the two go in separate messages.
    for (n, iface) in cfg.interfaces.iter().enumerate() {
        let idx = index[&iface.mac];
        let what = |s: &str| format!("NIC {} (for {}): {s}", iface.mac, iface.name);
        h.link()
            .set(LinkUnspec::new_with_index(idx).down().build())
            .execute()
            .await
            .map_err(nl(what("set down")))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name(format!("cocoon-nic{n}"))
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(what("rename")))?;
    }
    for iface in &cfg.interfaces {
        let idx = index[&iface.mac];
        let what = |s: &str| format!("interface {} ({}): {s}", iface.name, iface.mac);
        h.link()
            .set(
                LinkUnspec::new_with_index(idx)
                    .name(iface.name.clone())
                    .mtu(iface.mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(what(&format!("rename, set MTU {}", iface.mtu))))?;
        for &(addr, prefix) in &iface.addresses {
            let mut add = h.address().add(idx, addr, prefix);
            if addr.is_ipv6() {
                // The host's netns already owns the address: no duplicate
                // detection (it would only delay the address).
                add.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            }
            match add.execute().await {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {}
                Err(e) => return Err(nl(what(&format!("add {addr}/{prefix}")))(e)),
            }
        }
        h.link()
            .set(LinkUnspec::new_with_index(idx).up().build())
            .execute()
            .await
            .map_err(nl(what("set up")))?;
        tracing::info!(
            interface = %iface.name,
            mac = %iface.mac,
            mtu = iface.mtu,
            addresses = ?iface.addresses,
            "NIC configured"
        );
    }
    let by_name: HashMap<&str, u32> = cfg
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), index[&i.mac]))
        .collect();
    for r in &cfg.routes {
        let (dst, len) = r.destination;
        let what = format!("route to {dst}/{len} via {:?} dev {}", r.gateway, r.device);
        let b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .map_err(|e| Error::Internal(format!("{what}: {e}")))?;
        let b = match r.gateway {
            Some(g) => b
                .gateway(g)
                .map_err(|e| Error::Internal(format!("{what}: {e}")))?,
            None => b,
        };
        let mut b = b
            .output_interface(by_name[r.device.as_str()])
            .scope(r.scope);
        if r.metric != 0 {
            b = b.priority(r.metric);
        }
        match h.route().add(b.build()).execute().await {
            Ok(()) => {}
            Err(e) if is_exists(&e) => {}
            Err(e) => return Err(nl(what)(e)),
        }
    }
    for n in &cfg.neighbours {
        h.neighbours()
            .add(by_name[n.device.as_str()], n.address)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!(
                "neighbour {} ({}) on {}",
                n.address, n.mac, n.device
            )))?;
    }
    tracing::info!(
        interfaces = cfg.interfaces.len(),
        routes = cfg.routes.len(),
        neighbours = cfg.neighbours.len(),
        "network configured"
    );
    Ok(())
}

/// The index of each NIC, by MAC; waits up to [`NIC_WAIT`] for NICs that
/// have not appeared yet.
async fn find_nics(h: &Handle, wanted: &[Interface]) -> Result<HashMap<MacAddr, u32>> {
    let deadline = tokio::time::Instant::now() + NIC_WAIT;
    loop {
        let links: Vec<LinkMessage> = h
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("list links"))?;
        let present: HashMap<MacAddr, u32> = links
            .iter()
            .filter_map(|l| {
                l.attributes.iter().find_map(|a| match a {
                    LinkAttribute::Address(b) => {
                        MacAddr::from_slice(b).map(|m| (m, l.header.index))
                    }
                    _ => None,
                })
            })
            .collect();
        let missing: Vec<&Interface> = wanted
            .iter()
            .filter(|i| !present.contains_key(&i.mac))
            .collect();
        if missing.is_empty() {
            return Ok(present);
        }
        if tokio::time::Instant::now() >= deadline {
            let m: Vec<String> = missing
                .iter()
                .map(|i| format!("{} ({})", i.name, i.mac))
                .collect();
            return Err(Error::FailedPrecondition(format!(
                "no NIC in the guest for {} after {NIC_WAIT:?}",
                m.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(a: &str, p: u32) -> ag::IpNetwork {
        ag::IpNetwork {
            address: a.into(),
            prefix_len: p,
            ..Default::default()
        }
    }

    fn request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces: vec![ag::NetworkInterface {
                name: "eth0".into(),
                mac: "02:42:0a:01:02:02".into(),
                mtu: 1500,
                addresses: vec![net("10.1.2.2", 24), net("fd00::2", 64)],
                ..Default::default()
            }],
            routes: vec![
                ag::Route {
                    destination: Some(net("0.0.0.0", 0)).into(),
                    gateway: "10.1.1.1".into(),
                    device: "eth0".into(),
                    ..Default::default()
                },
                ag::Route {
                    destination: Some(net("10.1.1.1", 32)).into(),
                    device: "eth0".into(),
                    scope: ag::RouteScope::ROUTE_SCOPE_LINK.into(),
                    ..Default::default()
                },
            ],
            neighbours: vec![ag::Neighbour {
                address: "10.1.1.1".into(),
                mac: "02:00:00:00:00:01".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_valid_request_parses_with_link_routes_first() {
        let c = parse(&request()).unwrap();
        assert_eq!(c.interfaces[0].name, "eth0");
        assert_eq!(
            c.interfaces[0].addresses,
            [
                ("10.1.2.2".parse().unwrap(), 24),
                ("fd00::2".parse().unwrap(), 64)
            ]
        );
        assert_eq!(c.routes[0].gateway, None, "the link route comes first");
        assert_eq!(c.routes[0].scope, RouteScope::Link);
        assert_eq!(c.routes[1].destination, ("0.0.0.0".parse().unwrap(), 0));
        assert_eq!(c.neighbours[0].mac.0, [2, 0, 0, 0, 0, 1]);
    }

    fn rejected(f: impl FnOnce(&mut ConfigureNetworkRequest), want: &str) {
        let mut r = request();
        f(&mut r);
        match parse(&r) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(want), "{want:?} not in {m:?}"),
            other => panic!("expected InvalidArgument with {want:?}, got {other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_invalid_arguments() {
        rejected(|r| r.interfaces[0].name = "x".repeat(16), "interface name");
        rejected(|r| r.interfaces[0].name = "a/b".into(), "interface name");
        rejected(|r| r.interfaces[0].name = "lo".into(), "interface name");
        rejected(|r| r.interfaces[0].mac = "02:42".into(), "MAC");
        rejected(
            |r| r.interfaces[0].mac = "ff:ff:ff:ff:ff:ff".into(),
            "unicast",
        );
        rejected(|r| r.interfaces[0].mtu = 0, "MTU");
        rejected(|r| r.interfaces[0].mtu = 70000, "MTU");
        rejected(|r| r.interfaces[0].addresses[0].prefix_len = 33, "prefix");
        rejected(|r| r.interfaces[0].addresses[1].prefix_len = 129, "prefix");
        rejected(
            |r| r.interfaces[0].addresses[0].address = "10.1.2".into(),
            "IP",
        );
        rejected(
            |r| r.interfaces.push(r.interfaces[0].clone()),
            "given twice",
        );
        rejected(|r| r.routes[0].device = "eth1".into(), "not one of");
        rejected(|r| r.routes[0].gateway = "fd00::1".into(), "family");
        rejected(|r| r.routes[0].destination.clear(), "no destination");
        rejected(
            |r| r.routes[0].scope = protobuf::EnumOrUnknown::from_i32(99),
            "scope",
        );
        rejected(|r| r.neighbours[0].device = "eth9".into(), "not one of");
        rejected(
            |r| r.interfaces = vec![r.interfaces[0].clone(); MAX_INTERFACES + 1],
            "more than",
        );
        rejected(
            |r| r.routes = vec![r.routes[0].clone(); MAX_ROUTES + 1],
            "more than",
        );
        rejected(
            |r| r.interfaces[0].addresses = vec![net("10.0.0.1", 32); MAX_ADDRESSES + 1],
            "more than",
        );
    }

    #[test]
    fn an_empty_request_is_valid() {
        let c = parse(&ConfigureNetworkRequest::default()).unwrap();
        assert!(c.interfaces.is_empty() && c.routes.is_empty() && c.neighbours.is_empty());
    }
}
