//! A fake pod for the service's unit tests: a guest agent served over ttrpc
//! behind a hybrid-vsock-style unix socket, with scripted processes, and an
//! event sink that records what the service publishes. No VM, no containerd.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cocoon_hypervisor::VsockConnector;
use cocoon_protocols::agent::*;
use cocoon_protocols::agent_ttrpc;
use cocoon_protocols::Id;
use cocoon_runtime::{Channel, Container};
use containerd_shim::protos::protobuf::MessageDyn;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use ttrpc::r#async::TtrpcContext;

use crate::error::Result;
use crate::pod::{Events, Launcher, PodHandle};

/// A scripted process: `["exit", "N"]` exits with N at start; anything else
/// runs until signalled. Its stdout carries `out:<container>/<exec>\n`.
struct Proc {
    args: Vec<String>,
    exit: watch::Sender<Option<i32>>,
}

#[derive(Default)]
struct AgentState {
    procs: HashMap<(String, String), Proc>,
}

#[derive(Clone, Default)]
pub struct FakeAgent {
    state: Arc<Mutex<AgentState>>,
    /// What GetOomEvent answers, one container id per event.
    oom: Arc<tokio::sync::Mutex<Option<mpsc::Receiver<String>>>>,
}

fn status(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

impl FakeAgent {
    fn exit_rx(&self, c: &str, e: &str) -> ttrpc::Result<watch::Receiver<Option<i32>>> {
        let st = self.state.lock().unwrap();
        st.procs
            .get(&(c.into(), e.into()))
            .map(|p| p.exit.subscribe())
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, "no such process"))
    }

    fn add(&self, c: &str, e: &str, args: Vec<String>) -> ttrpc::Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.procs.contains_key(&(c.into(), e.into())) {
            return Err(status(ttrpc::Code::ALREADY_EXISTS, "exists"));
        }
        st.procs.insert(
            (c.into(), e.into()),
            Proc {
                args,
                exit: watch::channel(None).0,
            },
        );
        Ok(())
    }

    fn run(&self, c: &str, e: &str) {
        let st = self.state.lock().unwrap();
        if let Some(p) = st.procs.get(&(c.into(), e.into())) {
            if p.args.first().map(String::as_str) == Some("exit") {
                let code = p.args.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                p.exit.send_replace(Some(code));
            }
        }
    }

    /// Serves stream connections: output then EOF when the process exits.
    async fn stream(&self, conn: UnixStream) {
        let mut r = BufReader::new(conn);
        let mut line = String::new();
        if r.read_line(&mut line).await.is_err() {
            return;
        }
        let Some(h) = cocoon_protocols::StreamHeader::decode(&line) else {
            return;
        };
        let mut conn = r.into_inner();
        match h.kind {
            cocoon_protocols::StreamKind::Stdin => {
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink).await;
            }
            kind => {
                let exec = h.exec_id.as_ref().map_or("", |e| e.as_str());
                let Ok(mut rx) = self.exit_rx(&h.container_id, exec) else {
                    return;
                };
                if kind == cocoon_protocols::StreamKind::Stdout {
                    let _ = conn
                        .write_all(format!("out:{}/{exec}\n", h.container_id).as_bytes())
                        .await;
                }
                let _ = rx.wait_for(Option::is_some).await;
                let _ = conn.shutdown().await;
            }
        }
    }
}

#[async_trait]
impl agent_ttrpc::Agent for FakeAgent {
    async fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        Ok(PingResponse::default())
    }
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, &e.to_string()))?;
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        self.add(&req.container_id, "", args)?;
        Ok(CreateContainerResponse {
            pid: 1,
            ..Default::default()
        })
    }
    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.run(&req.container_id, "");
        Ok(Empty::new())
    }
    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.state
            .lock()
            .unwrap()
            .procs
            .retain(|(c, _), _| *c != req.container_id);
        Ok(Empty::new())
    }
    async fn pause_container(&self, _: &TtrpcContext, _: ContainerRequest) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
    async fn resume_container(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
    async fn stats_container(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        let memory = MemoryStats {
            usage_bytes: 4096,
            ..Default::default()
        };
        Ok(StatsContainerResponse {
            memory: Some(memory).into(),
            ..Default::default()
        })
    }
    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        let p: oci_spec::runtime::Process = serde_json::from_slice(&req.oci_process_json)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, &e.to_string()))?;
        self.add(
            &req.container_id,
            &req.exec_id,
            p.args().clone().unwrap_or_default(),
        )?;
        self.run(&req.container_id, &req.exec_id);
        Ok(ExecProcessResponse {
            pid: 2,
            ..Default::default()
        })
    }
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        let mut rx = self.exit_rx(&req.container_id, &req.exec_id)?;
        let code = rx
            .wait_for(Option::is_some)
            .await
            .map(|v| v.unwrap_or(0))
            .unwrap_or(255);
        Ok(WaitProcessResponse {
            exit_status: code,
            exited_at_unix_nanos: 1,
            ..Default::default()
        })
    }
    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let st = self.state.lock().unwrap();
        let p = st
            .procs
            .get(&(req.container_id.clone(), req.exec_id.clone()))
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, "no such process"))?;
        p.exit.send_replace(Some(128 + req.signal as i32));
        Ok(Empty::new())
    }
    async fn close_stdin(&self, _: &TtrpcContext, _: ProcessRequest) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
    async fn list_processes(
        &self,
        _: &TtrpcContext,
        _: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        Ok(ListProcessesResponse {
            pids: vec![1],
            ..Default::default()
        })
    }
    async fn get_oom_event(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<OomEvent> {
        let mut rx = self.oom.lock().await;
        let next = match rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => None,
        };
        match next {
            Some(id) => Ok(OomEvent {
                container_id: id,
                ..Default::default()
            }),
            None => std::future::pending().await,
        }
    }
}

/// A pod whose guest is a [`FakeAgent`] behind a hybrid-vsock-style socket.
pub struct FakePod {
    channel: Channel,
    // Holds the fake guest's socket.
    _dir: tempfile::TempDir,
    stopped: Arc<Mutex<bool>>,
    stop_takes: std::time::Duration,
    shared: Arc<Mutex<BTreeSet<String>>>,
    dead: Arc<AtomicBool>,
    ended: Arc<AtomicBool>,
    // Dropped with the pod, which ends the fake guest.
    _server: Mutex<ttrpc::r#async::Server>,
}

#[async_trait]
impl PodHandle for FakePod {
    fn channel(&self) -> Channel {
        self.channel.clone()
    }
    fn vmm_pid(&self) -> u32 {
        4242
    }
    async fn create_container(
        &mut self,
        id: &Id,
        spec: oci_spec::runtime::Spec,
        _: &Path,
        terminal: bool,
    ) -> Result<Container> {
        self.shared.lock().unwrap().insert(id.to_string());
        let r = self.channel.create_container(id, &spec, terminal).await;
        if r.is_err() {
            self.shared.lock().unwrap().remove(id.as_str());
        }
        r
    }
    async fn update_container(
        &mut self,
        id: &Id,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        self.channel.container(id).update(resources).await
    }
    async fn remove_container(&mut self, id: &Id) {
        let _ = self.channel.container(id).remove().await;
        self.shared.lock().unwrap().remove(id.as_str());
    }
    fn try_wait(&mut self) -> Option<String> {
        self.dead
            .load(Ordering::SeqCst)
            .then(|| "killed by the test".into())
    }
    async fn end_vm(&mut self) {
        self.ended.store(true, Ordering::SeqCst);
    }
    async fn stop(self: Box<Self>) {
        tokio::time::sleep(self.stop_takes).await;
        *self.stopped.lock().unwrap() = true;
    }
}

#[derive(Default)]
pub struct FakeLauncher {
    pub launches: Mutex<Vec<String>>,
    /// The options of each launch, in order.
    pub options: Mutex<Vec<cocoon_runtime::SandboxOptions>>,
    pub stopped: Arc<Mutex<bool>>,
    /// How long stopping the pod VM takes.
    pub stop_takes: std::time::Duration,
    /// Container ids whose rootfs the pod shares now.
    pub shared: Arc<Mutex<BTreeSet<String>>>,
    /// Set to make the VM die.
    pub dead: Arc<AtomicBool>,
    /// Set once what was left of a dead VM has been stopped.
    pub ended: Arc<AtomicBool>,
    /// The guest accepts no stdio stream (never answers `OK`).
    pub silent_streams: bool,
    /// Feeds GetOomEvent.
    pub oom: Mutex<Option<mpsc::Receiver<String>>>,
}

#[async_trait]
impl Launcher for FakeLauncher {
    async fn launch(
        &self,
        sandbox_id: &Id,
        _: &cocoon_config::Config,
        options: &cocoon_runtime::SandboxOptions,
    ) -> Result<Box<dyn PodHandle>> {
        self.launches.lock().unwrap().push(sandbox_id.to_string());
        self.options.lock().unwrap().push(options.clone());
        let silent = self.silent_streams;
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let agent = FakeAgent {
            oom: Arc::new(tokio::sync::Mutex::new(self.oom.lock().unwrap().take())),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel::<std::io::Result<UnixStream>>(16);
        let streams = agent.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let mut line = Vec::new();
                loop {
                    let mut b = [0u8; 1];
                    if conn.read_exact(&mut b).await.is_err() || b[0] == b'\n' {
                        break;
                    }
                    line.push(b[0]);
                }
                let port: u32 = String::from_utf8_lossy(&line)
                    .trim_start_matches("CONNECT ")
                    .parse()
                    .unwrap_or(0);
                if port != cocoon_protocols::AGENT_PORT && silent {
                    // Holds the connection open and never answers.
                    tokio::spawn(async move {
                        let mut sink = Vec::new();
                        let _ = conn.read_to_end(&mut sink).await;
                    });
                    continue;
                }
                let _ = conn.write_all(b"OK 1\n").await;
                if port == cocoon_protocols::AGENT_PORT {
                    let _ = tx.send(Ok(conn)).await;
                } else {
                    let a = streams.clone();
                    tokio::spawn(async move { a.stream(conn).await });
                }
            }
        });
        let incoming =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) });
        let mut server = ttrpc::r#async::Server::new()
            .add_listener(ttrpc::r#async::transport::Listener::new(incoming))
            .register_service(agent_ttrpc::create_agent(Arc::new(agent)));
        server.start().await.unwrap();
        let vsock = VsockConnector::Hybrid { uds };
        let stream = vsock.connect(cocoon_protocols::AGENT_PORT).await.unwrap();
        let client = agent_ttrpc::AgentClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::new(stream),
        ));
        Ok(Box::new(FakePod {
            channel: Channel::new(sandbox_id, client, vsock)
                .with_stream_timeout(std::time::Duration::from_millis(500)),
            _dir: dir,
            stopped: self.stopped.clone(),
            stop_takes: self.stop_takes,
            shared: self.shared.clone(),
            dead: self.dead.clone(),
            ended: self.ended.clone(),
            _server: Mutex::new(server),
        }))
    }
}

/// Records the topics of published events, in order.
#[derive(Default)]
pub struct FakeEvents {
    pub topics: Mutex<Vec<String>>,
}

#[async_trait]
impl Events for FakeEvents {
    async fn publish(&self, topic: &str, _: Box<dyn MessageDyn>) {
        self.topics.lock().unwrap().push(topic.into());
    }
}
