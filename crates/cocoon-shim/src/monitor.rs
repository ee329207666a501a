//! Watching the pod: the VM's death (every process exits 255) and the
//! guest's OOM reports, which are accepted only for containers of the table.

use std::time::{Duration, SystemTime};

use cocoon_protocols::Error;
use cocoon_runtime::Channel;
use containerd_shim::protos::events::task::{TaskExit, TaskOOM};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::{TASK_EXIT_EVENT_TOPIC, TASK_OOM_EVENT_TOPIC};

use crate::service::{ts, Service, EXIT_VM_DIED};
use crate::table::{event_id, Exit};

/// How often the VM process is checked.
const VM_POLL: Duration = Duration::from_millis(500);
/// The pause after an OOM report that is dropped or failed: a guest that
/// answers the long-poll at once, again and again, cannot spin the shim.
const OOM_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) fn spawn(svc: Service, channel: Channel) {
    tokio::spawn(oom_events(svc.clone(), channel));
    tokio::spawn(watch_vm(svc));
}

async fn oom_events(svc: Service, channel: Channel) {
    loop {
        match channel.next_oom().await {
            Ok(Some(id)) => {
                let ours = svc.s.table.lock().unwrap().containers.contains_key(&id);
                if ours {
                    let e = TaskOOM {
                        container_id: id.to_string(),
                        ..Default::default()
                    };
                    svc.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
                    continue;
                }
                tracing::warn!(sandbox = %svc.sandbox(), "OOM event for unknown container {id} dropped");
            }
            Ok(None) => {}
            Err(Error::Unavailable(_)) => return,
            Err(e) => {
                tracing::debug!(sandbox = %svc.sandbox(), "OOM events: {e}");
                if svc.s.info.lock().unwrap().is_none() {
                    return;
                }
            }
        }
        tokio::time::sleep(OOM_BACKOFF).await;
    }
}

async fn watch_vm(svc: Service) {
    loop {
        tokio::time::sleep(VM_POLL).await;
        let mut pod = svc.s.pod.lock().await;
        let Some(p) = pod.as_mut() else { return };
        if let Some(status) = p.try_wait() {
            drop(pod);
            tracing::error!(sandbox = %svc.sandbox(), "pod VM exited ({status}); every task exits with {EXIT_VM_DIED}");
            vm_died(&svc).await;
            return;
        }
    }
}

/// Marks every process exited (created ones too, so that every `Wait`
/// returns) and tells containerd.
pub(crate) async fn vm_died(svc: &Service) {
    let pid = svc.vmm_pid();
    let now = SystemTime::now();
    let exit = Exit {
        status: EXIT_VM_DIED,
        at: now,
    };
    let exited = svc.s.table.lock().unwrap().all_exited(exit);
    *svc.s.info.lock().unwrap() = None;
    for (id, exec) in exited {
        let e = TaskExit {
            container_id: id.to_string(),
            id: event_id(&id, exec.as_ref()),
            pid,
            exit_status: EXIT_VM_DIED,
            exited_at: MessageField::some(ts(now)),
            ..Default::default()
        };
        svc.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
    }
}
