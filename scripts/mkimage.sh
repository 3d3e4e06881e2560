#!/usr/bin/env bash
# Builds a small three-layer OCI image archive offline, from Debian's
# busybox-static, for `ctr images import`. Its layers exercise what a
# snapshotter must get right when it stacks layers:
#
#   layer 1  busybox and its applets; files and dirs to change later
#   layer 2  an added file, a whiteout (deleted file), an opaque
#            (replaced) directory, a mode change and an owner change
#   layer 3  a hard link, a relative and an absolute symlink
#
# With "deep", four more layers stack changes on changes, for parallel
# unpack (each layer unpacked without its parent, then rebased):
#
#   layer 4  whiteout of a symlink, an opaque dir over layer 2's, a file's
#            mode and owner changed, a new tree with its own owner
#   layer 5  whiteout of that whole tree, a file replaced by a directory,
#            a setuid file, changed content
#   layer 6  the tree re-created after its whiteout, an empty mode-0 file,
#            a symlink to a directory, a whiteout of a hidden file
#   layer 7  an opaque dir over three layers with its own mode and owner,
#            a whiteout of layer 4's file and of an applet, a directory's
#            mode and owner changed
#
# With "pause", only layer 1, and a command that sleeps: a sandbox
# ("pause") image for CRI pods.
#
# With "many", four more layers of many small files, as an application's
# dependencies come (10,000 files in 400 directories, about 30 MiB):
#
#   layer 4  2,500 files of 0.1-6 KiB in 100 directories
#   layer 5  2,500 more, and a fifth of layer 4's files rewritten
#   layer 6  2,500 more, and a whiteout of 20 of layer 4's directories
#   layer 7  2,500 more, in directories of their own
#
# Usage: mkimage.sh OUT.tar [IMAGE-NAME] [deep|pause|many]
# The expected view from inside a container is in tests/containerd.rs.
set -euo pipefail

out=${1:?usage: mkimage.sh OUT.tar [IMAGE-NAME]}
name=${2:-docker.io/ontop/e2e:latest}
variant=${3:-}
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "mkimage: busybox is missing (apt-get install busybox-static)" >&2; exit 1; }
# The image has no libc, so busybox must be the static build.
{ ldd "$busybox" 2>&1 || true; } | grep -q 'not a dynamic' \
  || { echo "mkimage: $busybox is not statically linked; install busybox-static" >&2; exit 1; }

source "$(dirname "$0")/oci.sh"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Layer 1: busybox, its applets, and the files later layers change.
l1=$work/l1
mkdir -p "$l1"/{bin,etc,data,olddir,modes,owner,tmp}
chmod 1777 "$l1/tmp"
cp "$busybox" "$l1/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$l1/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$l1/etc/passwd"
echo 'root:x:0:' > "$l1/etc/group"
echo keep > "$l1/data/keep.txt"
echo gone > "$l1/data/delete-me.txt"
echo a > "$l1/olddir/a"
echo b > "$l1/olddir/b"
echo mode > "$l1/modes/file"
chmod 0644 "$l1/modes/file"
echo owner > "$l1/owner/file"

# Layer 2: add, delete, replace a directory, change a mode and an owner.
l2=$work/l2
mkdir -p "$l2"/{added,data,olddir,modes,owner}
echo "new in layer 2" > "$l2/added/new.txt"
: > "$l2/data/.wh.delete-me.txt"
: > "$l2/olddir/.wh..wh..opq"
echo c > "$l2/olddir/c"
echo mode > "$l2/modes/file"
chmod 0600 "$l2/modes/file"
echo owner > "$l2/owner/file"
chown 1000:1000 "$l2/owner/file"

# Layer 3: a hard link and two symlinks.
l3=$work/l3
mkdir -p "$l3/links"
echo "linked content" > "$l3/links/target"
ln "$l3/links/target" "$l3/links/hard"
ln -s target "$l3/links/sym"
ln -s /data/keep.txt "$l3/links/abs"

stack=("$l1" "$l2" "$l3")
cmd='["/bin/sh"]'
if [ "$variant" = pause ]; then
  stack=("$l1")
  cmd='["/bin/sleep","2147483647"]'
fi
if [ "$variant" = deep ]; then
  l4=$work/l4
  mkdir -p "$l4"/{links,added,data,modes,deep/a/b}
  : > "$l4/links/.wh.sym"
  : > "$l4/added/.wh..wh..opq"
  echo "other in layer 4" > "$l4/added/other.txt"
  echo keep > "$l4/data/keep.txt"
  chmod 0640 "$l4/data/keep.txt"
  chown 0:42 "$l4/data/keep.txt"
  echo mode > "$l4/modes/file"
  chmod 0604 "$l4/modes/file"
  chown 2000:3000 "$l4/modes/file"
  echo "deep in layer 4" > "$l4/deep/a/b/file"
  chmod 0700 "$l4/deep"
  chown -R 7:8 "$l4/deep"

  l5=$work/l5
  mkdir -p "$l5"/{deep,olddir/c,etc}
  : > "$l5/deep/.wh.a"
  echo "c in layer 5" > "$l5/deep/c"
  echo "inner" > "$l5/olddir/c/inner"
  printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n' > "$l5/etc/passwd"
  echo setuid > "$l5/setuid"
  chmod 4755 "$l5/setuid"

  l6=$work/l6
  mkdir -p "$l6"/{deep/a,olddir}
  echo "new a in layer 6" > "$l6/deep/a/new"
  : > "$l6/empty-file"
  chmod 0000 "$l6/empty-file"
  ln -s /deep "$l6/symdir"
  : > "$l6/olddir/.wh.a"

  l7=$work/l7
  mkdir -p "$l7"/{deep,added,bin,tmp}
  : > "$l7/deep/.wh..wh..opq"
  echo "final in layer 7" > "$l7/deep/final"
  chmod 0711 "$l7/deep"
  chown 9:9 "$l7/deep"
  : > "$l7/added/.wh.other.txt"
  : > "$l7/bin/.wh.vi"
  chmod 0770 "$l7/tmp"
  chown 5:5 "$l7/tmp"
  stack+=("$l4" "$l5" "$l6" "$l7")
fi

# N files of 0.1-6 KiB in 100 directories under DIR/PREFIX-*/.
many_files() {
  local dir=$1 prefix=$2 n=$3 i pad
  for i in $(seq 0 99); do mkdir -p "$dir/$prefix-$i"; done
  for i in $(seq 0 $((n - 1))); do
    printf -v pad '%*s' $(( (i * 37) % 6000 + 100 )) ''
    printf '%s %s\n' "$prefix $i" "$pad" > "$dir/$prefix-$((i % 100))/file-$i"
  done
}
if [ "$variant" = many ]; then
  l4=$work/l4 l5=$work/l5 l6=$work/l6 l7=$work/l7
  many_files "$l4/usr/lib" a 2500
  many_files "$l5/usr/lib" b 2500
  for i in $(seq 0 99); do mkdir -p "$l5/usr/lib/a-$i"; done
  for i in $(seq 0 5 2499); do
    echo "rewritten in layer 5" > "$l5/usr/lib/a-$((i % 100))/file-$i"
  done
  many_files "$l6/usr/share" c 2500
  mkdir -p "$l6/usr/lib"
  for i in $(seq 80 99); do : > "$l6/usr/lib/.wh.a-$i"; done
  many_files "$l7/opt/app" d 2500
  stack+=("$l4" "$l5" "$l6" "$l7")
fi

tars=()
for l in "${stack[@]}"; do
  oci_layer_tar "$l" "$l.tar"
  tars+=("$l.tar")
done
oci_archive "$out" "$name" "{\"Env\":[\"PATH=/bin\"],\"Cmd\":$cmd,\"WorkingDir\":\"/\"}" "${tars[@]}"
echo "$name"
