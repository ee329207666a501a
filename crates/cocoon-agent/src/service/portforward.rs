//! Port forwarding: the host opens a connection on
//! [`cocoon_protocols::PORT_FORWARD_PORT`] naming a container and a port;
//! the agent connects to `localhost:<port>` in the guest's network
//! namespace (the pod's), answers whether it could, and splices the bytes
//! both ways until either side is done.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cocoon_protocols::{PortForwardHeader, PortForwardReply};
use tokio::io::AsyncWriteExt;

use super::Agent;

/// How long the host may take to send its header line.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the port in the guest may take (IPv4 and IPv6
/// together), well below the host's 10 s for the whole exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// Forwarded connections open at once; more wait for one to end.
const MAX_CONNECTIONS: usize = 128;
/// The copy buffer of each direction.
const BUFFER: usize = 64 * 1024;

/// Serves the port-forward port until the agent stops.
pub async fn serve(agent: Arc<Agent>, port: u32) -> std::io::Result<()> {
    let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            // Out of fds, say: the service stays for the next connection.
            Err(e) => {
                tracing::warn!("port forward: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(&agent, conn).await {
                tracing::warn!("port forward: {e}");
            }
            drop(permit);
        });
    }
}

async fn forward(agent: &Agent, mut conn: tokio_vsock::VsockStream) -> std::io::Result<()> {
    let line = tokio::time::timeout(
        HEADER_TIMEOUT,
        cocoon_protocols::read_line_bounded(
            &mut conn,
            PortForwardHeader::MAX_LEN,
            "port-forward header",
        ),
    )
    .await
    .map_err(|_| std::io::Error::other("no port-forward header within 10s"))??;
    let line = String::from_utf8(line).map_err(std::io::Error::other)?;
    let header = PortForwardHeader::decode(&line)
        .ok_or_else(|| std::io::Error::other(format!("bad port-forward header {line:?}")))?;
    let target = match connect(agent, &header).await {
        Ok(t) => t,
        Err(why) => {
            let reply = PortForwardReply::Failed(why.clone());
            conn.write_all(reply.encode().as_bytes()).await?;
            conn.shutdown(std::net::Shutdown::Both)?;
            return Err(std::io::Error::other(why));
        }
    };
    conn.write_all(PortForwardReply::Connected.encode().as_bytes())
        .await?;
    splice(conn, target).await
}

/// Copies both ways. When the port's side ends, the whole connection to
/// the host is closed, not half-closed: a vsock half-close does not reach
/// the host's end through every vsock backend (hybrid vsock forwards only
/// the close), and containerd ends the session when either way ends.
async fn splice(
    conn: tokio_vsock::VsockStream,
    target: tokio::net::TcpStream,
) -> std::io::Result<()> {
    let (mut from_port, mut to_port) = target.into_split();
    let (mut from_host, mut to_host) = tokio::io::split(conn);
    let port_to_host = async {
        let mut r = tokio::io::BufReader::with_capacity(BUFFER, &mut from_port);
        let copied = tokio::io::copy_buf(&mut r, &mut to_host).await;
        let _ = to_host.shutdown().await;
        copied
    };
    let host_to_port = async {
        let mut r = tokio::io::BufReader::with_capacity(BUFFER, &mut from_host);
        let copied = tokio::io::copy_buf(&mut r, &mut to_port).await;
        let _ = to_port.shutdown().await;
        copied
    };
    tokio::pin!(port_to_host);
    tokio::select! {
        r = &mut port_to_host => r.map(drop),
        // The host is done sending: the port may still answer.
        r = host_to_port => {
            r?;
            port_to_host.await.map(drop)
        }
    }
}

/// Connects to `localhost:<port>` (IPv4, then IPv6) in the guest's network
/// namespace, which every container of the pod shares (the VM is the
/// pod): the container only has to be known. Both tries share one budget,
/// below the host's deadline for the whole exchange.
async fn connect(agent: &Agent, h: &PortForwardHeader) -> Result<tokio::net::TcpStream, String> {
    agent
        .process(&h.container_id, None, |_| ())
        .map_err(|e| e.to_string())?;
    let port = h.port;
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let tries = async {
        match tokio::net::TcpStream::connect(v4).await {
            Ok(s) => Ok(s),
            Err(e4) => tokio::net::TcpStream::connect(v6)
                .await
                .map_err(|e6| format!("connect to localhost:{port}: IPv4: {e4}, IPv6: {e6}")),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, tries)
        .await
        .map_err(|_| format!("connect to localhost:{port}: no answer within {CONNECT_TIMEOUT:?}"))?
}
