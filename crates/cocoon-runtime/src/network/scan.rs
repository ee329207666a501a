//! Reading the pod's network from its netns: netlink dumps in, a [`Plan`]
//! out. The translation is a pure function, tested on hand-made messages.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cocoon_protocols::network::{
    valid_ifname, MacAddr, MAX_ADDRESSES, MAX_INTERFACES, MAX_NEIGHBOURS, MAX_ROUTES,
};
use futures_util::{Stream, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::tc::{link_name, nl};
use super::{tap, Cause, Failed, Interface, IpNet, Neighbour, Plan, Route, Scope};

/// The most entries read from one dump: a pod's netns holds a handful.
const MAX_DUMP: usize = 4096;

/// Dumps links, addresses, routes and neighbours, and makes the plan.
pub(super) async fn read(h: &Handle) -> Result<Plan, Failed> {
    let links = dump("links", h.link().get().execute()).await?;
    let addrs = dump("addresses", h.address().get().execute()).await?;
    let mut routes = dump(
        "IPv4 routes",
        h.route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute(),
    )
    .await?;
    routes.extend(
        dump(
            "IPv6 routes",
            h.route()
                .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
                .execute(),
        )
        .await?,
    );
    let neighbours = dump("neighbours", h.neighbours().get().execute()).await?;
    plan(&links, &addrs, &routes, &neighbours).map_err(|e| Failed::new("read", Cause::Invalid(e)))
}

async fn dump<T>(
    what: &str,
    s: impl Stream<Item = Result<T, rtnetlink::Error>>,
) -> Result<Vec<T>, Failed> {
    let mut s = std::pin::pin!(s);
    let mut out = Vec::new();
    while let Some(m) = s
        .try_next()
        .await
        .map_err(|e| Failed::new(format!("list {what}"), nl(e)))?
    {
        if out.len() == MAX_DUMP {
            return Err(Failed::new(
                format!("list {what}"),
                Cause::Invalid(format!("more than {MAX_DUMP}")),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// The plan for the pod's netns, from its dumps: every Ethernet interface
/// but `lo` and our own taps; their addresses but IPv6 link-local ones
/// (the guest derives those from the same MAC); the unicast routes of the
/// main table through them, but those the kernel made for an address (the
/// guest's kernel makes them again); their permanent neighbours.
pub(super) fn plan(
    links: &[LinkMessage],
    addrs: &[AddressMessage],
    routes: &[RouteMessage],
    neighbours: &[NeighbourMessage],
) -> Result<Plan, String> {
    let mut interfaces = Vec::new();
    for l in links {
        let Some(name) = link_name(l) else { continue };
        if l.header.link_layer_type == LinkLayerType::Loopback || tap::is_ours(name) {
            continue;
        }
        let mac = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::Address(b) => MacAddr::from_slice(b),
            _ => None,
        });
        let (true, Some(mac)) = (l.header.link_layer_type == LinkLayerType::Ether, mac) else {
            tracing::warn!("interface {name} is not Ethernet: the guest does not get it");
            continue;
        };
        if !valid_ifname(name) {
            return Err(format!(
                "interface name {name:?} is not one a guest can take"
            ));
        }
        let mtu = l
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .ok_or_else(|| format!("interface {name} has no MTU"))?;
        interfaces.push(Interface {
            name: name.to_string(),
            index: l.header.index,
            mac,
            mtu,
            addresses: Vec::new(),
        });
    }
    if interfaces.len() > MAX_INTERFACES {
        return Err(format!(
            "{} interfaces, more than the {MAX_INTERFACES} a pod can have",
            interfaces.len()
        ));
    }
    let by_index: HashMap<u32, usize> = interfaces
        .iter()
        .enumerate()
        .map(|(i, iface)| (iface.index, i))
        .collect();

    for a in addrs {
        let Some(&i) = by_index.get(&a.header.index) else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
        // peer's on a point-to-point link); IPv6 has only IFA_ADDRESS.
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(addr) = local.or(address) else {
            continue;
        };
        if matches!(a.header.scope, AddressScope::Link | AddressScope::Host) {
            continue;
        }
        let iface = &mut interfaces[i];
        if iface.addresses.len() == MAX_ADDRESSES {
            return Err(format!(
                "interface {} has more than {MAX_ADDRESSES} addresses",
                iface.name
            ));
        }
        iface.addresses.push(IpNet {
            addr,
            prefix: a.header.prefix_len,
        });
    }

    let mut out_routes = Vec::new();
    for r in routes {
        let Some(route) = route(r, &interfaces, &by_index)? else {
            continue;
        };
        if out_routes.len() == MAX_ROUTES {
            return Err(format!("more than {MAX_ROUTES} routes"));
        }
        out_routes.push(route);
    }

    let mut out_neighbours = Vec::new();
    for n in neighbours {
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let Some(&i) = by_index.get(&n.header.ifindex) else {
            continue;
        };
        let address = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_slice(b),
            _ => None,
        });
        let (Some(address), Some(mac)) = (address, mac) else {
            continue;
        };
        if out_neighbours.len() == MAX_NEIGHBOURS {
            return Err(format!("more than {MAX_NEIGHBOURS} permanent neighbours"));
        }
        out_neighbours.push(Neighbour {
            address,
            mac,
            device: interfaces[i].name.clone(),
        });
    }

    Ok(Plan {
        interfaces,
        routes: out_routes,
        neighbours: out_neighbours,
    })
}

/// One route of the plan, or `None` for a route the guest does not need
/// or cannot take.
fn route(
    r: &RouteMessage,
    interfaces: &[Interface],
    by_index: &HashMap<u32, usize>,
) -> Result<Option<Route>, String> {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table.into());
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || r.header.kind != RouteType::Unicast
        || r.header.protocol == RouteProtocol::Kernel
    {
        return Ok(None);
    }
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let Some(&i) = oif.and_then(|o| by_index.get(&o)) else {
        // Through lo, a multipath route, or another interface.
        return Ok(None);
    };
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let unspecified = match r.header.address_family {
        rtnetlink::packet_route::AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        rtnetlink::packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return Ok(None),
    };
    let destination = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => ip(d),
            _ => None,
        })
        .unwrap_or(unspecified);
    if let IpAddr::V6(v6) = destination {
        // Link-local and multicast: the guest's kernel makes its own.
        if v6.segments()[0] & 0xffc0 == 0xfe80 || v6.is_multicast() {
            return Ok(None);
        }
    }
    let gateway = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => ip(g),
        _ => None,
    });
    let scope = match r.header.scope {
        RouteScope::Universe => Scope::Universe,
        RouteScope::Site => Scope::Site,
        RouteScope::Link => Scope::Link,
        RouteScope::Host => Scope::Host,
        other => {
            return Err(format!(
                "route to {destination}/{} has scope {other}",
                r.header.destination_prefix_length
            ))
        }
    };
    let metric = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    Ok(Some(Route {
        destination: IpNet {
            addr: destination,
            prefix: r.header.destination_prefix_length,
        },
        gateway,
        device: interfaces[i].name.clone(),
        scope,
        metric,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::AddressFamily;

    fn link(index: u32, name: &str, kind: LinkLayerType, mac: &[u8], mtu: u32) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.header.link_layer_type = kind;
        l.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(mac.to_vec()),
            LinkAttribute::Mtu(mtu),
        ];
        l
    }

    fn addr(index: u32, ip: &str, prefix: u8, scope: AddressScope) -> AddressMessage {
        let ip: IpAddr = ip.parse().unwrap();
        let mut a = AddressMessage::default();
        a.header.index = index;
        a.header.prefix_len = prefix;
        a.header.scope = scope;
        a.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        a.attributes = vec![AddressAttribute::Address(ip)];
        if ip.is_ipv4() {
            a.attributes.push(AddressAttribute::Local(ip));
        }
        a
    }

    fn route(
        dst: Option<(&str, u8)>,
        gw: Option<&str>,
        oif: u32,
        protocol: RouteProtocol,
        scope: RouteScope,
    ) -> RouteMessage {
        let ipv6 = dst.is_some_and(|(d, _)| d.contains(':')) || gw.is_some_and(|g| g.contains(':'));
        let mut r = RouteMessage::default();
        r.header.address_family = if ipv6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.kind = RouteType::Unicast;
        r.header.protocol = protocol;
        r.header.scope = scope;
        if let Some((d, len)) = dst {
            r.header.destination_prefix_length = len;
            let d: IpAddr = d.parse().unwrap();
            r.attributes.push(RouteAttribute::Destination(d.into()));
        }
        if let Some(g) = gw {
            let g: IpAddr = g.parse().unwrap();
            r.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        r.attributes.push(RouteAttribute::Oif(oif));
        r
    }

    const MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x01, 0x02, 0x02];

    /// What CNI's bridge plugin leaves: lo, eth0 with an IPv4 and an IPv6
    /// address, a kernel prefix route, a default route.
    fn bridge_netns() -> (
        Vec<LinkMessage>,
        Vec<AddressMessage>,
        Vec<RouteMessage>,
        Vec<NeighbourMessage>,
    ) {
        let links = vec![
            link(1, "lo", LinkLayerType::Loopback, &[0; 6], 65536),
            link(2, "eth0", LinkLayerType::Ether, &MAC, 1450),
            link(
                3,
                "tap0_cocoon",
                LinkLayerType::Ether,
                &[2, 0, 0, 0, 0, 9],
                1450,
            ),
        ];
        let addrs = vec![
            addr(1, "127.0.0.1", 8, AddressScope::Host),
            addr(2, "10.1.2.2", 24, AddressScope::Universe),
            addr(2, "fd00::2", 64, AddressScope::Universe),
            addr(2, "fe80::42:aff:fe01:202", 64, AddressScope::Link),
        ];
        let routes = vec![
            route(
                None,
                Some("10.1.2.1"),
                2,
                RouteProtocol::Boot,
                RouteScope::Universe,
            ),
            route(
                Some(("10.1.2.0", 24)),
                None,
                2,
                RouteProtocol::Kernel,
                RouteScope::Link,
            ),
            route(
                Some(("10.9.0.0", 16)),
                Some("10.1.2.254"),
                2,
                RouteProtocol::Static,
                RouteScope::Universe,
            ),
            route(
                Some(("fe80::", 64)),
                None,
                2,
                RouteProtocol::Static,
                RouteScope::Universe,
            ),
            route(
                Some(("127.0.0.0", 8)),
                None,
                1,
                RouteProtocol::Static,
                RouteScope::Host,
            ),
        ];
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 2;
        n.header.state = NeighbourState::Permanent;
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.1.2.1".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]),
        ];
        let mut stale = n.clone();
        stale.header.state = NeighbourState::Stale;
        (links, addrs, routes, vec![n, stale])
    }

    #[test]
    fn a_bridge_plugin_netns() {
        let (l, a, r, n) = bridge_netns();
        let p = plan(&l, &a, &r, &n).unwrap();
        assert_eq!(
            p.interfaces.len(),
            1,
            "lo and our tap are not pod interfaces"
        );
        let eth0 = &p.interfaces[0];
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.index, 2);
        assert_eq!(eth0.mac.0, MAC);
        assert_eq!(eth0.mtu, 1450);
        let addrs: Vec<String> = eth0.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.1.2.2/24", "fd00::2/64"]);
        assert_eq!(
            p.routes,
            [
                Route {
                    destination: IpNet {
                        addr: "0.0.0.0".parse().unwrap(),
                        prefix: 0
                    },
                    gateway: Some("10.1.2.1".parse().unwrap()),
                    device: "eth0".into(),
                    scope: Scope::Universe,
                    metric: 0,
                },
                Route {
                    destination: IpNet {
                        addr: "10.9.0.0".parse().unwrap(),
                        prefix: 16
                    },
                    gateway: Some("10.1.2.254".parse().unwrap()),
                    device: "eth0".into(),
                    scope: Scope::Universe,
                    metric: 0,
                },
            ],
            "kernel, link-local and lo routes are left out"
        );
        assert_eq!(p.neighbours.len(), 1, "only permanent neighbours");
        assert_eq!(p.neighbours[0].address.to_string(), "10.1.2.1");
        assert_eq!(p.neighbours[0].device, "eth0");
    }

    #[test]
    fn a_netns_without_interfaces_is_an_empty_plan() {
        let links = vec![link(1, "lo", LinkLayerType::Loopback, &[0; 6], 65536)];
        assert_eq!(plan(&links, &[], &[], &[]).unwrap(), Plan::default());
    }

    #[test]
    fn non_ethernet_links_are_skipped_and_limits_hold() {
        let mut ipip = link(4, "tunl0", LinkLayerType::Tunnel, &[0, 0, 0, 0], 1480);
        ipip.header.link_layer_type = LinkLayerType::Tunnel;
        assert!(plan(&[ipip], &[], &[], &[]).unwrap().interfaces.is_empty());

        let many: Vec<_> = (0..=MAX_INTERFACES as u32)
            .map(|i| link(i + 2, &format!("eth{i}"), LinkLayerType::Ether, &MAC, 1500))
            .collect();
        let e = plan(&many, &[], &[], &[]).unwrap_err();
        assert!(e.contains("more than"), "{e}");

        let eth0 = link(2, "eth0", LinkLayerType::Ether, &MAC, 1500);
        let addrs: Vec<_> = (0..=MAX_ADDRESSES)
            .map(|i| {
                addr(
                    2,
                    &format!("10.0.{}.{}", i / 200, i % 200 + 1),
                    32,
                    AddressScope::Universe,
                )
            })
            .collect();
        let e = plan(std::slice::from_ref(&eth0), &addrs, &[], &[]).unwrap_err();
        assert!(e.contains("eth0"), "{e}");

        let routes: Vec<_> = (0..=MAX_ROUTES)
            .map(|i| {
                route(
                    Some((&format!("10.{}.{}.0", i / 200, i % 200), 24)),
                    Some("10.255.0.1"),
                    2,
                    RouteProtocol::Static,
                    RouteScope::Universe,
                )
            })
            .collect();
        let e = plan(&[eth0], &[], &routes, &[]).unwrap_err();
        assert!(e.contains("routes"), "{e}");
    }

    #[test]
    fn a_link_scope_route_and_a_metric_are_kept() {
        let (l, a, _, _) = bridge_netns();
        let mut r = route(
            Some(("10.1.1.1", 32)),
            None,
            2,
            RouteProtocol::Boot,
            RouteScope::Link,
        );
        r.attributes.push(RouteAttribute::Priority(100));
        let p = plan(&l, &a, &[r], &[]).unwrap();
        assert_eq!(p.routes[0].scope, Scope::Link);
        assert_eq!(p.routes[0].metric, 100);
        assert_eq!(p.routes[0].gateway, None);
    }
}
