#!/usr/bin/env bash
# Benchmarks ontop against containerd's own overlayfs snapshotter, in two
# runs whose numbers are ratios against the first target:
#
#   1. direct: refproxy (containerd 1.6's overlayfs snapshotter served over
#      the proxy protocol) against ontop, both started by the bench on fresh
#      roots, each as containerd and ontop ship: refproxy with
#      --async-remove (containerd's plugin default; without it each Remove
#      rescans every snapshot directory), ontop with its defaults;
#   2. through containerd: its built-in overlayfs against ontop behind
#      [proxy_plugins], in an isolated containerd, plus image import
#      (unpack) and `ctr run` of the test image.
#
# Usage: bash scripts/bench.sh [--quick]
# REFPROXY (default ../shared/tools/refproxy) is the refproxy binary.
# Results: target/bench/direct.json and target/bench/containerd.json.
source "$(dirname "$0")/lib.sh"
require_root
install_build_deps
apt_install containerd runc busybox-static tar coreutils
require_overlayfs

quick=()
[ "${1:-}" = --quick ] && quick=(--quick)
refproxy=$(realpath "${REFPROXY:-../shared/tools/refproxy}" 2>/dev/null) \
  || die "refproxy not found; set REFPROXY to containerd's overlayfs snapshotter served over the proxy protocol"

cargo build --release --locked
ontop=$PWD/target/release/ontop
out=$PWD/target/bench
mkdir -p "$out"

echo "== 1. direct: refproxy against ontop"
"$ontop" bench "${quick[@]}" --json "$out/direct.json" \
  --serve "refproxy=$refproxy --async-remove --root {root} --address {address}" \
  --serve "ontop=$ontop serve --root {root} --address {address} --log-level warn"

echo "== 2. through containerd: built-in overlayfs against ontop"
work=$(mktemp -d /tmp/ontop-bench-containerd.XXXXXX)
cleanup() {
  set +e
  [ -f "$work/run/containerd.pid" ] && kill "$(cat "$work/run/containerd.pid")" 2>/dev/null
  [ -n "${ontop_pid:-}" ] && kill "$ontop_pid" 2>/dev/null
  sleep 1
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$ontop" serve --root "$work/ontop" --address "$work/ontop.sock" --log-level warn \
  >"$work/ontop.log" 2>&1 &
ontop_pid=$!
start_isolated_containerd "$work/run" "$work/containerd" "$work/ontop.sock" "$work/containerd.log"
# containerd's own List asks the snapshotter to Stat each snapshot, one
# round trip each for a proxy plugin: at 100k that run alone would take many
# minutes, so this run stops at 10k.
through_containerd=()
if [ ${#quick[@]} = 0 ]; then through_containerd=(--scales 10000 --creates 2000); fi
image=$(bash scripts/mkimage.sh "$work/image.tar" docker.io/ontop/bench:latest)
"$ontop" bench "${quick[@]}" --json "$out/containerd.json" \
  --containerd "$work/run/containerd.sock" \
  --snapshotter overlayfs --snapshotter ontop \
  "${through_containerd[@]}" \
  --image "$image=$work/image.tar"
