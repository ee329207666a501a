//! The one owner of `waitpid`: as PID 1 the agent inherits every orphan, so
//! one loop reaps all children and hands each status to whoever asked for
//! that pid.
//!
//! Most processes are watched before they can exit (the helper is spawned
//! with its waiter registered under the lock). A container's init or exec
//! process is different: the helper creates it and only then prints its
//! pid, so it may exit before anyone can ask for it. Such exits are kept,
//! but only while a [`Launch`] is open, only if they were reaped after that
//! launch began, and never more than [`MAX_UNCLAIMED`] of them: an exit
//! reaped before a launch began cannot belong to a process the launch
//! created, so it is never handed to a reused pid; an exit reaped while no
//! launch is open belongs to no one who will ask, so it is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// An exit: code, or 128 + signal.
pub type ExitStatus = i32;

/// The most exits kept for launches still to claim them; the oldest go first.
pub const MAX_UNCLAIMED: usize = 1024;

/// An exit nobody was waiting for when it was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unclaimed {
    /// When it was reaped, in reaping order.
    seq: u64,
    pid: i32,
    status: ExitStatus,
}

/// The bookkeeping, free of system calls so that it is tested alone.
#[derive(Default)]
struct Table {
    /// Pids someone waits for; each is ours while it lives.
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
    /// Exits reaped while a launch was open and nobody waited for them, oldest first.
    unclaimed: VecDeque<Unclaimed>,
    /// Exits reaped so far.
    seq: u64,
    /// Launches open.
    launches: usize,
}

impl Table {
    /// Hands an exit to its waiter, or keeps it for an open launch.
    fn exited(&mut self, pid: i32, status: ExitStatus) {
        self.seq += 1;
        if let Some(tx) = self.waiters.remove(&pid) {
            let _ = tx.send(status);
            return;
        }
        if self.launches == 0 {
            return;
        }
        if self.unclaimed.len() == MAX_UNCLAIMED {
            self.unclaimed.pop_front();
        }
        self.unclaimed.push_back(Unclaimed {
            seq: self.seq,
            pid,
            status,
        });
    }

    fn begin_launch(&mut self) -> u64 {
        self.launches += 1;
        self.seq
    }

    fn end_launch(&mut self) {
        self.launches -= 1;
        if self.launches == 0 {
            self.unclaimed.clear();
        }
    }

    /// The exit of `pid` if it was reaped after `since`, else a waiter for it.
    /// An older exit of the same pid was an earlier process's: it is not
    /// handed over (and stays for the launch it may belong to).
    fn claim(&mut self, pid: i32, since: u64, tx: oneshot::Sender<ExitStatus>) {
        let newest = self
            .unclaimed
            .iter()
            .rposition(|u| u.pid == pid && u.seq > since);
        match newest.and_then(|i| self.unclaimed.remove(i)) {
            Some(u) => {
                let _ = tx.send(u.status);
            }
            None => {
                self.waiters.insert(pid, tx);
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
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
            self.table.lock().unwrap().exited(pid.as_raw(), status);
        }
    }

    /// Opens a launch: exits reaped from now until it is dropped are kept
    /// for [`Launch::claim`].
    pub fn launch(&self) -> Launch {
        let since = self.table.lock().unwrap().begin_launch();
        Launch {
            table: self.table.clone(),
            since,
        }
    }
}

/// The window in which a helper creates processes whose pids are learnt
/// only afterwards.
pub struct Launch {
    table: Arc<Mutex<Table>>,
    since: u64,
}

impl Launch {
    /// Spawns `cmd` and watches it, with the table locked so that the exit
    /// can not be reaped before it is watched.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, oneshot::Receiver<ExitStatus>)> {
        let (tx, rx) = oneshot::channel();
        let mut table = self.table.lock().unwrap();
        let child = cmd.spawn()?;
        table.waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// The exit status of `pid`, a process created during this launch.
    pub fn claim(&self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.table.lock().unwrap().claim(pid, self.since, tx);
        rx
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        self.table.lock().unwrap().end_launch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(t: &mut Table, pid: i32, since: u64) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        t.claim(pid, since, tx);
        rx
    }

    #[test]
    fn a_waiter_gets_its_exit() {
        let mut t = Table::default();
        let since = t.begin_launch();
        let mut rx = claim(&mut t, 7, since);
        assert!(rx.try_recv().is_err());
        t.exited(7, 3);
        assert_eq!(rx.try_recv(), Ok(3));
        assert!(t.waiters.is_empty());
    }

    #[test]
    fn an_exit_before_the_claim_is_kept_for_the_launch() {
        let mut t = Table::default();
        let since = t.begin_launch();
        t.exited(42, 0);
        let mut rx = claim(&mut t, 42, since);
        assert_eq!(rx.try_recv(), Ok(0));
        assert!(t.unclaimed.is_empty());
    }

    #[test]
    fn a_reused_pid_never_gets_an_older_exit() {
        let mut t = Table::default();
        // An exit of pid 42 kept for an earlier launch: another process.
        t.begin_launch();
        t.exited(42, 9);
        let since = t.begin_launch();
        let mut rx = claim(&mut t, 42, since);
        assert!(rx.try_recv().is_err(), "stale status handed over");
        // The real one arrives later.
        t.exited(42, 1);
        assert_eq!(rx.try_recv(), Ok(1));
    }

    #[test]
    fn the_newest_exit_of_a_pid_in_the_window_wins() {
        let mut t = Table::default();
        let since = t.begin_launch();
        t.exited(5, 1);
        t.exited(5, 2);
        let mut rx = claim(&mut t, 5, since);
        assert_eq!(rx.try_recv(), Ok(2));
    }

    #[test]
    fn exits_nobody_will_claim_are_dropped() {
        let mut t = Table::default();
        t.exited(1, 0);
        assert!(t.unclaimed.is_empty(), "kept with no launch open");
        t.begin_launch();
        t.exited(2, 0);
        t.exited(3, 0);
        assert_eq!(t.unclaimed.len(), 2);
        t.end_launch();
        assert!(t.unclaimed.is_empty(), "kept after the last launch ended");
    }

    #[test]
    fn unclaimed_exits_are_bounded_oldest_first() {
        let mut t = Table::default();
        let since = t.begin_launch();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            t.exited(pid, 0);
        }
        assert_eq!(t.unclaimed.len(), MAX_UNCLAIMED);
        assert_eq!(t.unclaimed.front().unwrap().pid, 10);
        let mut newest = claim(&mut t, MAX_UNCLAIMED as i32 + 9, since);
        assert_eq!(newest.try_recv(), Ok(0));
    }

    #[test]
    fn launches_overlap() {
        let mut t = Table::default();
        t.begin_launch();
        t.exited(10, 4);
        let b = t.begin_launch();
        t.exited(11, 5);
        // Pid 10 exited before b began: never b's, but still a's.
        assert!(claim(&mut t, 10, b).try_recv().is_err());
        assert_eq!(claim(&mut t, 11, b).try_recv(), Ok(5));
        assert_eq!(claim(&mut t, 10, 0).try_recv(), Ok(4));
        t.end_launch();
        t.end_launch();
        assert!(t.unclaimed.is_empty());
    }

    #[tokio::test]
    async fn launch_guard_opens_and_closes_the_window() {
        let r = Reaper::default();
        {
            let l = r.launch();
            r.table.lock().unwrap().exited(99, 7);
            assert_eq!(l.claim(99).await, Ok(7));
            r.table.lock().unwrap().exited(98, 7);
        }
        let t = r.table.lock().unwrap();
        assert_eq!(t.launches, 0);
        assert!(t.unclaimed.is_empty());
    }
}
