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

type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// A `binary://` logger, started as containerd's runc shim starts one: the
/// process's stdout and stderr reach it on fds 3 and 4, and it closes (or
/// writes to) fd 5 when it is ready. Query parameters become arguments
/// (`?key=value` → `key value`); `CONTAINER_ID` and `CONTAINER_NAMESPACE`
/// are set.
pub async fn spawn_binary(
    uri: &str,
    container_id: &str,
    namespace: &str,
) -> Result<(Writer, Writer, tokio::process::Child)> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let rest = uri.strip_prefix("binary://").unwrap_or(uri);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(k.to_string());
        if !v.is_empty() {
            args.push(v.to_string());
        }
    }
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Internal(format!("pipe: {e}")))
    };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let fds: [OwnedFd; 3] = [out_r, err_r, ready_w];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(&args)
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: dup2 is async-signal-safe; the fds stay open in the parent
    // (owned by `fds`) until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for (src, dst) in raw.iter().zip(3..) {
                if libc::dup2(*src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Error::InvalidArgument(format!("stdio binary {path}: {e}")))?;
    drop(fds);
    // Wait until the logger is ready (it writes or closes fd 5).
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::from(ready_r);
        let mut b = [0u8; 1];
        let _ = f.read(&mut b);
    });
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ready).await;
    let to_writer = |fd: OwnedFd| -> Result<Writer> {
        let f = std::fs::File::from(fd);
        Ok(Box::new(tokio::fs::File::from_std(f)))
    };
    Ok((to_writer(out_w)?, to_writer(err_w)?, child))
}

/// The most one read of a guest output stream takes: what the guest may
/// send before it waits for credit (tokio's `copy` would take 8 KiB, a
/// read and a write per 8 KiB). The buffer bounds what this copy holds:
/// while the destination does not drain, nothing more is read, and the
/// guest is left without credit.
const OUTPUT_CHUNK: usize = 256 * 1024;

/// Copies a guest output stream to its destination until the stream ends.
pub async fn copy_out(
    stream: VsockStream,
    dest: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
) {
    let mut stream = tokio::io::BufReader::with_capacity(OUTPUT_CHUNK, stream);
    match dest {
        Some(mut d) => {
            let _ = tokio::io::copy_buf(&mut stream, &mut d).await;
            let _ = d.flush().await;
        }
        None => {
            let _ = tokio::io::copy_buf(&mut stream, &mut tokio::io::sink()).await;
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

/// How long, once CloseIO has come, a write to the guest may wait: a
/// guest that stops reading its stdin must not keep this task (and the
/// fifo) for ever, but one that is merely slower gets every byte.
const STDIN_CLOSE_STALL: std::time::Duration = std::time::Duration::from_secs(10);

/// Copies stdin to the guest until containerd's side ends or CloseIO comes;
/// then forwards what is left in the fifo, and closes the stream, which
/// closes the process's stdin.
pub async fn copy_in(
    mut src: tokio::net::unix::pipe::Receiver,
    mut stream: VsockStream,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut closing = false;
    'copy: loop {
        let n = if closing {
            // containerd wrote everything before CloseIO: what the fifo
            // holds now is the rest.
            match src.try_read(&mut buf) {
                Ok(n) if n > 0 => n,
                _ => break,
            }
        } else {
            tokio::select! {
                r = src.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = &mut close => {
                    closing = true;
                    continue;
                }
            }
        };
        // `write` is cancel-safe: a write overtaken by CloseIO has written
        // nothing, and is tried again under the deadline.
        let mut off = 0;
        while off < n {
            let w = if closing {
                match tokio::time::timeout(STDIN_CLOSE_STALL, stream.write(&buf[off..n])).await {
                    Ok(w) => w,
                    Err(_) => break 'copy,
                }
            } else {
                tokio::select! {
                    w = stream.write(&buf[off..n]) => w,
                    _ = &mut close => {
                        closing = true;
                        continue;
                    }
                }
            };
            match w {
                Ok(0) | Err(_) => return,
                Ok(k) => off += k,
            }
        }
    }
    let _ = stream.shutdown().await;
}
