//! Reaching a guest vsock port from the host, over kernel vhost-vsock
//! (AF_VSOCK) or hybrid vsock (a unix socket and a `CONNECT <port>` line).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::UnixStream;

/// How to reach the guest.
#[derive(Debug, Clone)]
pub enum VsockConnector {
    Vhost { guest_cid: u32 },
    Hybrid { uds: PathBuf },
}

/// A connected stream to a guest port.
pub enum VsockStream {
    Unix(UnixStream),
    Vsock(tokio_vsock::VsockStream),
}

impl VsockConnector {
    /// Connects to `port` in the guest. Fails (rather than waits) while
    /// nothing in the guest listens on the port.
    pub async fn connect(&self, port: u32) -> io::Result<VsockStream> {
        match self {
            VsockConnector::Vhost { guest_cid } => {
                let addr = tokio_vsock::VsockAddr::new(*guest_cid, port);
                Ok(VsockStream::Vsock(
                    tokio_vsock::VsockStream::connect(addr).await?,
                ))
            }
            VsockConnector::Hybrid { uds } => {
                let mut s = UnixStream::connect(uds).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                // Read the answer byte by byte: bytes after it belong to the caller.
                let mut line = Vec::with_capacity(16);
                let mut reader = BufReader::with_capacity(1, &mut s);
                reader.read_until(b'\n', &mut line).await?;
                let answer = String::from_utf8_lossy(&line);
                if !answer.starts_with("OK ") {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("hybrid vsock refused port {port}: {:?}", answer.trim()),
                    ));
                }
                Ok(VsockStream::Unix(s))
            }
        }
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            VsockStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            VsockStream::Vsock(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_flush(cx),
            VsockStream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            VsockStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            VsockStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
