//! Port forwarding for CRI. containerd 1.6's PortForward dials
//! `localhost:<port>` inside the pod's network namespace; in a Cocoon pod
//! nothing listens there, the pod's processes are in the guest. So when
//! the sandbox has a network namespace, the shim listens on 127.0.0.1:P in
//! it and has iptables redirect every other TCP connection to the loopback
//! there to P (nat OUTPUT, REDIRECT). On accept, the original destination
//! (`SO_ORIGINAL_DST`) names the pod's port, and the agent connects to it
//! in the guest, in the network namespace of the sandbox container; the
//! bytes are spliced both ways with bounded buffers.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocols::Id;
use cocoon_runtime::Channel;

/// Forwarded connections open at once; more are refused.
const MAX_CONNECTIONS: usize = 128;
/// The copy buffer of each direction.
const BUFFER: usize = 64 * 1024;
/// How long iptables may wait for the xtables lock.
const IPTABLES_WAIT_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("open network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Entering the namespace, or binding in it.
    #[error("listen on 127.0.0.1 in network namespace {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("run iptables in network namespace {path}")]
    RunIptables {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables in network namespace {path} failed ({status}): {stderr}")]
    Iptables {
        path: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The forwarder of one pod: the listener in its network namespace, the
/// redirect rule, and the task that serves them.
pub struct PortForwarder {
    netns_path: PathBuf,
    netns: File,
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl PortForwarder {
    /// Listens in `netns_path` and installs the redirect; connections go to
    /// the guest through `channel`, into `container`'s network namespace.
    pub async fn start(
        netns_path: &Path,
        container: Id,
        channel: Channel,
    ) -> Result<Self, PortForwardError> {
        let path = netns_path.to_path_buf();
        let netns = File::open(&path).map_err(|source| PortForwardError::OpenNetns {
            path: path.clone(),
            source,
        })?;
        let listener = listen_in(&path, &netns).await?;
        let port = listener
            .local_addr()
            .map_err(|source| PortForwardError::Listen {
                path: path.clone(),
                source,
            })?
            .port();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
            PortForwardError::Listen {
                path: path.clone(),
                source,
            }
        })?;
        let fd = netns
            .try_clone()
            .map_err(|source| PortForwardError::OpenNetns {
                path: path.clone(),
                source,
            })?;
        let p = path.clone();
        tokio::task::spawn_blocking(move || iptables(&p, &fd, "-A", port))
            .await
            .expect("iptables thread")?;
        tracing::info!(netns = %path.display(), port, "port forwarding ready");
        let task = tokio::spawn(serve(listener, container, channel));
        Ok(Self {
            netns_path: path,
            netns,
            port,
            task,
        })
    }

    /// Stops accepting and removes the redirect (the namespace may outlive
    /// the pod's VM). Connections already forwarded end with the VM.
    pub async fn stop(self) {
        self.task.abort();
        let (path, netns, port) = (self.netns_path, self.netns, self.port);
        let r = tokio::task::spawn_blocking(move || iptables(&path, &netns, "-D", port)).await;
        if let Ok(Err(e)) = r {
            tracing::debug!(
                "remove the port-forward redirect: {}",
                cocoon_runtime::error_chain(&e)
            );
        }
    }
}

/// A listener on 127.0.0.1 (ephemeral port) inside the namespace, made on
/// a thread that entered it (the socket stays in the namespace).
async fn listen_in(path: &Path, netns: &File) -> Result<std::net::TcpListener, PortForwardError> {
    let p = path.to_path_buf();
    let listen_err = |source| PortForwardError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let netns = netns
        .try_clone()
        .map_err(|source| PortForwardError::OpenNetns {
            path: p.clone(),
            source,
        })?;
    tokio::task::spawn_blocking(move || {
        cocoon_runtime::network::netns::on_thread(&netns, || {
            let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
    })
    .await
    .map_err(|e| listen_err(std::io::Error::other(e)))?
    .map_err(listen_err)
}

/// `iptables -t nat <op> OUTPUT ...`: every TCP connection to the loopback
/// in the namespace, except to `port` itself, goes to `port`.
fn iptables(path: &Path, netns: &File, op: &str, port: u16) -> Result<(), PortForwardError> {
    let port = port.to_string();
    let fd = netns.as_raw_fd();
    let mut cmd = std::process::Command::new("iptables");
    cmd.args(["-w", IPTABLES_WAIT_SECS, "-t", "nat", op, "OUTPUT"])
        .args([
            "-o",
            "lo",
            "-d",
            "127.0.0.0/8",
            "-p",
            "tcp",
            "!",
            "--dport",
            &port,
        ])
        .args(["-m", "comment", "--comment", "cocoon port forward"])
        .args(["-j", "REDIRECT", "--to-ports", &port])
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only setns(2), async-signal-safe, on
    // an fd that stays open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|source| PortForwardError::RunIptables {
            path: path.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(PortForwardError::Iptables {
            path: path.to_path_buf(),
            status: out.status,
            stderr: stderr
                .chars()
                .take(512)
                .collect::<String>()
                .trim()
                .to_string(),
        });
    }
    Ok(())
}

async fn serve(listener: tokio::net::TcpListener, container: Id, channel: Channel) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                tracing::warn!("port forward: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("port forward: {MAX_CONNECTIONS} connections open, one refused");
            refuse(conn);
            continue;
        };
        let (container, channel) = (container.clone(), channel.clone());
        tokio::spawn(async move {
            forward(conn, &container, &channel).await;
            drop(permit);
        });
    }
}

/// Closes with a reset, so that the client sees a failure, not an empty
/// answer.
fn refuse(conn: tokio::net::TcpStream) {
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &reset);
}

async fn forward(mut conn: tokio::net::TcpStream, container: &Id, channel: &Channel) {
    let port = match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::OriginalDst) {
        Ok(addr) => u16::from_be(addr.sin_port),
        Err(e) => {
            tracing::warn!("port forward: original destination: {e}");
            return refuse(conn);
        }
    };
    let mut guest = match channel.port_forward(container, port).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!("port forward to {port}: {e}");
            return refuse(conn);
        }
    };
    tracing::debug!(port, "port forward connected");
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut guest, BUFFER, BUFFER).await
    {
        tracing::debug!("port forward to {port} ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::Command;

    use cocoon_hypervisor::VsockConnector;
    use cocoon_protocols::{agent_ttrpc, PortForwardHeader, PortForwardReply};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;

    /// A network namespace for the test; deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new() -> Self {
            let name = format!("cocoon-pf-unit-{}", std::process::id());
            let ok = Command::new("ip").args(["netns", "add", &name]).status();
            assert!(ok.is_ok_and(|s| s.success()), "ip netns add {name}");
            let ns = Self(name);
            let up = Command::new("ip")
                .args(["-n", &ns.0, "link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()));
            ns
        }

        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/var/run/netns/{}", self.0))
        }

        fn nat_rules(&self) -> String {
            let o = Command::new("ip")
                .args([
                    "netns", "exec", &self.0, "iptables", "-t", "nat", "-S", "OUTPUT",
                ])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
    }

    /// Connects to 127.0.0.1:`port` inside namespace `netns`, sends `msg`
    /// and reads the answer until EOF (or the error).
    fn talk(netns: &Path, port: u16, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let netns = File::open(netns)?;
        let msg = msg.to_vec();
        std::thread::spawn(move || {
            // SAFETY: setns on an open namespace fd; this thread only.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(&msg)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })
        .join()
        .unwrap()
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// A guest behind hybrid vsock whose agent answers port-forward
    /// connections: port 7 echoes (after `ok`), any other is refused.
    async fn fake_guest(uds: &Path) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(uds).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut lines = Vec::new();
                    while lines.len() < 2 {
                        let b = conn.read_u8().await.unwrap();
                        if b == b'\n' {
                            lines.push(String::from_utf8(std::mem::take(&mut line)).unwrap());
                            if lines.len() == 1 {
                                let want =
                                    format!("CONNECT {}", cocoon_protocols::PORT_FORWARD_PORT);
                                assert_eq!(lines[0], want);
                                conn.write_all(b"OK 1\n").await.unwrap();
                            }
                        } else {
                            line.push(b);
                        }
                    }
                    let h = PortForwardHeader::decode(&lines[1]).expect("header");
                    assert_eq!(h.container_id.as_str(), "pod");
                    if h.port != 7 {
                        let r = PortForwardReply::Failed("connection refused".into());
                        conn.write_all(r.encode().as_bytes()).await.unwrap();
                        return;
                    }
                    conn.write_all(PortForwardReply::Connected.encode().as_bytes())
                        .await
                        .unwrap();
                    let (mut r, mut w) = conn.split();
                    tokio::io::copy(&mut r, &mut w).await.unwrap();
                    w.shutdown().await.unwrap();
                });
            }
        })
    }

    #[tokio::test]
    #[ignore = "needs root: makes a network namespace and runs iptables in it"]
    async fn forwards_loopback_connections_of_the_netns_to_the_guest() {
        let ns = Netns::new();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let guest = fake_guest(&uds).await;
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let agent = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::new(a),
        ));
        let channel = Channel::new(
            &Id::sandbox("pod").unwrap(),
            agent,
            VsockConnector::Hybrid { uds },
        );
        let f = PortForwarder::start(&ns.path(), Id::container("pod").unwrap(), channel)
            .await
            .expect("start");
        assert!(
            ns.nat_rules().contains("cocoon port forward"),
            "{}",
            ns.nat_rules()
        );

        let talk = |port, msg: &'static [u8]| {
            let path = ns.path();
            tokio::task::spawn_blocking(move || talk(&path, port, msg))
        };
        let echoed = talk(7, b"hello through the guest").await.unwrap();
        assert_eq!(echoed.unwrap(), b"hello through the guest");
        let refused = talk(9, b"anyone?").await.unwrap();
        assert!(
            refused.as_ref().map_or(true, |d| d.is_empty()),
            "a refused port gives no data: {refused:?}"
        );
        if let Err(e) = &refused {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }

        f.stop().await;
        assert!(
            !ns.nat_rules().contains("cocoon port forward"),
            "{}",
            ns.nat_rules()
        );
        guest.abort();
    }
}
