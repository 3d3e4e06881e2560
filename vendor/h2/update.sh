#!/usr/bin/env bash
# Rebuilds vendor/h2 from h2 VERSION as published on crates.io, plus
# ontop.patch: bash vendor/h2/update.sh 0.4.21
# Then set the version in ONTOP-PATCH.md, run `cargo update -p h2`, and
# run the suite (tests/clients.rs calls ontop from grpcio).
set -euo pipefail
version=${1:?usage: update.sh VERSION}
here=$(cd "$(dirname "$0")" && pwd)
# Have cargo download the release into its registry cache, untouched.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
mkdir "$probe/src" && touch "$probe/src/lib.rs"
printf '[package]\nname = "probe"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\nh2 = "=%s"\n' \
  "$version" >"$probe/Cargo.toml"
cargo fetch --manifest-path "$probe/Cargo.toml" >/dev/null
published=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"h2-$version" | head -1)
[ -d "$published/src" ] || { echo "h2 $version was not downloaded" >&2; exit 1; }
rm -rf "$here/src"
cp -r "$published/src" "$published/LICENSE" "$published/README.md" "$here/"
# Cargo.toml without examples, benches and dev-dependencies, which are
# not shipped here and would pull crates into ontop's lock file.
awk '
  /^\[\[(example|bench)\]\]/ || /^\[dev-dependencies/ { skip = 1; next }
  /^\[/ { skip = 0 }
  !skip
' "$published/Cargo.toml" | cat -s >"$here/Cargo.toml"
patch -d "$here" -p1 --no-backup-if-mismatch <"$here/ontop.patch"
echo "vendor/h2 is h2 $version with ontop.patch"
