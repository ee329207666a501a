//! The Task service against a fake pod: events, ordering, codes, and
//! what a hostile or dying guest can and cannot make it do.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics::*;
use containerd_shim::{ExitSignal, TtrpcContext};

use crate::fake::{FakeEvents, FakeLauncher};
use crate::service::Service;

fn tctx() -> TtrpcContext {
    TtrpcContext {
        mh: ttrpc::MessageHeader {
            length: 0,
            stream_id: 0,
            type_: 0,
            flags: 0,
        },
        metadata: Default::default(),
        timeout_nano: 0,
    }
}

struct Env {
    svc: Service,
    events: Arc<FakeEvents>,
    launcher: Arc<FakeLauncher>,
    exit: Arc<ExitSignal>,
    dir: tempfile::TempDir,
}

fn env() -> Env {
    env_with(FakeLauncher::default())
}

fn env_with(launcher: FakeLauncher) -> Env {
    let events = Arc::new(FakeEvents::default());
    let launcher = Arc::new(launcher);
    let exit = Arc::new(ExitSignal::default());
    let svc = Service::new("ns", "shim", events.clone(), launcher.clone(), exit.clone());
    Env {
        svc,
        events,
        launcher,
        exit,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Env {
    fn bundle(&self, id: &str, args: &[&str]) -> String {
        let b = self.dir.path().join(id);
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let mut spec = oci_spec::runtime::Spec::default();
        let mut p = spec.process().clone().unwrap();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        spec.set_process(Some(p));
        spec.save(b.join("config.json")).unwrap();
        b.display().to_string()
    }

    async fn create(&self, id: &str, args: &[&str]) -> ttrpc::Result<api::CreateTaskResponse> {
        let out = format!("file://{}/{id}.out", self.dir.path().display());
        let req = api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, args),
            stdout: out,
            ..Default::default()
        };
        Task::create(&self.svc, &tctx(), req).await
    }

    async fn wait(&self, id: &str, exec: &str) -> u32 {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        Task::wait(&self.svc, &tctx(), req)
            .await
            .unwrap()
            .exit_status
    }

    async fn start(&self, id: &str, exec: &str) -> ttrpc::Result<api::StartResponse> {
        let req = api::StartRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        Task::start(&self.svc, &tctx(), req).await
    }

    async fn state(&self, id: &str, exec: &str) -> ttrpc::Result<api::StateResponse> {
        let req = api::StateRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        Task::state(&self.svc, &tctx(), req).await
    }

    async fn kill(&self, id: &str, signal: u32) -> ttrpc::Result<api::Empty> {
        let req = api::KillRequest {
            id: id.into(),
            signal,
            ..Default::default()
        };
        Task::kill(&self.svc, &tctx(), req).await
    }

    async fn delete(&self, id: &str) -> ttrpc::Result<api::DeleteResponse> {
        let req = api::DeleteRequest {
            id: id.into(),
            ..Default::default()
        };
        Task::delete(&self.svc, &tctx(), req).await
    }

    fn topics(&self) -> Vec<String> {
        self.events.topics.lock().unwrap().clone()
    }
}

fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test]
async fn lifecycle_publishes_events_in_order_and_output_before_exit() {
    let e = env();
    let created = e.create("c1", &["exit", "3"]).await.unwrap();
    assert_eq!(created.pid, 4242, "task pid is the VMM's");
    e.start("c1", "").await.unwrap();
    let (a, b) = tokio::join!(e.wait("c1", ""), e.wait("c1", ""));
    assert_eq!((a, b), (3, 3), "every waiter gets the status");
    let out = std::fs::read_to_string(e.dir.path().join("c1.out")).unwrap();
    assert_eq!(
        out, "out:c1/\n",
        "output reached its destination before the exit"
    );
    let state = e.state("c1", "").await.unwrap();
    assert_eq!(state.status.enum_value().unwrap(), api::Status::STOPPED);
    assert_eq!(state.exit_status, 3);
    let del = e.delete("c1").await.unwrap();
    assert_eq!(del.exit_status, 3);
    assert_eq!(
        e.topics(),
        [
            TASK_CREATE_EVENT_TOPIC,
            TASK_START_EVENT_TOPIC,
            TASK_EXIT_EVENT_TOPIC,
            TASK_DELETE_EVENT_TOPIC
        ]
    );
    Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(
        *e.launcher.stopped.lock().unwrap(),
        "the pod VM is stopped with the last task"
    );
    tokio::time::timeout(Duration::from_secs(1), e.exit.wait())
        .await
        .expect("shim exit signalled");
}

/// containerd gives Shutdown 3 s, then closes the connection, and ttrpc
/// drops the handler: the VM must still be stopped and the shim exit.
#[tokio::test]
async fn a_shutdown_abandoned_by_containerd_still_stops_the_pod_and_exits() {
    let e = env_with(FakeLauncher {
        stop_takes: Duration::from_millis(300),
        ..Default::default()
    });
    e.create("c1", &["exit", "0"]).await.unwrap();
    e.start("c1", "").await.unwrap();
    assert_eq!(e.wait("c1", "").await, 0);
    e.delete("c1").await.unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(50),
        Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default()),
    )
    .await;
    assert!(
        abandoned.is_err(),
        "the stop outlives the caller's deadline"
    );
    tokio::time::timeout(Duration::from_secs(2), e.exit.wait())
        .await
        .expect("shim exit signalled after the caller gave up");
    assert!(*e.launcher.stopped.lock().unwrap(), "the pod VM is stopped");
}

#[tokio::test]
async fn one_vm_per_pod_and_shutdown_waits_for_the_last_task() {
    let e = env();
    e.create("c1", &["sleep"]).await.unwrap();
    e.create("c2", &["sleep"]).await.unwrap();
    assert_eq!(*e.launcher.launches.lock().unwrap(), ["c1"]);
    assert_eq!(
        code(e.create("c2", &["sleep"]).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(!*e.launcher.stopped.lock().unwrap());
}

#[tokio::test]
async fn exec_kill_and_their_errors() {
    let e = env();
    e.create("c1", &["sleep"]).await.unwrap();
    let spec = |args: &[&str]| {
        let mut p = oci_spec::runtime::Process::default();
        p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::to_vec(&p).unwrap(),
            ..Default::default()
        }
    };
    let exec = |id: &str, args: &[&str]| api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: id.into(),
        spec: MessageField::some(spec(args)),
        ..Default::default()
    };
    // Exec needs a running container.
    assert_eq!(
        code(Task::exec(&e.svc, &tctx(), exec("x1", &["exit", "0"])).await),
        ttrpc::Code::FAILED_PRECONDITION
    );
    e.start("c1", "").await.unwrap();
    Task::exec(&e.svc, &tctx(), exec("x1", &["exit", "5"]))
        .await
        .unwrap();
    assert_eq!(
        code(Task::exec(&e.svc, &tctx(), exec("x1", &["true"])).await),
        ttrpc::Code::ALREADY_EXISTS
    );
    e.start("c1", "x1").await.unwrap();
    assert_eq!(e.wait("c1", "x1").await, 5);
    // A running init cannot be deleted; killed, it reports 128 + 9.
    assert_eq!(code(e.delete("c1").await), ttrpc::Code::FAILED_PRECONDITION);
    e.kill("c1", 9).await.unwrap();
    assert_eq!(e.wait("c1", "").await, 137);
    assert_eq!(code(e.kill("c1", 9).await), ttrpc::Code::NOT_FOUND);
    let topics = e.topics();
    assert!(
        topics.contains(&TASK_EXEC_ADDED_EVENT_TOPIC.to_string())
            && topics.contains(&TASK_EXEC_STARTED_EVENT_TOPIC.to_string()),
        "{topics:?}"
    );
}

#[tokio::test]
async fn bad_requests_get_their_codes() {
    let e = env();
    let st = e.state("nope", "").await;
    assert_eq!(code(st), ttrpc::Code::NOT_FOUND);
    let cp = Task::checkpoint(
        &e.svc,
        &tctx(),
        api::CheckpointTaskRequest {
            id: "x".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(code(cp), ttrpc::Code::UNIMPLEMENTED);
    let mut req = api::CreateTaskRequest {
        id: "c9".into(),
        bundle: e.bundle("c9", &["sleep"]),
        ..Default::default()
    };
    req.rootfs.push(api::Mount {
        type_: "tmpfs".into(),
        source: "tmpfs".into(),
        ..Default::default()
    });
    assert_eq!(
        code(Task::create(&e.svc, &tctx(), req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let mut req = api::CreateTaskRequest {
        id: "c8".into(),
        bundle: e.bundle("c8", &["sleep"]),
        ..Default::default()
    };
    req.options = MessageField::some(Any {
        type_url: "containerd.runc.v1.Options".into(),
        ..Default::default()
    });
    assert_eq!(
        code(Task::create(&e.svc, &tctx(), req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    e.create("c1", &["sleep"]).await.unwrap();
    let upd = api::UpdateTaskRequest {
        id: "c1".into(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        code(Task::update(&e.svc, &tctx(), upd).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let stats = Task::stats(
        &e.svc,
        &tctx(),
        api::StatsRequest {
            id: "c1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stats.stats.type_url, "io.containerd.cgroups.v1.Metrics");
}

#[tokio::test]
async fn oom_events_are_accepted_only_for_our_containers() {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let launcher = FakeLauncher {
        oom: std::sync::Mutex::new(Some(rx)),
        ..Default::default()
    };
    let e = env_with(launcher);
    e.create("c1", &["sleep"]).await.unwrap();
    // Another pod's container, an invalid id, an empty answer: dropped.
    for id in ["other-pods-container", "../../etc", "", "c1"] {
        tx.send(id.to_string()).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !e.topics().contains(&TASK_OOM_EVENT_TOPIC.to_string()) {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", e.topics());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ooms = e
        .topics()
        .iter()
        .filter(|t| *t == TASK_OOM_EVENT_TOPIC)
        .count();
    assert_eq!(ooms, 1, "only the event for c1 is published");
}

#[tokio::test]
async fn a_vm_death_ends_created_and_running_tasks_with_255() {
    let e = env();
    e.create("c1", &["sleep"]).await.unwrap();
    e.create("c2", &["sleep"]).await.unwrap();
    e.start("c2", "").await.unwrap();
    e.launcher
        .dead
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let waits = async { tokio::join!(e.wait("c1", ""), e.wait("c2", "")) };
    let (created, running) = tokio::time::timeout(Duration::from_secs(5), waits)
        .await
        .expect("every Wait returns when the VM dies");
    assert_eq!((created, running), (255, 255));
    // Nothing of the VM ran on once the tasks had ended.
    assert!(e.launcher.ended.load(std::sync::atomic::Ordering::SeqCst));
    // containerd's CRI deletes an exited task with a SIGKILL to all its
    // processes first, and accepts only NotFound (or success): after the
    // VM, nothing is left to signal.
    for id in ["c1", "c2"] {
        let req = api::KillRequest {
            id: id.into(),
            signal: 9,
            all: true,
            ..Default::default()
        };
        assert_eq!(
            code(Task::kill(&e.svc, &tctx(), req).await),
            ttrpc::Code::NOT_FOUND,
            "{id}"
        );
    }
    // The pod can still be taken down.
    for id in ["c1", "c2"] {
        e.delete(id).await.unwrap();
    }
    Task::shutdown(&e.svc, &tctx(), api::ShutdownRequest::default())
        .await
        .unwrap();
    assert!(*e.launcher.stopped.lock().unwrap());
}

#[tokio::test]
async fn a_guest_that_never_accepts_a_stream_fails_create_in_time_and_leaves_nothing() {
    let launcher = FakeLauncher {
        silent_streams: true,
        ..Default::default()
    };
    let e = env_with(launcher);
    let started = std::time::Instant::now();
    let r = e.create("c1", &["sleep"]).await;
    let took = started.elapsed();
    let msg = format!("{r:?}");
    assert_eq!(code(r), ttrpc::Code::DEADLINE_EXCEEDED, "{msg}");
    assert!(msg.contains("stdout of container c1"), "{msg}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        e.launcher.shared.lock().unwrap().is_empty(),
        "the rootfs share is undone"
    );
    assert_eq!(
        code(e.state("c1", "").await),
        ttrpc::Code::NOT_FOUND,
        "no container is recorded"
    );
}

#[tokio::test]
async fn invalid_ids_are_refused_before_anything_is_created() {
    let e = env();
    let long = "a".repeat(300);
    for bad in ["a/b", "..", "a,b", "a\0b", long.as_str()] {
        let req = api::CreateTaskRequest {
            id: bad.into(),
            bundle: e.bundle("valid", &["sleep"]),
            ..Default::default()
        };
        assert_eq!(
            code(Task::create(&e.svc, &tctx(), req).await),
            ttrpc::Code::INVALID_ARGUMENT,
            "{bad:?}"
        );
        assert_eq!(
            code(e.state("valid", bad).await),
            ttrpc::Code::INVALID_ARGUMENT,
            "{bad:?}"
        );
    }
    assert!(
        e.launcher.launches.lock().unwrap().is_empty(),
        "no VM booted"
    );
    // A sandbox id (from the CRI annotation) is checked the same way.
    let b = e.dir.path().join("c1");
    std::fs::create_dir_all(&b).unwrap();
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_annotations(Some(
        [(
            "io.kubernetes.cri.sandbox-id".to_string(),
            "x,share=on".to_string(),
        )]
        .into(),
    ));
    spec.save(b.join("config.json")).unwrap();
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: b.display().to_string(),
        ..Default::default()
    };
    assert_eq!(
        code(Task::create(&e.svc, &tctx(), req).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(
        e.launcher.launches.lock().unwrap().is_empty(),
        "no VM booted"
    );
}

#[tokio::test]
async fn a_failed_start_ends_the_process_with_an_exit_event_and_wait_returns() {
    let e = env();
    e.create("c1", &["sleep"]).await.unwrap();
    e.start("c1", "").await.unwrap();
    // The guest refuses this exec (its process spec is not JSON).
    let req = api::ExecProcessRequest {
        id: "c1".into(),
        exec_id: "x1".into(),
        spec: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: b"{not json".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Task::exec(&e.svc, &tctx(), req).await.unwrap();
    assert_eq!(
        code(e.start("c1", "x1").await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let status = tokio::time::timeout(Duration::from_secs(5), e.wait("c1", "x1"))
        .await
        .expect("Wait on a process whose start failed returns");
    assert_eq!(status, 255);
    assert_eq!(
        code(e.start("c1", "x1").await),
        ttrpc::Code::FAILED_PRECONDITION,
        "a stopped process cannot be started again"
    );
    let topics = e.topics();
    let exits = topics
        .iter()
        .filter(|t| *t == TASK_EXIT_EVENT_TOPIC)
        .count();
    assert_eq!(exits, 1, "{topics:?}");
    assert!(!topics.contains(&TASK_EXEC_STARTED_EVENT_TOPIC.to_string()));
}

#[tokio::test]
async fn the_sandbox_containers_netns_reaches_the_launcher() {
    use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
    let e = env();
    // The default spec asks for a new, unnamed network namespace: no
    // network for the pod.
    e.create("c0", &["sleep"]).await.unwrap();
    let e2 = env();
    let bundle = e2.bundle("c1", &["sleep"]);
    let path = std::path::Path::new(&bundle).join("config.json");
    let mut spec = oci_spec::runtime::Spec::load(&path).unwrap();
    let mut linux = spec.linux().clone().unwrap();
    let mut ns = linux.namespaces().clone().unwrap();
    ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    ns.push(
        LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Network)
            .path("/var/run/netns/cni-1234")
            .build()
            .unwrap(),
    );
    linux.set_namespaces(Some(ns));
    spec.set_linux(Some(linux));
    spec.save(&path).unwrap();
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle,
        ..Default::default()
    };
    Task::create(&e2.svc, &tctx(), req).await.unwrap();
    assert_eq!(e.launcher.options.lock().unwrap()[0].netns, None);
    assert_eq!(
        e2.launcher.options.lock().unwrap()[0].netns.as_deref(),
        Some(std::path::Path::new("/var/run/netns/cni-1234"))
    );
}

#[tokio::test]
async fn the_sandbox_containers_cgroup_reaches_the_launcher_and_a_bad_one_is_refused() {
    let with_cgroup = |e: &Env, id: &str, cgroup: &str| {
        let bundle = e.bundle(id, &["sleep"]);
        let path = std::path::Path::new(&bundle).join("config.json");
        let mut spec = oci_spec::runtime::Spec::load(&path).unwrap();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_cgroups_path(Some(cgroup.into()));
        spec.set_linux(Some(linux));
        spec.save(&path).unwrap();
        api::CreateTaskRequest {
            id: id.into(),
            bundle,
            ..Default::default()
        }
    };
    let e = env();
    let req = with_cgroup(
        &e,
        "c1",
        "kubepods-besteffort-pod12.slice:cri-containerd:c1",
    );
    Task::create(&e.svc, &tctx(), req).await.unwrap();
    let cgroup = e.launcher.options.lock().unwrap()[0].cgroup.clone();
    assert_eq!(
        cgroup.map(|c| c.to_string()).as_deref(),
        Some(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-c1.scope"
        )
    );

    let e = env();
    let req = with_cgroup(&e, "c2", "/kubepods/../../etc");
    match Task::create(&e.svc, &tctx(), req).await {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{s:?}");
            assert!(s.message.contains("linux.cgroupsPath"), "{s:?}");
            assert!(s.message.contains("task c2"), "{s:?}");
        }
        other => panic!("a cgroupsPath with `..` was accepted: {other:?}"),
    }
    assert!(
        e.launcher.launches.lock().unwrap().is_empty(),
        "no VM booted"
    );
}
