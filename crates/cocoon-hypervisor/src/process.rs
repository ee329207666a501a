//! Child processes the VM owns: spawned with their output in a size-capped
//! log, killed on drop, reaped on every path.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::logfile::{LogPump, LOG_CAP};
use crate::{Error, Result};

/// A helper daemon or the VMM itself.
pub(crate) struct Daemon {
    pub what: &'static str,
    child: Child,
    /// Its stdout and stderr. Declared after `child`: dropping the daemon
    /// kills the process first, then drains and joins the pump.
    log: LogPump,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr going into a capped log at `log`.
    /// `pass_fds` are inherited by the child under their own numbers (the
    /// caller names them on the command line); the parent's copies are
    /// closed once the child runs. `lend_fds` are inherited the same way,
    /// and the parent's copies stay the caller's to close. The child joins
    /// the cgroups whose `cgroup.procs` files `join` holds before it execs
    /// (see [`crate::VmSpec::cgroup_procs`]).
    pub fn spawn(
        what: &'static str,
        mut cmd: Command,
        log: &Path,
        pass_fds: Vec<OwnedFd>,
        lend_fds: &[BorrowedFd<'_>],
        join: &[BorrowedFd<'_>],
    ) -> Result<Self> {
        let program = Path::new(cmd.as_std().get_program()).to_path_buf();
        // Blocking writer: the daemons treat a failed write to stderr as an
        // error (Rust's eprintln! panics). The pump drains continuously, so a
        // full pipe only slows a daemon that logs at disk speed.
        let (pump, out) = LogPump::start(what, log, LOG_CAP, false)?;
        let err = out.try_clone().map_err(|source| Error::Io {
            action: "duplicate log pipe",
            path: log.into(),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        // Own process group: a Ctrl-C at the terminal reaches Cocoon, which
        // then stops the VM in order, instead of killing QEMU under it.
        cmd.process_group(0);
        let inherit: Vec<RawFd> = pass_fds
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(lend_fds.iter().map(AsRawFd::as_raw_fd))
            .collect();
        // Close-on-exec in the parent and in the child: open until exec.
        let cgroups: Vec<RawFd> = join.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the forked child before exec and calls
        // only async-signal-safe functions (write, prctl, umask, fcntl); it
        // reads `cgroups` and `inherit` but allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // `0` is the writer: the child moves itself (v1 and v2)
                // before exec, so nothing of what it runs is charged to
                // the caller's cgroup.
                for fd in &cgroups {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // If the owner is SIGKILLed, the VM goes with it rather than
                // running on unowned. The death signal follows the spawning
                // thread: owners spawn from their main thread or a runtime
                // worker, which live as long as the owner does.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Sockets and files the daemon creates (QMP, vhost-user,
                // hybrid vsock) are for Cocoon alone, whatever our umask.
                libc::umask(0o077);
                // Our fds are close-on-exec so that no other child inherits
                // them; this child is meant to.
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what,
            path: program,
            source,
        })?;
        // The child holds its own copies now. Ours must go, or the pumps
        // would never see EOF: `cmd` still holds the log pipe's write end.
        drop(cmd);
        drop(pass_fds);
        tracing::debug!(what, pid = child.id(), "spawned");
        Ok(Self {
            what,
            child,
            log: pump,
        })
    }

    /// The last `n` lines of the log of a running daemon, as drained so far.
    pub fn log_tail(&self, n: usize) -> String {
        self.log.tail(n)
    }

    /// The last `n` lines of the log of a daemon that has exited: what it
    /// wrote before exiting is drained first.
    pub fn last_words(&mut self, n: usize) -> String {
        self.log.finish();
        self.log.tail(n)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// `Some(status)` if the process has exited.
    pub fn try_exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown status ({e})")),
        }
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(&mut self) -> String {
        match self.child.wait().await {
            Ok(st) => st.to_string(),
            Err(e) => format!("unknown status ({e})"),
        }
    }

    /// Waits up to `grace` for an exit, then SIGTERM, then SIGKILL; always
    /// reaps, then drains and joins the log pump.
    pub async fn stop(&mut self, grace: Duration) {
        self.end(grace).await;
        self.log.finish();
    }

    async fn end(&mut self, grace: Duration) {
        if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            return;
        }
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// Waits for `path` to appear while `daemon` runs, then makes it private.
pub(crate) async fn wait_for_socket(
    daemon: &mut Daemon,
    path: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return make_private(path);
        }
        if let Some(status) = daemon.try_exited() {
            return Err(Error::EarlyExit {
                what: daemon.what,
                status,
                log: daemon.last_words(20),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::SocketTimeout {
                what: daemon.what,
                path: path.into(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sets a socket a daemon created to mode 0600. The daemons run with umask
/// 077 already; this holds even for one that sets its own mode. Only a
/// socket is touched (never what a symlink points to).
pub(crate) fn make_private(path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        action: "restrict socket",
        path: path.into(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_socket() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a socket",
        )));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)
}
