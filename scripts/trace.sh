#!/usr/bin/env bash
# Accounts for the end-to-end time of containerd's flows through ontop:
# which Snapshots calls containerd makes to a proxy snapshotter during an
# image import (unpack) and a `ctr run --rm`, how long each takes inside
# ontop (its per-call debug log), and how that compares with the whole
# flow, for containerd's built-in overlayfs, for refproxy (containerd
# 1.6's overlayfs snapshotter served as a proxy plugin: what being a proxy
# costs by itself) and for ontop, interleaved. Two images: the small
# three-layer test image, and seven layers of 10,000 files in all
# (`mkimage.sh ... many`), where per-file work shows.
#
# Usage: bash scripts/trace.sh [REPS]      (default 10 repetitions)
# REFPROXY (default ../shared/tools/refproxy) is the refproxy binary.
# Runs on Debian's containerd 1.6, and on Debian sid's 2.1 (unpacked into
# target/containerd/2.1 as scripts/test.sh does), or on the containerd in
# ONTOP_CONTAINERD_EXTRA_BIN instead when that is set.
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/oci.sh"
require_root
install_build_deps
apt_install containerd runc busybox-static tar coreutils
require_overlayfs
fetch_debian_containerds
ctd2=${ONTOP_CONTAINERD_EXTRA_BIN:-$PWD/target/containerd/2.1/usr/bin}
reps=${1:-10}
refproxy=$(realpath "${REFPROXY:-../shared/tools/refproxy}" 2>/dev/null) \
  || die "refproxy not found; set REFPROXY"

cargo build --release --locked
ontop=$PWD/target/release/ontop
work=$(mktemp -d /tmp/ontop-trace.XXXXXX)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for pidfile in "$work"/run*/containerd.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null
  done
  sleep 1
  grep -o " $work[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
declare -A images=(
  [small]=$(bash scripts/mkimage.sh "$work/small.tar" docker.io/ontop/trace:latest)
  [many]=$(bash scripts/mkimage.sh "$work/many.tar" docker.io/ontop/many:latest many)
)

settle_filesystem

# The calls ontop logged between two marks, by method: count and total ms.
calls_between() {
  local log=$1 from=$2 to=$3
  sed -n "${from},${to}p" "$log" | grep -o 'call method="[A-Za-z]*".*duration_ms=[0-9.]*' |
    sed -E 's/call method="([A-Za-z]+)".*duration_ms=([0-9.]+)/\1 \2/' |
    awk '{n[$1]++; t[$1]+=$2; all+=$2} END {for (m in n) printf "    %-8s %3d calls %8.2f ms\n", m, n[m], t[m]; printf "    in ontop: %.2f ms\n", all}'
}

now_ms() { date +%s%3N; }

trace_generation() {
  local name=$1 dir=$2
  local sock=$work/$name-ontop.sock log=$work/$name-ontop.log
  # ontop's applier reads layers from this containerd's content store.
  printf 'content_store = "%s"\n' "$work/$name-containerd/io.containerd.content.v1.content" \
    >"$work/$name-ontop.toml"
  "$ontop" serve --config "$work/$name-ontop.toml" --root "$work/$name-ontop" --address "$sock" \
    --log-level debug >"$log" 2>&1 &
  pids+=($!)
  "$refproxy" --async-remove --root "$work/$name-refproxy" --address "$work/$name-refproxy.sock" \
    >"$work/$name-refproxy.log" 2>&1 &
  pids+=($!)
  local extra
  extra=$(printf '[proxy_plugins.refproxy]\n  type = "snapshot"\n  address = "%s"\n' "$work/$name-refproxy.sock")
  if [ "$(containerd_major)" -ge 2 ]; then
    extra+=$(printf '\n[[plugins."io.containerd.transfer.v1.local".unpack_config]]\n  platform = "linux/%s"\n  snapshotter = "refproxy"\n  differ = "walking"\n' "$(oci_arch)")
  fi
  start_isolated_containerd "$dir" "$work/$name-containerd" "$ontop" "$sock" "$work/$name-containerd.log" "$extra"
  local ctr=(ctr --address "$dir/containerd.sock")
  echo "== $name: $("${ctr[@]}" version 2>/dev/null | awk '/Server:/{s=1} s && /Version:/{print $2; exit}')"
  declare -A total=()
  # The layers' blobs go into the content store once, untimed, so that
  # every timed import does the same work: unpack.
  for img in small many; do
    "${ctr[@]}" -n trace-content images import --no-unpack "$work/$img.tar" >/dev/null 2>&1
  done
  local order=(overlayfs refproxy ontop)
  for rep in $(seq "$reps"); do
    for img in small many; do
      for sn in "${order[@]}"; do
        # A namespace per repetition: an unpack where another image holds
        # the layers does almost nothing. Nothing is removed until the end
        # (see settle_filesystem in lib.sh): whoever ran after a removal
        # paid for it, 2-4x on the 10,000-file image.
        local ns=trace-$sn-$img-$rep image=${images[$img]}
        local mark t0 t1
        mark=$(wc -l <"$log")
        t0=$(now_ms)
        "${ctr[@]}" -n "$ns" images import --snapshotter "$sn" "$work/$img.tar" >/dev/null 2>&1
        t1=$(now_ms)
        total[$sn-$img-import]+="$((t1 - t0)) "
        [ "$rep" = 1 ] && [ "$sn" = ontop ] && { echo "  $img import: calls to ontop"; calls_between "$log" "$mark" '$'; }
        mark=$(wc -l <"$log")
        t0=$(now_ms)
        "${ctr[@]}" -n "$ns" run --rm --snapshotter "$sn" "$image" "trace-$rep" true >/dev/null 2>&1
        t1=$(now_ms)
        total[$sn-$img-run]+="$((t1 - t0)) "
        [ "$rep" = 1 ] && [ "$sn" = ontop ] && { echo "  $img ctr run --rm: calls to ontop"; calls_between "$log" "$mark" '$'; }
      done
    done
    # Each goes first in turn.
    order=("${order[@]:1}" "${order[0]}")
  done
  median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  for flow in small-import small-run many-import many-run; do
    local om rm pm
    om=$(echo "${total[overlayfs-$flow]}" | median)
    rm=$(echo "${total[refproxy-$flow]}" | median)
    pm=$(echo "${total[ontop-$flow]}" | median)
    printf "  %-12s overlayfs %5d ms   refproxy %5d ms (%sx)   ontop %5d ms (%sx)   medians of %d\n" \
      "$flow" "$om" "$rm" "$(awk -v a="$rm" -v b="$om" 'BEGIN {printf "%.2f", a / b}')" \
      "$pm" "$(awk -v a="$pm" -v b="$om" 'BEGIN {printf "%.2f", a / b}')" "$reps"
    printf "    every repetition, ms: overlayfs %s| refproxy %s| ontop %s\n" \
      "${total[overlayfs-$flow]}" "${total[refproxy-$flow]}" "${total[ontop-$flow]}"
  done
}

trace_generation containerd1 "$work/run1"
PATH="$ctd2:$PATH" trace_generation containerd2 "$work/run2"
