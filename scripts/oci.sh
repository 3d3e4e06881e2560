# OCI image archives, written by hand so that images build offline.
# Sourced, not run, by mkimage.sh and image.sh.

# containerd's name for this machine's architecture.
oci_arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64) echo arm64 ;;
    *) uname -m ;;
  esac
}

# Tars a staged layer directory, reproducibly, with numeric owners.
#   oci_layer_tar DIR OUT.tar
oci_layer_tar() {
  (cd "$1" && tar --create --format=gnu --numeric-owner --sort=name --mtime=@0 \
    --file "$2" $(ls -A))
}

# Writes an OCI image archive (a tarred image layout) for `ctr images
# import` and `skopeo copy oci-archive:`.
#   oci_archive OUT.tar NAME CONFIG LAYER.tar...
# NAME is the image's name; CONFIG the image config's "config" object
# (JSON: Env, Cmd, Entrypoint...); the layers go bottom first.
oci_archive() {
  local out=$1 name=$2 config=$3
  shift 3
  local layout arch d s diff_ids="" layers=""
  layout=$(mktemp -d)
  arch=$(oci_arch)
  mkdir -p "$layout/blobs/sha256"
  # Adds a file to the blob store and prints "<digest> <size>".
  blob() {
    d=$(sha256sum "$1" | cut -d' ' -f1)
    s=$(stat -c %s "$1")
    cp "$1" "$layout/blobs/sha256/$d"
    echo "$d $s"
  }
  for tar in "$@"; do
    read -r d s < <(blob "$tar")
    diff_ids+="${diff_ids:+,}\"sha256:$d\""
    layers+="${layers:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar\",\"digest\":\"sha256:$d\",\"size\":$s}"
  done
  echo "{\"architecture\":\"$arch\",\"os\":\"linux\",\"config\":$config,\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[$diff_ids]}}" > "$layout/config.json"
  read -r cd cs < <(blob "$layout/config.json")
  echo "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$cd\",\"size\":$cs},\"layers\":[$layers]}" > "$layout/manifest.json"
  read -r md ms < <(blob "$layout/manifest.json")
  rm "$layout/config.json" "$layout/manifest.json"
  echo "{\"schemaVersion\":2,\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$md\",\"size\":$ms,\"platform\":{\"architecture\":\"$arch\",\"os\":\"linux\"},\"annotations\":{\"io.containerd.image.name\":\"$name\",\"org.opencontainers.image.ref.name\":\"${name##*:}\"}}]}" > "$layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
  (cd "$layout" && tar --create --format=gnu --sort=name --mtime=@0 --file - oci-layout index.json blobs) > "$out"
  rm -rf "$layout"
}
