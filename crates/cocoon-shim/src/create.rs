//! Create: mount the rootfs containerd gives, create the container in the
//! pod (booting the VM for the first one), attach its stdio. Each step
//! undoes itself if a later one fails: no mount, share, guest container or
//! table entry is left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cocoon_protocols::Id;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC;

use crate::error::{Error, Result};
use crate::service::Service;
use crate::table::{Container, Proc, Stdio};

/// The bundle's `rootfs` with containerd's mounts on it; unmounted on drop
/// unless kept.
struct MountedRootfs {
    path: PathBuf,
    layers: usize,
}

impl MountedRootfs {
    fn mount(id: &Id, mounts: &[api::Mount], path: &Path) -> Result<Self> {
        let mut m = Self {
            path: path.to_path_buf(),
            layers: 0,
        };
        if mounts.is_empty() {
            return Ok(m);
        }
        std::fs::create_dir_all(path)
            .map_err(|e| Error::Internal(format!("task {id}: create {}: {e}", path.display())))?;
        for mnt in mounts {
            mount_one(mnt, path).map_err(|e| {
                Error::Internal(format!(
                    "task {id}: mount rootfs {} on {}: {e}",
                    mnt.source,
                    path.display()
                ))
            })?;
            m.layers += 1;
        }
        Ok(m)
    }

    /// Leaves the mounts in place (the container now owns them); returns
    /// how many layers there are.
    fn keep(mut self) -> usize {
        std::mem::take(&mut self.layers)
    }
}

impl Drop for MountedRootfs {
    fn drop(&mut self) {
        for _ in 0..self.layers {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn check_rootfs_types(id: &Id, mounts: &[api::Mount]) -> Result<()> {
    for m in mounts {
        let supported = matches!(m.type_.as_str(), "overlay" | "bind" | "rbind")
            || (m.type_ == "none" && m.options.iter().any(|o| o.contains("bind")));
        if !supported {
            return Err(Error::InvalidArgument(format!(
                "task {id}: rootfs mount type {:?} (source {}) is not supported",
                m.type_, m.source
            )));
        }
    }
    Ok(())
}

impl Service {
    pub(crate) async fn create(
        &self,
        id: Id,
        req: api::CreateTaskRequest,
    ) -> Result<api::CreateTaskResponse> {
        if self.s.table.lock().unwrap().containers.contains_key(&id) {
            return Err(Error::AlreadyExists(format!("task {id} already exists")));
        }
        if !req.checkpoint.is_empty() {
            return Err(Error::Unimplemented(format!(
                "task {id}: restore from a checkpoint is not supported"
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let config_json = bundle.join("config.json");
        let spec = oci_spec::runtime::Spec::load(&config_json).map_err(|e| {
            Error::InvalidArgument(format!("task {id}: {}: {e}", config_json.display()))
        })?;
        check_rootfs_types(&id, &req.rootfs)?;
        // Before a VM boots for it.
        cocoon_runtime::spec::check_namespaces(&spec, id.as_str())?;
        let pod = self.ensure_pod(&req, &spec).await?;

        let rootfs = bundle.join("rootfs");
        let mounted = MountedRootfs::mount(&id, &req.rootfs, &rootfs)?;
        let src = if req.rootfs.is_empty() {
            spec.root()
                .as_ref()
                .map(|r| {
                    if r.path().is_absolute() {
                        r.path().clone()
                    } else {
                        bundle.join(r.path())
                    }
                })
                .unwrap_or_else(|| rootfs.clone())
        } else {
            rootfs.clone()
        };
        let container = {
            let mut guard = self.s.pod.lock().await;
            let p = guard
                .as_mut()
                .ok_or_else(|| Error::Unavailable("the pod VM is not running".into()))?;
            p.create_container(&id, spec, &src, req.terminal).await?
        };
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        self.s.table.lock().unwrap().containers.insert(
            id.clone(),
            Container {
                bundle: bundle.clone(),
                rootfs_layers: 0,
                creating: true,
                init: Proc::new(stdio.clone(), None),
                execs: HashMap::new(),
            },
        );
        if let Err(e) = self.attach_io(&container, None, &stdio).await {
            self.s.table.lock().unwrap().containers.remove(&id);
            if let Some(p) = self.s.pod.lock().await.as_mut() {
                p.remove_container(&id).await;
            }
            return Err(e.context(format!("task {id}: stdio")));
        }
        let layers = mounted.keep();
        if let Ok(c) = self.s.table.lock().unwrap().container(&id) {
            c.rootfs_layers = layers;
            c.creating = false;
        }
        let ev = TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid: pod.vmm_pid,
            ..Default::default()
        };
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(ev)).await;
        tracing::info!(container = %id, "created");
        Ok(api::CreateTaskResponse {
            pid: pod.vmm_pid,
            ..Default::default()
        })
    }
}

fn mount_one(m: &api::Mount, target: &Path) -> nix::Result<()> {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in &m.options {
        match o.as_str() {
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            other => data.push(other.to_string()),
        }
    }
    let fstype = if flags.contains(MsFlags::MS_BIND) {
        None
    } else {
        Some(m.type_.as_str())
    };
    let data = data.join(",");
    nix::mount::mount(
        Some(m.source.as_str()),
        target,
        fstype,
        flags,
        if data.is_empty() {
            None
        } else {
            Some(data.as_str())
        },
    )
}
