#!/usr/bin/env bash
# A private containerd for the end-to-end tests: own root, state, sockets
# and config; the Cocoon shim from target/release on its PATH. Its CRI
# plugin serves on the same socket, with:
#   - runtime handlers `cocoon` (q35 flavour), `cocoon-microvm` (microvm
#     flavour) and `runc` (the baseline); the flavours boot the guest image
#     in $COCOON_GUEST_DIR (default /var/lib/cocoon/guest), and the q35 one
#     is the default of tasks that name none ($COCOON_CONF_FILE); a
#     q35-debian flavour file (Debian's kernel) when the image has it, for
#     scripts/bench.sh;
#   - a private CNI network: bridge $COCOON_CNI_BRIDGE (cni-cocoon0) on
#     $COCOON_CNI_SUBNET (10.89.66.0/24), masquerade, portmap, firewall, its
#     leases in DIR (the plugins come from /usr/lib/cni);
#   - the offline images imported into `k8s.io`: the pause image (the
#     `sandbox_image`) and busybox (docker.io/library/busybox:cocoon).
# With $COCOON_STATE_DIR set, the flavours keep their pods' state there
# instead of /run/cocoon.
#   scripts/containerd.sh start DIR     (prints the socket path)
#   scripts/containerd.sh restart DIR   (containerd alone, same config; prints the socket path)
#   scripts/containerd.sh stop DIR
# `restart` stops containerd with SIGTERM (if it still runs) and starts it
# again on the same root, state and sockets: its tasks keep running, and
# the new containerd reconnects to their shims.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=$1
dir=$(realpath -m "$2")
pause_image=localhost/cocoon/pause:offline

# containerd on DIR's config, in the background; waits until it answers.
launch() {
  # Tasks that name no flavour (`ctr run` without --runtime-config-path)
  # get the q35 one, so they too boot the guest image under test.
  COCOON_CONF_FILE="$dir/flavours/q35.toml" PATH="$PWD/target/release:$PATH" setsid containerd --config "$dir/config.toml" >> "$dir/containerd.log" 2>&1 < /dev/null &
  echo $! > "$dir/containerd.pid"
  c="ctr --address $dir/containerd.sock"
  for _ in $(seq 100); do
    [ -S "$dir/containerd.sock" ] && $c version > /dev/null 2>&1 && break
    sleep 0.1
  done
  $c version > /dev/null
}

case "$cmd" in
start)
  guest=${COCOON_GUEST_DIR:-/var/lib/cocoon/guest}
  bridge=${COCOON_CNI_BRIDGE:-cni-cocoon0}
  subnet=${COCOON_CNI_SUBNET:-10.89.66.0/24}
  shim=$PWD/target/release/containerd-shim-cocoon-v2
  [ -x "$shim" ] || { echo "containerd.sh: $shim missing: cargo build --release" >&2; exit 1; }
  mkdir -p "$dir/root" "$dir/state" "$dir/flavours" "$dir/cni/net.d" "$dir/cni/ipam" "$dir/images"
  runtime=
  if [ -n "${COCOON_STATE_DIR:-}" ]; then
    runtime=$(printf '\n[runtime]\nstate_dir = "%s"' "$COCOON_STATE_DIR")
  fi
  for machine in q35 microvm; do
    # Room to grow for containers' limits: 4 vCPUs; 4 GiB on q35 (microvm
    # cannot hotplug memory: its ceiling is its size).
    case $machine in
    q35) ceilings=$'max_vcpus = 4\nmax_memory_mib = 4096' ;;
    microvm) ceilings='max_vcpus = 4' ;;
    esac
    cat > "$dir/flavours/$machine.toml" <<TOML
[hypervisor]
machine = "$machine"
boot_timeout_secs = 60
$ceilings

[guest]
dir = "$guest"
$runtime
TOML
  done
  # Debian's kernel, where the image has it: for comparisons (bench.sh).
  if [ -e "$guest/debian/vmlinuz" ]; then
    cat > "$dir/flavours/q35-debian.toml" <<TOML
[hypervisor]
machine = "q35"
boot_timeout_secs = 60
max_vcpus = 4
max_memory_mib = 4096

[guest]
dir = "$guest"
kernel = "$guest/debian/vmlinuz"
initrd = "$guest/debian/initrd.img"
$runtime
TOML
  fi
  # containerd's CRI adds the loopback network itself (from bin_dir).
  cat > "$dir/cni/net.d/10-cocoon.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "cocoon-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "$subnet" }]],
        "routes": [{ "dst": "0.0.0.0/0" }],
        "dataDir": "$dir/cni/ipam"
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } },
    { "type": "firewall" }
  ]
}
JSON
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    # containerd 1.6 ignores runtime_path: the shim is named by its path.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon]
      runtime_type = "$shim"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon.options]
        ConfigPath = "$dir/flavours/q35.toml"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon-microvm]
      runtime_type = "$shim"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.cocoon-microvm.options]
        ConfigPath = "$dir/flavours/microvm.toml"
TOML
: > "$dir/containerd.log"
  launch
  bash scripts/pause-oci.sh "$dir/images/pause.tar" "$pause_image" > /dev/null
  bash scripts/busybox-oci.sh "$dir/images/busybox.tar" > /dev/null
  $c -n k8s.io images import "$dir/images/pause.tar" > /dev/null
  $c -n k8s.io images import "$dir/images/busybox.tar" > /dev/null
  echo "$dir/containerd.sock"
  ;;
restart)
  [ -f "$dir/config.toml" ] || { echo "containerd.sh: no $dir/config.toml: start it first" >&2; exit 1; }
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "containerd.sh: containerd $pid did not stop on SIGTERM" >&2
      exit 1
    fi
  fi
  launch
  echo "$dir/containerd.sock"
  ;;
stop)
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    # A safety net for tests that died without cleaning up: every task
    # left is killed and deleted through its shim (which stops its VM).
    if [ -S "$dir/containerd.sock" ] && kill -0 "$pid" 2>/dev/null; then
      for ns in $(ctr --address "$dir/containerd.sock" namespaces ls -q 2>/dev/null); do
        c="ctr --address $dir/containerd.sock -n $ns"
        for t in $($c tasks ls -q 2>/dev/null); do
          # Bounded: a task that cannot be removed is left to the kill of its
          # shim below.
          timeout 60 $c tasks rm -f "$t" > /dev/null 2>&1 || true
        done
      done
    fi
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
  # Shims of this containerd that outlived it (a task that could not be
  # removed): killed, their VMs and daemons go with them.
  for p in $(pgrep -f -- "-address $dir/containerd.sock( |$)" || true); do
    echo "containerd.sh: killing shim $p left by containerd in $dir" >&2
    kill -9 "$p" 2>/dev/null || true
  done
  # What containerd mounted under DIR (snapshots, pod shm) and left.
  findmnt -rn -o TARGET | { grep "^$dir/" || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # The CNI bridge, once no pod is on it (CNI never deletes it).
  bridge=${COCOON_CNI_BRIDGE:-cni-cocoon0}
  if ip link show "$bridge" > /dev/null 2>&1 && [ -z "$(ip -o link show master "$bridge")" ]; then
    ip link del "$bridge" 2>/dev/null || true
  fi
  ;;
*) echo "usage: $0 start|restart|stop DIR" >&2; exit 2 ;;
esac
