//! The one owner of `waitpid`: as PID 1 the agent inherits every orphan, so
//! one loop reaps all children and hands each status to whoever asked for
//! that pid. A status that arrives before anyone asks is kept until asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// An exit: code, or 128 + signal.
pub type ExitStatus = i32;

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    unclaimed: HashMap<i32, ExitStatus>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl Reaper {
    /// Starts the reaping loop.
    pub fn start(&self) -> std::io::Result<()> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all();
                sigchld.recv().await;
            }
        });
        Ok(())
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            let mut inner = self.inner.lock().unwrap();
            match inner.waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(status);
                }
                None => {
                    inner.unclaimed.insert(pid.as_raw(), status);
                }
            }
        }
    }

    /// The exit status of `pid`, a child or an orphan inherited by PID 1.
    pub fn watch(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap();
        match inner.unclaimed.remove(&pid) {
            Some(status) => {
                let _ = tx.send(status);
            }
            None => {
                inner.waiters.insert(pid, tx);
            }
        }
        rx
    }

    /// Spawns `cmd` and watches it, with the reaper locked so the exit can
    /// not be reaped before it is watched.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, oneshot::Receiver<ExitStatus>)> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap();
        let child = cmd.spawn()?;
        inner.unclaimed.remove(&(child.id() as i32));
        inner.waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }
}
