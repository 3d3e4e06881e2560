#!/usr/bin/env bash
# Builds ontop's Debian package: target/debian/ontop_<version>-1_<arch>.deb,
# with the daemon, ontop-bench, /etc/ontop/config.toml (a conffile), the
# systemd units of contrib/, man pages and shell completions.
# Needs cargo-deb (installed here from crates.io when missing) and
# dpkg-dev (for the shared-library dependencies).
source "$(dirname "$0")/lib.sh"
install_build_deps
apt_install dpkg-dev
install_cargo_deb
cargo build --release --locked
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
rm -rf "$target/release/dist"
"$target/release/ontop-gen" "$target/release/dist"
cargo deb -p ontop --no-build --locked
