//! End-to-end tests of `cocoon run`: real QEMU, real virtiofsd, real
//! vhost-device-vsock, the real guest kernel and agent.
//!
//! They boot VMs, so they are `#[ignore]`d in a plain `cargo test`; the
//! project's test command (`scripts/test.sh`) runs them with
//! `--include-ignored`. They need root, the guest image (`COCOON_GUEST_DIR`,
//! default `/var/lib/cocoon/guest`) and a static busybox (`/bin/busybox`);
//! a missing one fails the test with its name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const COCOON: &str = env!("CARGO_BIN_EXE_cocoon");

fn guest_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("COCOON_GUEST_DIR").unwrap_or_else(|_| "/var/lib/cocoon/guest".into()),
    );
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file(),
        "no guest image in {} (run: cocoon image build --out {0})",
        dir.display()
    );
    dir
}

/// A private world for one test: config, state directory, busybox rootfs.
struct World {
    tmp: tempfile::TempDir,
}

impl World {
    fn new(hypervisor_toml: &str) -> Self {
        Self::with(hypervisor_toml, "")
    }

    fn with(hypervisor_toml: &str, guest_toml: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("cocoon-e2e-")
            .tempdir()
            .unwrap();
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.is_file(),
            "static busybox missing at /bin/busybox (apt-get install busybox-static)"
        );
        let root = tmp.path().join("rootfs");
        for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for applet in [
            "sh",
            "echo",
            "cat",
            "uname",
            "true",
            "head",
            "tr",
            "sha256sum",
            "kill",
            "sleep",
            "grep",
            "free",
        ] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        let state = tmp.path().join("state");
        let config = format!(
            "[hypervisor]\nboot_timeout_secs = 60\n{hypervisor_toml}\n[guest]\ndir = {:?}\n{guest_toml}\n[runtime]\nstate_dir = {:?}\n",
            guest_dir(),
            state
        );
        std::fs::write(tmp.path().join("cocoon.toml"), config).unwrap();
        Self { tmp }
    }

    fn config(&self) -> PathBuf {
        self.tmp.path().join("cocoon.toml")
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(COCOON);
        c.arg("run")
            .arg("--config")
            .arg(self.config())
            .arg("--rootfs")
            .arg(self.tmp.path().join("rootfs"))
            .arg("--");
        c.args(args);
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).output().unwrap();
        self.assert_clean();
        out
    }

    /// Nothing of this world's sandboxes is left: no process, mount or file.
    fn assert_clean(&self) {
        let state = self.state();
        let state_s = state.to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&state_s)).collect();
        assert!(left.is_empty(), "mounts left behind: {left:#?}");
        let mut procs = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&state_s) {
                    procs.push(cmdline);
                }
            }
        }
        assert!(procs.is_empty(), "processes left behind: {procs:#?}");
        if state.exists() {
            let entries: Vec<_> = std::fs::read_dir(&state)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            assert!(entries.is_empty(), "state left behind: {entries:?}");
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn echo_hello() {
    let w = World::new("");
    let o = w.run(&["echo", "hello"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "hello\n");
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn exit_code_is_propagated() {
    let w = World::new("");
    let o = w.run(&["sh", "-c", "echo to-stderr >&2; exit 42"]);
    assert_eq!(o.status.code(), Some(42), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("to-stderr"), "{}", stderr(&o));
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn sigkill_reports_137() {
    // The container's init ignores SIGKILL from inside its PID namespace, so
    // let the kernel send it: the OOM killer, under a 16 MiB limit.
    let w = World::new("");
    let mut c = Command::new(COCOON);
    c.arg("run")
        .arg("--config")
        .arg(w.config())
        .arg("--rootfs")
        .arg(w.tmp.path().join("rootfs"));
    c.args([
        "--memory",
        "16",
        "--",
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    let o = c.stdin(Stdio::null()).output().unwrap();
    w.assert_clean();
    assert_eq!(
        o.status.code(),
        Some(137),
        "stdout: {} stderr: {}",
        stdout(&o),
        stderr(&o)
    );
    assert!(!stdout(&o).contains("survived"));
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn stdin_is_forwarded() {
    let w = World::new("");
    let mut child = w
        .cmd(&["cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(data.as_bytes()).unwrap();
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    w.assert_clean();
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), input);
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn ten_mib_of_stdout_arrive_intact() {
    use sha2::Digest;
    let w = World::new("");
    let o = w.run(&[
        "sh",
        "-c",
        "head -c 10485760 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
    ]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(o.stdout.len(), 10 * 1024 * 1024);
    let host_sum = format!("{:x}", sha2::Sha256::digest(&o.stdout));
    let guest_sum = stderr(&o)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(host_sum, guest_sum, "stderr: {}", stderr(&o));
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn uname_is_the_guest_kernel() {
    let w = World::new("");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(guest_dir().join("manifest.json")).unwrap())
            .unwrap();
    let guest = manifest["kernel_release"].as_str().unwrap().to_string();
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let o = w.run(&["uname", "-r"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o).trim(), guest);
    assert_ne!(stdout(&o).trim(), host.trim());
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn debian_kernel_flavour_boots_with_its_modules() {
    // The image's debian/: Debian's kernel, whose drivers the agent loads
    // from the initrd (configs/q35-debian.toml).
    let debian = guest_dir().join("debian");
    assert!(
        debian.join("vmlinuz").is_file(),
        "no Debian kernel in {} (cocoon image build without --no-debian)",
        debian.display()
    );
    let w = World::with(
        "",
        &format!(
            "kernel = {:?}\ninitrd = {:?}\n",
            debian.join("vmlinuz"),
            debian.join("initrd.img")
        ),
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(guest_dir().join("manifest.json")).unwrap())
            .unwrap();
    let release = manifest["debian"]["kernel_release"].as_str().unwrap();
    let o = w.run(&["sh", "-c", "uname -r; cat /proc/modules"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().next(), Some(release), "{out}");
    // The share and the agent's channel work only through modules here.
    for m in ["virtiofs", "vmw_vsock_virtio_transport"] {
        assert!(
            out.lines().any(|l| l.split_whitespace().next() == Some(m)),
            "module {m} not loaded: {out}"
        );
    }
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn microvm_flavour_runs() {
    let w = World::new("machine = \"microvm\"\nmemory_mib = 384\n");
    let o = w.run(&["sh", "-c", "grep MemTotal /proc/meminfo"]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let kib: u64 = stdout(&o)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        kib > 200 * 1024 && kib <= 384 * 1024,
        "MemTotal {kib} kB for a 384 MiB flavour"
    );
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn two_vms_at_once_do_not_interfere() {
    let w = World::new("");
    let children: Vec<_> = ["alpha", "bravo"]
        .iter()
        .map(|tag| {
            let script = format!("for i in 1 2 3 4 5; do echo {tag}-$i; sleep 0.2; done");
            (
                tag,
                w.cmd(&["sh", "-c", &script])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for (tag, child) in children {
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
        let want: String = (1..=5).map(|i| format!("{tag}-{i}\n")).collect();
        assert_eq!(stdout(&o), want);
    }
    w.assert_clean();
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn missing_kernel_is_a_clear_error() {
    let w = World::with("", "kernel = \"/nonexistent/vmlinuz\"");
    let o = w.run(&["true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("/nonexistent/vmlinuz"),
        "{}",
        stderr(&o)
    );
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn malformed_toml_is_a_clear_error() {
    let w = World::new("");
    std::fs::write(w.config(), "[hypervisor]\nvcpus = 1\nmemory_mib = = 2\n").unwrap();
    let o = w.run(&["true"]);
    assert_eq!(o.status.code(), Some(125));
    let msg = stderr(&o);
    assert!(
        msg.contains(&format!("{}:3:", w.config().display())),
        "{msg}"
    );
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn silent_guest_times_out_cleanly() {
    // No init in the initrd and panic=0: the kernel hangs, nobody answers.
    let w = World::new("kernel_params = \"rdinit=/nonexistent panic=0\"\n");
    let cfg = std::fs::read_to_string(w.config())
        .unwrap()
        .replace("boot_timeout_secs = 60", "boot_timeout_secs = 8");
    std::fs::write(w.config(), cfg).unwrap();
    let t = Instant::now();
    let o = w.run(&["true"]);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains("did not answer within 8s"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("last lines of the helper daemons:\n[virtiofsd]"),
        "the report carries the daemons' logs: {}",
        stderr(&o)
    );
    assert!(took < Duration::from_secs(8 + 15), "took {took:?}");
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn terminal_is_the_containers_own() {
    let w = World::new("");
    let cmd = format!(
        "{COCOON} run -t --config {} --rootfs {} -- sh -c 'tty; echo in-tty'",
        w.config().display(),
        w.tmp.path().join("rootfs").display()
    );
    // `script` gives cocoon a terminal of its own, as a user at a shell has.
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    w.assert_clean();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("/dev/pts/0") && out.contains("in-tty"),
        "{out:?}"
    );
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn killed_cocoon_run_leaves_nothing_after_the_next_run() {
    let w = World::new("");
    let mut victim = w
        .cmd(&["sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let qemu_of = |pid: u32| format!("-name cocoon-run-{pid} ");
    let marker = qemu_of(victim.id());
    let running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&marker)
                })
                .unwrap_or(false)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running() {
        assert!(Instant::now() < deadline, "no QEMU for the victim");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    victim.kill().unwrap();
    victim.wait().unwrap();
    // The VM and its daemons die with their owner...
    let deadline = Instant::now() + Duration::from_secs(10);
    while running() {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived its SIGKILLed owner"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...and the next run clears the mounts and state the victim left.
    let o = w.run(&["true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn container_root_is_pivoted_and_the_guest_root_is_out_of_reach() {
    // The agent enters every container with pivot_root(2), which fails on
    // an initramfs root: that this container runs at all shows that the
    // guest switched to its tmpfs root. (From inside an unprivileged
    // container, pivot_root and a chroot look alike; what pivot_root adds,
    // the guest's mounts detached from the container's namespace, is
    // probed by guest root in cocoon-runtime's hostile tests.) Inside, the
    // root is the container's own rootfs, and neither a `..` walk nor a
    // path reaches the guest's files or mounts.
    let w = World::new("");
    let script = "cat /proc/self/mountinfo; echo ---; cd /../../..; echo *; echo ---; \
                  for p in /init /lib/modules /run/cocoon; do [ -e $p ] && echo reached $p; done; \
                  echo done";
    let o = w.run(&["sh", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 3, "{out}");
    let mounts: Vec<(&str, &str)> = parts[0]
        .lines()
        .filter_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            Some((mount.split(' ').nth(4)?, fs.split(' ').next()?))
        })
        .collect();
    let roots: Vec<_> = mounts.iter().filter(|(at, _)| *at == "/").collect();
    assert_eq!(
        roots,
        [&("/", "virtiofs")],
        "the root is not the container's rootfs alone:\n{}",
        parts[0]
    );
    assert!(
        mounts
            .iter()
            .all(|(at, fs)| *fs != "rootfs" && !at.starts_with("/run")),
        "a guest mount is in view:\n{}",
        parts[0]
    );
    assert_eq!(
        parts[1].trim(),
        "bin dev etc proc root sys tmp",
        "`cd /../../..` left the rootfs"
    );
    assert_eq!(parts[2], "done\n", "the guest root is in reach");
}

#[test]
#[ignore = "boots a VM: run by scripts/test.sh"]
fn a_helper_error_longer_than_a_pipe_is_reported() {
    // libcontainer names the missing executable in its error: 100 KB of
    // it fill the helper's stderr pipe, which the agent must drain while
    // it waits for the pid on stdout (it used to hang until the host's
    // call deadline).
    let w = World::new("");
    let name = "x".repeat(100_000);
    let o = w.run(&[name.as_str()]);
    assert_eq!(o.status.code(), Some(125), "stderr: {:.300}", stderr(&o));
    let msg = stderr(&o);
    assert!(
        msg.trim_end().contains("not found in $PATH"),
        "...{}",
        &msg[msg.len().saturating_sub(300)..]
    );
    assert!(
        msg.len() < 100 * 1024,
        "the error is not bounded: {} bytes",
        msg.len()
    );
}
