//! `containerd-shim-cocoon-v2`: the containerd runtime `io.containerd.cocoon.v2`.
//!
//! One shim per pod: `start` groups containers by the CRI sandbox id; the
//! serving shim boots the pod's VM at the first Create and stops it when the
//! last task is gone. `delete` cleans up after a shim that died.

mod attach;
mod create;
mod delete;
mod error;
#[cfg(test)]
mod fake;
mod io;
mod metrics;
mod monitor;
mod options;
mod pod;
mod portforward;
mod process;
mod service;
mod start;
mod state;
mod table;
mod task;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use cocoon_protocols::cri;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Flags, StartOpts};

const RUNTIME_ID: &str = "io.containerd.cocoon.v2";

struct CocoonShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
    /// The socket the serving shim listens on (`-socket`).
    socket: PathBuf,
}

/// The pod a bundle's container belongs to: its CRI sandbox, or itself.
fn grouping(bundle: &Path, id: &str) -> String {
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok();
    let ann = spec
        .as_ref()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default();
    match (
        ann.get(cri::CONTAINER_TYPE).map(String::as_str),
        ann.get(cri::SANDBOX_ID),
    ) {
        (Some(cri::TYPE_CONTAINER), Some(sandbox)) if !sandbox.is_empty() => sandbox.clone(),
        _ => id.to_string(),
    }
}

#[async_trait]
impl Shim for CocoonShim {
    type T = service::Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        init_logging(args);
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
            socket: PathBuf::from(args.socket.trim_start_matches("unix://")),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let bundle =
            std::env::current_dir().map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        let group = grouping(&bundle, &opts.id);
        let address = spawn(opts, &group, Vec::new()).await?;
        // containerd reads the address from here; without it stale sockets pile up.
        std::fs::write("address", &address)
            .map_err(|e| containerd_shim::Error::Other(format!("write address: {e}")))?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle =
            std::env::current_dir().map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        cleanup_dead_shim(&bundle).await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: now.as_secs() as i64,
                    nanos: now.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // By its own path: the library removes the socket named in the
        // bundle's `address` file once the server is down, but by then
        // containerd, answered, may have removed the bundle (seen after a
        // containerd restart), and the socket would stay. Connections
        // already made are not affected.
        remove_socket(&self.socket);
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(
            &self.namespace,
            &self.id,
            Arc::new(pod::RemoteEvents {
                publisher,
                namespace: self.namespace.clone(),
            }),
            Arc::new(pod::SandboxLauncher),
            self.exit.clone(),
        )
    }
}

/// Serving, logs go to containerd's `log` fifo in the bundle; `start` and
/// `delete` log to stderr (stdout carries their answer). `-debug` (or
/// `$COCOON_SHIM_LOG`) raises the level.
fn init_logging(args: &Flags) {
    let level = std::env::var("COCOON_SHIM_LOG").unwrap_or_else(|_| {
        if args.debug {
            "debug".into()
        } else {
            "info".into()
        }
    });
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(filter);
    let fifo = if args.action.is_empty() {
        std::fs::OpenOptions::new().write(true).open("log").ok()
    } else {
        None
    };
    let _ = match fifo {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The `delete` path: if the pod's shim is gone, kill its VM and daemons,
/// undo its mounts and remove its state and the shim's socket; if it still
/// serves (a failed Create in a live pod), only this bundle's rootfs mount
/// is undone. The pointer
/// file is acted on only if it names `<state_dir>/<valid sandbox id>` of
/// the configured state directory.
async fn cleanup_dead_shim(bundle: &Path) {
    // Every layer Create mounted on the bundle's rootfs (a few at most).
    let rootfs = bundle.join("rootfs");
    let flags = nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW;
    for _ in 0..16 {
        if nix::mount::umount2(&rootfs, flags).is_err() {
            break;
        }
    }
    let socket = std::fs::read_to_string(bundle.join("address"))
        .ok()
        .map(|a| PathBuf::from(a.trim().trim_start_matches("unix://")));
    let alive = match &socket {
        Some(path) => serving(path).await,
        None => false,
    };
    let pointer = bundle.join(service::SANDBOX_POINTER);
    let run_dir = std::fs::read_to_string(&pointer);
    let _ = std::fs::remove_file(&pointer);
    if alive {
        return;
    }
    // A shim that was killed leaves its socket behind (one that exits
    // removes it).
    if let Some(path) = &socket {
        remove_dead_socket(path).await;
    }
    let Ok(run_dir) = run_dir else {
        return;
    };
    // The configured state directory; a flavour chosen by ConfigPath may
    // name another, so the pointer's own parent is tried next. Either way
    // cleanup_dead acts only on a directory that holds this sandbox's
    // marker, which only Cocoon writes.
    let configured = match cocoon_config::load(None) {
        Ok(l) => l.config.runtime.state_dir,
        Err(e) => {
            tracing::warn!("configuration: {}", cocoon_runtime::error_chain(&e));
            cocoon_config::Config::default().runtime.state_dir
        }
    };
    let run_dir = Path::new(run_dir.trim_end());
    let candidates = [Some(configured.as_path()), run_dir.parent()];
    let Some((state_dir, id)) = candidates.into_iter().flatten().find_map(|dir| {
        cocoon_runtime::sandbox_id_of(dir, run_dir).map(|id| (dir.to_path_buf(), id))
    }) else {
        tracing::warn!(
            "{}: {} is not a sandbox directory; not cleaned",
            pointer.display(),
            run_dir.display()
        );
        return;
    };
    if let Err(e) = cocoon_runtime::cleanup_dead(&state_dir, &id).await {
        tracing::warn!(sandbox = %id, "cleanup: {}", cocoon_runtime::error_chain(&e));
    }
}

/// Whether a shim serves on `socket`.
async fn serving(socket: &Path) -> bool {
    tokio::net::UnixStream::connect(socket).await.is_ok()
}

/// Removes `path` if it is a socket.
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    if is_socket {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("remove {}: {e}", path.display());
        }
    }
}

/// Removes the socket of a shim that died, if no shim serves on it: it is
/// removed only if it is still the very socket found dead (a new shim of
/// the same pod may bind the same path).
async fn remove_dead_socket(socket: &Path) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let id = |m: std::fs::Metadata| m.file_type().is_socket().then(|| (m.dev(), m.ino()));
    let Some(dead) = std::fs::symlink_metadata(socket).ok().and_then(id) else {
        return;
    };
    if serving(socket).await {
        return;
    }
    if std::fs::symlink_metadata(socket).ok().and_then(id) == Some(dead) {
        match std::fs::remove_file(socket) {
            Ok(()) => tracing::info!("removed the socket of a dead shim: {}", socket.display()),
            Err(e) => tracing::warn!("remove {}: {e}", socket.display()),
        }
    }
}

#[tokio::main]
async fn main() {
    let config = Config {
        no_reaper: true,
        no_sub_reaper: true,
        // Cocoon logs through tracing, to the same fifo (see init_logging).
        no_setup_logger: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<CocoonShim>(RUNTIME_ID, Some(config)).await;
}
