//! OOM kills: a poller reads each container's `memory.events` and queues
//! new kills for the host's long poll; a container init's exit reads it
//! too, so that an OOM-killed init is reported with its exit. Each kill is
//! reported once, by whichever looks first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cocoon_protocols::Id;
use tokio::sync::mpsc;

use super::Agent;

/// How often the poller looks.
const POLL: Duration = Duration::from_millis(250);
/// Kills queued for the host before the poller waits for it to take them.
const QUEUE: usize = 64;

/// OOM kills already reported, per container.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<HashMap<Id, u64>>>);

impl Ledger {
    /// Whether the container has OOM kills not yet reported (and marks
    /// them reported).
    pub fn take_new(&self, id: &Id) -> bool {
        self.record(id, super::cgroups::oom_kills(id))
    }

    /// Records that `id` has had `kills` kills; whether that is more than before.
    fn record(&self, id: &Id, kills: u64) -> bool {
        let before = self
            .0
            .lock()
            .unwrap()
            .insert(id.clone(), kills)
            .unwrap_or(0);
        kills > before
    }

    /// Forgets containers not in `ids`.
    fn retain(&self, ids: &[Id]) {
        self.0.lock().unwrap().retain(|k, _| ids.contains(k));
    }
}

/// The ledger and the queue of kills for the host.
pub struct Oom {
    pub ledger: Ledger,
    tx: mpsc::Sender<Id>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Id>>,
}

impl Default for Oom {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            ledger: Ledger::default(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
        }
    }
}

impl Oom {
    /// The next container with an OOM kill (the host's long poll).
    pub async fn next(&self) -> Option<Id> {
        self.rx.lock().await.recv().await
    }
}

/// Polls each container's `memory.events` and queues new OOM kills.
pub async fn watch(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(POLL).await;
        let ids = agent.container_ids();
        agent.oom.ledger.retain(&ids);
        for id in ids {
            if agent.oom.ledger.take_new(&id) {
                tracing::info!(container = %id, "OOM kill");
                let _ = agent.oom.tx.send(id).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kill_is_reported_once() {
        let l = Ledger::default();
        let c1 = Id::container("c1").unwrap();
        assert!(!l.record(&c1, 0));
        assert!(l.record(&c1, 1));
        assert!(!l.record(&c1, 1));
        assert!(l.record(&c1, 3));
        l.retain(&[]);
        assert!(l.0.lock().unwrap().is_empty());
    }
}
