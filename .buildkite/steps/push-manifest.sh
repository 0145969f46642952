#!/usr/bin/env bash
# Release step: the multi-architecture image users pull. Puts the per-architecture images the build
# steps pushed (by digest) into one manifest list, pushes it as REGISTRY/stateless-agent:<version>,
# then reads back what the registry serves for that tag and checks it (check-index.sh) before
# recording its digest (meta-data image-digest): the digest everything after this signs and pins.
#
#   .buildkite/steps/push-manifest.sh
#
# The architectures' digests come from the build's meta-data (image-digest-amd64, -arm64), or from
# DIGEST_AMD64 / DIGEST_ARM64 when set (a re-run by hand).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

need buildah "install buildah on the release agents"
need skopeo "install skopeo on the release agents (apt-get install skopeo)"
version=$(release_version)
registry_login
out=${RELEASE_DIR:-release}
mkdir -p "$out"

list="localhost/stateless-agent-release:$version"
buildah manifest rm "$list" >/dev/null 2>&1 || true
buildah manifest create "$list" >/dev/null
pairs=()
for arch in "${PLATFORMS[@]}"; do
  var="DIGEST_${arch^^}"
  digest=$(meta_get "image-digest-$arch" "$var")
  is_digest "$digest" || die "the $arch build step recorded '$digest', not a digest: re-run the $arch build step"
  buildah manifest add --os linux --arch "$arch" "$list" "docker://$IMAGE_REPO@$digest" >/dev/null \
    || die "$IMAGE_REPO@$digest (linux/$arch) is not in the registry: re-run the $arch build step"
  pairs+=("$arch=$digest")
done

echo "--- :arrow_up: pushing the manifest list $IMAGE_REPO:$version"
# The architectures' images are already in the repository (their build steps pushed them), so
# only the list itself is pushed.
buildah manifest push --all=false --format oci --digestfile "$out/pushed.digest" \
  "$list" "docker://$IMAGE_REPO:$version" \
  || die "could not push the manifest list to $IMAGE_REPO:$version: check that REGISTRY_USERNAME may push there"

echo "--- :mag: reading it back"
skopeo inspect --raw "docker://$IMAGE_REPO:$version" >"$out/index.json" \
  || die "could not read $IMAGE_REPO:$version back: check the registry and the login"
digest=$("$STEPS_DIR/check-index.sh" "$out/index.json" "${pairs[@]}")
pushed=$(cat "$out/pushed.digest")
[ "$digest" = "$pushed" ] \
  || die "the registry serves $IMAGE_REPO:$version as $digest, but buildah pushed $pushed: something else pushed the tag meanwhile; re-run this step"
buildkite-agent meta-data set image-digest "$digest"
buildkite-agent artifact upload "$out/index.json"
echo "push-manifest.sh: $IMAGE_REPO:$version is $IMAGE_REPO@$digest (${pairs[*]})" >&2
