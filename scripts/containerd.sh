#!/usr/bin/env bash
# A private containerd for the end-to-end tests: own root, state, sockets
# and config; the Cocoon shim from target/release on its PATH.
#   scripts/containerd.sh start DIR   (prints the socket path)
#   scripts/containerd.sh stop DIR
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=$1
dir=$(realpath -m "$2")
case "$cmd" in
start)
  mkdir -p "$dir/root" "$dir/state"
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
TOML
  PATH="$PWD/target/release:$PATH" setsid containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 < /dev/null &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 100); do
    [ -S "$dir/containerd.sock" ] && ctr --address "$dir/containerd.sock" version > /dev/null 2>&1 && break
    sleep 0.1
  done
  ctr --address "$dir/containerd.sock" version > /dev/null
  echo "$dir/containerd.sock"
  ;;
stop)
  if [ -f "$dir/containerd.pid" ]; then
    pid=$(cat "$dir/containerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/containerd.pid"
  fi
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
