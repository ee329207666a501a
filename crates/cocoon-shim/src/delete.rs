//! Delete: an exec's record, or a container with everything it holds (the
//! guest container, the rootfs share, the rootfs mount).

use std::time::SystemTime;

use cocoon_protocols::Id;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::TaskDelete;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC;

use crate::error::{Error, Result};
use crate::service::{ts, Service, SANDBOX_POINTER};
use crate::table::Exit;

impl Service {
    pub(crate) async fn delete(&self, id: Id, exec: Option<Id>) -> Result<api::DeleteResponse> {
        let name = format!(
            "{id}{}",
            exec.as_ref().map(|e| format!("/{e}")).unwrap_or_default()
        );
        let exit = {
            let mut table = self.s.table.lock().unwrap();
            if exec.is_none() && table.container(&id)?.creating {
                return Err(Error::FailedPrecondition(format!(
                    "cannot delete {id}: it is being created"
                )));
            }
            let p = table.proc(&id, exec.as_ref())?;
            p.state.can_delete(&name)?;
            let exit = *p.exit.borrow();
            exit
        };
        let exit = exit.unwrap_or(Exit {
            status: 0,
            at: SystemTime::now(),
        });
        let pid = self.vmm_pid();
        match &exec {
            Some(e) => {
                if let Ok(c) = self.s.table.lock().unwrap().container(&id) {
                    c.execs.remove(e);
                }
            }
            None => {
                if let Some(p) = self.s.pod.lock().await.as_mut() {
                    p.remove_container(&id).await;
                }
                let c = self.s.table.lock().unwrap().containers.remove(&id);
                if let Some(c) = c {
                    for _ in 0..c.rootfs_layers {
                        let _ = nix::mount::umount2(
                            &c.bundle.join("rootfs"),
                            nix::mount::MntFlags::MNT_DETACH
                                | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
                        );
                    }
                    let _ = std::fs::remove_file(c.bundle.join(SANDBOX_POINTER));
                }
                let ev = TaskDelete {
                    container_id: id.to_string(),
                    pid,
                    exit_status: exit.status,
                    exited_at: MessageField::some(ts(exit.at)),
                    ..Default::default()
                };
                self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(ev)).await;
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(ts(exit.at)),
            ..Default::default()
        })
    }
}
