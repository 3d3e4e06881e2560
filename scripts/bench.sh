#!/usr/bin/env bash
# Benchmarks ontop against containerd's own overlayfs snapshotter, in runs
# whose numbers are ratios against the first target. Runs 2 and 3 need only
# Debian's containerds; run 1 needs refproxy, a developer tool that is not
# shipped, and runs only when REFPROXY names it:
#
#   1. direct: refproxy (containerd 1.6's overlayfs snapshotter served over
#      the proxy protocol) against ontop, both started by the bench on fresh
#      roots, each as containerd and ontop ship: refproxy with
#      --async-remove (containerd's plugin default; without it each Remove
#      rescans every snapshot directory), ontop with its defaults;
#   2. through containerd: its built-in overlayfs against ontop behind
#      [proxy_plugins], in an isolated containerd, plus image import
#      (unpack) and `ctr run` of the small three-layer test image and of
#      the seven-layer image of 10,000 files (`mkimage.sh ... many`);
#   3. through containerd 2.x (Debian sid's 2.1, unpacked into
#      target/containerd/2.1 as scripts/test.sh does, or the containerd in
#      ONTOP_CONTAINERD_EXTRA_BIN) with max_concurrent_unpacks = 4: the
#      same two images imported, and the seven-layer images (`deep` and
#      `many`) pulled from a local registry (on 2.2+ a parallel unpack,
#      with ontop's `rebase`): overlayfs with containerd's applier against
#      ontop with its own applier, ontop with containerd's, ontop with its
#      applier and sync_layers = false, and GNU tar of the same layers as
#      the floor (plain, and with a syncfs after each layer: the floor of
#      a durable unpack).
#
#   4. size limits: ontop without limits against ontop with a limit on
#      every container (default_max_size) held by each enforcer this
#      machine has: loop-ext4 on its own filesystem, and on a btrfs the
#      run makes (on a loop device, quotas on) ontop without a limit
#      against btrfs-qgroup. Prepare+Commit directly, then image import
#      and `ctr run --rm` through one containerd with all four behind
#      [proxy_plugins]. (XFS project quotas need a quota-capable kernel:
#      see tests/limits_guest.rs.)
#
# Usage: bash scripts/bench.sh [--quick] [--only-limits | --only-unpack]
# REFPROXY: the refproxy binary, for run 1 (skipped without it).
# Results: target/bench/{direct,containerd,containerd2}.json.
source "$(dirname "$0")/lib.sh"
require_root
install_build_deps
apt_install containerd runc busybox-static tar coreutils docker-registry skopeo curl
require_overlayfs
fetch_debian_containerds
ctd2=${ONTOP_CONTAINERD_EXTRA_BIN:-$PWD/target/containerd/2.1/usr/bin}

quick=()
only=
for arg in "$@"; do
  case $arg in
    --quick) quick=(--quick) ;;
    --only-limits) only=limits ;;
    --only-unpack) only=unpack ;;
    *) die "unknown argument $arg" ;;
  esac
done
refproxy=
if [ -n "${REFPROXY:-}" ]; then
  refproxy=$(realpath "$REFPROXY") || die "REFPROXY=$REFPROXY does not exist"
fi

cargo build --release --locked
ontop=$PWD/target/release/ontop
out=$PWD/target/bench
mkdir -p "$out"

work=$(mktemp -d /tmp/ontop-bench-containerd.XXXXXX)
cleanup() {
  set +e
  for pidfile in "$work"/run*/containerd.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  done
  [ -n "${ontop_pid:-}" ] && kill "$ontop_pid" 2>/dev/null
  [ -n "${ontop2_pid:-}" ] && kill "$ontop2_pid" 2>/dev/null
  [ -n "${ontop3_pid:-}" ] && kill "$ontop3_pid" 2>/dev/null
  [ -n "${ontop4_pid:-}" ] && kill "$ontop4_pid" 2>/dev/null
  [ -n "${registry_pid:-}" ] && kill "$registry_pid" 2>/dev/null
  for pid in "${limit_pids[@]}"; do kill "$pid" 2>/dev/null; done
  sleep 1
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
limit_pids=()

image=$(bash scripts/mkimage.sh "$work/image.tar" docker.io/ontop/bench:latest)
many=$(bash scripts/mkimage.sh "$work/many.tar" docker.io/ontop/many:latest many)
images=(--image "$image=$work/image.tar" --image "$many=$work/many.tar")

if [ -z "$only" ]; then
if [ -n "$refproxy" ]; then
  echo "== 1. direct: refproxy against ontop"
  [ ${#quick[@]} = 0 ] && settle_filesystem
  "$ontop" bench "${quick[@]}" --json "$out/direct.json" \
    --serve "refproxy=$refproxy --async-remove --root {root} --address {address}" \
    --serve "ontop=$ontop serve --root {root} --address {address} --log-level warn"
else
  echo "== 1. direct: skipped (set REFPROXY to compare against refproxy)"
fi

echo "== 2. through containerd: built-in overlayfs against ontop"
"$ontop" serve --root "$work/ontop" --address "$work/ontop.sock" --log-level warn \
  >"$work/ontop.log" 2>&1 &
ontop_pid=$!
start_isolated_containerd "$work/run" "$work/containerd" "$ontop" "$work/ontop.sock" "$work/containerd.log"
# containerd's own List asks the snapshotter to Stat each snapshot, one
# round trip each for a proxy plugin: at 100k that run alone would take many
# minutes, so this run stops at 10k.
through_containerd=()
if [ ${#quick[@]} = 0 ]; then through_containerd=(--scales 10000 --creates 2000); fi
[ ${#quick[@]} = 0 ] && settle_filesystem
"$ontop" bench "${quick[@]}" --json "$out/containerd.json" \
  --containerd "$work/run/containerd.sock" \
  --snapshotter overlayfs --snapshotter ontop \
  "${through_containerd[@]}" "${images[@]}"

fi

if [ -z "$only" ] || [ "$only" = unpack ]; then
echo "== 3. through containerd 2.x: overlayfs against ontop with its applier and with containerd's"
# Three ontops, each on a root of its own, read layers from this
# containerd's content store: "ontop" unpacks with its applier;
# "ontop-walking" with containerd's own ("walking"), which tells the
# applier from the rest; "ontop-nosync", with its applier, runs with
# sync_layers = false, which prices the syncfs that makes each committed
# layer durable.
store=$work/containerd2/io.containerd.content.v1.content
printf 'content_store = "%s"\n' "$store" >"$work/ontop2.toml"
printf 'content_store = "%s"\nsync_layers = false\n' "$store" >"$work/ontop4.toml"
for n in 2 3 4; do
  config=$work/ontop2.toml
  [ $n = 4 ] && config=$work/ontop4.toml
  "$ontop" serve --config "$config" --root "$work/ontop$n" --address "$work/ontop$n.sock" \
    --log-level warn >"$work/ontop$n.log" 2>&1 &
  eval "ontop${n}_pid=$!"
done
unpack_entry() { # SNAPSHOTTER DIFFER
  printf '[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n  platform = "%s"\n  snapshotter = "%s"\n  differ = "%s"\n' \
    "$(containerd_platform)" "$1" "$2"
}
proxy() { # NAME TYPE SOCKET
  printf '[proxy_plugins.%s]\n  type = "%s"\n  address = "%s"\n' "$1" "$2" "$3"
}
others=$(proxy ontop-walking snapshot "$work/ontop3.sock"; unpack_entry ontop-walking walking
  proxy ontop-nosync snapshot "$work/ontop4.sock"; proxy ontop-nosync-applier diff "$work/ontop4.sock"
  unpack_entry ontop-nosync ontop-nosync-applier)
PATH="$ctd2:$PATH" start_isolated_containerd "$work/run2" "$work/containerd2" \
  "$ontop" "$work/ontop2.sock" "$work/containerd2.log" \
  $'[plugins."io.containerd.transfer.v1.local"]\n  max_concurrent_unpacks = 4\n'"$others"
mkdir -p "$work/registry"
cat > "$work/registry/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry/data
http:
  addr: 127.0.0.1:5099
YAML
docker-registry serve "$work/registry/config.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
bash scripts/mkimage.sh "$work/deep.tar" docker.io/ontop/deep:latest deep >/dev/null
for _ in $(seq 50); do curl -fs http://127.0.0.1:5099/v2/ >/dev/null && break; sleep 0.1; done
for name in deep many; do
  skopeo --insecure-policy copy --dest-tls-verify=false "oci-archive:$work/$name.tar" \
    "docker://127.0.0.1:5099/ontop/$name:latest" >/dev/null
done
[ ${#quick[@]} = 0 ] && settle_filesystem
PATH="$ctd2:$PATH" "$ontop" bench "${quick[@]}" --json "$out/containerd2.json" \
  --containerd "$work/run2/containerd.sock" \
  --snapshotter overlayfs --snapshotter ontop --snapshotter ontop-walking --snapshotter ontop-nosync \
  --only image "${images[@]}" \
  --pull 127.0.0.1:5099/ontop/deep:latest --pull 127.0.0.1:5099/ontop/many:latest
fi

if [ -z "$only" ] || [ "$only" = limits ]; then
echo "== 4. size limits: without a limit against each enforcer"
# A btrfs of the run's own, quotas on, for btrfs-qgroup and its baseline.
truncate -s 8G "$work/btrfs.img"
mkfs.btrfs -q "$work/btrfs.img"
mkdir -p "$work/btrfs"
mount -o loop "$work/btrfs.img" "$work/btrfs"
btrfs quota enable "$work/btrfs"
limited=$'default_max_size = "1GiB"\n'
serve_limits() { # NAME ROOT CONFIG
  printf '%s' "$3" > "$work/$1.toml"
  "$ontop" serve --config "$work/$1.toml" --root "$2" --address "$work/$1.sock" \
    --log-level warn >"$work/$1.log" 2>&1 &
  limit_pids+=($!)
}
serve_limits ext4 "$work/ext4" ""
serve_limits ext4-loop "$work/ext4-loop" "$limited"$'limit_enforcer = "loop-ext4"\n'
serve_limits btrfs "$work/btrfs/plain" ""
serve_limits btrfs-qgroup "$work/btrfs/qgroup" "$limited"$'limit_enforcer = "btrfs-qgroup"\n'
for name in ext4 ext4-loop btrfs btrfs-qgroup; do
  for _ in $(seq 100); do [ -S "$work/$name.sock" ] && break; sleep 0.1; done
done
[ ${#quick[@]} = 0 ] && settle_filesystem
"$ontop" bench "${quick[@]}" --json "$out/limits.json" --only create --creates 400 \
  --address "ext4=$work/ext4.sock" --address "ext4-loop=$work/ext4-loop.sock" \
  --address "btrfs=$work/btrfs.sock" --address "btrfs-qgroup=$work/btrfs-qgroup.sock"
proxies=
for name in ext4 ext4-loop btrfs btrfs-qgroup; do
  proxies+=$'[proxy_plugins."limits-'"$name"$'"]\n  type = "snapshot"\n  address = "'"$work/$name.sock"$'"\n'
done
start_isolated_containerd "$work/run4" "$work/containerd4" "$ontop" "$work/ext4.sock" \
  "$work/containerd4.log" "$proxies"
"$ontop" bench "${quick[@]}" --json "$out/limits-containerd.json" --only image \
  --containerd "$work/run4/containerd.sock" \
  --snapshotter limits-ext4 --snapshotter limits-ext4-loop \
  --snapshotter limits-btrfs --snapshotter limits-btrfs-qgroup \
  --image "$image=$work/image.tar"
fi
