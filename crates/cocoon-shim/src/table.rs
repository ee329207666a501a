//! The pod's process table: every container and exec this shim created,
//! keyed by validated ids. Nothing the guest says about a process is
//! accepted unless the process is in here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use cocoon_protocols::Id;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::state::ProcState;

/// How a process ended, as containerd is told.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// containerd's stdio for a process.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

pub struct Proc {
    pub state: ProcState,
    pub stdio: Stdio,
    /// The OCI process of an exec, as JSON.
    pub exec_spec: Option<Vec<u8>>,
    pub exit: watch::Sender<Option<Exit>>,
    pub close_stdin: Option<oneshot::Sender<()>>,
    /// Set once TaskStart (or TaskExecStarted) is published: a fast process's
    /// TaskExit must not overtake it.
    pub started: watch::Sender<bool>,
    /// One path (the waiter, the VM-death monitor, a failed start) has
    /// claimed the exit: it alone publishes TaskExit, then records it.
    pub exit_claimed: bool,
}

impl Proc {
    pub fn new(stdio: Stdio, exec_spec: Option<Vec<u8>>) -> Self {
        Self {
            state: ProcState::Created,
            stdio,
            exec_spec,
            exit: watch::channel(None).0,
            close_stdin: None,
            started: watch::channel(false).0,
            exit_claimed: false,
        }
    }

    /// Claims the right to publish this process's exit; false if another
    /// path has it.
    pub fn claim_exit(&mut self) -> bool {
        !std::mem::replace(&mut self.exit_claimed, true)
    }

    /// Records the exit (the first one wins) and marks the process stopped.
    pub fn exited(&mut self, exit: Exit) {
        self.state = ProcState::Stopped;
        self.close_stdin.take();
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
    }
}

pub struct Container {
    pub bundle: PathBuf,
    /// Layers this shim mounted on the bundle's rootfs (undone at delete).
    pub rootfs_layers: usize,
    /// Create has not returned yet: the container cannot be deleted.
    pub creating: bool,
    pub init: Proc,
    pub execs: HashMap<Id, Proc>,
}

/// A process of the table: its container and exec ids (None: the init).
pub type ProcKey = (Id, Option<Id>);

#[derive(Default)]
pub struct Table {
    pub containers: HashMap<Id, Container>,
}

impl Table {
    pub fn container(&mut self, id: &Id) -> Result<&mut Container> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
    }

    pub fn proc(&mut self, id: &Id, exec: Option<&Id>) -> Result<&mut Proc> {
        let c = self.container(id)?;
        match exec {
            None => Ok(&mut c.init),
            Some(e) => c
                .execs
                .get_mut(e)
                .ok_or_else(|| Error::NotFound(format!("exec {e} of container {id} not found"))),
        }
    }

    /// Claims the exit of every process whose exit no one has claimed,
    /// created ones too (their `Wait` must return), but not those being
    /// started (their Start ends them); returns them.
    pub fn claim_all_exits(&mut self) -> Vec<ProcKey> {
        let mut out = Vec::new();
        for (id, c) in self.containers.iter_mut() {
            let procs = std::iter::once((None, &mut c.init))
                .chain(c.execs.iter_mut().map(|(k, v)| (Some(k.clone()), v)));
            for (eid, p) in procs {
                if p.state != ProcState::Starting && p.claim_exit() {
                    out.push((id.clone(), eid));
                }
            }
        }
        out
    }
}

/// containerd's name of a process in events: the exec id, or the container
/// id for an init.
pub fn event_id(id: &Id, exec: Option<&Id>) -> String {
    exec.unwrap_or(id).to_string()
}
