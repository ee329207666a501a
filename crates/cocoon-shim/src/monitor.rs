//! Watching the pod: the VM's death (its VMM or a helper daemon exited:
//! what is left of it is stopped, and every process exits 255) and the
//! guest's OOM reports, which are accepted only for containers of the table.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use cocoon_protocols::{Error, Id};
use cocoon_runtime::Channel;
use containerd_shim::protos::events::task::TaskOOM;
use containerd_shim::protos::topics::TASK_OOM_EVENT_TOPIC;

use crate::service::{Service, EXIT_VM_DIED};
use crate::table::Exit;

/// How often the VM's processes are checked.
const VM_POLL: Duration = Duration::from_millis(500);
/// The pause after every OOM report: a guest that answers the long-poll at
/// once, again and again, cannot spin the shim.
const OOM_BACKOFF: Duration = Duration::from_millis(100);
/// At most one TaskOOM per container per interval reaches containerd.
const OOM_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Dropped reports are logged at most once per interval, with a count.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) fn spawn(svc: Service, channel: Channel) {
    tokio::spawn(oom_events(svc.clone(), channel));
    tokio::spawn(watch_vm(svc));
}

async fn oom_events(svc: Service, channel: Channel) {
    let mut last: HashMap<Id, Instant> = HashMap::new();
    let mut dropped = 0u64;
    let mut logged: Option<Instant> = None;
    loop {
        match channel.next_oom().await {
            Ok(Some(id)) => {
                let ours = svc.s.table.lock().unwrap().containers.contains_key(&id);
                let now = Instant::now();
                let due = last
                    .get(&id)
                    .is_none_or(|t| now.duration_since(*t) >= OOM_MIN_INTERVAL);
                if ours && due {
                    last.insert(id.clone(), now);
                    let e = TaskOOM {
                        container_id: id.to_string(),
                        ..Default::default()
                    };
                    svc.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
                } else {
                    dropped += 1;
                }
            }
            Ok(None) => dropped += 1,
            Err(Error::Unavailable(_)) => return,
            Err(e) => {
                tracing::debug!(sandbox = %svc.sandbox(), "OOM events: {e}");
                if svc.vm_dead() {
                    return;
                }
            }
        }
        if dropped > 0 && logged.is_none_or(|t| t.elapsed() >= DROP_LOG_INTERVAL) {
            tracing::warn!(
                sandbox = %svc.sandbox(),
                "{dropped} OOM reports from the guest dropped (no such container of this pod, or too frequent)"
            );
            dropped = 0;
            logged = Some(Instant::now());
        }
        if last.len() > 1024 {
            let table = svc.s.table.lock().unwrap();
            last.retain(|k, _| table.containers.contains_key(k));
        }
        tokio::time::sleep(OOM_BACKOFF).await;
    }
}

async fn watch_vm(svc: Service) {
    loop {
        tokio::time::sleep(VM_POLL).await;
        if check_vm(&svc).await {
            return;
        }
    }
}

/// Whether the pod's VM has ended (or the pod was stopped). A VM that has
/// ended ends the pod as a whole: what still runs of it is stopped (a VMM
/// that lost its share or its vsock, or the daemons of a VMM that died),
/// then every process exits with [`EXIT_VM_DIED`]. Called by the monitor,
/// and by whoever finds the guest gone first.
pub(crate) async fn check_vm(svc: &Service) -> bool {
    let mut pod = svc.s.pod.lock().await;
    let Some(p) = pod.as_mut() else { return true };
    let Some(status) = p.try_wait() else {
        return false;
    };
    if !svc.vm_dead() {
        tracing::error!(sandbox = %svc.sandbox(), "pod VM ended: {status}; every task exits with {EXIT_VM_DIED}");
    }
    p.end_vm().await;
    drop(pod);
    vm_died(svc).await;
    true
}

/// Ends every process (created ones too, so that every `Wait` returns;
/// those being started are ended by their Start) and tells containerd.
pub(crate) async fn vm_died(svc: &Service) {
    if let Some(info) = svc.s.info.lock().unwrap().as_mut() {
        info.dead = true;
    }
    let exit = Exit {
        status: EXIT_VM_DIED,
        at: SystemTime::now(),
    };
    let ended = svc.s.table.lock().unwrap().claim_all_exits();
    for (id, exec) in ended {
        svc.publish_exit(&id, exec.as_ref(), exit, false).await;
    }
}
