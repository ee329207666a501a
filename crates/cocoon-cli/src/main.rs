//! `cocoon`: the admin CLI.

mod bench;
mod check;
mod image;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cocoon",
    version,
    about = "Cocoon: containers in lightweight VMs"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "COCOON_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Says whether this host can run Cocoon, and how.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Prints the resolved configuration and where it came from.
    Env {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Guest image commands.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Boots a VM and runs one command in a container in it.
    Run(run::RunArgs),
    /// Measures Cocoon on this host beside runc and a bare VM; prints a
    /// markdown table (and writes JSON and a PNG chart).
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Builds the guest kernels and initrds from Debian packages: the
    /// Cocoon kernel (from linux-source, cached) and Debian's cloud kernel.
    Build {
        /// Output directory (the configuration's `guest.dir`).
        #[arg(long, default_value = cocoon_config::GuestConfig::DEFAULT_DIR)]
        out: PathBuf,
        /// The cocoon-agent binary; defaults to the one beside this binary.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Debian kernel package for the image's `debian/` (a meta package
        /// is resolved).
        #[arg(long, default_value = "linux-image-cloud-amd64")]
        kernel_package: String,
        /// Leave the Debian kernel out (only the Cocoon kernel).
        #[arg(long, conflicts_with = "kernel_package")]
        no_debian: bool,
        /// Kernel source tarball of the Cocoon kernel.
        #[arg(long, default_value = image::kernel::DEFAULT_SOURCE)]
        kernel_source: PathBuf,
        /// Kernel config fragment applied on top of allnoconfig; defaults
        /// to the one built into this binary (configs/kernel/cocoon-guest.config).
        #[arg(long)]
        kernel_config: Option<PathBuf>,
        /// Where built Cocoon kernels are kept, by hash of their inputs.
        #[arg(long, default_value = image::kernel::DEFAULT_CACHE)]
        kernel_cache: PathBuf,
        /// Rebuild even if the inputs are unchanged, the Cocoon kernel too
        /// (minutes; without it a cached kernel is reused).
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .init();
    let code = match cli.command {
        Command::Check { config } => check::check(config.as_deref()),
        Command::Env { config } => check::env(config.as_deref()),
        Command::Image {
            command:
                ImageCommand::Build {
                    out,
                    agent,
                    kernel_package,
                    no_debian,
                    kernel_source,
                    kernel_config,
                    kernel_cache,
                    force,
                },
        } => {
            let agent = agent.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("cocoon-agent")))
                    .unwrap_or_else(|| "cocoon-agent".into())
            });
            match image::build(&image::BuildOptions {
                out,
                agent,
                debian_kernel: (!no_debian).then_some(kernel_package),
                kernel_source,
                kernel_config,
                kernel_cache,
                force,
            }) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("cocoon image build: {e:#}");
                    1
                }
            }
        }
        Command::Run(args) => run::main(args),
        Command::Bench(args) => bench::main(args),
    };
    std::process::exit(code);
}
