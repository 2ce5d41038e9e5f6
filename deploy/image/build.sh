#!/usr/bin/env bash
# Builds the iamlet node image (deploy/image/Containerfile) with podman, for one or more
# architectures, with no registry needed until the push:
#
#   bash deploy/image/build.sh                                   # this machine's architecture
#   IMAGE=ghcr.io/you/iamlet:0.1.0 ARCHES="amd64 arm64" bash deploy/image/build.sh --push
#   ARCHES="amd64 arm64" bash deploy/image/build.sh --context-only   # then docker buildx
#
# For each architecture it makes a root filesystem with mmdebstrap (Debian bookworm, its
# security updates, iptables with both backends, CA certificates; cached), builds iamlet in
# release mode (cross-compiled for a foreign architecture), puts both in the build context, and
# podman builds one image per architecture; --push sends them to $IMAGE as one manifest list.
#
# Needs: mmdebstrap, podman (not for --context-only), cargo. For a foreign architecture also:
# qemu-user-static and binfmt-support (mmdebstrap runs the packages' scripts under emulation),
# `rustup target add aarch64-unknown-linux-gnu` (or x86_64-…) and a cross C toolchain
# (Debian: gcc-aarch64-linux-gnu, or gcc-x86-64-linux-gnu).
#
# Environment:
#   IMAGE              image name (default localhost/iamlet:<version in Cargo.toml>)
#   ARCHES             Debian architecture names: amd64, arm64 (default: this machine's)
#   IAMLET_BINARY      use this iamlet instead of building one (a single architecture only)
#   CONTEXT_DIR        the build context (default target/image)
#   CACHE_DIR          cached root filesystems (default $IAMLET_CACHE/image, ~/.cache/iamlet/image)
#   BASE_MAX_AGE_DAYS  remake a cached root filesystem older than this (default 7), so
#                      Debian's security updates reach the image
#   MIRROR             Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail
cd "$(dirname "$0")/../.."

push=false
context_only=false
for arg in "$@"; do
  case "$arg" in
    --push) push=true ;;
    --context-only) context_only=true ;;
    *) echo "build.sh: unknown argument $arg (want --push or --context-only)" >&2; exit 2 ;;
  esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
image=${IMAGE:-localhost/iamlet:$version}
case "$(uname -m)" in
  x86_64) host_arch=amd64 ;;
  aarch64 | arm64) host_arch=arm64 ;;
  *) host_arch=$(uname -m) ;;
esac
read -r -a arches <<< "${ARCHES:-$host_arch}"
context=${CONTEXT_DIR:-target/image}
cache=${CACHE_DIR:-${IAMLET_CACHE:-$HOME/.cache/iamlet}/image}
max_age=${BASE_MAX_AGE_DAYS:-7}
mirror=${MIRROR:-http://deb.debian.org/debian}
security_mirror=${SECURITY_MIRROR:-${mirror%/debian}/debian-security}
if [ -n "${IAMLET_BINARY:-}" ] && [ ${#arches[@]} -ne 1 ]; then
  echo "build.sh: IAMLET_BINARY is one binary: give one architecture in ARCHES" >&2
  exit 2
fi

triple() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    *) echo "build.sh: no Rust target for architecture $1 (amd64 or arm64)" >&2; return 1 ;;
  esac
}

# The root filesystem: only what iamlet runs (iptables, both backends) and trusts (CA
# certificates). No apt, no recommends, no docs but copyrights; no device nodes (the container
# runtime provides /dev).
rootfs() {
  local arch=$1 tar="$cache/rootfs-bookworm-$1.tar"
  mkdir -p "$cache"
  if [ -f "$tar" ] && [ -z "$(find "$tar" -mtime "+$max_age")" ]; then
    echo "image: root filesystem for $arch from the cache ($tar)" >&2
  else
    echo "image: making the root filesystem for $arch with mmdebstrap (about half a minute)" >&2
    local log="$cache/mmdebstrap-$arch.log"
    if ! mmdebstrap --variant=essential --architectures="$arch" \
      --include=iptables,ca-certificates \
      --aptopt='Apt::Install-Recommends "false"' \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --skip=output/dev \
      bookworm "$tar.$$.tar" \
      "deb $mirror bookworm main" \
      "deb $mirror bookworm-updates main" \
      "deb $security_mirror bookworm-security main" >"$log" 2>&1; then
      tail -n 30 "$log" >&2
      echo "build.sh: mmdebstrap failed; its log: $log" >&2
      return 1
    fi
    mv "$tar.$$.tar" "$tar"
  fi
  echo "$tar"
}

binary() {
  local arch=$1
  if [ -n "${IAMLET_BINARY:-}" ]; then
    echo "$IAMLET_BINARY"
    return
  fi
  local target_dir=${CARGO_TARGET_DIR:-target}
  if [ "$arch" = "$host_arch" ]; then
    echo "image: cargo build --release for $arch" >&2
    cargo build --release --locked --bin iamlet >&2
    echo "$target_dir/release/iamlet"
  else
    local rust_target upper
    rust_target=$(triple "$arch")
    upper=$(echo "$rust_target" | tr 'a-z-' 'A-Z_')
    local gnu=${rust_target%%-*}-linux-gnu
    echo "image: cargo build --release --target $rust_target (cross, with $gnu-gcc)" >&2
    env "CARGO_TARGET_${upper}_LINKER=${gnu}-gcc" "CC_${rust_target//-/_}=${gnu}-gcc" \
      cargo build --release --locked --bin iamlet --target "$rust_target" >&2
    echo "$target_dir/$rust_target/release/iamlet"
  fi
}

platforms=()
for arch in "${arches[@]}"; do
  triple "$arch" >/dev/null
  mkdir -p "$context/$arch"
  tar=$(rootfs "$arch")
  # A hard link where the cache and the context share a file system, else a copy.
  ln -f "$tar" "$context/$arch/rootfs.tar" 2>/dev/null || cp "$tar" "$context/$arch/rootfs.tar"
  bin=$(binary "$arch")
  cp "$bin" "$context/$arch/iamlet"
  platforms+=("linux/$arch")
done
if $context_only; then
  echo "image: build context ready in $context (${arches[*]})"
  exit 0
fi

# One image per architecture, tagged $IMAGE-<arch>; $IMAGE itself names this machine's (or the
# first) architecture. A push sends one manifest list over all of them to $IMAGE. The list is
# made only for the push and removed after it: podman 4.3 (Debian bookworm) cannot list images
# while a manifest list is stored locally. No layer cache: it would only keep dangling images.
for arch in "${arches[@]}"; do
  echo "image: podman build --platform linux/$arch -t $image-$arch"
  podman build --quiet --layers=false --platform "linux/$arch" -t "$image-$arch" \
    -f deploy/image/Containerfile "$context" >/dev/null
done
local_arch=${arches[0]}
for arch in "${arches[@]}"; do
  if [ "$arch" = "$host_arch" ]; then local_arch=$arch; fi
done
podman tag "$image-$local_arch" "$image"
echo "image: built $image ($local_arch) and ${arches[*]/#/$image-}"
if $push; then
  list="localhost/iamlet-push-list:$$"
  podman manifest create "$list" >/dev/null
  for arch in "${arches[@]}"; do
    podman manifest add "$list" "containers-storage:$image-$arch" >/dev/null
  done
  echo "image: pushing ${arches[*]} to $image as one manifest list"
  podman manifest push --all --rm "$list" "docker://$image"
fi
