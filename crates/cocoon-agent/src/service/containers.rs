//! Containers: create (bundle, spec, the helper), the libcontainer
//! lifecycle operations (start, pause, resume) and removal.

use std::collections::HashMap;
use std::path::Path;

use cocoon_protocols::{Error, Id};
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;

use super::sandbox;
use super::spec::{self, Placement};
use super::{internal, Agent, ContainerEntry, Result, BUNDLE_ROOT, CGROUP_PARENT, CONTAINER_ROOT};
use crate::launcher::Op;

/// Runs a libcontainer operation on a loaded container, off the async threads.
async fn with_container<T: Send + 'static>(
    id: &Id,
    what: &'static str,
    f: impl FnOnce(&mut Container) -> Result<T, LibcontainerError> + Send + 'static,
) -> Result<T> {
    let root = Path::new(CONTAINER_ROOT).join(id.as_str());
    let id = id.clone();
    tokio::task::spawn_blocking(move || {
        let mut c =
            Container::load(root).map_err(|e| Error::NotFound(format!("container {id}: {e}")))?;
        f(&mut c).map_err(|e| Error::FailedPrecondition(format!("{what} container {id}: {e}")))
    })
    .await
    .map_err(internal("libcontainer task"))?
}

/// A libcontainer lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Start,
    Pause,
    Resume,
}

impl Agent {
    /// Creates container `id` from the host's `spec`; returns its init's pid.
    pub(super) async fn create_container(
        &self,
        id: &Id,
        spec: oci_spec::runtime::Spec,
        terminal: bool,
    ) -> Result<i32> {
        let at = Placement {
            share_dir: Path::new(cocoon_protocols::GUEST_SHARE_DIR),
            cgroup_parent: Path::new(CGROUP_PARENT),
            sandbox_init: self.sandbox_init(id, &spec)?,
        };
        let (spec, setup) = spec::rewrite(spec, id, terminal, &at)?;
        if let Some(size) = setup.shm_size {
            sandbox::ensure_pod_shm(size)?;
        }
        sandbox::apply_net_sysctls(&setup.net_sysctls)?;
        let rootfs = spec.root().as_ref().map(|r| r.path().clone());
        if let Some(rootfs) = rootfs.filter(|r| !r.is_dir()) {
            return Err(Error::InvalidArgument(format!(
                "rootfs {} of container {id} is not a directory",
                rootfs.display()
            )));
        }
        let bundle = Path::new(BUNDLE_ROOT).join(id.as_str());
        {
            let mut map = self.containers.lock().unwrap();
            if map.contains_key(id) {
                return Err(Error::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
            map.insert(
                id.clone(),
                ContainerEntry {
                    bundle: bundle.clone(),
                    processes: HashMap::new(),
                },
            );
        }
        let result = self.create_in_bundle(id, &bundle, &spec, terminal).await;
        if result.is_err() {
            self.containers.lock().unwrap().remove(id);
            let _ = std::fs::remove_dir_all(&bundle);
            let _ = std::fs::remove_dir_all(Path::new(CONTAINER_ROOT).join(id.as_str()));
        }
        result
    }

    /// The init pid of the pod's sandbox container, for a container CRI
    /// made part of a pod; an error if that container is not running here.
    fn sandbox_init(&self, id: &Id, spec: &oci_spec::runtime::Spec) -> Result<Option<i32>> {
        use cocoon_protocols::cri;
        let ann = spec.annotations().clone().unwrap_or_default();
        let sandbox = match (
            ann.get(cri::CONTAINER_TYPE).map(String::as_str),
            ann.get(cri::SANDBOX_ID),
        ) {
            (Some(cri::TYPE_CONTAINER), Some(s)) if s != id.as_str() => s,
            _ => return Ok(None),
        };
        let map = self.containers.lock().unwrap();
        let init = map
            .iter()
            .find(|(c, _)| c.as_str() == sandbox)
            .and_then(|(_, c)| c.processes.get(&None))
            .filter(|p| p.exit.borrow().is_none());
        match init {
            Some(p) => Ok(Some(p.pid)),
            None => Err(Error::FailedPrecondition(format!(
                "container {id} joins pod sandbox {sandbox}, whose container is not running in this VM"
            ))),
        }
    }

    async fn create_in_bundle(
        &self,
        id: &Id,
        bundle: &Path,
        spec: &oci_spec::runtime::Spec,
        terminal: bool,
    ) -> Result<i32> {
        std::fs::create_dir_all(bundle)
            .map_err(internal(format!("create {}", bundle.display())))?;
        std::fs::create_dir_all(CONTAINER_ROOT).map_err(internal(CONTAINER_ROOT))?;
        spec.save(bundle.join("config.json"))
            .map_err(internal("write config.json"))?;
        let started = self.start_process(Op::Create, id, bundle, terminal).await?;
        let pid = self.track(id, None, started);
        tracing::info!(container = %id, pid, "created");
        Ok(pid)
    }

    /// Starts, pauses or resumes a known container.
    pub(super) async fn lifecycle(&self, id: &Id, op: Lifecycle) -> Result<()> {
        self.exists(id)?;
        match op {
            Lifecycle::Start => with_container(id, "start", |c| c.start()).await,
            Lifecycle::Pause => with_container(id, "pause", |c| c.pause()).await,
            Lifecycle::Resume => with_container(id, "resume", |c| c.resume()).await,
        }
    }

    /// Deletes the container (killing what still runs) and forgets it.
    pub(super) async fn remove_container(&self, id: &Id) -> Result<()> {
        self.exists(id)?;
        let root = Path::new(CONTAINER_ROOT).join(id.as_str());
        if root.exists() {
            with_container(id, "remove", |c| c.delete(true)).await?;
        }
        let entry = self.containers.lock().unwrap().remove(id);
        self.stdio.remove_container(id);
        if let Some(e) = entry {
            let _ = std::fs::remove_dir_all(e.bundle);
        }
        tracing::info!(container = %id, "removed");
        Ok(())
    }
}
