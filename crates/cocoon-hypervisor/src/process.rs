//! Child processes the VM owns: spawned with their output in a log file,
//! killed on drop, reaped on every path.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{Error, Result};

/// A helper daemon or the VMM itself.
pub(crate) struct Daemon {
    pub what: &'static str,
    child: Child,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(what: &'static str, mut cmd: Command, log: &Path) -> Result<Self> {
        let program = Path::new(cmd.as_std().get_program()).to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| Error::Io {
                action: "open log",
                path: log.into(),
                source,
            })?;
        let file2 = file.try_clone().map_err(|source| Error::Io {
            action: "open log",
            path: log.into(),
            source,
        })?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(file2))
            .kill_on_drop(true);
        // Own process group: a Ctrl-C at the terminal reaches Cocoon, which
        // then stops the VM in order, instead of killing QEMU under it.
        cmd.process_group(0);
        // If the owner is SIGKILLed, the VM goes with it rather than running
        // on unowned. The death signal follows the spawning thread: owners
        // spawn from their main thread or a runtime worker, which live as
        // long as the owner does.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            what,
            path: program,
            source,
        })?;
        tracing::debug!(what, pid = child.id(), "spawned");
        Ok(Self { what, child })
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

    /// Waits up to `grace` for an exit, then SIGTERM, then SIGKILL; always reaps.
    pub async fn stop(&mut self, grace: Duration) {
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

/// Waits for `path` to appear while `daemon` runs.
pub(crate) async fn wait_for_socket(
    daemon: &mut Daemon,
    path: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = daemon.try_exited() {
            return Err(Error::EarlyExit {
                what: daemon.what,
                status,
                log: tail(log, 20),
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

/// The last `n` lines of a log file.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
