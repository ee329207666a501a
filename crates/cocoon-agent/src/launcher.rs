//! The agent's side of the helper ([`crate::helper`]): places the
//! container's stdio on the helper's fds 3-5, runs it, and reads what it
//! prints. Both output streams are read at once (a helper that fills one
//! pipe while the agent waits on the other would never finish), and only
//! so much of each is kept: the pid from stdout, the end of stderr.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use cocoon_protocols::Id;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::helper::STDIO_FDS;
use crate::reaper::{ExitStatus, Launch};

/// How much of the helper's stdout is kept: it prints one pid.
pub const KEEP_STDOUT: usize = 4096;
/// How much of the helper's stderr is kept for the error message: the end,
/// where the reason is.
pub const KEEP_STDERR: usize = 64 * 1024;

/// The helper's operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Creates a container (its init waits for start).
    Create,
    /// Starts a process in a running container.
    Exec,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Exec => "exec",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("move the container's stdio above fd {}", FIRST_FREE_FD - 1)]
    PlaceStdio(#[source] nix::Error),
    #[error("spawn the helper")]
    Spawn(#[source] std::io::Error),
    #[error("read the helper's output")]
    Read(#[source] std::io::Error),
    /// The helper failed; its message is the end of its stderr.
    #[error("{message}")]
    Failed { status: ExitStatus, message: String },
    #[error("the helper printed {0:?}, not a pid")]
    NoPid(String),
}

/// What a finished command left: its status and the kept output.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Kept,
    pub stderr: Kept,
}

/// The part of a stream that was kept, and how long the stream was.
#[derive(Debug, Default)]
pub struct Kept {
    pub data: Vec<u8>,
    pub len: u64,
}

impl Kept {
    /// How many bytes were not kept.
    pub fn cut(&self) -> u64 {
        self.len - self.data.len() as u64
    }
}

/// Runs the helper for `op` on container `id` (`path` is the bundle for
/// create, the process file for exec) with `stdio` as the process's stdin,
/// stdout and stderr; returns the pid of the process it made.
pub async fn run(
    launch: &Launch,
    op: Op,
    id: &Id,
    path: &Path,
    container_root: &Path,
    stdio: [OwnedFd; 3],
    console: Option<&Path>,
) -> Result<i32, LaunchError> {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(crate::helper::ARG)
        .arg(op.as_str())
        .arg(id.as_str())
        .arg(path)
        .arg(container_root);
    if let Some(c) = console {
        cmd.arg(c);
    }
    let done = run_command(launch, &mut cmd, stdio).await?;
    let stdout = String::from_utf8_lossy(&done.stdout.data);
    if done.status != 0 {
        let stderr = String::from_utf8_lossy(&done.stderr.data)
            .trim()
            .to_string();
        let message = match (stderr.is_empty(), done.stderr.cut()) {
            (true, _) => format!("the helper exited with status {}", done.status),
            (false, 0) => stderr,
            (false, cut) => format!("[first {cut} bytes of the helper's message cut] {stderr}"),
        };
        return Err(LaunchError::Failed {
            status: done.status,
            message,
        });
    }
    stdout
        .trim()
        .parse()
        .map_err(|_| LaunchError::NoPid(stdout.into_owned()))
}

/// The lowest fd the container's stdio may sit on in the agent while the
/// helper is set up: above 0-2 (which the child's own stdio replaces first)
/// and above the fds they move to.
const FIRST_FREE_FD: RawFd = 1 + STDIO_FDS[STDIO_FDS.len() - 1];

/// Copies of `fds` numbered [`FIRST_FREE_FD`] or above (close-on-exec), so
/// that placing one on its target fd can never overwrite another still to
/// be placed, whatever numbers they had: PID 1 may start with fds 0-2
/// closed, so a pipe can be fd 0.
fn place_above(fds: [OwnedFd; 3]) -> nix::Result<[OwnedFd; 3]> {
    let [a, b, c] = fds;
    let dup = |fd: OwnedFd| -> nix::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIRST_FREE_FD),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC just made this fd; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    Ok([dup(a)?, dup(b)?, dup(c)?])
}

/// Spawns `cmd` with `stdio` on fds 3-5 and its stdout and stderr piped,
/// reads both to their end, and waits for it.
async fn run_command(
    launch: &Launch,
    cmd: &mut Command,
    stdio: [OwnedFd; 3],
) -> Result<Finished, LaunchError> {
    let stdio = place_above(stdio).map_err(LaunchError::PlaceStdio)?;
    let raw: [RawFd; 3] = [0, 1, 2].map(|i| stdio[i].as_raw_fd());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe and the closure allocates nothing.
    // The sources stay open in the parent (owned by `stdio`) until spawn
    // returns, and all are at or above FIRST_FREE_FD, so neither the
    // child's stdio set-up nor an earlier dup2 here has replaced them.
    unsafe {
        cmd.pre_exec(move || {
            for (src, dst) in raw.iter().zip(STDIO_FDS) {
                if libc::dup2(*src, dst) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let (mut child, status) = launch.spawn(cmd).map_err(LaunchError::Spawn)?;
    drop(stdio);
    let out = child.stdout.take().map(OwnedFd::from);
    let err = child.stderr.take().map(OwnedFd::from);
    let (stdout, stderr) = tokio::join!(
        read_pipe(out, Keep::Head(KEEP_STDOUT)),
        read_pipe(err, Keep::Tail(KEEP_STDERR)),
    );
    let status = status.await.unwrap_or(-1);
    Ok(Finished {
        status,
        stdout: stdout.map_err(LaunchError::Read)?,
        stderr: stderr.map_err(LaunchError::Read)?,
    })
}

/// Which part of a stream to keep.
#[derive(Debug, Clone, Copy)]
enum Keep {
    Head(usize),
    Tail(usize),
}

impl Keep {
    /// Adds `data` to `kept`, keeping no more than asked (a tail may hold
    /// up to twice its size between calls, so that it is not moved on
    /// every read).
    fn add(self, kept: &mut Vec<u8>, data: &[u8]) {
        match self {
            Keep::Head(max) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&data[..room.min(data.len())]);
            }
            Keep::Tail(max) => {
                kept.extend_from_slice(data);
                if kept.len() > 2 * max {
                    kept.drain(..kept.len() - max);
                }
            }
        }
    }

    fn finish(self, kept: &mut Vec<u8>) {
        if let Keep::Tail(max) = self {
            if kept.len() > max {
                kept.drain(..kept.len() - max);
            }
        }
    }
}

async fn read_pipe(fd: Option<OwnedFd>, keep: Keep) -> std::io::Result<Kept> {
    match fd {
        Some(fd) => read_bounded(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?, keep).await,
        None => Ok(Kept::default()),
    }
}

/// Reads `r` to its end, keeping the part `keep` says.
async fn read_bounded(mut r: impl AsyncRead + Unpin, keep: Keep) -> std::io::Result<Kept> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut kept = Kept::default();
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        kept.len += n as u64;
        keep.add(&mut kept.data, &buf[..n]);
    }
    keep.finish(&mut kept.data);
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[tokio::test]
    async fn keeps_the_head_or_the_tail() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let head = read_bounded(&data[..], Keep::Head(1000)).await.unwrap();
        assert_eq!(head.data, data[..1000]);
        assert_eq!((head.len, head.cut()), (100_000, 99_000));
        let tail = read_bounded(&data[..], Keep::Tail(1000)).await.unwrap();
        assert_eq!(tail.data, data[data.len() - 1000..]);
        assert_eq!(tail.cut(), 99_000);
        let short = read_bounded(&data[..10], Keep::Tail(1000)).await.unwrap();
        assert_eq!(short.data, data[..10]);
        assert_eq!(short.cut(), 0);
    }

    #[test]
    fn stdio_is_moved_above_its_targets() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let null = std::fs::File::open("/dev/null").map(OwnedFd::from).unwrap();
        let placed = place_above([r, w, null]).unwrap();
        for fd in &placed {
            assert!(fd.as_raw_fd() >= FIRST_FREE_FD);
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "copy is not close-on-exec");
        }
    }

    /// The one test here that spawns processes: its reaper reaps every
    /// child of the test binary.
    #[tokio::test]
    async fn a_helper_flooding_stderr_finishes_and_its_fds_are_in_place() {
        use std::io::Write;
        let reaper = crate::reaper::Reaper::default();
        reaper.start().unwrap();
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let ((in_r, in_w), (out_r, out_w), (err_r, err_w)) = (pipe(), pipe(), pipe());
        std::fs::File::from(in_w).write_all(b"hello\n").unwrap();
        // 300 KiB of stderr before any stdout: reading stdout to its end
        // first would wait for ever on a child blocked writing stderr.
        let script = "head -c 307200 /dev/zero | tr '\\0' e >&2; \
                      echo to-out >&4; echo to-err >&5; read x <&3; echo \"got $x\" >&4; \
                      echo 4242";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        let launch = reaper.launch();
        let done = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            run_command(&launch, &mut cmd, [in_r, out_w, err_w]),
        )
        .await
        .expect("the helper's output was not drained")
        .unwrap();
        let stderr = &done.stderr;
        assert_eq!(done.status, 0, "{}", String::from_utf8_lossy(&stderr.data));
        assert_eq!(done.stdout.data, b"4242\n");
        assert_eq!(stderr.len, 307_200);
        assert_eq!(stderr.data.len(), KEEP_STDERR);
        assert!(stderr.data.iter().all(|&b| b == b'e'));
        let mut out = String::new();
        std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
        assert_eq!(out, "to-out\ngot hello\n");
        let mut err = String::new();
        std::fs::File::from(err_r).read_to_string(&mut err).unwrap();
        assert_eq!(err, "to-err\n");
    }
}
