# Shared helpers for ontop's scripts. Sourced, not run.
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" = 0 ] || die "run this as root: ontop mounts overlay filesystems and serves containerd"
}

# Installs the named Debian packages that are not installed yet, running
# apt-get update once first.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

require_rust() {
  command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (1.85 or newer) with rustup first"
}

# Build dependencies: protoc for the gRPC code, a C compiler for SQLite.
install_build_deps() {
  apt_install protobuf-compiler gcc libc6-dev
  require_rust
}

require_overlayfs() {
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || die "the kernel has no overlayfs (modprobe overlay failed)"
}

require_fuse() {
  [ -c /dev/fuse ] || modprobe fuse 2>/dev/null || true
  [ -c /dev/fuse ] || die "/dev/fuse is missing (modprobe fuse failed): the fuse-overlayfs backend cannot be tested"
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
