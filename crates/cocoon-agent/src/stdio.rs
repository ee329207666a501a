//! Process stdio and the stream port.
//!
//! Each process gets pipes (or a pty). The agent keeps its ends here until the
//! host opens a stream for them on [`cocoon_protocols::STREAM_PORT`]; until
//! then output waits in the pipe, so nothing is lost. A stream ends when its
//! source does: stdout/stderr at the last writer's exit, stdin when the host
//! closes the stream (then the process sees EOF).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use cocoon_protocols::{StreamHeader, StreamKind};
use nix::fcntl::OFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The agent's ends of one process's stdio.
#[derive(Default)]
pub struct HostEnds {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

/// The container's ends (stdin, stdout, stderr), and for a terminal the pty
/// master kept for resizing.
pub struct Made {
    pub host: HostEnds,
    pub container: [OwnedFd; 3],
    pub pty_master: Option<OwnedFd>,
}

pub fn make(terminal: bool) -> nix::Result<Made> {
    if terminal {
        let pty = nix::pty::openpty(None, None)?;
        let master = pty.master;
        let slave = pty.slave;
        // openpty(3) leaves both ends inheritable; other helpers must not
        // inherit them, or the terminal would never see its last close.
        for fd in [&master, &slave] {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )?;
        }
        let host = HostEnds {
            stdin: Some(File::from(master.try_clone().map_err(io_errno)?)),
            stdout: Some(File::from(master.try_clone().map_err(io_errno)?)),
            stderr: None,
        };
        let container = [
            slave.try_clone().map_err(io_errno)?,
            slave.try_clone().map_err(io_errno)?,
            slave,
        ];
        return Ok(Made {
            host,
            container,
            pty_master: Some(master),
        });
    }
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok(Made {
        host: HostEnds {
            stdin: Some(File::from(in_w)),
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
        },
        container: [in_r, out_w, err_w],
        pty_master: None,
    })
}

fn io_errno(e: std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

type Key = (String, String);

/// Agent-side stdio ends waiting for their streams.
#[derive(Clone, Default)]
pub struct StdioTable {
    inner: Arc<Mutex<HashMap<Key, HostEnds>>>,
}

impl StdioTable {
    pub fn insert(&self, container_id: &str, exec_id: &str, ends: HostEnds) {
        self.inner
            .lock()
            .unwrap()
            .insert((container_id.into(), exec_id.into()), ends);
    }

    fn take(&self, h: &StreamHeader) -> Option<File> {
        let mut map = self.inner.lock().unwrap();
        let ends = map.get_mut(&(h.container_id.clone(), h.exec_id.clone()))?;
        match h.kind {
            StreamKind::Stdin => ends.stdin.take(),
            StreamKind::Stdout => ends.stdout.take(),
            StreamKind::Stderr => ends.stderr.take(),
        }
    }

    /// Closes a process's stdin if no stream has taken it.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) {
        if let Some(e) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(&(container_id.into(), exec_id.into()))
        {
            e.stdin = None;
        }
    }

    /// Forgets every process of a container.
    pub fn remove_container(&self, container_id: &str) {
        self.inner
            .lock()
            .unwrap()
            .retain(|(c, _), _| c != container_id);
    }

    /// Serves the stream port.
    pub async fn serve(self, port: u32) -> std::io::Result<()> {
        let addr = tokio_vsock::VsockAddr::new(libc::VMADDR_CID_ANY, port);
        let listener = tokio_vsock::VsockListener::bind(addr)?;
        loop {
            let (conn, _) = listener.accept().await?;
            let table = self.clone();
            tokio::spawn(async move {
                if let Err(e) = table.attach(conn).await {
                    tracing::warn!("stream: {e}");
                }
            });
        }
    }

    async fn attach(&self, mut conn: tokio_vsock::VsockStream) -> std::io::Result<()> {
        let mut line = Vec::new();
        loop {
            let b = conn.read_u8().await?;
            if b == b'\n' {
                break;
            }
            line.push(b);
            if line.len() > 512 {
                return Err(std::io::Error::other("stream header too long"));
            }
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        let header = StreamHeader::decode(&text)
            .ok_or_else(|| std::io::Error::other(format!("bad stream header {text:?}")))?;
        let Some(file) = self.take(&header) else {
            return Err(std::io::Error::other(format!("no unclaimed {text:?}")));
        };
        let mut file = tokio::fs::File::from_std(file);
        match header.kind {
            StreamKind::Stdin => {
                tokio::io::copy(&mut conn, &mut file).await?;
                file.flush().await?;
            }
            StreamKind::Stdout | StreamKind::Stderr => {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match file.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => n,
                        // A pty master reads EIO once the last slave closes.
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                        Err(e) => return Err(e),
                    };
                    conn.write_all(&buf[..n]).await?;
                }
                conn.flush().await?;
                conn.shutdown(std::net::Shutdown::Both)?;
            }
        }
        Ok(())
    }
}
