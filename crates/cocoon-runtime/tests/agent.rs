//! The guest agent answers bad requests with errors and keeps serving:
//! a real VM (QEMU, the guest image), driven through `Sandbox` directly.
//! `#[ignore]`d in a plain `cargo test`; `scripts/test.sh` runs it.

use std::time::Duration;

use cocoon_protocols::agent::*;
use cocoon_runtime::{ctx, Sandbox};

fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> ttrpc::Code {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => s.code(),
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM: run by scripts/test.sh"]
async fn bad_requests_get_errors_and_the_agent_lives_on() {
    let guest =
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into());
    let state = tempfile::tempdir().unwrap();
    let mut config = cocoon_config::Config::default();
    let guest = std::path::PathBuf::from(guest);
    config.guest.kernel = guest.join("vmlinuz");
    config.guest.initrd = guest.join("initrd.img");
    config.guest.dir = guest;
    config.runtime.state_dir = state.path().to_path_buf();
    let id = cocoon_protocols::Id::sandbox("agent-errors").unwrap();
    let sandbox = Sandbox::start(&id, &config).await.unwrap();
    let a = sandbox.agent();
    let t = || ctx(Duration::from_secs(10));

    let garbage = CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec_json: b"{not json".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code(a.create_container(t(), &garbage).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let bad_id = CreateContainerRequest {
        container_id: "../escape".into(),
        oci_spec_json: b"{}".to_vec(),
        ..Default::default()
    };
    assert_eq!(
        code(a.create_container(t(), &bad_id).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let unknown = ProcessRequest {
        container_id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        code(a.wait_process(t(), &unknown).await),
        ttrpc::Code::NOT_FOUND
    );
    let r = ContainerRequest {
        container_id: "nope".into(),
        ..Default::default()
    };
    assert_eq!(
        code(a.start_container(t(), &r).await),
        ttrpc::Code::NOT_FOUND
    );
    assert_eq!(
        code(a.stats_container(t(), &r).await),
        ttrpc::Code::NOT_FOUND
    );
    let sig = SignalProcessRequest {
        container_id: "nope".into(),
        signal: 9999,
        ..Default::default()
    };
    assert_eq!(
        code(a.signal_process(t(), &sig).await),
        ttrpc::Code::INVALID_ARGUMENT
    );
    let resize = ResizeTtyRequest {
        container_id: "nope".into(),
        rows: 1,
        columns: 1,
        ..Default::default()
    };
    assert_eq!(
        code(a.resize_tty(t(), &resize).await),
        ttrpc::Code::NOT_FOUND
    );

    // Still serving, on the same connection.
    let pong = a
        .ping(t(), &Empty::new())
        .await
        .expect("agent still answers");
    assert_eq!(pong.kernel_release, sandbox.kernel_release());
    sandbox.stop().await;
    let left: Vec<_> = std::fs::read_dir(state.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "state left behind: {left:?}");
}
