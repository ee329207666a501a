//! Reaching a guest vsock port from the host, over kernel vhost-vsock
//! (AF_VSOCK) or hybrid vsock (a unix socket and a `CONNECT <port>` line).
//!
//! A connect is a call into the guest (or into a backend the guest can keep
//! busy), so it has a deadline, and the hybrid handshake's answer is read
//! with a bounded length.
//!
//! A hybrid handshake the caller stops waiting for is not closed before the
//! backend answers: vhost-device-vsock 0.3 panics when the guest's answer
//! arrives for a connection the host already closed (its `OK <port>` write
//! fails with EPIPE), and its worker thread, which serves every connection
//! of the VM, dies with it; later connects are accepted and never answered.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::UnixStream;

/// The deadline of [`VsockConnector::connect`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a hybrid handshake its caller gave up on is still waited for
/// (in a task of its own) before its stream is closed. An answer later than
/// this still reaches a closed stream.
const LINGER: Duration = Duration::from_secs(120);

/// The longest hybrid vsock answer we read (`OK <u32>\n` is at most 14
/// bytes).
const MAX_ANSWER: usize = 64;

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
    /// Connects to `port` in the guest within [`CONNECT_TIMEOUT`]; see
    /// [`VsockConnector::connect_timeout`].
    pub async fn connect(&self, port: u32) -> io::Result<VsockStream> {
        self.connect_timeout(port, CONNECT_TIMEOUT).await
    }

    /// Connects to `port` in the guest. Fails (rather than waits) while
    /// nothing in the guest listens on the port (`ConnectionRefused`), and
    /// with `TimedOut` if the whole connect (socket connect and, for hybrid
    /// vsock, the handshake) takes longer than `timeout`. A hybrid handshake
    /// cut short (by `timeout`, or by the caller dropping this future) runs
    /// on until the backend answers, at most [`LINGER`], and its stream is
    /// closed then (see the module documentation).
    pub async fn connect_timeout(&self, port: u32, timeout: Duration) -> io::Result<VsockStream> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("vsock port {port}: not connected within {timeout:?}"),
            )
        };
        match self {
            VsockConnector::Vhost { guest_cid } => {
                let addr = tokio_vsock::VsockAddr::new(*guest_cid, port);
                match tokio::time::timeout(timeout, tokio_vsock::VsockStream::connect(addr)).await {
                    Ok(r) => Ok(VsockStream::Vsock(r?)),
                    Err(_) => Err(timed_out()),
                }
            }
            VsockConnector::Hybrid { uds } => {
                let uds = uds.clone();
                // Dropping the handle (on timeout, or with this future)
                // leaves the task running: it owns the stream until the
                // answer comes.
                let mut handshake = tokio::spawn(async move {
                    tokio::time::timeout(LINGER, hybrid_connect(&uds, port)).await
                });
                match tokio::time::timeout(timeout, &mut handshake).await {
                    Ok(Ok(Ok(r))) => Ok(VsockStream::Unix(r?)),
                    Ok(Ok(Err(_))) | Err(_) => Err(timed_out()),
                    Ok(Err(join)) => Err(io::Error::other(format!(
                        "vsock port {port}: handshake task: {join}"
                    ))),
                }
            }
        }
    }
}

/// Connects to the hybrid vsock backend at `uds` and asks for `port`.
async fn hybrid_connect(uds: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Byte by byte: bytes after the answer belong to the caller.
    // At most MAX_ANSWER of them: a peer that never sends '\n'
    // must not grow our buffer.
    let mut line = Vec::with_capacity(MAX_ANSWER);
    let mut reader = BufReader::with_capacity(1, &mut s).take(MAX_ANSWER as u64);
    reader.read_until(b'\n', &mut line).await?;
    check_answer(port, &line)?;
    Ok(s)
}

/// Accepts exactly `OK <number>\n` (the number is the host-side port the
/// backend assigned, not the guest's).
fn check_answer(port: u32, line: &[u8]) -> io::Result<()> {
    let Some(answer) = line.strip_suffix(b"\n") else {
        return Err(if line.len() >= MAX_ANSWER {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("hybrid vsock port {port}: answer longer than {MAX_ANSWER} bytes"),
            )
        } else {
            // What the backend does when nothing in the guest listens.
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("hybrid vsock refused port {port}: connection closed"),
            )
        });
    };
    let ok = answer
        .strip_prefix(b"OK ")
        .and_then(|n| std::str::from_utf8(n).ok())
        .is_some_and(|n| n.parse::<u32>().is_ok());
    if ok {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "hybrid vsock port {port}: unexpected answer {:?}",
            String::from_utf8_lossy(answer)
        ),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A hybrid vsock backend that reads the CONNECT line and then does
    /// whatever `then` says with the connection.
    async fn backend<F, Fut>(
        then: F,
    ) -> (
        tempfile::TempDir,
        VsockConnector,
        tokio::task::JoinHandle<()>,
    )
    where
        F: FnOnce(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            BufReader::with_capacity(1, &mut s)
                .read_until(b'\n', &mut line)
                .await
                .unwrap();
            assert_eq!(line, b"CONNECT 1024\n");
            then(s).await;
        });
        (dir, VsockConnector::Hybrid { uds }, task)
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_times_out() {
        let (_dir, vsock, peer) = backend(|s| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        })
        .await;
        let t0 = std::time::Instant::now();
        let err = vsock
            .connect_timeout(1024, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let msg = err.to_string();
        assert!(msg.contains("1024") && msg.contains("200ms"), "{msg}");
        peer.abort();
    }

    /// vhost-device-vsock 0.3 panics if the host has closed a connection
    /// by the time the guest's answer comes: a handshake the caller gave up
    /// on stays open until the answer, and is closed after it.
    #[tokio::test]
    async fn an_abandoned_handshake_is_closed_only_after_the_answer() {
        let (_dir, vsock, peer) = backend(|mut s| async move {
            let mut buf = [0u8; 16];
            // Well after the caller gave up: still open (no EOF).
            let early = tokio::time::timeout(Duration::from_millis(400), s.read(&mut buf)).await;
            assert!(early.is_err(), "closed before the answer: {early:?}");
            s.write_all(b"OK 77\n").await.unwrap();
            // Then closed, without the caller.
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the abandoned handshake was not closed after the answer")
                .unwrap();
            assert_eq!(n, 0);
        })
        .await;
        // The caller drops the future mid-handshake, as the boot's short
        // attempts do (an elapsed `connect_timeout` drops it the same way).
        let gave_up = tokio::time::timeout(Duration::from_millis(50), vsock.connect(1024)).await;
        assert!(gave_up.is_err());
        tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_sends_garbage_forever_is_cut_off() {
        let (_dir, vsock, peer) = backend(|mut s| async move {
            let junk = [b'O'; 4096];
            // Until the client hangs up.
            while s.write_all(&junk).await.is_ok() {}
        })
        .await;
        let err = vsock.connect(1024).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("port 1024"), "{err}");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn answers_are_parsed_strictly() {
        for (answer, kind) in [
            (&b"OK nope\n"[..], io::ErrorKind::InvalidData),
            (b"ERR\n", io::ErrorKind::InvalidData),
            (b"OK 12", io::ErrorKind::ConnectionRefused),
            (b"", io::ErrorKind::ConnectionRefused),
        ] {
            let (_dir, vsock, peer) = backend(move |mut s| async move {
                s.write_all(answer).await.unwrap();
            })
            .await;
            let err = vsock.connect(1024).await.err().unwrap();
            assert_eq!(err.kind(), kind, "{answer:?}: {err}");
            peer.await.unwrap();
        }
    }

    #[tokio::test]
    async fn bytes_after_the_answer_belong_to_the_caller() {
        let (_dir, vsock, peer) = backend(|mut s| async move {
            s.write_all(b"OK 4321\nhello").await.unwrap();
        })
        .await;
        let mut stream = vsock.connect(1024).await.unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello");
        peer.await.unwrap();
    }
}
