//! What the Task service needs from a pod VM and from containerd's event
//! bus, as traits: the real ones boot QEMU and publish to containerd; the
//! fakes in tests run the service's state machine without either.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use cocoon_runtime::{Channel, Sandbox};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;

use crate::error::Result;

/// A running pod VM.
#[async_trait]
pub trait PodHandle: Send + Sync {
    /// The agent and the stream port.
    fn channel(&self) -> Channel;
    /// The host pid containerd sees as every task's pid.
    fn vmm_pid(&self) -> u32;
    /// The pod's state directory (for `delete` after a shim died).
    fn run_dir(&self) -> PathBuf;
    /// Shares a host directory into the guest as a container's rootfs.
    fn share_rootfs(&mut self, container_id: &str, rootfs: &Path) -> Result<String>;
    fn unshare_rootfs(&mut self, container_id: &str);
    /// `Some(status)` once the VM has died.
    fn try_wait(&mut self) -> Option<String>;
    /// Powers the VM off and releases everything.
    async fn stop(self: Box<Self>);
}

/// Boots pod VMs.
#[async_trait]
pub trait Launcher: Send + Sync {
    async fn launch(
        &self,
        sandbox_id: &str,
        config: &cocoon_config::Config,
    ) -> Result<Box<dyn PodHandle>>;
}

/// Publishes task events.
#[async_trait]
pub trait Events: Send + Sync {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// The real pod: a QEMU sandbox.
pub struct QemuLauncher;

#[async_trait]
impl Launcher for QemuLauncher {
    async fn launch(
        &self,
        sandbox_id: &str,
        config: &cocoon_config::Config,
    ) -> Result<Box<dyn PodHandle>> {
        Ok(Box::new(
            Sandbox::start(sandbox_id, config, &cocoon_hypervisor::Qemu).await?,
        ))
    }
}

#[async_trait]
impl PodHandle for Sandbox {
    fn channel(&self) -> Channel {
        Sandbox::channel(self)
    }
    fn vmm_pid(&self) -> u32 {
        Sandbox::vmm_pid(self)
    }
    fn run_dir(&self) -> PathBuf {
        Sandbox::run_dir(self).to_path_buf()
    }
    fn share_rootfs(&mut self, container_id: &str, rootfs: &Path) -> Result<String> {
        Ok(Sandbox::share_rootfs(self, container_id, rootfs)?)
    }
    fn unshare_rootfs(&mut self, container_id: &str) {
        Sandbox::unshare_rootfs(self, container_id)
    }
    fn try_wait(&mut self) -> Option<String> {
        self.vm().try_wait()
    }
    async fn stop(self: Box<Self>) {
        Sandbox::stop(*self).await
    }
}

/// containerd's event bus.
pub struct RemoteEvents {
    pub publisher: RemotePublisher,
    pub namespace: String,
}

#[async_trait]
impl Events for RemoteEvents {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let r = self
            .publisher
            .publish(
                containerd_shim::Context::default(),
                topic,
                &self.namespace,
                event,
            )
            .await;
        if let Err(e) = r {
            tracing::warn!("publish {topic}: {e}");
        }
    }
}
