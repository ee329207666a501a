#!/usr/bin/env bash
# Builds a deterministic OCI image layout tarball of Debian's static busybox,
# for `ctr images import` without a registry.
#   scripts/busybox-oci.sh OUT.tar [IMAGE-NAME]
set -euo pipefail
here=$(dirname "$0")
out=$1
name=${2:-docker.io/library/busybox:cocoon}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,root,var}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -s busybox "$root/bin/$a"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
chmod 1777 "$root/tmp"
bash "$here/oci-image.sh" "$root" "$out" "$name" null '["sh"]'
