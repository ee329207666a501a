//! A process's stdio on the host side: containerd's fifos (or `file://`
//! URIs) copied to and from the process's vsock streams.

use std::path::Path;

use cocoon_hypervisor::VsockStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Where an output stream goes.
enum Sink {
    Discard,
    Fifo(tokio::net::unix::pipe::Sender),
    File(tokio::fs::File),
}

/// Opens containerd's destination for an output stream.
pub async fn open_output(
    uri: &str,
) -> Result<Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>> {
    let sink = if uri.is_empty() {
        Sink::Discard
    } else if let Some(path) = uri.strip_prefix("file://") {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| Error::InvalidArgument(format!("stdio file {path}: {e}")))?;
        Sink::File(f)
    } else if uri.contains("://") {
        return Err(Error::InvalidArgument(format!(
            "stdio URI {uri:?}: only fifos and file:// are supported"
        )));
    } else {
        let p = Path::new(uri);
        let s = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(p)
            .map_err(|e| Error::InvalidArgument(format!("stdio fifo {uri}: {e}")))?;
        Sink::Fifo(s)
    };
    Ok(match sink {
        Sink::Discard => None,
        Sink::Fifo(s) => Some(Box::new(s)),
        Sink::File(f) => Some(Box::new(f)),
    })
}

/// Copies a guest output stream to its destination until the stream ends.
pub async fn copy_out(
    mut stream: VsockStream,
    dest: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
) {
    match dest {
        Some(mut d) => {
            let _ = tokio::io::copy(&mut stream, &mut d).await;
            let _ = d.flush().await;
        }
        None => {
            let _ = tokio::io::copy(&mut stream, &mut tokio::io::sink()).await;
        }
    }
}

/// Opens containerd's stdin fifo.
pub fn open_input(uri: &str) -> Result<tokio::net::unix::pipe::Receiver> {
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(uri)
        .map_err(|e| Error::InvalidArgument(format!("stdin fifo {uri}: {e}")))
}

/// Copies stdin to the guest until containerd's side ends or CloseIO comes;
/// then closes the stream, which closes the process's stdin.
pub async fn copy_in(
    mut src: tokio::net::unix::pipe::Receiver,
    mut stream: VsockStream,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => if stream.write_all(&buf[..n]).await.is_err() { return },
            },
            _ = &mut close => {
                // Forward what is already in the fifo, then end.
                while let Ok(n) = src.try_read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = stream.shutdown().await;
}
