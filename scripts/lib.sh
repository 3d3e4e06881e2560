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
  command -v cargo >/dev/null || die "cargo is missing: install a Rust toolchain (1.88 or newer) with rustup first"
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

# Writes the config of a containerd isolated from the system one, with
# ontop as a proxy snapshotter, and starts it in the background.
#   start_isolated_containerd DIR ROOT ONTOP_SOCKET LOG
# DIR holds its sockets, state, config and pid file; ROOT is its root.
start_isolated_containerd() {
  local dir=$1 root=$2 ontop_socket=$3 log=$4
  mkdir -p "$dir"
  cat > "$dir/containerd.toml" <<TOML
version = 2
root = "$root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$root/opt"
[proxy_plugins.ontop]
  type = "snapshot"
  address = "$ontop_socket"
TOML
  setsid containerd --config "$dir/containerd.toml" >>"$log" 2>&1 < /dev/null &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 200); do
    ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "the isolated containerd did not start; see $log"
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
