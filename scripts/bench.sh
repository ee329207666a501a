#!/usr/bin/env bash
# Repeatable figures for one host, printed as a table:
#   - boot-run-teardown time of `cocoon run -- true`, per flavour (median of N)
#   - host memory (PSS) of QEMU, virtiofsd and vhost-device-vsock for an idle VM
# Usage: scripts/bench.sh [N]   (needs scripts/setup.sh to have run; root)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-7}
cocoon=${COCOON:-target/release/cocoon}
rootfs=build/busybox-rootfs
mkdir -p "$rootfs/bin" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/tmp"
cp /bin/busybox "$rootfs/bin/busybox"
for a in sh true sleep; do ln -sf busybox "$rootfs/bin/$a"; done

median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f", m}'; }

for flavour in configs/q35.toml configs/microvm.toml; do
  times=()
  for _ in $(seq "$n"); do
    t0=$(date +%s%N)
    "$cocoon" run --config "$flavour" --rootfs "$rootfs" -- true
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
  done
  printf '%-22s cocoon run -- true: median %s ms of %s runs (all: %s)\n' \
    "$(basename "$flavour")" "$(printf '%s\n' "${times[@]}" | median)" "$n" "${times[*]}"
done

pss() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
for flavour in configs/q35.toml configs/microvm.toml; do
  "$cocoon" run --config "$flavour" --rootfs "$rootfs" -- sleep 20 &
  runner=$!
  sleep 12
  q=$(pgrep -n -f "qemu-system-x86_64 -name cocoon-run-" || true)
  v=$(pgrep -n -f "virtiofsd --socket-path=/run/cocoon/run-" || true)
  b=$(pgrep -n -f "vhost-device-vsock .*/run/cocoon/run-" || true)
  printf '%-22s idle VM PSS: qemu %s KiB, virtiofsd %s KiB, vhost-device-vsock %s KiB\n' \
    "$(basename "$flavour")" "$(pss "${q:-0}")" "$(pss "${v:-0}")" "$(pss "${b:-0}")"
  wait "$runner"
done
