#!/usr/bin/env bash
# Release step helper: checks the manifest list the registry serves for the release's tag, as its
# raw bytes (skopeo inspect --raw), before anything is signed: it must be an image index (OCI) or
# manifest list (Docker) holding exactly one linux/<arch> image per released architecture, each the
# digest that architecture's build step pushed, and nothing else. Prints the index's digest (the
# sha256 of those bytes, which is what the registry names it by), the one the release signs.
#
#   .buildkite/steps/check-index.sh index.json amd64=sha256:<hex> arm64=sha256:<hex>
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

[ $# -ge 2 ] || die "usage: check-index.sh INDEX_JSON ARCH=DIGEST... (e.g. index.json amd64=sha256:<hex> arm64=sha256:<hex>)"
index=$1
shift
[ -s "$index" ] || die "$index is missing or empty: save the registry's manifest list with skopeo inspect --raw first"
need jq "install jq on the release agents"
need sha256sum "install coreutils"

media=$(jq -r '.mediaType // empty' "$index") || die "$index is not JSON: save the registry's raw manifest list (skopeo inspect --raw)"
case "$media" in
  application/vnd.oci.image.index.v1+json | application/vnd.docker.distribution.manifest.list.v2+json) ;;
  *) die "$index is a ${media:-manifest without a mediaType}, not a manifest list: push the list (buildah manifest push) to the release's tag" ;;
esac

expected=0
for pair in "$@"; do
  arch=${pair%%=*}
  want=${pair#*=}
  is_digest "$want" || die "$pair: the digest is not sha256:<64 hex>: pass ARCH=DIGEST as the build step pushed it"
  expected=$((expected + 1))
  mapfile -t got < <(jq -r --arg arch "$arch" \
    '.manifests[] | select(.platform.os == "linux" and .platform.architecture == $arch) | .digest' "$index")
  [ "${#got[@]}" -eq 1 ] || die "the manifest list has ${#got[@]} linux/$arch images, not one: rebuild the list from the build steps' digests"
  [ "${got[0]}" = "$want" ] || die "the manifest list's linux/$arch is ${got[0]}, but its build step pushed $want: something else changed the list; re-run the manifest step"
done
total=$(jq '.manifests | length' "$index")
[ "$total" -eq "$expected" ] || die "the manifest list has $total images, not the $expected released ($*): rebuild it from the build steps' digests"

echo "sha256:$(sha256sum "$index" | cut -d' ' -f1)"
