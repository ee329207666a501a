#!/usr/bin/env bash
# Sets up Cocoon on a fresh Debian bookworm machine (as root) and runs the
# demo: `uname -r` from inside a VM, beside the host's.
#   - Debian packages: QEMU, containerd + runc, the build dependencies of
#     virtiofsd, kmod/cpio for the guest image, the kernel source and its
#     build dependencies for the Cocoon guest kernel, busybox-static for the demo;
#     for the CRI tests: the CNI plugins, iptables, protoc (the CRI client's
#     build), gcc and static libc (the offline pause image, `cocoon bench`'s
#     I/O helper); a TrueType font for `cocoon bench --png`
#   - the rust-vmm daemons virtiofsd and vhost-device-vsock (cargo install)
#   - the Cocoon workspace (release), installed to /usr/local/bin, and the
#     guest agent (static, size-optimised: scripts/build-agent.sh)
#   - the guest image (/var/lib/cocoon/guest: the Cocoon kernel, built once
#     and cached in /var/cache/cocoon/kernel, and Debian's cloud kernel) and a default flavour
#     (/etc/cocoon/configuration.toml, if there is none)
# Re-running it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs packages, and VMs need mounts)" >&2
  exit 1
fi
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "setup.sh: cargo not found; install Rust (rustup, 1.85 or newer) first" >&2
  exit 1
fi

say "Debian packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  qemu-system-x86 containerd runc \
  libseccomp-dev libcap-ng-dev pkg-config \
  kmod cpio busybox-static procps ca-certificates \
  linux-source-6.1 make bc bison flex libelf-dev libssl-dev xz-utils lz4 binutils perl \
  containernetworking-plugins iptables protobuf-compiler gcc libc6-dev curl \
  fonts-dejavu-core

say "rust-vmm daemons (virtiofsd 1.14, vhost-device-vsock 0.3)"
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
installed() { cargo install --list | grep -q "^$1 v$2:"; }
installed virtiofsd 1.14.0 || cargo install --locked virtiofsd@1.14.0
# vhost-device-vsock 0.3.0 with two fixes: see third_party/vhost-device-vsock/COCOON.md.
vsock_src="$PWD/third_party/vhost-device-vsock"
cargo install --list | grep -qF "vhost-device-vsock v0.3.0 ($vsock_src):" ||
  cargo install --locked --force --path "$vsock_src"
for b in virtiofsd vhost-device-vsock; do install -m 0755 "$cargo_bin/$b" /usr/local/bin/$b; done

say "Cocoon (cargo build --release; the guest agent: scripts/build-agent.sh)"
cargo build --release --locked --workspace
for b in cocoon containerd-shim-cocoon-v2; do install -m 0755 target/release/$b /usr/local/bin/$b; done
# The guest's agent: static and size-optimised (scripts/build-agent.sh).
agent=$(bash scripts/build-agent.sh)
install -m 0755 "$agent" /usr/local/bin/cocoon-agent

say "guest image"
cocoon image build --agent "$agent" --out /var/lib/cocoon/guest

[ -e /etc/cocoon/configuration.toml ] || install -D -m 0644 configs/q35.toml /etc/cocoon/configuration.toml
[ -e /etc/cocoon/microvm.toml ] || install -D -m 0644 configs/microvm.toml /etc/cocoon/microvm.toml
[ -e /etc/cocoon/q35-tcg.toml ] || install -D -m 0644 configs/q35-tcg.toml /etc/cocoon/q35-tcg.toml
[ -e /etc/cocoon/q35-debian.toml ] || install -D -m 0644 configs/q35-debian.toml /etc/cocoon/q35-debian.toml

say "cocoon check"
cocoon check

say "demo"
rootfs=build/busybox-rootfs
mkdir -p "$rootfs/bin" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/tmp" "$rootfs/etc"
cp /bin/busybox "$rootfs/bin/busybox"
for a in sh uname echo cat; do ln -sf busybox "$rootfs/bin/$a"; done
echo "host  kernel: $(uname -r)"
echo "guest kernel: $(cocoon run --rootfs "$rootfs" -- uname -r)"
