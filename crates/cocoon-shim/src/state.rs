//! The lifecycle of a task's process, with the transitions containerd may ask for.

use crate::error::{Error, Result};
use containerd_shim_protos::api::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Created,
    /// A Start is in flight: neither startable nor deletable.
    Starting,
    Running,
    Paused,
    Stopped,
}

impl ProcState {
    pub fn status(self) -> Status {
        match self {
            ProcState::Created | ProcState::Starting => Status::CREATED,
            ProcState::Running => Status::RUNNING,
            ProcState::Paused => Status::PAUSED,
            ProcState::Stopped => Status::STOPPED,
        }
    }

    fn refuse(self, what: &str, id: &str) -> Error {
        Error::FailedPrecondition(format!(
            "cannot {what} {id}: it is {}",
            format!("{self:?}").to_lowercase()
        ))
    }

    pub fn start(self, id: &str) -> Result<Self> {
        match self {
            ProcState::Created => Ok(ProcState::Starting),
            s => Err(s.refuse("start", id)),
        }
    }

    pub fn pause(self, id: &str) -> Result<Self> {
        match self {
            ProcState::Running => Ok(ProcState::Paused),
            s => Err(s.refuse("pause", id)),
        }
    }

    pub fn resume(self, id: &str) -> Result<Self> {
        match self {
            ProcState::Paused => Ok(ProcState::Running),
            s => Err(s.refuse("resume", id)),
        }
    }

    /// Exec needs a running (or paused) container.
    pub fn can_exec(self, id: &str) -> Result<()> {
        match self {
            ProcState::Running | ProcState::Paused => Ok(()),
            s => Err(s.refuse("exec in", id)),
        }
    }

    /// Delete needs the process not to run.
    pub fn can_delete(self, id: &str) -> Result<()> {
        match self {
            ProcState::Created | ProcState::Stopped => Ok(()),
            s => Err(s.refuse("delete", id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ProcState::*;
    use crate::error::Error;

    #[test]
    fn transitions() {
        assert_eq!(Created.start("c").unwrap(), Starting);
        assert_eq!(Running.pause("c").unwrap(), Paused);
        assert_eq!(Paused.resume("c").unwrap(), Running);
        assert!(Running.can_exec("c").is_ok());
        assert!(Stopped.can_delete("c").is_ok());
        assert!(Created.can_delete("c").is_ok());
    }

    #[test]
    fn refusals_are_failed_precondition() {
        for e in [
            Running.start("c").unwrap_err(),
            Starting.start("c").unwrap_err(),
            Starting.can_delete("c").unwrap_err(),
            Stopped.pause("c").unwrap_err(),
            Running.resume("c").unwrap_err(),
            Stopped.can_exec("c").unwrap_err(),
            Running.can_delete("c").unwrap_err(),
        ] {
            assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        }
        assert_eq!(
            Stopped.can_exec("c1").unwrap_err().to_string(),
            "cannot exec in c1: it is stopped"
        );
    }
}
