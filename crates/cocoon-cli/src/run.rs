//! `cocoon run`: one container in one VM, with stdio forwarded, then a full
//! teardown. The exit status is the container's.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cocoon_protocols::{Id, StreamKind};
use cocoon_runtime::{Container, Sandbox, SandboxOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Configuration file (else $COCOON_CONF_FILE, then the default paths).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Host directory used as the container's root filesystem.
    #[arg(long)]
    rootfs: PathBuf,
    /// Allocate a terminal for the container.
    #[arg(short = 't', long)]
    tty: bool,
    /// Memory limit of the container, in MiB (its cgroup in the guest).
    #[arg(long = "memory", value_name = "MIB")]
    memory_mib: Option<u64>,
    /// A network namespace (e.g. /var/run/netns/NAME) whose interfaces the
    /// VM takes over: the container gets their addresses and routes.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// A host cgroup for the VM (QEMU and its daemons), as an OCI
    /// `linux.cgroupsPath`: `/parent/name` below the root of every
    /// hierarchy, or systemd's `slice:prefix:name`. Cocoon creates what is
    /// missing and removes what it created when the VM is gone.
    #[arg(long, value_name = "PATH", value_parser = parse_cgroup)]
    cgroup: Option<cocoon_runtime::cgroup::CgroupPath>,
    /// Environment variables (KEY=VALUE) for the command.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

const CONTAINER_ID: &str = "main";

/// Exit status when Cocoon itself fails (as `docker run` and `ctr` use 125).
const EXIT_RUNTIME_ERROR: i32 = 125;

pub fn main(args: RunArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cocoon run: {e}");
            return EXIT_RUNTIME_ERROR;
        }
    };
    let code = rt.block_on(async {
        match run(args).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cocoon run: {e:#}");
                EXIT_RUNTIME_ERROR
            }
        }
    });
    // A blocking read of our stdin may still be pending; do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// Cleans up after `cocoon run`s that were killed outright: their VMs died
/// with them, but their mounts and state directories are still here.
async fn sweep_stale_runs(state_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(
                "cleaning up {} (its cocoon run is gone)",
                e.path().display()
            );
            if let Ok(id) = Id::sandbox(&name) {
                if let Err(e) = cocoon_runtime::cleanup_dead(state_dir, &id).await {
                    tracing::warn!("{}", cocoon_runtime::error_chain(&e));
                }
            }
        }
    }
}

fn spec_for(args: &RunArgs) -> anyhow::Result<oci_spec::runtime::Spec> {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.command.clone()));
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "HOME=/root".into(),
    ];
    if args.tty {
        env.push("TERM=xterm".into());
    }
    env.extend(args.env.iter().cloned());
    process.set_env(Some(env));
    process.set_cwd("/".into());
    process.set_terminal(Some(args.tty));
    spec.set_process(Some(process));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    spec.set_hostname(Some("cocoon".into()));
    if let Some(mib) = args.memory_mib {
        let bytes =
            i64::try_from(mib.saturating_mul(1024 * 1024)).context("--memory is too large")?;
        let memory = oci_spec::runtime::LinuxMemoryBuilder::default()
            .limit(bytes)
            .swap(bytes)
            .build()?;
        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut resources = linux.resources().clone().unwrap_or_default();
        resources.set_memory(Some(memory));
        linux.set_resources(Some(resources));
        spec.set_linux(Some(linux));
    }
    Ok(spec)
}

async fn run(args: RunArgs) -> anyhow::Result<i32> {
    let rootfs = std::fs::canonicalize(&args.rootfs)
        .with_context(|| format!("rootfs {}", args.rootfs.display()))?;
    let loaded = cocoon_config::load(args.config.as_deref())?;
    tracing::info!(source = %loaded.source, "configuration");
    sweep_stale_runs(&loaded.config.runtime.state_dir).await;
    let id = Id::sandbox(&format!("run-{}", std::process::id()))?;
    let cid = Id::container(CONTAINER_ID)?;

    let interrupted = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
    };
    tokio::pin!(interrupted);

    let options = SandboxOptions {
        netns: args.netns.clone(),
        cgroup: args.cgroup.clone(),
        ..Default::default()
    };
    let hypervisor = cocoon_runtime::hypervisor(&loaded.config);
    let start = Sandbox::start_with(&id, &loaded.config, &options, hypervisor.as_ref());
    let mut sandbox = tokio::select! {
        s = start => s?,
        _ = &mut interrupted => anyhow::bail!("interrupted while booting"),
    };
    let result = tokio::select! {
        r = run_in(&mut sandbox, &cid, &args, &rootfs) => r,
        _ = &mut interrupted => {
            eprintln!("cocoon run: interrupted; stopping the VM");
            Ok(130)
        }
    };
    sandbox.remove_container(&cid).await;
    sandbox.stop().await;
    result
}

/// The host terminal in raw mode while a container's terminal is attached;
/// restored on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// The host terminal's size, if stdin is one.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which outlives
    // the call.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Keeps the container's terminal the size of the host's.
fn follow_window_size(container: Container) {
    let Ok(mut winch) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
    else {
        return;
    };
    tokio::spawn(async move {
        loop {
            if let Some((rows, columns)) = window_size() {
                let _ = container.resize(None, rows.into(), columns.into()).await;
            }
            if winch.recv().await.is_none() {
                return;
            }
        }
    });
}

async fn run_in(
    sandbox: &mut Sandbox,
    cid: &Id,
    args: &RunArgs,
    rootfs: &std::path::Path,
) -> anyhow::Result<i32> {
    let spec = spec_for(args)?;
    let container = sandbox
        .create_container(cid, spec, rootfs, args.tty)
        .await?;

    let _raw = if args.tty {
        follow_window_size(container.clone());
        RawTerminal::enter()
    } else {
        None
    };
    let stdout = container.open_stream(StreamKind::Stdout, None).await?;
    let stderr = if args.tty {
        None
    } else {
        Some(container.open_stream(StreamKind::Stderr, None).await?)
    };
    let stdin = container.open_stream(StreamKind::Stdin, None).await?;
    // In chunks of up to what the guest may send before it waits for
    // credit (tokio's `copy` would take 8 KiB at a time).
    const OUTPUT_CHUNK: usize = 256 * 1024;
    let pump_out = tokio::spawn(async move {
        let mut s = tokio::io::BufReader::with_capacity(OUTPUT_CHUNK, stdout);
        let mut o = tokio::io::stdout();
        // The first bytes (or the end, for a command that prints nothing)
        // mark the `first-output` phase of the debug log.
        let first = s.fill_buf().await?;
        let n = first.len();
        tracing::debug!(bytes = n, phase = "first-output", "first output");
        o.write_all(first).await?;
        s.consume(n);
        let r = tokio::io::copy_buf(&mut s, &mut o)
            .await
            .map(|c| c + n as u64);
        let _ = o.flush().await;
        r
    });
    let pump_err = tokio::spawn(async move {
        if let Some(s) = stderr {
            let mut s = tokio::io::BufReader::with_capacity(OUTPUT_CHUNK, s);
            let mut e = tokio::io::stderr();
            let _ = tokio::io::copy_buf(&mut s, &mut e).await;
            let _ = e.flush().await;
        }
    });
    tokio::spawn(async move {
        let mut s = stdin;
        let mut i = tokio::io::stdin();
        let _ = tokio::io::copy(&mut i, &mut s).await;
        let _ = s.shutdown().await;
    });

    container.start().await?;
    let exit = container.wait(None).await?;
    // The container's init has exited, so its PID namespace is gone and the
    // streams end; wait for their last bytes.
    let _ = pump_out.await;
    let _ = pump_err.await;
    Ok(exit.status as i32)
}

fn parse_cgroup(s: &str) -> Result<cocoon_runtime::cgroup::CgroupPath, String> {
    cocoon_runtime::cgroup::CgroupPath::parse(s).map_err(|e| e.reason)
}
