#!/usr/bin/env bash
# Builds the guest agent as the guest image wants it and prints its path:
# statically linked (glibc and libseccomp included, so the initrd holds no
# shared libraries) and optimised for size (Cargo profile `guest`: opt-level
# "s", fat LTO, one codegen unit, stripped). Every byte of it is in each
# pod's initrd, loaded and paged in by the guest at boot; docs/kernel.md
# ("Figures") has what it saves. Arguments go to cargo (e.g. --offline).
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# libseccomp-sys links what these say; the flags apply to the agent's
# target only, not to build scripts and proc macros.
LIBSECCOMP_LINK_TYPE=static \
LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --locked --profile guest -p cocoon-agent --target "$target" "$@" >&2
echo "${CARGO_TARGET_DIR:-$PWD/target}/$target/guest/cocoon-agent"
