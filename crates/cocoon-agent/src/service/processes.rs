//! Processes: starting one through the helper (pipes or a terminal), and
//! watching, waiting for, signalling and resizing the container's init and
//! its execs.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use cocoon_protocols::{Error, Id};
use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};

use super::{chain, internal, process_name, Agent, Exit, Process, Result, CONTAINER_ROOT};
use crate::launcher::{self, Op};
use crate::reaper::ExitStatus;
use crate::stdio;

/// A process the helper has made, not yet recorded.
pub struct Started {
    pid: i32,
    host: stdio::HostEnds,
    pty_master: Option<OwnedFd>,
    exited: oneshot::Receiver<ExitStatus>,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Agent {
    /// Creates a process through the helper: with pipes, or with a terminal
    /// made in the container and received on a console socket.
    pub(super) async fn start_process(
        &self,
        op: Op,
        id: &Id,
        path: &Path,
        terminal: bool,
    ) -> Result<Started> {
        // Open before the helper runs: the process may exit before its pid
        // is known.
        let launch = self.reaper.launch();
        let root = Path::new(CONTAINER_ROOT);
        let failed = |e: launcher::LaunchError| Error::Internal(chain(&e));
        if !terminal {
            let made = stdio::pipes().map_err(internal("stdio pipes"))?;
            let pid = launcher::run(&launch, op, id, path, root, made.container, None)
                .await
                .map_err(failed)?;
            return Ok(Started {
                pid,
                host: made.host,
                pty_master: None,
                exited: launch.claim(pid),
            });
        }
        let socket = stdio::ConsoleSocket::listen().map_err(internal("console socket"))?;
        let null = || {
            std::fs::File::open("/dev/null")
                .map(OwnedFd::from)
                .map_err(internal("/dev/null"))
        };
        let pid = launcher::run(
            &launch,
            op,
            id,
            path,
            root,
            [null()?, null()?, null()?],
            Some(socket.path()),
        )
        .await
        .map_err(failed)?;
        let exited = launch.claim(pid);
        let made = tokio::task::spawn_blocking(move || socket.receive())
            .await
            .map_err(internal("console socket task"))?
            .map_err(internal(format!("terminal of {id}")))?;
        Ok(Started {
            pid,
            host: made.host,
            pty_master: made.pty_master,
            exited,
        })
    }

    /// Records a started process, its stdio and its exit; returns its pid.
    pub(super) fn track(&self, container_id: &Id, exec_id: Option<&Id>, p: Started) -> i32 {
        let (tx, rx) = watch::channel(None);
        let ledger = self.oom.ledger.clone();
        let init_of = exec_id.is_none().then(|| container_id.clone());
        let exited = p.exited;
        tokio::spawn(async move {
            let status = exited.await.unwrap_or(255);
            let at_nanos = now_nanos();
            // Read before anything can remove the cgroup; the poller may
            // not have looked since the kill.
            let oom_killed = init_of.is_some_and(|id| ledger.take_new(&id));
            let _ = tx.send(Some(Exit {
                status,
                at_nanos,
                oom_killed,
            }));
        });
        self.stdio
            .insert(container_id.clone(), exec_id.cloned(), p.host);
        let mut map = self.containers.lock().unwrap();
        if let Some(c) = map.get_mut(container_id) {
            c.processes.insert(
                exec_id.cloned(),
                Process {
                    pid: p.pid,
                    exit: rx,
                    pty_master: p.pty_master.map(Arc::new),
                },
            );
        }
        p.pid
    }

    /// Starts `process` in a running container as exec `exec_id`; returns its pid.
    pub(super) async fn exec_process(
        &self,
        container_id: &Id,
        exec_id: &Id,
        mut process: oci_spec::runtime::Process,
        terminal: bool,
    ) -> Result<i32> {
        let bundle = {
            let map = self.containers.lock().unwrap();
            let c = map
                .get(container_id)
                .ok_or_else(|| Error::NotFound(format!("container {container_id} not found")))?;
            if c.processes.contains_key(&Some(exec_id.clone())) {
                return Err(Error::AlreadyExists(format!(
                    "exec {exec_id} already exists in container {container_id}"
                )));
            }
            if c.processes
                .get(&None)
                .is_some_and(|p| p.exit.borrow().is_some())
            {
                return Err(Error::FailedPrecondition(format!(
                    "container {container_id} is not running"
                )));
            }
            c.bundle.clone()
        };
        process.set_terminal(Some(terminal));
        super::spec::drop_lsm_labels(&mut process, container_id);
        let path = bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process).map_err(internal("encode the OCI process"))?;
        std::fs::write(&path, json).map_err(internal(format!("write {}", path.display())))?;
        let started = self
            .start_process(Op::Exec, container_id, &path, terminal)
            .await;
        let _ = std::fs::remove_file(&path);
        let pid = self.track(container_id, Some(exec_id), started?);
        tracing::info!(container = %container_id, exec = %exec_id, pid, "exec");
        Ok(pid)
    }

    /// Waits for the process to exit.
    pub(super) async fn wait_process(
        &self,
        container_id: &Id,
        exec_id: Option<&Id>,
    ) -> Result<Exit> {
        let mut rx = self.process(container_id, exec_id, |p| p.exit.clone())?;
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Internal("process watch closed".into()))?
            .unwrap_or(Exit {
                status: 255,
                at_nanos: 0,
                oom_killed: false,
            });
        Ok(exit)
    }

    /// Signals the process, or with `all` every process of the container.
    pub(super) fn signal_process(
        &self,
        container_id: &Id,
        exec_id: Option<&Id>,
        sig: Signal,
        all: bool,
    ) -> Result<()> {
        let (pid, exited) = self.process(container_id, exec_id, |p| {
            (p.pid, p.exit.borrow().is_some())
        })?;
        if all {
            for p in super::cgroups::pids(container_id)? {
                let _ = nix::sys::signal::kill(p, sig);
            }
            return Ok(());
        }
        if exited {
            return Err(Error::NotFound(format!(
                "{} (pid {pid}) has exited",
                process_name(container_id, exec_id)
            )));
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| Error::Internal(format!("signal {sig} to pid {pid}: {e}")))
    }

    /// Closes the process's stdin if no stream has taken it.
    pub(super) fn close_stdin(&self, container_id: &Id, exec_id: Option<&Id>) -> Result<()> {
        let known = self.process(container_id, exec_id, |_| ());
        self.stdio.close_stdin(container_id, exec_id);
        known
    }

    /// Resizes the process's terminal.
    pub(super) fn resize_tty(
        &self,
        container_id: &Id,
        exec_id: Option<&Id>,
        rows: u16,
        columns: u16,
    ) -> Result<()> {
        let pty = self
            .process(container_id, exec_id, |p| p.pty_master.clone())?
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "{} has no terminal",
                    process_name(container_id, exec_id)
                ))
            })?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // outlives the call; the fd is a pty master we own.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::Internal(format!(
                "resize tty: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}
