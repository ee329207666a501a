#!/usr/bin/env bash
# Measures whether starting a Cocoon VM from a QEMU snapshot pays against
# booting it, on this host (docs/snapshot.md has the method and figures).
# Each round, per machine type (one VM at a time, every variant in turn):
#   boot      Cocoon's VM as the runtime starts it today: the QEMU command
#             line of cocoon_hypervisor::qemu::command_line for the shipped
#             q35-tcg / microvm flavours (1 vCPU of 4, 512 MiB, TCG), with
#             virtiofsd + vhost-device-vsock and both vhost-user devices;
#             timed to "guest ready" and to "share mounted + vsock answered".
#   template  the same VM less its vhost-user devices (on q35 plus two empty
#             PCIe root ports), booted, paused (QMP stop) and saved (QMP
#             migrate to exec:cat): whole RAM into the stream (RAM in a
#             memfd, as Cocoon has it), or RAM left in a shared tmpfs file
#             (x-ignore-shared, as Kata's VM templating).
#   restore   -incoming defer + migrate-incoming exec:cat + cont, timed to
#             "guest ready"; QEMU's PSS. Variants: copy (the stream into a
#             memfd), copy-anon (into private RAM), file-copy (a sparse copy
#             of the template's RAM file, mapped shared), template-cow (the
#             template's file mapped private, as Kata's clones). On q35,
#             copy and file-copy then hot-add virtio-fs and vsock
#             (chardev-add + device_add) to "share mounted + vsock answered".
# Before the rounds: which device blocks a save. --checks, after them: the
# restored guest's wall clock, and vhost-user hot-added to a Kata-style
# (MAP_PRIVATE) clone. Prints medians, min-max and n.
#
# The guest: the Cocoon kernel (bzImage for q35, PVH vmlinux for microvm)
# and a tiny initrd built here: static busybox, a vsock echo server on port
# 1024, and an /init that prints SNAP-READY and answers console lines
# (ping, clock, devs, sh; see below). --initrd FILE must do the same.
#
# Usage (root): scripts/snapshot-probe.sh [--rounds N] [--machines q35,microvm]
#   [--kernel-dir DIR (bzImage + vmlinux; default: the newest in
#   /var/cache/cocoon/kernel)] [--initrd FILE] [--busybox FILE]
#   [--checks] [--raw FILE.json (every sample)]
# Needs: qemu-system-x86_64, python3, gcc with static glibc (libc6-dev),
# cpio, busybox-static, virtiofsd, vhost-device-vsock. Everything it makes
# lives in one directory on /dev/shm, removed at exit (Ctrl-C included);
# every process it starts is killed and reaped.
set -euo pipefail

rounds=5 machines=q35,microvm kernel_dir= initrd= busybox=/bin/busybox raw= checks=
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --machines) machines=$2; shift 2 ;;
    --kernel-dir) kernel_dir=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --busybox) busybox=$2; shift 2 ;;
    --checks) checks=--checks; shift ;;
    --raw) raw=$(realpath -m "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//; /^set -e/d'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

[ "$(id -u)" = 0 ] || { echo "needs root (virtiofsd's namespace sandbox)" >&2; exit 1; }
if [ -z "$kernel_dir" ]; then
    # The Cocoon kernel as `cocoon image build` caches it (the newest).
    kernel_dir=$(ls -td /var/cache/cocoon/kernel/*/ 2>/dev/null | head -n1)
fi
kernel_dir=${kernel_dir%/}
[ -f "$kernel_dir/bzImage" ] && [ -f "$kernel_dir/vmlinux" ] ||
    { echo "no bzImage + vmlinux in '$kernel_dir' (--kernel-dir)" >&2; exit 1; }
find_bin() { command -v "$1" || ls ~/.cargo/bin/"$1" 2>/dev/null || { echo "$1 not found" >&2; exit 1; }; }
virtiofsd=$(find_bin virtiofsd)
vsockd=$(find_bin vhost-device-vsock)
for b in qemu-system-x86_64 python3 gcc cpio; do find_bin "$b" >/dev/null; done

# tmpfs: the template's RAM file must be on shared memory.
work=$(mktemp -d /dev/shm/snapshot-probe.XXXXXX)
cleanup() {
    trap - EXIT INT TERM
    # The driver reaps what it started; this catches a driver that was killed.
    if [ -f "$work/pids" ]; then
        while read -r pid; do
            if { tr "\0" " " <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF "$work"; then
                kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$work/pids"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A copy: a kernel rebuilt into the cache during the run does not change it.
cp "$kernel_dir/bzImage" "$kernel_dir/vmlinux" "$work/"
kernel_label="$kernel_dir ($(cat "$kernel_dir/release" 2>/dev/null || echo "release unknown"))"

if [ -z "$initrd" ]; then
    root=$work/initrd
    mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp}
    cp "$busybox" "$root/bin/busybox"
    cat >"$work/vsock-echo.c" <<'EOF'
/* Echoes every connection to AF_VSOCK port argv[1]. Bound to any CID, so
 * that it listens before a vsock transport exists (a template without the
 * device) and serves once one is hot-added. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) { perror("vsock-echo: socket"); return 1; }
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = argc > 1 ? atoi(argv[1]) : 1024;
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("vsock-echo: bind"); return 1; }
    if (listen(s, 4) < 0) { perror("vsock-echo: listen"); return 1; }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char buf[256];
        ssize_t n;
        while ((n = read(c, buf, sizeof buf)) > 0)
            if (write(c, buf, n) != n) break;
        close(c);
    }
}
EOF
    gcc -static -O2 -o "$root/bin/vsock-echo" "$work/vsock-echo.c"
    cat >"$root/init" <<'EOF'
#!/bin/busybox sh
# Prints SNAP-READY, then answers console commands:
#   ping X  -> ANSWER X
#   clock   -> CLOCK <wall clock, s since the epoch> <uptime, s>
#   sh CMD  -> CMD's output, then SH-DONE (for looking around by hand)
#   devs    -> DEV-OK <file read from the virtio-fs share> | DEV-FAIL <why>,
#              once the virtio-fs and vsock drivers are bound
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
stty -echo
vsock-echo 1024 &
echo SNAP-READY
while read -r cmd arg; do
    case "$cmd" in
    ping) echo "ANSWER $arg" ;;
    clock) echo "CLOCK $(date +%s) $(cut -d' ' -f1 /proc/uptime)" ;;
    sh) eval "$arg" 2>&1; echo SH-DONE ;;
    devs)
        # Both drivers bound (the vsock transport is up before the host
        # connects, as Cocoon's agent prints its ready line only once it
        # listens), then the share mounted and a file read through it.
        i=0
        until ls /sys/bus/virtio/drivers/virtiofs/ 2>/dev/null | grep -q virtio &&
            ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/ 2>/dev/null | grep -q virtio; do
            i=$((i + 1))
            [ $i -gt 2000 ] && break
            usleep 5000
        done
        if grep -q " /mnt " /proc/mounts || mount -t virtiofs cocoon /mnt 2>/tmp/err; then
            echo "DEV-OK $(cat /mnt/hello)"
        else
            echo "DEV-FAIL $(cat /tmp/err)"
        fi
        ;;
    esac
done
EOF
    chmod 755 "$root/init"
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
    initrd=$work/initrd.img
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) >"$initrd"
fi

cat >"$work/probe.py" <<'PY'
"""Boot against snapshot restore for Cocoon's QEMU command line (driver of
snapshot-probe.sh; see docs/snapshot.md). One VM at a time; every process
it starts is killed and reaped in `finally`, also on SIGINT/SIGTERM."""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
# Cocoon's fixed kernel parameters (cocoon_hypervisor::qemu::BASE_KERNEL_PARAMS).
BASE_PARAMS = ("console=ttyS0 panic=-1 reboot=t quiet loglevel=4 tsc=reliable "
               "no_timer_check cryptomgr.notests i8042.noaux i8042.nomux i8042.nopnp "
               "i8042.dumbkbd rcupdate.rcu_expedited=1")
MEM = 512  # memory_mib of the shipped q35-tcg and microvm flavours
TAG = "cocoon"  # cocoon_protocols::SHARE_TAG
VSOCK_PORT = 1024


class Probe:
    def __init__(self, work, kernel, vmlinux, initrd, virtiofsd, vsockd):
        self.work = work
        self.kernel = kernel
        self.vmlinux = vmlinux
        self.initrd = initrd
        self.virtiofsd = virtiofsd
        self.vsockd = vsockd
        self.procs = []
        self.seq = 0
        self.hotplug_args = []
        mhz = next(float(l.split(":")[1]) for l in open("/proc/cpuinfo") if l.startswith("cpu MHz"))
        self.tsc_khz = int(mhz * 1000)
        self.share = os.path.join(work, "share")
        os.makedirs(self.share, exist_ok=True)
        with open(os.path.join(self.share, "hello"), "w") as f:
            f.write("hello-from-host\n")

    # ---- processes -------------------------------------------------------

    def spawn(self, what, argv):
        log = open(os.path.join(self.work, f"{what}.log"), "ab")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
        log.close()
        p.what = what
        self.procs.append(p)
        with open(os.path.join(self.work, "pids"), "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def reap(self, p, grace=2.0):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def reap_all(self):
        for p in list(reversed(self.procs)):
            self.reap(p, 1.0)

    # ---- command lines ---------------------------------------------------

    def cocoon_args(self, machine, run, devices, memory, root_ports=False):
        """QEMU's arguments as cocoon_hypervisor::qemu::command_line builds
        them for the shipped q35-tcg / microvm flavours (vcpus 1, max 4,
        512 MiB; TCG), with the console on a socket the probe can write to
        instead of the log pipe. `devices`: the vhost-user fs + vsock
        devices (their daemons must be up). `memory`: the -object value."""
        microvm = machine == "microvm"
        params = BASE_PARAMS + f" tsc_early_khz={self.tsc_khz}"
        if microvm:
            params += " maxcpus=1"
            a = ["-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on,memory-backend=mem",
                 "-smp", "4", "-m", f"{MEM}M"]
            kernel = self.vmlinux
        else:
            a = ["-machine", "q35,memory-backend=mem", "-smp", "1,maxcpus=4",
                 "-m", f"{MEM}M,slots=4,maxmem=4096M"]
            kernel = self.kernel
        a = ["-name", f"cocoon-{os.path.basename(run)}", "-nodefaults", "-no-user-config", "-nographic",
             "-no-reboot"] + a[:2] + ["-accel", "tcg,thread=multi", "-cpu", "max,erms=off"] + a[2:]
        a += ["-object", memory, "-kernel", kernel, "-initrd", self.initrd, "-append", params,
              "-chardev", f"socket,id=console,path={run}/console.sock,server=on,wait=off",
              "-serial", "chardev:console",
              "-chardev", f"socket,id=qmp,path={run}/qmp.sock,server=on,wait=off",
              "-mon", "chardev=qmp,mode=control"]
        if devices:
            a += ["-chardev", f"socket,id=fs,path={run}/virtiofs.sock",
                  "-device", ("vhost-user-fs-device" if microvm else "vhost-user-fs-pci")
                  + f",chardev=fs,tag={TAG},queue-size=1024",
                  "-chardev", f"socket,id=vsock,path={run}/vhost-vsock.sock",
                  "-device", ("vhost-user-vsock-device" if microvm else "vhost-user-vsock-pci")
                  + ",chardev=vsock"]
        if root_ports:
            # Empty PCIe root ports for the devices plugged after a restore.
            a += self.hotplug_args + ["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1",
                  "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2"]
        return a

    def new_run(self, name):
        self.seq += 1
        run = os.path.join(self.work, f"{self.seq:03d}-{name}")
        os.makedirs(run)
        return run

    def daemons(self, run):
        """virtiofsd and vhost-device-vsock with Cocoon's arguments
        (qemu::virtiofsd_args, qemu::vsock_backend_args); returns when
        both sockets exist."""
        fs = self.spawn("virtiofsd", [
            self.virtiofsd, f"--socket-path={run}/virtiofs.sock", f"--shared-dir={self.share}",
            "--cache=auto", "--sandbox=namespace", "--seccomp=kill", "--announce-submounts",
            "--inode-file-handles=never", "--xattr"])
        vs = self.spawn("vhost-device-vsock", [
            self.vsockd, "--guest-cid=3", f"--socket={run}/vhost-vsock.sock",
            f"--uds-path={run}/vsock.sock", f"--tx-buffer-size={256 * 1024}"])
        deadline = time.monotonic() + 10
        for p, path in ((fs, "virtiofs.sock"), (vs, "vhost-vsock.sock")):
            while not os.path.exists(os.path.join(run, path)):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{p.what} did not create {path}")
                time.sleep(0.002)
        return [fs, vs]


def connect_unix(path, proc, timeout, what):
    """Connects to the Unix socket `path` that `proc` is about to create."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {what} socket {path}")
            time.sleep(0.002)


class Console:
    """The guest's serial console through QEMU's socket chardev."""

    def __init__(self, path, proc, timeout=10):
        self.sock = connect_unix(path, proc, timeout, "console")
        self.buf = b""
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                d = self.sock.recv(65536)
            except OSError:
                d = b""
            with self.cv:
                if not d:
                    self.buf += b"\n[console closed]\n"
                    self.cv.notify_all()
                    return
                self.buf += d
                self.cv.notify_all()

    def wait(self, pattern, timeout):
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                m = rx.search(self.buf.decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or b"[console closed]" in self.buf:
                    tail = self.buf.decode(errors="replace")[-600:]
                    raise RuntimeError(f"console: no {pattern!r} in time; tail: {tail!r}")
                self.cv.wait(left)

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def ping(self, token, timeout=10):
        self.send(f"ping {token}")
        self.wait(rf"ANSWER {token}\b", timeout)

    def close(self):
        self.sock.close()


class Qmp:
    def __init__(self, path, proc, timeout=10):
        self.sock = connect_unix(path, proc, timeout, "QMP")
        self.f = self.sock.makefile("rwb")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, execute, **args):
        msg = {"execute": execute}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {execute}")
            r = json.loads(line)
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QmpError(execute, r["error"]["desc"])
            return r["return"]

    def close(self):
        self.sock.close()


class QmpError(RuntimeError):
    def __init__(self, execute, desc):
        super().__init__(f"{execute}: {desc}")
        self.desc = desc


def smaps(pid):
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return out


def migrate_wait(q, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        s = q.cmd("query-migrate")
        st = s.get("status")
        if st == "completed":
            return s
        if st in ("failed", "cancelled"):
            raise RuntimeError(f"migration {st}: {s.get('error-desc', s)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"migration still {st}")
        time.sleep(0.005)


def wait_running(q, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited ({proc.returncode}) during restore")
        st = q.cmd("query-status")["status"]
        if st == "running":
            return
        if st == "paused":
            # The source was stopped before it was saved: the restored VM
            # stays paused until told to run.
            q.cmd("cont")
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"restored VM still {st}")
        time.sleep(0.002)


def vsock_echo(uds, timeout):
    """Hybrid vsock: CONNECT to the guest's echo server and get a line back.
    An attempt that gets no answer within a second is abandoned and
    retried."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        stage = "connect"
        try:
            s.connect(uds)
            s.sendall(f"CONNECT {VSOCK_PORT}\n".encode())
            f = s.makefile("rb")
            stage = "OK"
            ok = f.readline()
            if not ok.startswith(b"OK"):
                raise RuntimeError(f"backend said {ok!r}")
            stage = "echo"
            s.sendall(b"echo-me\n")
            if f.readline() != b"echo-me\n":
                raise RuntimeError("no echo")
            return
        except socket.timeout:
            last = f"no answer in 1 s waiting for {stage}"
        except (OSError, RuntimeError) as e:
            last = f"{stage}: {e}"
            time.sleep(0.02)
        finally:
            s.close()
    raise RuntimeError(f"vsock to guest port {VSOCK_PORT}: {last}")


def ms(t):
    return round(t * 1000)


class Runner:
    def __init__(self, p, rounds, machines, checks):
        self.p = p
        self.rounds = rounds
        self.machines = machines
        self.checks = checks
        self.res = {}  # (machine, measure) -> [values]
        self.notes = []
        self.clock_offset = {}

    def rec(self, machine, key, value):
        self.res.setdefault((machine, key), []).append(value)

    def qemu(self, run, args, incoming=False):
        argv = [QEMU] + args + (["-incoming", "defer"] if incoming else [])
        return self.p.spawn("qemu", argv)

    def finish(self, qemu, qmp=None, con=None):
        if qmp:
            try:
                qmp.cmd("quit")
            except (OSError, RuntimeError):
                pass
            qmp.close()
        if con:
            con.close()
        self.p.reap(qemu)

    # A: Cocoon's current VM: daemons + QEMU with both vhost-user devices.
    def boot_full(self, m, r):
        run = self.p.new_run(f"{m}-boot-full")
        t0 = time.monotonic()
        ds = self.p.daemons(run)
        t_d = time.monotonic()
        mem = f"memory-backend-memfd,id=mem,size={MEM}M,share=on"
        q = self.qemu(run, self.p.cocoon_args(m, run, True, mem))
        con = Console(f"{run}/console.sock", q)
        con.wait("SNAP-READY", 60)
        con.ping(f"b{r}")
        t_ready = time.monotonic()
        self.devices_ok(con, run, f"{m} boot")
        t_dev = time.monotonic()
        self.rec(m, "daemons up", ms(t_d - t0))
        self.rec(m, "boot: ready", ms(t_ready - t0))
        self.rec(m, "boot: fs mounted + vsock echo", ms(t_dev - t0))
        self.rec(m, "boot: QEMU PSS MiB", smaps(q.pid)["Pss"])
        self.finish(q, None, con)
        for d in ds:
            self.p.reap(d)

    def blockers(self, m):
        """Which vhost-user device stops a save: a QEMU (-S, guest not
        started) with one of them at a time, asked to migrate."""
        for only in ("fs", "vsock"):
            run = self.p.new_run(f"{m}-blocker-{only}")
            ds = self.p.daemons(run)
            args = self.p.cocoon_args(m, run, True, f"memory-backend-memfd,id=mem,size={MEM}M,share=on")
            drop = "vsock" if only == "fs" else "fs"
            keep = []
            i = 0
            while i < len(args):
                if i + 1 < len(args) and (f"id={drop}," in args[i + 1]
                                          or f"chardev={drop}," in args[i + 1] + ","):
                    i += 2
                    continue
                keep.append(args[i])
                i += 1
            q = self.qemu(run, keep + ["-S"])
            qmp = Qmp(f"{run}/qmp.sock", q)
            try:
                qmp.cmd("migrate", uri="exec:cat > /dev/null")
                st = migrate_wait(qmp, 30)
                self.notes.append(f"{m}: save with vhost-user {only} only: {st['status']}")
            except RuntimeError as e:
                self.notes.append(f"{m}: save with vhost-user {only} only: refused: {e}")
            self.finish(q, qmp)
            for d in ds:
                self.p.reap(d)

    def devices_ok(self, con, run, what, timeout=30):
        """Both devices in use, the way Cocoon's runtime goes about it: the
        guest says on its console that the virtio-fs and vsock drivers are
        bound and has mounted the share and read a file through it; then
        the host connects over vsock. (Connecting before the guest's vsock
        driver is up can leave vhost-device-vsock 0.3 serving nothing more;
        see docs/snapshot.md.) The time each step took from now."""
        t0 = time.monotonic()
        con.send("devs")
        m = con.wait(r"DEV-(OK|FAIL)([^\r\n]*)\r?\n", timeout)
        if m.group(1) != "OK" or m.group(2).strip() != "hello-from-host":
            raise RuntimeError(f"{what}: {m.group(0)}")
        t_fs = time.monotonic() - t0
        vsock_echo(f"{run}/vsock.sock", timeout)
        return {"fs": t_fs, "vsock": time.monotonic() - t0}

    # B: the template: Cocoon's VM less its vhost-user devices (plus, on
    # q35, two root ports to plug them into later), booted, paused and saved.
    # kind "copy": RAM in a memfd as Cocoon has it, saved whole into the
    # stream. kind "shared": RAM in a shared tmpfs file that outlives QEMU,
    # left out of the stream (x-ignore-shared), as Kata's templating does.
    def template(self, m, r, kind):
        run = self.p.new_run(f"{m}-template-{kind}")
        tpl = os.path.join(run, "ram")
        if kind == "copy":
            mem = f"memory-backend-memfd,id=mem,size={MEM}M,share=on"
        else:
            mem = f"memory-backend-file,id=mem,size={MEM}M,mem-path={tpl},share=on"
        t0 = time.monotonic()
        q = self.qemu(run, self.p.cocoon_args(m, run, False, mem, root_ports=(m == "q35")))
        con = Console(f"{run}/console.sock", q)
        con.wait("SNAP-READY", 60)
        con.ping(f"t{r}")
        t_ready = time.monotonic()
        self.rec(m, "template boot (no vhost-user): ready", ms(t_ready - t0))
        self.rec(m, f"template boot {kind}: QEMU PSS MiB", smaps(q.pid)["Pss"])
        con.send("clock")
        c = con.wait(r"CLOCK (\d+) ", 10)
        offset = time.time() - int(c.group(1))
        qmp = Qmp(f"{run}/qmp.sock", q)
        qmp.cmd("stop")
        state = os.path.join(run, f"{kind}.state")
        self.clock_offset[state] = (offset, time.time())
        if kind == "shared":
            qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
        t1 = time.monotonic()
        qmp.cmd("migrate", uri=f"exec:cat > {state}")
        migrate_wait(qmp)
        what = "full RAM" if kind == "copy" else "x-ignore-shared"
        self.rec(m, f"save {what}: ms", ms(time.monotonic() - t1))
        self.rec(m, f"save {what}: state file MiB", os.path.getsize(state) / 2**20)
        self.finish(q, qmp, con)
        if kind == "shared":
            self.rec(m, "template RAM file on tmpfs, MiB used", int(subprocess.check_output(
                ["du", "-k", tpl]).split()[0]) / 1024)
        return run, tpl, state

    def restore(self, m, r, mem, state, ignore_shared, label, hotadd=False, copy_ram=None):
        """Restore `state` into a QEMU whose RAM is `mem`. `copy_ram`: the
        template's RAM file, copied (sparse) into this VM's own file first,
        which `mem` then maps shared."""
        run = self.p.new_run(f"{m}-restore-{label}")
        t0 = time.monotonic()
        ds = self.p.daemons(run) if hotadd else []
        if copy_ram:
            subprocess.run(["cp", "--sparse=always", copy_ram, f"{run}/ram"], check=True)
            mem = mem.replace("@RAM@", f"{run}/ram")
            self.rec(m, f"restore {label}: RAM file copied", ms(time.monotonic() - t0))
        q = self.qemu(run, self.p.cocoon_args(m, run, False, mem, root_ports=(m == "q35")),
                      incoming=True)
        qmp = Qmp(f"{run}/qmp.sock", q)
        con = Console(f"{run}/console.sock", q)
        t_q = time.monotonic()
        if ignore_shared:
            qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate-incoming", uri=f"exec:cat {state}")
        wait_running(qmp, q)
        t_run = time.monotonic()
        con.ping(f"r{r}{label}")
        t_ready = time.monotonic()
        self.rec(m, f"restore {label}: QEMU up (QMP)", ms(t_q - t0))
        self.rec(m, f"restore {label}: state loaded, running", ms(t_run - t0))
        self.rec(m, f"restore {label}: ready", ms(t_ready - t0))
        s = smaps(q.pid)
        self.rec(m, f"restore {label}: QEMU PSS MiB", s["Pss"])
        self.rec(m, f"restore {label}: QEMU PSS anon MiB", s.get("Pss_Anon", 0))
        self.rec(m, f"restore {label}: QEMU PSS file+shmem MiB",
                 s.get("Pss_File", 0) + s.get("Pss_Shmem", 0))
        if hotadd:
            t1 = time.monotonic()
            self.hot_add(qmp, run)
            t2 = time.monotonic()
            took = self.devices_ok(con, run, f"{m} restore {label} + hot-add")
            t3 = time.monotonic()
            self.rec(m, "hot-add: QMP chardev-add + device_add x2", ms(t2 - t1))
            self.rec(m, "hot-add: to drivers bound + fs mounted", ms(t2 - t1 + took["fs"]))
            self.rec(m, "hot-add: to vsock echo too", ms(t3 - t1))
            self.rec(m, f"restore {label} + hot-add: fs mounted + vsock echo", ms(t3 - t0))
            self.rec(m, f"restore {label} + hot-add: QEMU PSS MiB", smaps(q.pid)["Pss"])
        if copy_ram:
            self.rec(m, f"restore {label}: own RAM file on tmpfs, MiB used", int(
                subprocess.check_output(["du", "-k", f"{run}/ram"]).split()[0]) / 1024)
        self.finish(q, qmp, con)
        for d in ds:
            self.p.reap(d)

    @staticmethod
    def hot_add(qmp, run):
        for cid, path, dev, port in (
                ("fs", "virtiofs.sock", f"vhost-user-fs-pci,chardev=fs,tag={TAG},queue-size=1024", "rp0"),
                ("vsock", "vhost-vsock.sock", "vhost-user-vsock-pci,chardev=vsock", "rp1")):
            qmp.cmd("chardev-add", id=cid, backend={"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": f"{run}/{path}"}}, "server": False}})
            drv, _, rest = dev.partition(",")
            props = dict(kv.split("=", 1) for kv in rest.split(","))
            qmp.cmd("device_add", driver=drv, id=f"{cid}0", bus=port, **props)

    def run(self):
        for m in self.machines:
            self.blockers(m)
        for r in range(1, self.rounds + 1):
            for m in self.machines:
                self.boot_full(m, r)
                run, _, state = self.template(m, r, "copy")
                memfd = f"memory-backend-memfd,id=mem,size={MEM}M,share=on"
                self.restore(m, r, memfd, state, False, "copy", hotadd=(m == "q35"))
                # The same stream into private anonymous RAM (no vhost-user
                # possible): what the shared memfd's page allocation costs.
                anon = f"memory-backend-ram,id=mem,size={MEM}M"
                self.restore(m, r, anon, state, False, "copy-anon")
                subprocess.run(["rm", "-rf", run])
                run, tpl, state = self.template(m, r, "shared")
                own = f"memory-backend-file,id=mem,size={MEM}M,mem-path=@RAM@,share=on"
                self.restore(m, r, own, state, True, "file-copy", hotadd=(m == "q35"),
                             copy_ram=tpl)
                cow = f"memory-backend-file,id=mem,size={MEM}M,mem-path={tpl},share=off"
                self.restore(m, r, cow, state, True, "template-cow")
                if r < self.rounds or m != "q35":
                    subprocess.run(["rm", "-rf", run])
                else:
                    self.last_q35_template = (tpl, state)
            print(f"round {r}/{self.rounds} done; load {open('/proc/loadavg').read().split()[:3]}",
                  file=sys.stderr, flush=True)
        if self.checks and "q35" in self.machines:
            self.clock_check()
            self.private_hotadd()

    def clock_check(self):
        """A restored guest's wall clock: the template's, aged ≥ 15 s."""
        tpl, state = self.last_q35_template
        offset, saved = self.clock_offset[state]
        time.sleep(max(0.0, 15 - (time.time() - saved)))
        run = self.p.new_run("q35-clock")
        cow = f"memory-backend-file,id=mem,size={MEM}M,mem-path={tpl},share=off"
        q = self.qemu(run, self.p.cocoon_args("q35", run, False, cow, root_ports=True), incoming=True)
        qmp = Qmp(f"{run}/qmp.sock", q)
        con = Console(f"{run}/console.sock", q)
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate-incoming", uri=f"exec:cat {state}")
        wait_running(qmp, q)
        con.send("clock")
        c = con.wait(r"CLOCK (\d+) ", 10)
        age = time.time() - saved
        lag = time.time() - int(c.group(1)) - offset
        self.notes.append(f"q35: guest wall clock after restoring a template {age:.0f} s old: "
                          f"{lag:.0f} s behind the host (more than before the save)")
        self.finish(q, qmp, con)

    def private_hotadd(self):
        """Kata's clone (template RAM mapped MAP_PRIVATE) with vhost-user
        devices hot-added: the daemons would map the template file, not the
        clone's memory. Run once, last: it may write into the template."""
        tpl, dev = self.last_q35_template
        run = self.p.new_run("q35-private-hotadd")
        ds = self.p.daemons(run)
        cow = f"memory-backend-file,id=mem,size={MEM}M,mem-path={tpl},share=off"
        q = self.qemu(run, self.p.cocoon_args("q35", run, False, cow, root_ports=True), incoming=True)
        qmp = Qmp(f"{run}/qmp.sock", q)
        con = Console(f"{run}/console.sock", q)
        qmp.cmd("migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp.cmd("migrate-incoming", uri=f"exec:cat {dev}")
        wait_running(qmp, q)
        con.ping("p")
        try:
            self.hot_add(qmp, run)
            self.devices_ok(con, run, "private clone + hot-add", timeout=15)
            self.notes.append("q35: MAP_PRIVATE clone + hot-added vhost-user devices: worked (!)")
        except RuntimeError as e:
            self.notes.append(f"q35: MAP_PRIVATE clone + hot-added vhost-user devices: failed: {e}")
        self.finish(q, qmp, con)
        for d in ds:
            self.p.reap(d)

    def table(self):
        print(f"{'machine':8} {'measure':52} {'median':>8}  {'min-max':>13}  n")
        for (m, k), v in self.res.items():
            med = statistics.median(v)
            fmt = (lambda x: f"{x:.0f}") if "MiB" not in k else (lambda x: f"{x:.1f}")
            print(f"{m:8} {k:52} {fmt(med):>8}  {fmt(min(v)) + '-' + fmt(max(v)):>13}  {len(v)}")
        for n in self.notes:
            print("note:", n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--vmlinux", required=True)
    ap.add_argument("--kernel-label", default="")
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--virtiofsd", required=True)
    ap.add_argument("--vsockd", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--machines", default="q35,microvm")
    ap.add_argument("--checks", action="store_true")
    ap.add_argument("--raw", help="write every sample as JSON here")
    a = ap.parse_args()

    def on_term(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    p = Probe(a.work, a.kernel, a.vmlinux, a.initrd, a.virtiofsd, a.vsockd)
    r = Runner(p, a.rounds, a.machines.split(","), a.checks)
    load0 = open("/proc/loadavg").read().split()[:3]
    t0 = time.time()
    try:
        r.run()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"probe failed: {e}", file=sys.stderr)
        for (m, k), v in r.res.items():
            print(f"  {m} {k}: {v}", file=sys.stderr)
        return 1
    finally:
        p.reap_all()
    load1 = open("/proc/loadavg").read().split()[:3]
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.localtime(t0))}, {a.rounds} rounds interleaved, "
          f"{os.cpu_count()} CPUs, load average (1/5/15 min) before {'/'.join(load0)}, "
          f"after {'/'.join(load1)}; times in ms from spawning the first process")
    print(f"# kernel {a.kernel_label or a.kernel}; QEMU {subprocess.check_output([QEMU, '--version'], text=True).splitlines()[0]}")
    r.table()
    if a.raw:
        with open(a.raw, "w") as f:
            json.dump({f"{m}|{k}": v for (m, k), v in r.res.items()} | {"notes": r.notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
PY
set +e
python3 "$work/probe.py" --work "$work" --kernel "$work/bzImage" \
    --vmlinux "$work/vmlinux" --kernel-label "$kernel_label" --initrd "$(realpath "$initrd")" \
    --virtiofsd "$virtiofsd" --vsockd "$vsockd" --rounds "$rounds" \
    --machines "$machines" $checks ${raw:+--raw "$raw"}
rc=$?
exit $rc

