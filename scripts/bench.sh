#!/usr/bin/env bash
# Runs `cocoon bench` against a private containerd (Cocoon's shim and runc,
# scripts/containerd.sh) and the flavours it writes, which boot the guest
# image in $COCOON_GUEST_DIR (default /var/lib/cocoon/guest). Arguments go
# to `cocoon bench`, e.g.:
#   scripts/bench.sh --runs 3 --only start,exec --json bench.json --png bench.png
# The flavours compared are $COCOON_BENCH_FLAVOURS (default "q35 microvm";
# add q35-debian for Debian's kernel beside the Cocoon kernel).
# Needs root and scripts/setup.sh (a release build, the guest image).
set -euo pipefail
cd "$(dirname "$0")/.."
cocoon=${COCOON:-target/release/cocoon}
mkdir -p build
bash scripts/busybox-oci.sh build/busybox-oci.tar > /dev/null
ctd=$(mktemp -d /tmp/cocoon-bench.XXXXXX)
trap 'bash scripts/containerd.sh stop "$ctd"; rm -rf "$ctd"' EXIT
bash scripts/containerd.sh start "$ctd" > /dev/null
configs=()
for f in ${COCOON_BENCH_FLAVOURS:-q35 microvm}; do
  [ -e "$ctd/flavours/$f.toml" ] || { echo "bench.sh: no flavour $f in $ctd/flavours" >&2; exit 1; }
  configs+=(--config "$ctd/flavours/$f.toml")
done
"$cocoon" bench --containerd "$ctd" --image build/busybox-oci.tar "${configs[@]}" "$@"
