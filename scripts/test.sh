#!/usr/bin/env bash
# Quick start 2: install what the tests need and run the whole suite:
# formatting, clippy, unit tests, and integration tests that start the real
# daemon and mount real overlay filesystems (so it must run as root).
source "$(dirname "$0")/lib.sh"
require_root
install_build_deps
# The containerd suite runs Debian's containerd and runc, and builds its
# test image from busybox-static. Every mount suite also runs on
# fuse-overlayfs; the rootless suite needs useradd, setpriv, unshare and
# nsenter; the disk-full test makes an ext4 image (e2fsprogs); the
# clients test installs Python's grpcio from PyPI into a venv; the parallel
# unpack and bench tests pull from a local docker-registry fed by skopeo;
# the operations suite runs systemd-socket-activate (systemd), and a real
# Prometheus server and promtool (prometheus); the syscall counts, strace;
# containerd's own snapshotter testsuite, Go and containerd 1.6's source;
# the vendored h2's check (tests/h2_patch.rs), patch; the Debian package's
# test, dpkg-dev and cargo-deb (from crates.io); the power-cut test, qemu,
# Debian's kernel, cpio for the guest's initramfs, and mkfs for xfs and
# btrfs (tests/powercut).
apt_install util-linux passwd e2fsprogs containerd runc busybox-static tar coreutils fuse-overlayfs fuse3 \
  python3 python3-venv docker-registry skopeo systemd prometheus strace \
  golang-go golang-github-containerd-containerd-dev patch dpkg-dev \
  qemu-system-x86 linux-image-amd64 cpio xfsprogs btrfs-progs
install_cargo_deb
require_overlayfs
require_fuse
# containerd 1.7 and 2.1 from Debian's trixie and sid, unpacked into
# target/containerd/ (never installed), beside the installed 1.6.
fetch_debian_containerds
print_containerds
# A containerd of the user's own runs too, as the containerd_extra tests,
# when ONTOP_CONTAINERD_EXTRA_BIN names its directory.
extra=()
if [ -n "${ONTOP_CONTAINERD_EXTRA_BIN:-}" ]; then
  export ONTOP_CONTAINERD_EXTRA_BIN
  extra=(--include-ignored)
fi
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing: rustup component add clippy"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo build"
# The binaries, ontop-bench among them: cargo test builds only the binaries
# of the package whose tests use them, and tests/bench.rs runs ontop-bench.
cargo build --locked
echo "== cargo test"
cargo test --locked --all-targets -- "${extra[@]}"
