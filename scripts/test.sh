#!/usr/bin/env bash
# Runs the whole test suite: unit tests, then the end-to-end tests that boot
# real VMs (QEMU, virtiofsd, vhost-device-vsock, the guest image built by
# scripts/setup.sh). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export COCOON_GUEST_DIR="${COCOON_GUEST_DIR:-/var/lib/cocoon/guest}"
# Two cores run at most a few TCG guests well at once.
cargo test --release --locked --workspace -- --include-ignored --test-threads=2
