#!/usr/bin/env bash
# Runs the whole test suite: unit tests, then the end-to-end tests that boot
# real VMs (QEMU, virtiofsd, vhost-device-vsock, the guest image built by
# scripts/setup.sh), directly (`cocoon run`) and through a private
# containerd driven with `ctr` and through its CRI plugin (CNI bridge,
# offline pause and busybox images: scripts/containerd.sh provides them).
# Needs root. Nothing is skipped: a missing requirement fails its test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export COCOON_GUEST_DIR="${COCOON_GUEST_DIR:-/var/lib/cocoon/guest}"
# The hypervisor crate's console test boots this kernel with its own initrd.
export COCOON_TEST_KERNEL="${COCOON_TEST_KERNEL:-$COCOON_GUEST_DIR/vmlinuz}"

cargo build --release --locked --workspace
agent=$(bash scripts/build-agent.sh)
# The tests boot the image: rebuild it if the agent changed (else a no-op).
target/release/cocoon image build --agent "$agent" --out "$COCOON_GUEST_DIR"
bash scripts/busybox-oci.sh build/busybox-oci.tar > /dev/null

ctd=$(mktemp -d /tmp/cocoon-containerd.XXXXXX)
cleanup() {
  bash scripts/containerd.sh stop "$ctd" || true
  rm -rf "$ctd"
}
trap cleanup EXIT
export COCOON_TEST_CONTAINERD=$(bash scripts/containerd.sh start "$ctd")
export COCOON_TEST_REQUIRE=1

# Two cores run at most a few TCG guests well at once. The benchmarks
# (`bench_*`) are run by name, not here.
cargo test --release --locked --workspace -- --include-ignored --test-threads=2 --skip bench_
