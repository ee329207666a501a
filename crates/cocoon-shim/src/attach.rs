//! A process's stdio and exit: its guest streams joined to containerd's
//! stdio, and a waiter that publishes TaskExit once its output is copied.

use std::time::Duration;

use cocoon_protocols::{Id, StreamKind};
use cocoon_runtime::Container;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::Result;
use crate::service::{Service, EXIT_VM_DIED};
use crate::table::{Exit, Stdio};

/// How often, and how far apart, a waiter that lost the guest looks at
/// the VM before it reports the process ended on its own.
const VM_CHECKS: u32 = 10;
const VM_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Stream copies of one process; aborted if the attach fails half-way.
struct Copies(Vec<JoinHandle<()>>);

impl Drop for Copies {
    fn drop(&mut self) {
        for c in &self.0 {
            c.abort();
        }
    }
}

impl Service {
    /// Connects a process's streams to containerd's stdio and starts its
    /// waiter. On error nothing keeps running.
    pub(crate) async fn attach_io(
        &self,
        c: &Container,
        exec: Option<&Id>,
        stdio: &Stdio,
    ) -> Result<()> {
        let id = c.id();
        let (out_dest, err_dest, logger) = if stdio.stdout.starts_with("binary://") {
            let (o, e, child) =
                crate::io::spawn_binary(&stdio.stdout, id, &self.s.namespace).await?;
            (Some(o), Some(e), Some(child))
        } else {
            let o = crate::io::open_output(&stdio.stdout).await?;
            let e = if stdio.terminal {
                None
            } else {
                crate::io::open_output(&stdio.stderr).await?
            };
            (o, e, None)
        };
        let mut copies = Copies(Vec::new());
        let out = c.open_stream(StreamKind::Stdout, exec).await?;
        copies
            .0
            .push(tokio::spawn(crate::io::copy_out(out, out_dest)));
        if !stdio.terminal {
            let err = c.open_stream(StreamKind::Stderr, exec).await?;
            copies
                .0
                .push(tokio::spawn(crate::io::copy_out(err, err_dest)));
        }
        if stdio.stdin.is_empty() {
            c.close_stdin(exec).await?;
        } else {
            let src = crate::io::open_input(&stdio.stdin)?;
            let s = c.open_stream(StreamKind::Stdin, exec).await?;
            let (tx, rx) = oneshot::channel();
            self.with_proc(id, exec, |p| {
                p.close_stdin = Some(tx);
                Ok(())
            })?;
            tokio::spawn(crate::io::copy_in(src, s, rx));
        }
        let mut copies = std::mem::take(&mut copies.0);
        if let Some(mut child) = logger {
            // The logger ends when its inputs close; it is reaped here.
            let done = std::mem::take(&mut copies);
            copies.push(tokio::spawn(async move {
                for c in done {
                    let _ = c.await;
                }
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }));
        }
        // The waiter publishes the exit only after the output copies end.
        let me = self.clone();
        let (c, exec) = (c.clone(), exec.cloned());
        tokio::spawn(async move { me.wait_exit(c, exec, copies).await });
        Ok(())
    }

    async fn wait_exit(&self, c: Container, exec: Option<Id>, copies: Vec<JoinHandle<()>>) {
        let id = c.id().clone();
        let (status, at, oom_killed) = match c.wait(exec.as_ref()).await {
            Ok(w) => (w.status, w.at, w.oom_killed),
            Err(e) => {
                tracing::warn!(container = %id, "{e}");
                // The guest is out of reach: if that is because its VM
                // ended (a daemon it needs died, and the connection with
                // it), the pod ends as a whole first, and this exit with
                // it. A daemon's pid is reaped a moment after its
                // connections close.
                for _ in 0..VM_CHECKS {
                    if crate::monitor::check_vm(self).await {
                        break;
                    }
                    tokio::time::sleep(VM_CHECK_INTERVAL).await;
                }
                (EXIT_VM_DIED, std::time::SystemTime::now(), false)
            }
        };
        // Every byte the process wrote reaches containerd before its exit
        // event. Output of a process's leftover children is not waited for
        // beyond a grace period.
        let grace = Duration::from_secs(if exec.is_none() { 30 } else { 2 });
        for c in copies {
            let _ = tokio::time::timeout(grace, c).await;
        }
        // Events stay in order: the start first. A process deleted before it
        // was started (its sender dropped) has nothing to report.
        let Ok(mut started) = self.with_proc(&id, exec.as_ref(), |p| Ok(p.started.subscribe()))
        else {
            return;
        };
        if started.wait_for(|s| *s).await.is_err() {
            return;
        }
        let claimed = self
            .with_proc(&id, exec.as_ref(), |p| Ok(p.claim_exit()))
            .unwrap_or(false);
        if !claimed {
            return;
        }
        self.publish_exit(&id, exec.as_ref(), Exit { status, at }, oom_killed)
            .await;
        tracing::info!(sandbox = %self.sandbox(), container = %id, exec = ?exec.as_ref().map(Id::as_str), status, "exited");
    }
}
