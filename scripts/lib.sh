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

# Waits until no deletion is recent. On ext4 without a journal (this VM's
# root), the inode allocator skips every inode deleted in the last minute
# after writeback (ext4's recently_deleted), so files created just after
# thousands were deleted are slow to make: an unpack timed then paid 2-4x.
# Benchmarks call this before timing unpacks.
settle_filesystem() {
  echo "waiting 65 s for the filesystem's recent deletions to age"
  sync
  sleep 65
}

# The major version of the containerd on PATH: 1 or 2.
containerd_major() {
  containerd --version | awk '{print $3}' | sed 's/^v//; s/\..*//'
}

# Writes the config of a containerd isolated from the system one, with
# ontop as a proxy snapshotter (the fragment `ontop containerd-config`
# prints for the containerd on PATH), and starts it in the background.
#   start_isolated_containerd DIR ROOT ONTOP ONTOP_SOCKET LOG [EXTRA]
# DIR holds its sockets, state, config and pid file; ROOT is its root;
# ONTOP is the ontop binary; EXTRA is more TOML for the config.
start_isolated_containerd() {
  local dir=$1 root=$2 ontop=$3 ontop_socket=$4 log=$5 extra=${6:-}
  local version=2 disabled='"io.containerd.grpc.v1.cri"'
  if [ "$(containerd_major)" -ge 2 ]; then
    version=3
    disabled='"io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime"'
  fi
  mkdir -p "$dir"
  {
    cat <<TOML
version = $version
root = "$root"
state = "$dir/state"
disabled_plugins = [$disabled]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  address = "$dir/debug.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$root/opt"
$extra

TOML
    "$ontop" containerd-config --containerd-version auto --address "$ontop_socket"
  } > "$dir/containerd.toml"
  setsid containerd --config "$dir/containerd.toml" >>"$log" 2>&1 < /dev/null &
  echo $! > "$dir/containerd.pid"
  for _ in $(seq 200); do
    ctr --address "$dir/containerd.sock" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "the isolated containerd did not start; see $log"
}

# containerd 2.x for the test suite, which runs every containerd test on
# containerd 1.6 (Debian's) and 2.x. Sets ONTOP_CONTAINERD2_BIN, a
# directory with containerd, ctr, containerd-shim-runc-v2 and crictl:
#   1. as the caller set it;
#   2. else ../shared/tools/containerd-2.3.4/bin beside the checkout;
#   3. else the official containerd 2.3.4 and cri-tools v1.36.0 release
#      archives, downloaded into target/, checked against the sha256 sums
#      their releases publish.
# When all fail it stays unset, and the 2.x tests fail saying why.
CONTAINERD2_VERSION=2.3.4
CRICTL_VERSION=v1.36.0
ensure_containerd2() {
  if [ -n "${ONTOP_CONTAINERD2_BIN:-}" ]; then
    export ONTOP_CONTAINERD2_BIN
    return 0
  fi
  local shared=../shared/tools/containerd-$CONTAINERD2_VERSION/bin
  if [ -x "$shared/containerd" ]; then
    ONTOP_CONTAINERD2_BIN=$(cd "$shared" && pwd)
    export ONTOP_CONTAINERD2_BIN
    return 0
  fi
  local dest=$PWD/target/containerd-$CONTAINERD2_VERSION
  if [ ! -x "$dest/bin/crictl" ] && ! download_containerd2 "$dest"; then
    echo "warning: no containerd $CONTAINERD2_VERSION: the containerd 2.x tests will fail;" \
      "set ONTOP_CONTAINERD2_BIN to a directory holding its containerd, ctr," \
      "containerd-shim-runc-v2 and crictl" >&2
    return 0
  fi
  export ONTOP_CONTAINERD2_BIN=$dest/bin
}

# Downloads and checks the release archives into DEST/bin.
download_containerd2() {
  local dest=$1 arch tmp
  arch=$(dpkg --print-architecture)
  apt_install curl ca-certificates
  tmp=$(mktemp -d)
  local ctd=containerd-${CONTAINERD2_VERSION#v}-linux-$arch.tar.gz
  local cri=crictl-$CRICTL_VERSION-linux-$arch.tar.gz
  local ctd_url=https://github.com/containerd/containerd/releases/download/v$CONTAINERD2_VERSION/$ctd
  local cri_url=https://github.com/kubernetes-sigs/cri-tools/releases/download/$CRICTL_VERSION/$cri
  echo "downloading containerd $CONTAINERD2_VERSION and crictl $CRICTL_VERSION"
  if curl -fsSL --connect-timeout 30 --retry 2 -o "$tmp/$ctd" "$ctd_url" && curl -fsSL --connect-timeout 30 --retry 2 -o "$tmp/$ctd.sha256" "$ctd_url.sha256sum" &&
    curl -fsSL --connect-timeout 30 --retry 2 -o "$tmp/$cri" "$cri_url" && curl -fsSL --connect-timeout 30 --retry 2 -o "$tmp/$cri.sha256" "$cri_url.sha256" &&
    echo "$(awk '{print $1}' "$tmp/$ctd.sha256")  $tmp/$ctd" | sha256sum -c --quiet &&
    echo "$(awk '{print $1}' "$tmp/$cri.sha256")  $tmp/$cri" | sha256sum -c --quiet; then
    mkdir -p "$dest/bin"
    tar -xzf "$tmp/$ctd" -C "$dest"
    tar -xzf "$tmp/$cri" -C "$dest/bin"
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
