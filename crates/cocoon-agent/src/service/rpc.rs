//! The ttrpc trampoline: each request is translated here, once, into the
//! agent's types (ids into [`Id`], JSON into OCI types, numbers into their
//! ranges) with its sizes bounded, then delegated; every failure leaves
//! with its gRPC code. Nothing else happens here.

use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocols::agent::*;
use cocoon_protocols::{agent_ttrpc, Error, Id};
use ttrpc::r#async::TtrpcContext;

use super::containers::Lifecycle;
use super::{network, resources, sandbox, Agent, Result};

/// The largest OCI spec accepted.
pub const MAX_SPEC_JSON: usize = 2 << 20;
/// The largest OCI process (an exec's) accepted.
pub const MAX_PROCESS_JSON: usize = 2 << 20;
/// The largest OCI resources (an update's) accepted.
pub const MAX_RESOURCES_JSON: usize = 1 << 20;
/// The longest hostname (the kernel's HOST_NAME_MAX).
pub const MAX_HOSTNAME: usize = 64;
/// The longest virtio-fs tag (the device's tag field).
pub const MAX_SHARE_TAG: usize = 36;

/// Serves [`agent_ttrpc::Agent`] for the agent.
pub struct Rpc {
    agent: Arc<Agent>,
}

impl Rpc {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// InvalidArgument if `bytes` is longer than `max`.
fn bounded<'a>(what: &str, bytes: &'a [u8], max: usize) -> Result<&'a [u8]> {
    if bytes.len() > max {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes, more than the {max} accepted",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes bounded JSON; a failure is InvalidArgument.
fn json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8], max: usize) -> Result<T> {
    serde_json::from_slice(bounded(what, bytes, max)?)
        .map_err(|e| Error::InvalidArgument(format!("{what}: {e}")))
}

fn container(id: &str) -> Result<Id> {
    Ok(Id::container(id)?)
}

/// A container and one of its processes (an empty exec id is its init).
fn process(container_id: &str, exec_id: &str) -> Result<(Id, Option<Id>)> {
    Ok((container(container_id)?, Id::exec_or_init(exec_id)?))
}

fn reply<T>(what: &str, r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!("{what} failed: {e}");
        e.into()
    })
}

#[async_trait]
impl agent_ttrpc::Agent for Rpc {
    async fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        Ok(PingResponse {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_release: sandbox::kernel_release(),
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        let r = (|| {
            bounded("hostname", req.hostname.as_bytes(), MAX_HOSTNAME)?;
            bounded("share tag", req.share_tag.as_bytes(), MAX_SHARE_TAG)?;
            sandbox::create(&req.hostname, &req.share_tag)
        })();
        reply("create sandbox", r.map(|_| Empty::new()))
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        sandbox::destroy().await;
        Ok(Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        let r = async {
            let cfg = network::parse(&req)?;
            network::configure(&cfg).await
        };
        reply("configure network", r.await.map(|_| Empty::new()))
    }

    async fn online_resources(
        &self,
        _: &TtrpcContext,
        req: OnlineResourcesRequest,
    ) -> ttrpc::Result<OnlineResourcesResponse> {
        let r = async {
            if req.vcpus == 0 {
                return Err(Error::InvalidArgument("online 0 vCPUs".into()));
            }
            let timeout = std::time::Duration::from_millis(req.timeout_ms.into());
            resources::online(req.vcpus, req.memory_mib, timeout).await
        };
        reply(
            "online resources",
            r.await.map(|o| OnlineResourcesResponse {
                online_vcpus: o.vcpus,
                online_memory_mib: o.memory_mib,
                ..Default::default()
            }),
        )
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let r = async {
            let id = container(&req.container_id)?;
            let spec = json(
                &format!("OCI spec of container {id}"),
                &req.oci_spec_json,
                MAX_SPEC_JSON,
            )?;
            let pid = self.agent.create_container(&id, spec, req.terminal).await?;
            Ok(CreateContainerResponse {
                pid: pid as u32,
                ..Default::default()
            })
        };
        reply("create container", r.await)
    }

    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "start container",
            self.lifecycle(&req, Lifecycle::Start).await,
        )
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = async {
            let id = container(&req.container_id)?;
            self.agent.remove_container(&id).await.map(|_| Empty::new())
        };
        reply("remove container", r.await)
    }

    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "pause container",
            self.lifecycle(&req, Lifecycle::Pause).await,
        )
    }

    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        reply(
            "resume container",
            self.lifecycle(&req, Lifecycle::Resume).await,
        )
    }

    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let r = (|| {
            let id = container(&req.container_id)?;
            self.agent.exists(&id)?;
            let resources = json(
                &format!("resources of container {id}"),
                &req.oci_resources_json,
                MAX_RESOURCES_JSON,
            )?;
            super::cgroups::update(&id, &resources)
        })();
        reply("update container", r.map(|_| Empty::new()))
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let r = (|| {
            let id = container(&req.container_id)?;
            self.agent.exists(&id)?;
            super::cgroups::stats(&id)
        })();
        reply("stats", r)
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let r = (|| {
            let id = container(&req.container_id)?;
            self.agent.exists(&id)?;
            let pids = super::cgroups::pids(&id)?;
            Ok(ListProcessesResponse {
                pids: pids.iter().map(|p| p.as_raw() as u32).collect(),
                ..Default::default()
            })
        })();
        reply("list processes", r)
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let r = async {
            let cid = container(&req.container_id)?;
            let eid = Id::exec(&req.exec_id)?;
            let process = json(
                &format!("OCI process of exec {eid}"),
                &req.oci_process_json,
                MAX_PROCESS_JSON,
            )?;
            let pid = self
                .agent
                .exec_process(&cid, &eid, process, req.terminal)
                .await?;
            Ok(ExecProcessResponse {
                pid: pid as u32,
                ..Default::default()
            })
        };
        reply("exec", r.await)
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let r = async {
            let (cid, eid) = process(&req.container_id, &req.exec_id)?;
            let exit = self.agent.wait_process(&cid, eid.as_ref()).await?;
            Ok(WaitProcessResponse {
                exit_status: exit.status,
                exited_at_unix_nanos: exit.at_nanos,
                oom_killed: exit.oom_killed,
                ..Default::default()
            })
        };
        reply("wait", r.await)
    }

    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let r = (|| {
            let sig = i32::try_from(req.signal)
                .ok()
                .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
                .ok_or_else(|| Error::InvalidArgument(format!("invalid signal {}", req.signal)))?;
            let (cid, eid) = process(&req.container_id, &req.exec_id)?;
            self.agent.signal_process(&cid, eid.as_ref(), sig, req.all)
        })();
        reply("signal", r.map(|_| Empty::new()))
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        let r = (|| {
            let (cid, eid) = process(&req.container_id, &req.exec_id)?;
            self.agent.close_stdin(&cid, eid.as_ref())
        })();
        reply("close stdin", r.map(|_| Empty::new()))
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        let r = (|| {
            let (cid, eid) = process(&req.container_id, &req.exec_id)?;
            let size = |what: &str, n: u32| {
                u16::try_from(n)
                    .map_err(|_| Error::InvalidArgument(format!("{what} {n} is out of range")))
            };
            let (rows, columns) = (size("rows", req.rows)?, size("columns", req.columns)?);
            self.agent.resize_tty(&cid, eid.as_ref(), rows, columns)
        })();
        reply("resize tty", r.map(|_| Empty::new()))
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        let id = self.agent.oom.next().await;
        Ok(OomEvent {
            container_id: id.map(String::from).unwrap_or_default(),
            ..Default::default()
        })
    }
}

impl Rpc {
    async fn lifecycle(&self, req: &ContainerRequest, op: Lifecycle) -> Result<Empty> {
        let id = container(&req.container_id)?;
        self.agent.lifecycle(&id, op).await.map(|_| Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_parsed_at_the_edge() {
        assert!(matches!(container("../x"), Err(Error::InvalidArgument(_))));
        assert!(matches!(container(""), Err(Error::InvalidArgument(_))));
        assert_eq!(process("c1", "").unwrap().1, None);
        assert_eq!(
            process("c1", "e1").unwrap().1,
            Some(Id::exec("e1").unwrap())
        );
        assert!(matches!(
            process("c1", "a/b"),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn oversized_and_malformed_json_is_invalid() {
        let big = vec![b' '; MAX_SPEC_JSON + 1];
        let e = json::<oci_spec::runtime::Spec>("spec", &big, MAX_SPEC_JSON).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("more than"), "{e}");
        let e = json::<oci_spec::runtime::Spec>("spec", b"{not json", MAX_SPEC_JSON).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let spec = serde_json::to_vec(&oci_spec::runtime::Spec::default()).unwrap();
        json::<oci_spec::runtime::Spec>("spec", &spec, MAX_SPEC_JSON).unwrap();
    }
}
