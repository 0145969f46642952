#!/usr/bin/env bash
# Release step: what users download. Renders the install manifests pinned to the signed digest
# (render-manifests.sh), writes the release notes (release-notes.sh) and a SHA256SUMS of it all,
# uploads them as the build's artifacts and shows the notes on the build page.
#
#   .buildkite/steps/publish.sh
#
# The digest is the build's meta-data image-digest (push-manifest.sh), or IMAGE_DIGEST when set.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

need skopeo "install skopeo on the release agents"
need jq "install jq on the release agents"
version=$(release_version)
digest=$(meta_get image-digest IMAGE_DIGEST)
is_digest "$digest" || die "the manifest step recorded '$digest', not a digest: re-run the manifest step"
install_tool kubectl
registry_login
out=${RELEASE_DIR:-release}
mkdir -p "$out"

"$STEPS_DIR/render-manifests.sh" "$REGISTRY" "$digest" "$out"
skopeo inspect --raw "docker://$IMAGE_REPO@$digest" >"$out/index.json" \
  || die "could not read $IMAGE_REPO@$digest back from the registry"
"$STEPS_DIR/release-notes.sh" "$version" "$REGISTRY" "$digest" "$out/index.json" >"$out/RELEASE-NOTES.md"
buildkite-agent artifact download "$out/*.spdx.json" . || die "no SBOMs among the build's artifacts: re-run the sign step"
[ "$(signing_mode)" = keyless ] || buildkite-agent artifact download "$out/cosign.pub" . \
  || die "no cosign.pub among the build's artifacts: re-run the sign step"
(
  cd "$out" || exit 1
  files=(*.yaml *.json *.md)
  [ ! -f cosign.pub ] || files+=(cosign.pub)
  sha256sum -- "${files[@]}" >SHA256SUMS
)
buildkite-agent artifact upload "$out/*"
buildkite-agent annotate --style success --context release <"$out/RELEASE-NOTES.md"
echo "publish.sh: stateless-agent $version published as $IMAGE_REPO@$digest" >&2
