#!/usr/bin/env bash
# Packs a directory into a deterministic single-layer OCI image layout
# tarball, for `ctr images import` without a registry: the layer tar has
# fixed owners and mtimes, `diff_id` is the sha256 of the uncompressed
# layer, and `index.json` names the image (`io.containerd.image.name`).
#   scripts/oci-image.sh ROOTFS OUT.tar IMAGE-NAME ENTRYPOINT-JSON CMD-JSON
# e.g. scripts/oci-image.sh root/ out.tar example.org/x:1 'null' '["sh"]'
set -euo pipefail
root=$(realpath "$1")
out=$(realpath -m "$2")
name=$3
entrypoint=$4
cmd=$5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layer=$work/layer.tar
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$layer" .
layer_sha=$(sha256sum "$layer" | cut -d' ' -f1)
layer_size=$(stat -c %s "$layer")
mkdir -p "$work/oci/blobs/sha256"
mv "$layer" "$work/oci/blobs/sha256/$layer_sha"
config=$(printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":%s,"Cmd":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$entrypoint" "$cmd" "$layer_sha")
config_sha=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
printf '%s' "$config" > "$work/oci/blobs/sha256/$config_sha"
manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_sha" "${#config}" "$layer_sha" "$layer_size")
manifest_sha=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
printf '%s' "$manifest" > "$work/oci/blobs/sha256/$manifest_sha"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"cocoon"}}]}' \
  "$manifest_sha" "${#manifest}" "$name" > "$work/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$work/oci/oci-layout"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/oci" -cf "$out" .
echo "$out: $name (layer sha256:$layer_sha)"
