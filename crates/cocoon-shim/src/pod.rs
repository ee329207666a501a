//! What the Task service needs from a pod VM and from containerd's event
//! bus, as traits: the real ones boot QEMU and publish to containerd; the
//! fakes in tests run the service's state machine without either.

use std::path::Path;

use async_trait::async_trait;
use cocoon_protocols::Id;
use cocoon_runtime::{Channel, Container, Sandbox, SandboxOptions};
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
    /// Creates a container whose root filesystem is host directory
    /// `rootfs`; on failure nothing of it is left in the pod.
    async fn create_container(
        &mut self,
        id: &Id,
        spec: oci_spec::runtime::Spec,
        rootfs: &Path,
        terminal: bool,
    ) -> Result<Container>;
    /// Applies new resource limits to a container, growing the VM first
    /// (InvalidArgument past the flavour's ceiling).
    async fn update_container(
        &mut self,
        id: &Id,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()>;
    /// Removes a container from the guest and stops sharing its rootfs.
    async fn remove_container(&mut self, id: &Id);
    /// `Some(status)` once the VM has died: its VMM, or a helper daemon it
    /// cannot serve without, has exited.
    fn try_wait(&mut self) -> Option<String>;
    /// Ends a VM that has died: what still runs of it (a VMM whose daemon
    /// died, the other daemons) is stopped now.
    async fn end_vm(&mut self);
    /// Powers the VM off and releases everything.
    async fn stop(self: Box<Self>);
}

/// Boots pod VMs.
#[async_trait]
pub trait Launcher: Send + Sync {
    /// Boots the VM of pod `sandbox_id`; `options` carry what the pod's
    /// first container asked for (its network namespace).
    async fn launch(
        &self,
        sandbox_id: &Id,
        config: &cocoon_config::Config,
        options: &SandboxOptions,
    ) -> Result<Box<dyn PodHandle>>;
}

/// Publishes task events.
#[async_trait]
pub trait Events: Send + Sync {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// The real pod: a sandbox on the hypervisor its configuration names.
pub struct SandboxLauncher;

#[async_trait]
impl Launcher for SandboxLauncher {
    async fn launch(
        &self,
        sandbox_id: &Id,
        config: &cocoon_config::Config,
        options: &SandboxOptions,
    ) -> Result<Box<dyn PodHandle>> {
        let hypervisor = cocoon_runtime::hypervisor(config);
        Ok(Box::new(
            Sandbox::start_with(sandbox_id, config, options, hypervisor.as_ref()).await?,
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
    async fn create_container(
        &mut self,
        id: &Id,
        spec: oci_spec::runtime::Spec,
        rootfs: &Path,
        terminal: bool,
    ) -> Result<Container> {
        Sandbox::create_container(self, id, spec, rootfs, terminal).await
    }
    async fn update_container(
        &mut self,
        id: &Id,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        Sandbox::update_container(self, id, resources).await
    }
    async fn remove_container(&mut self, id: &Id) {
        Sandbox::remove_container(self, id).await
    }
    fn try_wait(&mut self) -> Option<String> {
        self.vm().try_wait()
    }
    async fn end_vm(&mut self) {
        Sandbox::end_vm(self).await
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
