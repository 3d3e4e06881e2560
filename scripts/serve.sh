#!/usr/bin/env bash
# Quick start 1: install what is missing, build, and run `ontop serve` with
# the defaults (root /var/lib/containerd/io.containerd.snapshotter.v1.ontop,
# socket /run/ontop/ontop.sock). Extra arguments go to `ontop serve`.
source "$(dirname "$0")/lib.sh"
require_root
install_build_deps
require_overlayfs
cargo build --release --locked
echo "starting ontop; stop it with Ctrl-C or SIGTERM"
exec ./target/release/ontop serve "$@"
