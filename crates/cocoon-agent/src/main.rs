//! `cocoon-agent`: PID 1 of the pod VM.
//!
//! As init it leaves the initramfs for a tmpfs root (so that containers are
//! entered with pivot_root), mounts the pseudo filesystems, loads the
//! kernel modules the image lists, reaps every child, and serves the agent
//! protocol on vsock.
//! Containers are created by re-running this binary as a short-lived,
//! single-threaded helper (`cocoon-agent helper ...`): libcontainer clones
//! processes, which is only sound from a single-threaded process.

mod helper;
mod init;
mod launcher;
mod modules;
mod reaper;
mod service;
mod stdio;
mod switch_root;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(helper::ARG) {
        std::process::exit(helper::main(&args[2..]));
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COCOON_AGENT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run() {
        tracing::error!("agent failed: {e:#}");
    }
    // PID 1 must not exit: that panics the kernel. Power off instead.
    init::power_off();
}

fn run() -> anyhow::Result<()> {
    let is_init = std::process::id() == 1;
    if is_init {
        init::setup()?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(service::serve())?;
    Ok(())
}
