#!/usr/bin/env bash
# `ctr run --rm IMAGE ID true` on Cocoon beside runc, alternating, in one run
# against one private containerd. Prints medians and their ratio.
#   scripts/bench-containerd.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-7}
bash scripts/busybox-oci.sh build/busybox-oci.tar > /dev/null
ctd=$(mktemp -d /tmp/cocoon-bench.XXXXXX)
trap 'bash scripts/containerd.sh stop "$ctd"; rm -rf "$ctd"' EXIT
sock=$(bash scripts/containerd.sh start "$ctd")
c="ctr --address $sock --namespace bench"
$c images import build/busybox-oci.tar > /dev/null
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.0f", m}'; }
declare -A all
for i in $(seq "$n"); do
  for rt in io.containerd.runc.v2 io.containerd.cocoon.v2; do
    t0=$(date +%s%N)
    $c run --rm --runtime "$rt" docker.io/library/busybox:cocoon "b-$i-${rt//./-}" true
    t1=$(date +%s%N)
    all[$rt]+="$(( (t1 - t0) / 1000000 )) "
  done
done
r=$(printf '%s\n' ${all[io.containerd.runc.v2]} | median)
k=$(printf '%s\n' ${all[io.containerd.cocoon.v2]} | median)
echo "ctr run --rm ... true, median of $n, alternating:"
echo "  runc:   ${r} ms  (${all[io.containerd.runc.v2]})"
echo "  cocoon: ${k} ms  (${all[io.containerd.cocoon.v2]})"
awk -v a="$k" -v b="$r" 'BEGIN { printf "  cocoon / runc = %.1fx\n", a / b }'
