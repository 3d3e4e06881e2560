#!/usr/bin/env bash
# Builds ontop's container image (deploy/image/Dockerfile's result) as an
# OCI archive, offline and without Docker: this checkout's release binary,
# fuse-overlayfs and fuse3 from this machine's Debian packages with the
# shared libraries they load, and busybox-static for a shell.
#
# Usage: image.sh OUT.tar [IMAGE-NAME]   (prints the image name)
# ONTOP_BIN picks the binary; the default is target/release/ontop.
# Needs: cargo build --release; apt-get install fuse-overlayfs fuse3 busybox-static
set -euo pipefail
out=$(realpath -m "${1:?usage: image.sh OUT.tar [IMAGE-NAME]}")
name=${2:-localhost/ontop:0.1.0}
source "$(dirname "$0")/lib.sh"
# ONTOP_BIN: another build of ontop (the tests use their debug build).
bin=${ONTOP_BIN:-$PWD/target/release/ontop}
[ -x "$bin" ] || die "no $bin: run cargo build --release first"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
mkdir -p "$rootfs"/{usr/local/bin,bin,usr/bin,etc/ontop,run,tmp,var/lib}
chmod 1777 "$rootfs/tmp"

# Copies a program and every shared library it loads, at their paths.
with_libs() {
  local prog=$1 dest=$2
  cp "$prog" "$rootfs$dest"
  ldd "$prog" 2>/dev/null | grep -oE '/[^ ]+' | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}
with_libs "$bin" /usr/local/bin/ontop
with_libs "$(command -v fuse-overlayfs)" /usr/bin/fuse-overlayfs
with_libs "$(command -v fusermount3)" /usr/bin/fusermount3
cp "$(command -v busybox)" "$rootfs/bin/busybox"
for applet in sh ls cat test; do ln -s busybox "$rootfs/bin/$applet"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
echo 'root:x:0:' > "$rootfs/etc/group"

source scripts/oci.sh
(cd "$rootfs" && tar --create --format=gnu --numeric-owner --owner=0 --group=0 --sort=name \
  --mtime=@0 --file "$work/layer.tar" .)
oci_archive "$out" "$name" \
  '{"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"Entrypoint":["/usr/local/bin/ontop"],"Cmd":["serve","--config","/etc/ontop/config.toml"]}' \
  "$work/layer.tar"
echo "$name"
