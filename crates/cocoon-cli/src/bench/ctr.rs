//! containerd driven through `ctr`, as a user would: one namespace of its
//! own, the busybox image imported from an OCI tarball.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The image `scripts/busybox-oci.sh` names its tarball.
pub const IMAGE: &str = "docker.io/library/busybox:cocoon";
pub const NAMESPACE: &str = "cocoon-bench";
pub const RUNC: &str = "io.containerd.runc.v2";
pub const COCOON: &str = "io.containerd.cocoon.v2";

/// A runtime as `ctr run` names it, with Cocoon's flavour file.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Shown in the tables: `runc`, `cocoon q35`, ….
    pub label: String,
    pub name: &'static str,
    pub config: Option<PathBuf>,
}

impl Runtime {
    pub fn runc() -> Self {
        Self {
            label: "runc".into(),
            name: RUNC,
            config: None,
        }
    }

    pub fn cocoon(label: &str, flavour: &Path) -> Self {
        Self {
            label: format!("cocoon {label}"),
            name: COCOON,
            config: Some(flavour.to_path_buf()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Ctr {
    pub address: PathBuf,
}

impl Ctr {
    pub fn command(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(NAMESPACE);
        c
    }

    /// Runs `ctr ARGS`; an error carries its stderr.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ctr {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    pub fn import(&self, tar: &Path) -> Result<()> {
        self.run(&["images", "import", &tar.to_string_lossy()])
            .map(|_| ())
    }

    /// `ctr run` arguments up to the image (runtime, flavour, `extra`).
    pub fn run_args(rt: &Runtime, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["run".to_string(), "--runtime".into(), rt.name.into()];
        if let Some(c) = &rt.config {
            a.push("--runtime-config-path".into());
            a.push(c.to_string_lossy().into_owned());
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// `ctr run [extra] IMAGE ID CMD...` as a command, not yet run.
    pub fn run_command(&self, rt: &Runtime, extra: &[&str], id: &str, cmd: &[&str]) -> Command {
        let mut c = self.command();
        c.args(Self::run_args(rt, extra))
            .arg(IMAGE)
            .arg(id)
            .args(cmd);
        c.stdin(Stdio::null());
        c
    }

    /// Runs a container to its end and returns its output.
    pub fn run_rm(&self, rt: &Runtime, extra: &[&str], id: &str, cmd: &[&str]) -> Result<Output> {
        let mut e = vec!["--rm"];
        e.extend_from_slice(extra);
        let out = self
            .run_command(rt, &e, id, cmd)
            .output()
            .with_context(|| format!("ctr run {id}"))?;
        if !out.status.success() {
            self.remove(id);
            bail!(
                "ctr run {id} ({}): {}: {}",
                rt.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Starts a long-running container (`ctr run -d`).
    pub fn start(&self, rt: &Runtime, extra: &[&str], id: &str, cmd: &[&str]) -> Result<()> {
        let mut e = vec!["-d"];
        e.extend_from_slice(extra);
        let out = self
            .run_command(rt, &e, id, cmd)
            .stdout(Stdio::null())
            .output()
            .with_context(|| format!("ctr run -d {id}"))?;
        if !out.status.success() {
            self.remove(id);
            bail!(
                "ctr run -d {id} ({}): {}: {}",
                rt.label,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Kills and deletes task and container `id`, whatever is left of them.
    pub fn remove(&self, id: &str) {
        let quiet = |args: &[&str]| {
            let _ = self
                .command()
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&["tasks", "kill", "-s", "SIGKILL", id]);
        quiet(&["tasks", "rm", "-f", id]);
        quiet(&["containers", "rm", id]);
    }

    /// The task's bundle in containerd's state directory, where the shim
    /// writes its socket's `address`.
    pub fn shim_address(state: &Path, id: &str) -> Result<PathBuf> {
        let f = state
            .join("io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id)
            .join("address");
        let a = std::fs::read_to_string(&f).with_context(|| format!("{}", f.display()))?;
        Ok(PathBuf::from(a.trim().trim_start_matches("unix://")))
    }
}
