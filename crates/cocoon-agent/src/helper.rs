//! The single-threaded helper that calls libcontainer's builders.
//!
//! `cocoon-agent helper create <id> <bundle> <root> [<console-socket>]` and
//! `cocoon-agent helper exec <id> <process.json> <root> [<console-socket>]`: the container's
//! stdin, stdout and stderr arrive as fds 3, 4 and 5. The new process's pid is
//! printed on stdout; errors go to stderr with exit status 1. The container
//! process outlives the helper and is reparented to the agent (PID 1).

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

pub const ARG: &str = "helper";

/// fds the agent places the container's stdio on.
pub const STDIO_FDS: [i32; 3] = [3, 4, 5];

pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(pid) => {
            println!("{pid}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<i32, String> {
    let (op, id, path, root, console) = match args {
        [op, id, path, root] => (op, id, path, root, None),
        [op, id, path, root, console] => (op, id, path, root, Some(PathBuf::from(console))),
        _ => {
            return Err(format!(
                "usage: helper create|exec ID PATH ROOT [CONSOLE-SOCKET] (got {args:?})"
            ))
        }
    };
    // SAFETY: the agent opened exactly these fds for this process, and
    // nothing else in this process owns them.
    let [stdin, stdout, stderr] = STDIO_FDS.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    let builder = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(PathBuf::from(root))
        .map_err(|e| format!("container root {root}: {e}"))?
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        // With a terminal, the pty is made in the container and its master
        // sent back over this socket (the runc console-socket protocol).
        .with_console_socket(console);
    match op.as_str() {
        "create" => {
            let container = builder
                .as_init(PathBuf::from(path))
                .with_systemd(false)
                // pivot_root(2), libcontainer's default: init has moved the
                // guest off the initramfs (see `switch_root`), so it works.
                .with_detach(true)
                .build()
                .map_err(|e| format!("create container {id}: {e}"))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| format!("container {id} has no pid after create"))
        }
        "exec" => builder
            .as_tenant()
            .with_process(Some(PathBuf::from(path)))
            .with_detach(true)
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| format!("exec in container {id}: {e}")),
        other => Err(format!("unknown helper operation {other:?}")),
    }
}
