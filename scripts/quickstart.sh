#!/usr/bin/env bash
# Quick start 1, ontop's main job on a fresh Debian machine, as root:
#   1. install what is missing (containerd, runc, protoc, busybox-static);
#   2. build ontop;
#   3. start `ontop serve` with the defaults, unless it is already running;
#   4. wire it into a containerd: the system one when its config already
#      has [proxy_plugins.ontop], otherwise an isolated one of our own;
#   5. import a small image and run a container through ontop;
#   6. leave ontop running, and say where it is and how to stop it.
source "$(dirname "$0")/lib.sh"
require_root
install_build_deps
apt_install containerd runc busybox-static tar coreutils
require_overlayfs

echo "== building ontop"
cargo build --release --locked
ontop=$PWD/target/release/ontop

socket=/run/ontop/ontop.sock
pidfile=/run/ontop/ontop.pid
log=/var/log/ontop.log
demo=/run/ontop-demo
mkdir -p /run/ontop "$demo"

answers() { "$ontop" ls --address "$socket" >/dev/null 2>&1; }

echo "== starting ontop"
if answers; then
  echo "ontop already answers on $socket; using it"
else
  setsid "$ontop" serve --address "$socket" >>"$log" 2>&1 < /dev/null &
  echo $! > "$pidfile"
  for _ in $(seq 100); do answers && break; sleep 0.1; done
  answers || { tail -20 "$log" >&2; die "ontop did not start; see $log"; }
  echo "ontop serve started (pid $(cat "$pidfile")), logs in $log"
fi

echo "== wiring ontop into containerd"
ctd_socket=/run/containerd/containerd.sock
if ctr --address "$ctd_socket" plugins ls 2>/dev/null | grep -qE 'io\.containerd\.snapshotter\.v1[[:space:]]+ontop'; then
  echo "the system containerd already has ontop as a proxy plugin; using it"
else
  if ctr --address "$ctd_socket" version >/dev/null 2>&1; then
    echo "the system containerd runs without ontop; leaving its config alone."
    echo "to use ontop there, add this to /etc/containerd/config.toml and restart it:"
    "$ontop" containerd-config --containerd-version auto --address "$socket" | sed 's/^/  /'
  fi
  ctd_socket=$demo/containerd.sock
  if ! ctr --address "$ctd_socket" version >/dev/null 2>&1; then
    start_isolated_containerd "$demo" /var/lib/ontop-demo/containerd "$ontop" "$socket" /var/log/ontop-demo-containerd.log
  fi
  echo "using an isolated containerd on $ctd_socket (config $demo/containerd.toml)"
fi

ctr() { command ctr --address "$ctd_socket" --namespace ontop-demo "$@"; }

echo "== importing a demo image through ontop"
image=$(bash scripts/mkimage.sh "$demo/image.tar" docker.io/ontop/demo:latest)
ctr images import --snapshotter ontop "$demo/image.tar"

echo "== running a container through ontop"
ctr run --rm --snapshotter ontop "$image" "demo-$$" \
  sh -c 'echo "hello from a container whose rootfs ontop provides"; echo "kernel: $(uname -r)"; mount | grep " / "; cat /added/new.txt'

echo "== what ontop holds now"
ctr snapshots --snapshotter ontop ls
"$ontop" ls --address "$socket"

cat <<EOF

ontop is running.
  socket:  $socket
  root:    /var/lib/containerd/io.containerd.snapshotter.v1.ontop
  logs:    $log
  try:     ctr --address $ctd_socket -n ontop-demo run --rm --snapshotter ontop $image t1 sh
  stop:    kill \$(cat $pidfile)
EOF
if [ -f "$demo/containerd.pid" ]; then
  echo "  the isolated containerd: kill \$(cat $demo/containerd.pid)"
fi
