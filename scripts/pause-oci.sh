#!/usr/bin/env bash
# Builds the pod sandbox ("pause") image offline: scripts/pause.c compiled
# static, packed as a deterministic OCI image layout tarball. CRI's
# `sandbox_image` names it.
#   scripts/pause-oci.sh OUT.tar [IMAGE-NAME]
set -euo pipefail
here=$(dirname "$0")
out=$1
name=${2:-localhost/cocoon/pause:offline}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rootfs"
gcc -static -Os -s -Wall -Werror -o "$work/rootfs/pause" "$here/pause.c"
bash "$here/oci-image.sh" "$work/rootfs" "$out" "$name" '["/pause"]' null
