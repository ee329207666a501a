//! Process stdio and the stream port.
//!
//! Each process gets pipes (or a pty). The agent keeps its ends here until the
//! host opens a stream for them on [`cocoon_protocols::STREAM_PORT`]; until
//! then output waits in the pipe, so nothing is lost. A stream ends when its
//! source does: stdout/stderr at the last writer's exit, stdin when the host
//! closes the stream (then the process sees EOF).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_protocols::{Id, StreamHeader, StreamKind};
use nix::fcntl::OFlag;

/// How long a new stream connection may take to name its stream.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The capacity asked of a process's stdout and stderr pipes: room for the
/// process to go on writing while the copier lingers (below) or waits for
/// the host's credit.
const OUTPUT_PIPE_SIZE: i32 = 256 * 1024;

/// The most one read of an output pipe takes, and so the most one write
/// to its stream sends: the host's vsock backend grants a connection this
/// much credit (the guest kernel never uses more than its own socket
/// buffer, 256 KiB by default, either).
const OUTPUT_CHUNK: usize = 256 * 1024;

/// How long the copier waits after a read that found less than half a
/// chunk. A process that writes in small pieces (stdio's 4 KiB, lines)
/// would otherwise wake the copier for each, and each piece would cost
/// two context switches, a vsock packet and a round trip through the host:
/// under emulation that costs more than producing the bytes (2 ms left
/// the copy's guest system time at two thirds of no wait at all; 10 ms at
/// under half). Output already read is sent at once, and the first bytes
/// after a quiet spell too: only what comes during the wait is delayed,
/// by at most this.
const LINGER: Duration = Duration::from_millis(10);

/// One read of a stdin stream (the host sends it in packets of at most
/// 4 KiB; a read takes every one queued).
const INPUT_CHUNK: usize = 64 * 1024;

/// Reads a stream header line, newline excluded.
async fn read_header(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    cocoon_protocols::read_line_bounded(conn, StreamHeader::MAX_LEN, "stream header").await
}

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

/// Pipes for a process without a terminal.
pub fn pipes() -> nix::Result<Made> {
    let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    for r in [&out_r, &err_r] {
        // A smaller pipe only means smaller batches: not worth failing for.
        let _ = nix::fcntl::fcntl(
            r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUTPUT_PIPE_SIZE),
        );
    }
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

/// The listening end of a console socket: the container's init (or exec)
/// creates its pty inside the container, so that it is the controlling
/// terminal there and named in the container's `/dev/pts`, and sends the
/// master here.
pub struct ConsoleSocket {
    path: std::path::PathBuf,
    listener: std::os::unix::net::UnixListener,
}

/// Where console sockets are made: a short path, so that a socket's path
/// fits in `sun_path` (108 bytes) whatever the ids (CRI's are 64 hex
/// digits each; a path built of two did not fit).
const CONSOLE_DIR: &str = "/run/cocoon/tty";

impl ConsoleSocket {
    /// Listens on a new socket of [`CONSOLE_DIR`].
    pub fn listen() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(CONSOLE_DIR)?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::path::Path::new(CONSOLE_DIR).join(format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        Ok(Self { path, listener })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Takes the pty master the container sent (it has connected by the
    /// time the helper succeeded), and makes the process's stdio of it.
    pub fn receive(self) -> std::io::Result<Made> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::FromRawFd;
        self.listener.set_nonblocking(true)?;
        let (conn, _) = self.listener.accept()?;
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let fd = msg
            .cmsgs()
            .map_err(std::io::Error::from)?
            .find_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                _ => None,
            })
            .ok_or_else(|| std::io::Error::other("no pty master on the console socket"))?;
        // SAFETY: SCM_RIGHTS just installed this fd in our table; we own it.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let host = HostEnds {
            stdin: Some(File::from(master.try_clone()?)),
            stdout: Some(File::from(master.try_clone()?)),
            stderr: None,
        };
        let null = || std::fs::File::open("/dev/null").map(OwnedFd::from);
        Ok(Made {
            host,
            container: [null()?, null()?, null()?],
            pty_master: Some(master),
        })
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A process: its container, and its exec id (`None` for the init).
type Key = (Id, Option<Id>);

/// Agent-side stdio ends waiting for their streams.
#[derive(Clone, Default)]
pub struct StdioTable {
    inner: Arc<Mutex<HashMap<Key, HostEnds>>>,
}

impl StdioTable {
    pub fn insert(&self, container_id: Id, exec_id: Option<Id>, ends: HostEnds) {
        self.inner
            .lock()
            .unwrap()
            .insert((container_id, exec_id), ends);
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
    pub fn close_stdin(&self, container_id: &Id, exec_id: Option<&Id>) {
        if let Some(e) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(&(container_id.clone(), exec_id.cloned()))
        {
            e.stdin = None;
        }
    }

    /// Forgets every process of a container.
    pub fn remove_container(&self, container_id: &Id) {
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
        let line = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn))
            .await
            .map_err(|_| std::io::Error::other("no stream header within 10s"))??;
        let text = String::from_utf8_lossy(&line).into_owned();
        let header = StreamHeader::decode(&text)
            .ok_or_else(|| std::io::Error::other(format!("bad stream header {text:?}")))?;
        let Some(file) = self.take(&header) else {
            return Err(std::io::Error::other(format!("no unclaimed {text:?}")));
        };
        // The copy runs on a blocking thread: a blocking read of a pipe is
        // woken only when the pipe was empty, where a polled one wakes the
        // reactor at every write; and no thread handoff per chunk.
        let conn = vsock::VsockStream::from(OwnedFd::from(conn));
        conn.set_nonblocking(false)?;
        tokio::task::spawn_blocking(move || match header.kind {
            StreamKind::Stdin => pump_input(&mut &conn, &mut &file),
            StreamKind::Stdout | StreamKind::Stderr => {
                pump_output(&mut &file, &mut &conn, LINGER)?;
                conn.shutdown(std::net::Shutdown::Both)
            }
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Copies a process's output to its stream until the last writer closes
/// it (a pty master reads EIO instead), in chunks of up to
/// [`OUTPUT_CHUNK`], lingering after short reads (see [`LINGER`]).
/// Returns the number of bytes copied.
fn pump_output(
    src: &mut impl Read,
    dst: &mut impl Write,
    linger: Duration,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once the last slave closes.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        total += n as u64;
        if n < OUTPUT_CHUNK / 2 {
            std::thread::sleep(linger);
        }
    }
    Ok(total)
}

/// Copies a stdin stream to the process until the host closes it.
fn pump_input(src: &mut impl Read, dst: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; INPUT_CHUNK];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_are_bounded() {
        let h = StreamHeader {
            kind: StreamKind::Stdout,
            container_id: Id::container(&"c".repeat(Id::MAX_LEN)).unwrap(),
            exec_id: Some(Id::exec(&"e".repeat(Id::MAX_LEN)).unwrap()),
        };
        let longest = h.encode();
        let line = read_header(&mut longest.as_bytes()).await.unwrap();
        assert_eq!(
            StreamHeader::decode(&String::from_utf8(line).unwrap()),
            Some(h)
        );
        let endless = vec![b'a'; 10 * StreamHeader::MAX_LEN];
        assert!(read_header(&mut &endless[..]).await.is_err());
    }

    /// A destination that records the size of each write.
    #[derive(Default)]
    struct Recorder {
        bytes: Vec<u8>,
        writes: Vec<usize>,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes.extend_from_slice(buf);
            self.writes.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_copied_exactly_and_small_writes_are_gathered() {
        let made = pipes().unwrap();
        let mut src = made.host.stdout.unwrap();
        let [_, out_w, _] = made.container;
        const PIECE: usize = 4096;
        const PIECES: usize = 512;
        let writer = std::thread::spawn(move || {
            let mut w = File::from(out_w);
            for i in 0..PIECES {
                // Not constant, so that a lost or repeated piece shows.
                let piece: Vec<u8> = (0..PIECE).map(|j| (i * 7 + j) as u8).collect();
                w.write_all(&piece).unwrap();
            }
        });
        let mut dst = Recorder::default();
        let n = pump_output(&mut src, &mut dst, LINGER).unwrap();
        writer.join().unwrap();
        assert_eq!(n, (PIECE * PIECES) as u64);
        let want: Vec<u8> = (0..PIECES)
            .flat_map(|i| (0..PIECE).map(move |j| (i * 7 + j) as u8))
            .collect();
        assert!(dst.bytes == want, "output changed on the way");
        assert!(
            dst.writes.len() < PIECES / 4,
            "{} writes for {PIECES} pieces: small writes were not gathered",
            dst.writes.len()
        );
        assert!(dst.writes.iter().all(|&w| w <= OUTPUT_CHUNK));
    }

    #[test]
    fn input_is_copied_until_the_stream_ends() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut dst = Vec::new();
        pump_input(&mut &data[..], &mut dst).unwrap();
        assert!(dst == data);
    }

    #[test]
    fn streams_are_found_by_process() {
        let t = StdioTable::default();
        let c1 = Id::container("c1").unwrap();
        let e1 = Id::exec("e1").unwrap();
        let made = pipes().unwrap();
        t.insert(c1.clone(), Some(e1.clone()), made.host);
        let header = |kind, exec_id| StreamHeader {
            kind,
            container_id: c1.clone(),
            exec_id,
        };
        assert!(t.take(&header(StreamKind::Stdout, None)).is_none());
        assert!(t
            .take(&header(StreamKind::Stdout, Some(e1.clone())))
            .is_some());
        assert!(
            t.take(&header(StreamKind::Stdout, Some(e1.clone())))
                .is_none(),
            "taken twice"
        );
        t.close_stdin(&c1, Some(&e1));
        assert!(t
            .take(&header(StreamKind::Stdin, Some(e1.clone())))
            .is_none());
        t.remove_container(&c1);
        assert!(t.take(&header(StreamKind::Stderr, Some(e1))).is_none());
    }
}
