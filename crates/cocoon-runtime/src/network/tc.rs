//! The tc plumbing between a pod interface and its tap: an ingress qdisc
//! on each, and on each a u32 match-all filter whose action is a mirred
//! egress redirect to the other. Every frame that arrives on the veth
//! leaves through the tap (to QEMU, so to the guest), and every frame the
//! guest sends leaves through the veth; the netns's own IP stack never
//! sees them.

use std::os::fd::OwnedFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec};

use super::{tap, Cause, Failed, Interface, Redirected};

/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// A netlink error as the errno it carries (so that it prints as one).
pub(super) fn nl(e: rtnetlink::Error) -> Cause {
    match e {
        rtnetlink::Error::NetlinkError(m) => Cause::Io(m.to_io()),
        e => Cause::Netlink(Box::new(e)),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// The link at `index`, if there is one.
pub(super) async fn link_by_index(h: &Handle, index: u32) -> Result<Option<LinkMessage>, Failed> {
    match h.link().get().match_index(index).execute().try_next().await {
        Ok(l) => Ok(l),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(Failed::new(format!("look up link {index}"), nl(e))),
    }
}

pub(super) fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// Gives `iface` (the `i`-th) a tap and the two redirects. The veth is
/// recorded in `redirected` as soon as its qdisc exists, so that the
/// caller can undo a half-done setup; the tap goes when its fd is dropped.
pub(super) async fn connect(
    h: &Handle,
    iface: &Interface,
    i: usize,
    redirected: &mut Vec<Redirected>,
) -> Result<OwnedFd, Failed> {
    let veth = &iface.name;
    let name = tap::name(i);
    let fd =
        tap::create(&name).map_err(|e| Failed::new(format!("create tap {name} for {veth}"), e))?;
    let tap = h
        .link()
        .get()
        .match_name(name.clone())
        .execute()
        .try_next()
        .await
        .map_err(|e| Failed::new(format!("look up tap {name} for {veth}"), nl(e)))?
        .ok_or_else(|| {
            Failed::new(
                format!("look up tap {name} for {veth}"),
                Cause::Invalid("not found after creation".into()),
            )
        })?
        .header
        .index;
    h.link()
        .set(LinkUnspec::new_with_index(tap).mtu(iface.mtu).up().build())
        .execute()
        .await
        .map_err(|e| {
            Failed::new(
                format!("set tap {name} up with {veth}'s MTU {}", iface.mtu),
                nl(e),
            )
        })?;
    add_ingress(h, iface.index)
        .await
        .map_err(|c| Failed::new(format!("add an ingress qdisc on {veth}"), c))?;
    redirected.push(Redirected {
        index: iface.index,
        name: veth.clone(),
    });
    add_ingress(h, tap)
        .await
        .map_err(|c| Failed::new(format!("add an ingress qdisc on tap {name} for {veth}"), c))?;
    redirect(h, iface.index, tap)
        .await
        .map_err(|e| Failed::new(format!("redirect {veth} ingress to tap {name}"), nl(e)))?;
    redirect(h, tap, iface.index)
        .await
        .map_err(|e| Failed::new(format!("redirect tap {name} ingress to {veth}"), nl(e)))?;
    Ok(fd)
}

async fn add_ingress(h: &Handle, index: u32) -> Result<(), Cause> {
    match h.qdisc().add(index as i32).ingress().execute().await {
        Ok(()) => Ok(()),
        // Someone else's qdisc: not ours to replace, nor to remove later.
        Err(e) if errno(&e) == Some(libc::EEXIST) => {
            Err(Cause::Invalid("it already has an ingress qdisc".into()))
        }
        Err(e) => Err(nl(e)),
    }
}

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev <to>`.
async fn redirect(h: &Handle, from: u32, to: u32) -> Result<(), rtnetlink::Error> {
    // The protocol is compared with the frame's, in network byte order.
    let all = (libc::ETH_P_ALL as u16).to_be();
    h.traffic_filter(from as i32)
        .add()
        .parent(INGRESS_HANDLE)
        .protocol(all)
        .redirect(to)?
        .execute()
        .await
}

/// Deletes the ingress qdisc (and with it the filters) of every veth in
/// `redirected` that is still there under its name. Goes on after an
/// error; returns the first.
pub(super) async fn unredirect(h: &Handle, redirected: &[Redirected]) -> Result<(), Failed> {
    let mut first = None;
    for r in redirected {
        if let Err(e) = unredirect_one(h, r).await {
            tracing::warn!("{}: {}", e.action, e.cause);
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

async fn unredirect_one(h: &Handle, r: &Redirected) -> Result<(), Failed> {
    let veth = &r.name;
    match link_by_index(h, r.index).await? {
        None => return Ok(()),
        Some(l) if link_name(&l) != Some(veth.as_str()) => {
            tracing::warn!(
                "link {} is no longer {veth}: its qdiscs are left alone",
                r.index
            );
            return Ok(());
        }
        Some(_) => {}
    }
    let mut del = h.qdisc().del(r.index as i32);
    del.message_mut().header.parent = TcHandle::INGRESS;
    del.message_mut().header.handle = INGRESS_HANDLE.into();
    match del.execute().await {
        Ok(()) => Ok(()),
        // Already gone.
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(()),
        Err(e) => Err(Failed::new(
            format!("delete the ingress qdisc of {veth}"),
            nl(e),
        )),
    }
}
