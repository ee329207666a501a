//! Size-capped logs, fed through pipes.
//!
//! Everything a guest can make a host process print ends up here: the guest's
//! serial console, and the output of QEMU, virtiofsd and vhost-device-vsock
//! (a guest can make virtiofsd warn once per request). Each goes through a
//! pipe into a [`CappedLog`]: `<name>` plus one rotated `<name>.1`, together
//! never larger than the cap, so the guest cannot fill the host's disk and
//! the newest lines are always there for error reports. [`tail`] reads a
//! bounded amount from the end, never a whole file.
//!
//! One thread per pipe (a [`LogPump`]) drains it as fast as it can: a slow
//! disk costs old log lines, never a stalled writer for long.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{Error, Result};

/// The default total size of one log (`<name>` plus `<name>.1`).
pub const LOG_CAP: u64 = 1 << 20;

/// The most [`tail`] reads, whatever the number of lines asked for.
pub const TAIL_MAX_BYTES: u64 = 64 << 10;

/// The smallest cap [`CappedLog`] accepts: below it the rotation would churn.
const MIN_CAP: u64 = 1024;

/// What the pump reads per `read(2)`.
const PUMP_BUF: usize = 64 << 10;

/// What the pump drains in one go before it looks at its stop signal again,
/// and the most it drains after being told to stop (a writer that never
/// stops must not keep the pump, or whoever joins it, forever).
const PUMP_BUDGET: usize = 4 << 20;

/// The mode of every log file: the guest's output is nobody else's business.
const LOG_MODE: u32 = 0o600;

/// A log file that keeps its newest bytes within `cap`: once the current file
/// reaches half the cap it becomes `<name>.1` (replacing the older one) and a
/// new `<name>` starts. At least the newest `cap / 2` bytes are always on
/// disk, and a line cut by the rotation reads whole again across the files.
pub(crate) struct CappedLog {
    path: PathBuf,
    old: PathBuf,
    file: Option<File>,
    /// Bytes in the current file.
    len: u64,
    half: u64,
}

impl CappedLog {
    /// Starts an empty log at `path` (truncating one left by an earlier run,
    /// and removing its `.1`, so the cap holds from the first byte).
    pub fn create(path: &Path, cap: u64) -> Result<Self> {
        let old = rotated(path);
        match std::fs::remove_file(&old) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::Io {
                    action: "remove old log",
                    path: old,
                    source,
                })
            }
        }
        let file = open_log(path).map_err(|source| Error::Io {
            action: "create log",
            path: path.into(),
            source,
        })?;
        Ok(Self {
            path: path.into(),
            old,
            file: Some(file),
            len: 0,
            half: cap.max(MIN_CAP) / 2,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `buf`, rotating as needed.
    pub fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        // Only the newest `2 * half` bytes could survive anyway.
        let keep = (2 * self.half) as usize;
        if buf.len() > keep {
            buf = &buf[buf.len() - keep..];
        }
        while !buf.is_empty() {
            if self.len >= self.half || self.file.is_none() {
                self.rotate()?;
            }
            let room = (self.half - self.len) as usize;
            let n = room.min(buf.len());
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| io::Error::other("log file not open"))?;
            file.write_all(&buf[..n])?;
            self.len += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        // Closed first: if a step fails, the next write starts over with a
        // fresh (truncated) current file rather than writing past the cap.
        if self.file.take().is_some() && self.len > 0 {
            self.len = 0;
            std::fs::rename(&self.path, &self.old)?;
        }
        self.len = 0;
        self.file = Some(open_log(&self.path)?);
        Ok(())
    }
}

/// `<path>.1`.
fn rotated(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// Creates (or truncates) a log file, mode 0600 whatever the umask, without
/// following a symlink.
fn open_log(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(LOG_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // The umask could only take bits away from `mode`; an existing file keeps
    // its old mode. fchmod sets exactly what we mean.
    file.set_permissions(std::fs::Permissions::from_mode(LOG_MODE))?;
    Ok(file)
}

/// Reads at most `max` bytes from the end of `path`. Returns the bytes and
/// whether they start at the beginning of the file.
fn read_end(path: &Path, max: u64) -> io::Result<(Vec<u8>, bool)> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(len.min(max) as usize);
    // `take`: the file may grow while we read; we still read only `max`.
    f.take(max).read_to_end(&mut buf)?;
    Ok((buf, start == 0))
}

/// The last `lines` lines of the capped log at `path` (read across `path.1`
/// and `path`), reading at most [`TAIL_MAX_BYTES`]. Control characters the
/// guest may have printed are replaced, so the result is safe to put in an
/// error message or a terminal. A missing log reads as empty.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    if lines == 0 {
        return String::new();
    }
    let (mut bytes, mut whole) = read_end(path, TAIL_MAX_BYTES).unwrap_or((Vec::new(), true));
    if whole && (bytes.len() as u64) < TAIL_MAX_BYTES {
        let room = TAIL_MAX_BYTES - bytes.len() as u64;
        if let Ok((mut older, older_whole)) = read_end(&rotated(path), room) {
            older.extend_from_slice(&bytes);
            bytes = older;
            whole = older_whole;
        }
    }
    // A read that started mid-file starts mid-line: drop the fragment.
    let text: &[u8] = if whole {
        &bytes
    } else {
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => &bytes[i + 1..],
            None => &bytes,
        }
    };
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    if text.is_empty() {
        return String::new();
    }
    let all: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| sanitize(l.strip_suffix(b"\r").unwrap_or(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A line for humans: invalid UTF-8 and control characters (terminal escape
/// sequences included) become U+FFFD.
fn sanitize(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                char::REPLACEMENT_CHARACTER
            } else {
                c
            }
        })
        .collect()
}

/// A pipe drained into a [`CappedLog`] by a thread. Give [`LogPump::start`]'s
/// write end to the process whose output this is; the thread ends when every
/// copy of the write end is closed (the process exited), or when
/// [`LogPump::finish`] (or drop) tells it to, and is joined there.
pub(crate) struct LogPump {
    log: Arc<Mutex<CappedLog>>,
    /// Closing it (POLLHUP on the thread's end) tells the thread to stop.
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    /// Creates the log at `path` and the pipe into it; returns the pump and
    /// the pipe's write end (close-on-exec: the spawner passes it on).
    ///
    /// `nonblocking_writer` makes writes to a full pipe fail with EAGAIN
    /// instead of blocking the writer: for QEMU's console, whose serial
    /// device then retries later and drops bytes rather than stall.
    pub fn start(
        what: &'static str,
        path: &Path,
        cap: u64,
        nonblocking_writer: bool,
    ) -> Result<(Self, OwnedFd)> {
        let log = CappedLog::create(path, cap)?;
        let io_err = |action: &'static str| {
            let path = path.to_path_buf();
            move |e: nix::Error| Error::Io {
                action,
                path,
                source: e.into(),
            }
        };
        let (data_r, mut data_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err("create log pipe"))?;
        // A child is given the write end under its own number: never one of
        // 0-2 (free in an owner started with closed stdio), which the child's
        // stdio setup would overwrite. try_clone dups to 3 or above.
        if data_w.as_raw_fd() <= 2 {
            data_w = data_w.try_clone().map_err(|source| Error::Io {
                action: "create log pipe",
                path: path.into(),
                source,
            })?;
        }
        let (stop_r, stop_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io_err("create log pipe"))?;
        // The pump polls, so its end never blocks; the write end is another
        // open file description, unaffected.
        set_nonblocking(&data_r).map_err(io_err("set up log pipe"))?;
        if nonblocking_writer {
            set_nonblocking(&data_w).map_err(io_err("set up log pipe"))?;
        }
        let log = Arc::new(Mutex::new(log));
        let thread = {
            let log = log.clone();
            std::thread::Builder::new()
                .name(format!("log-{what}"))
                .stack_size(256 << 10)
                .spawn(move || pump(what, File::from(data_r), stop_r, &log))
                .map_err(|source| Error::Io {
                    action: "start log thread",
                    path: path.into(),
                    source,
                })?
        };
        Ok((
            Self {
                log,
                stop: Some(stop_w),
                thread: Some(thread),
            },
            data_w,
        ))
    }

    /// The last `lines` lines of the log (bounded; see [`tail`]).
    pub fn tail(&self, lines: usize) -> String {
        // Under the lock: no rotation between reading `.1` and the current file.
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        tail(log.path(), lines)
    }

    /// Drains what is left in the pipe (bounded), stops the thread and joins
    /// it. Call it once the writer has exited, so its last words are kept.
    pub fn finish(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // Bounded: the thread drains at most PUMP_BUDGET more bytes.
            if t.join().is_err() {
                tracing::warn!("log thread panicked");
            }
        }
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        self.finish();
    }
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// What one round of draining found.
enum Drained {
    /// The pipe is empty for now.
    Empty,
    /// Every writer has closed its end.
    Eof,
    /// The budget ran out with data still waiting.
    Budget,
}

/// The pump thread: copies `data` into `log` until EOF or a stop signal.
fn pump(what: &'static str, mut data: File, stop: OwnedFd, log: &Mutex<CappedLog>) {
    let mut buf = vec![0u8; PUMP_BUF];
    let mut failed = false;
    loop {
        let mut fds = [
            PollFd::new(data.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(what, "log pipe poll failed: {e}");
                return;
            }
        }
        let stopping = fds[1].any().unwrap_or(true);
        match drain(what, &mut data, &mut buf, log, &mut failed) {
            Drained::Eof => return,
            Drained::Empty | Drained::Budget if stopping => return,
            Drained::Empty | Drained::Budget => {}
        }
    }
}

/// Reads `data` until it is empty, closed, or [`PUMP_BUDGET`] bytes are copied.
fn drain(
    what: &'static str,
    data: &mut File,
    buf: &mut [u8],
    log: &Mutex<CappedLog>,
    failed: &mut bool,
) -> Drained {
    let mut copied = 0;
    while copied < PUMP_BUDGET {
        let n = match data.read(buf) {
            Ok(0) => return Drained::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(what, "log pipe read failed: {e}");
                return Drained::Eof;
            }
        };
        copied += n;
        let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
        // A failing disk costs log lines, never a stalled writer: keep
        // draining, and say so once.
        if let Err(e) = log.write(&buf[..n]) {
            if !*failed {
                tracing::warn!(what, path = %log.path().display(), "log write failed: {e}");
                *failed = true;
            }
        }
    }
    Drained::Budget
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_size(path: &Path) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        size(path) + size(&rotated(path))
    }

    #[test]
    fn ten_times_the_cap_stays_under_it_and_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let cap = 64 << 10;
        let mut log = CappedLog::create(&path, cap).unwrap();
        let mut written = 0u64;
        let mut i = 0u64;
        while written < 10 * cap {
            let line = format!("line {i} {}\n", "x".repeat((i % 97) as usize));
            // Odd-sized writes, split mid-line, like a pipe delivers them.
            for chunk in line.as_bytes().chunks(7) {
                log.write(chunk).unwrap();
            }
            written += line.len() as u64;
            i += 1;
            assert!(total_size(&path) <= cap, "{} > {cap}", total_size(&path));
        }
        let last = tail(&path, 3);
        let want: Vec<String> = (i - 3..i)
            .map(|j| format!("line {j} {}", "x".repeat((j % 97) as usize)))
            .collect();
        assert_eq!(last, want.join("\n"));
        // One write far larger than the cap keeps only its end.
        let mut big = "y".repeat(10 * cap as usize);
        big.push_str("\nthe end\n");
        log.write(big.as_bytes()).unwrap();
        assert!(total_size(&path) <= cap);
        assert_eq!(tail(&path, 1), "the end");
    }

    #[test]
    fn logs_are_private_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.log");
        std::fs::write(&path, "left over").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(rotated(&path), "older").unwrap();
        let mut log = CappedLog::create(&path, MIN_CAP).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"", "truncated");
        assert!(!rotated(&path).exists(), "old rotation removed");
        log.write(&[b'a'; 2000]).unwrap();
        assert_eq!(mode(&rotated(&path)), 0o600);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn refuses_a_symlinked_log() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "keep me").unwrap();
        let path = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(CappedLog::create(&path, LOG_CAP).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert_eq!(tail(&path, 5), "", "tail does not follow it either");
    }

    #[test]
    fn tail_of_a_huge_file_reads_a_bounded_amount() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.log");
        // Sparse: 8 GiB of apparent size, nothing on disk but the end.
        let f = File::create(&path).unwrap();
        f.set_len(8 << 30).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"\none\ntwo\r\nthree\n").unwrap();
        // Reading the whole file would take the test minutes and 8 GiB.
        let t0 = std::time::Instant::now();
        assert_eq!(tail(&path, 2), "two\nthree");
        assert!(t0.elapsed() < std::time::Duration::from_secs(2));
        let (bytes, whole) = read_end(&path, TAIL_MAX_BYTES).unwrap();
        assert_eq!(bytes.len() as u64, TAIL_MAX_BYTES);
        assert!(!whole);
        // Many lines asked for: still bounded, the cut first line dropped.
        let all = tail(&path, usize::MAX);
        assert!(all.len() as u64 <= TAIL_MAX_BYTES);
        assert_eq!(all, "one\ntwo\nthree", "the cut (NUL) line is dropped");
    }

    #[test]
    fn tail_joins_the_rotated_file_and_neutralises_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        std::fs::write(rotated(&path), "a\nb\nhalf of a li").unwrap();
        std::fs::write(&path, "ne\n\x1b]0;pwned\x07c\n").unwrap();
        assert_eq!(
            tail(&path, 3),
            "b\nhalf of a line\n\u{fffd}]0;pwned\u{fffd}c"
        );
        assert_eq!(tail(&path, 0), "");
        assert_eq!(tail(&dir.path().join("missing"), 3), "");
    }

    #[test]
    fn pump_copies_until_the_writer_closes_and_is_joined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let (mut pump, w) = LogPump::start("test", &path, 4096, false).unwrap();
        let mut w = File::from(w);
        for i in 0..1000 {
            writeln!(w, "message {i}").unwrap();
        }
        drop(w);
        // EOF ends the thread by itself.
        let t0 = std::time::Instant::now();
        while !pump.thread.as_ref().unwrap().is_finished() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        pump.finish();
        assert!(total_size(&path) <= 4096);
        assert_eq!(pump.tail(2), "message 998\nmessage 999");
    }

    #[test]
    fn pump_stops_on_request_while_a_writer_still_holds_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let (mut pump, w) = LogPump::start("test", &path, 4096, true).unwrap();
        let mut w = File::from(w);
        w.write_all(b"last words\n").unwrap();
        // The writer (say, a daemon's forked child) never closes: finish
        // must still return, with what was written kept.
        pump.finish();
        assert_eq!(tail(&path, 1), "last words");
        // With the pump gone, a non-blocking writer gets EAGAIN (then EPIPE
        // would follow) rather than hanging.
        let err = loop {
            if let Err(e) = w.write(&[0u8; 4096]) {
                break e;
            }
        };
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::BrokenPipe
            ),
            "{err}"
        );
    }
}
