//! Running netlink work inside a network namespace.
//!
//! `setns(2)` moves only the calling thread, and a netlink socket (like a
//! tap) belongs to the namespace of the thread that creates it. So each
//! batch of work gets a thread of its own that enters the netns, opens the
//! socket there and drives it on a current-thread runtime, then ends: no
//! thread of the caller's runtime ever changes namespace.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

use super::{Cause, Error, Failed, NETLINK_TIMEOUT};

/// Runs `f` with a netlink handle opened inside `netns`, on a thread of
/// its own; blocks until it is done (at most [`NETLINK_TIMEOUT`] of
/// netlink work). Refuses the host's own namespace.
pub(super) fn run<T, F, Fut>(netns: &Path, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Failed>>,
{
    let wrap = |action: &str, source: Cause| Error::Netns {
        netns: netns.to_path_buf(),
        action: action.into(),
        source,
    };
    let file = File::open(netns).map_err(|e| wrap("open", e.into()))?;
    let ours = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| wrap("compare with the host's network namespace", e.into()))?;
    let theirs = file.metadata().map_err(|e| wrap("open", e.into()))?;
    if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
        return Err(Error::HostNetns {
            netns: netns.to_path_buf(),
        });
    }
    let worker = std::thread::Builder::new()
        .name("cocoon-netns".into())
        .spawn(move || -> Result<T, Failed> {
            // EINVAL here: the path is not a network namespace.
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Failed::new("enter", std::io::Error::from(e)))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failed::new("start a netlink runtime", e))?;
            rt.block_on(async move {
                let (conn, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| Failed::new("open a netlink socket", e))?;
                let conn = tokio::spawn(conn);
                let r = tokio::time::timeout(NETLINK_TIMEOUT, f(handle)).await;
                conn.abort();
                r.map_err(|_| Failed::new("netlink", Cause::Timeout(NETLINK_TIMEOUT)))?
            })
        })
        .map_err(|e| wrap("start a thread", e.into()))?;
    worker
        .join()
        .map_err(|_| wrap("netlink thread", Cause::Invalid("panicked".into())))?
        .map_err(|f| wrap(&f.action, f.cause))
}

/// Runs `f` on a thread of its own that has entered `netns`, and waits for
/// it: for a socket that must belong to the namespace (a listener), made
/// without moving any thread of the caller's.
pub fn on_thread<T: Send>(
    netns: &File,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")))
    })
}
