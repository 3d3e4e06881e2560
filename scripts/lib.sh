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

# cargo-deb, which builds the Debian package, from crates.io at a known
# version unless that version is already installed.
CARGO_DEB_VERSION=3.8.0
install_cargo_deb() {
  if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
    echo "installing cargo-deb $CARGO_DEB_VERSION from crates.io"
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION"
  fi
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

# containerd's name for this machine's platform, as unpack_config wants it.
containerd_platform() {
  case $(uname -m) in
    x86_64) echo linux/amd64 ;;
    aarch64) echo linux/arm64/v8 ;;
    *) echo "linux/$(uname -m)" ;;
  esac
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

# The containerd generations the suite runs besides the installed 1.6:
# each SERIES comes from the Debian SUITE that carries it, as an ordinary
# package that is downloaded and unpacked, never installed.
DEBIAN_CONTAINERDS=("1.7 trixie" "2.1 sid")

# Unpacks every generation of DEBIAN_CONTAINERDS into
# target/containerd/SERIES (its usr/bin holds containerd, ctr and the
# shim; VERSION names the package), unless it is there already. apt runs
# with a sources list, lists and cache of its own under target/apt, so the
# system's apt configuration and its installed containerd stay as they
# are. The archive is the one the machine's own apt sources name.
fetch_debian_containerds() {
  local entry series suite missing=()
  for entry in "${DEBIAN_CONTAINERDS[@]}"; do
    read -r series suite <<<"$entry"
    [ -x "target/containerd/$series/usr/bin/containerd" ] || missing+=("$entry")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local apt=$PWD/target/apt uri
  uri=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 !~ /-/ {print $1; exit}')
  [ -n "$uri" ] || die "the machine's apt sources name no Debian archive to take containerd from"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs"
  : >"$apt/sources.list"
  for entry in "${missing[@]}"; do
    read -r series suite <<<"$entry"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" >>"$apt/sources.list"
  done
  local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- \
    -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Get::List-Cleanup=0 \
    -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" -qq update || die "apt-get update of ${missing[*]} from $uri failed"
  for entry in "${missing[@]}"; do
    read -r series suite <<<"$entry"
    local version
    # The newest of that series the suite carries; Debian revisions move.
    version=$(apt-cache "${opts[@]}" madison containerd | awk -F' [|] ' -v s="$series." \
      '$2 ~ "^" s {print $2; exit}' | tr -d ' ')
    [ -n "$version" ] || die "Debian $suite carries no containerd $series any more" \
      "(apt-cache madison containerd); update DEBIAN_CONTAINERDS in scripts/lib.sh"
    (cd "$apt/debs" && apt-get "${opts[@]}" -qq download "containerd=$version") ||
      die "downloading containerd $version from Debian $suite failed"
    local dest=target/containerd/$series
    rm -rf "$dest" && mkdir -p "$dest"
    dpkg-deb -x "$apt/debs/containerd_${version/*:/}_$(dpkg --print-architecture).deb" "$dest"
    echo "$version" >"$dest/VERSION"
    echo "containerd $version from Debian $suite: $dest/usr/bin"
  done
}

# Says which binaries each containerd of the suite runs, and with what.
print_containerds() {
  local dir
  echo "containerd 1.6: $(command -v containerd) ($(containerd --version))"
  for dir in target/containerd/*/; do
    echo "containerd $(basename "$dir"): $PWD/${dir}usr/bin ($("${dir}usr/bin/containerd" --version 2>/dev/null))"
  done
  if [ -n "${ONTOP_CONTAINERD_EXTRA_BIN:-}" ]; then
    echo "containerd extra (ONTOP_CONTAINERD_EXTRA_BIN): $ONTOP_CONTAINERD_EXTRA_BIN" \
      "($("$ONTOP_CONTAINERD_EXTRA_BIN/containerd" --version 2>/dev/null))"
  fi
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
