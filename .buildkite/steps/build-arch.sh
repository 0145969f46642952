#!/usr/bin/env bash
# Release step: the image for one architecture, built on an agent of that architecture (native
# compilation: the release profile's LTO build takes minutes natively and far longer under QEMU;
# docs/releases.md, "One agent per architecture"), checked, and pushed by digest.
#
#   .buildkite/steps/build-arch.sh amd64|arm64
#
# Builds the Dockerfile with VERSION (the tag's, checked by check-version.sh) and REVISION (the
# commit) as build arguments, and AGENT_IMAGE / BUILDER_IMAGE when set (pin them by digest in the
# pipeline's environment); checks that the image's binaries run and print that version and that its
# label says it; pushes it as REGISTRY/stateless-agent:<version>-<arch> and records the digest the
# registry gave it in the build's meta-data (image-digest-<arch>) for the manifest step.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

arch=${1:-}
case "$arch" in
  amd64 | arm64) ;;
  *) die "usage: build-arch.sh amd64|arm64 (got '$arch')" ;;
esac
[ "$(host_arch)" = "$arch" ] || die "this agent is $(host_arch), not $arch: run the step on an agent tagged arch=$arch"
need buildah "install buildah on the release agents (Debian, Ubuntu: apt-get install buildah)"
version=$(release_version)
revision=${BUILDKITE_COMMIT:-$(git -C "$REPO_ROOT" rev-parse HEAD)}
local_image="localhost/stateless-agent-release:$version-$arch"

build_args=(--build-arg "VERSION=$version" --build-arg "REVISION=$revision")
[ -z "${AGENT_IMAGE:-}" ] || build_args+=(--build-arg "AGENT_IMAGE=$AGENT_IMAGE")
[ -z "${BUILDER_IMAGE:-}" ] || build_args+=(--build-arg "BUILDER_IMAGE=$BUILDER_IMAGE")
echo "--- :hammer: building $local_image (linux/$arch)"
buildah build --platform "linux/$arch" "${build_args[@]}" --tag "$local_image" "$REPO_ROOT" \
  || die "the image did not build on linux/$arch: see the build output above"

echo "--- :white_check_mark: checking it"
label=$(buildah inspect --type image \
  --format '{{index .OCIv1.Config.Labels "org.opencontainers.image.version"}}' "$local_image")
[ "$label" = "$version" ] \
  || die "the image's org.opencontainers.image.version label is '$label', not $version: the Dockerfile must set it from the VERSION build argument"
container=$(buildah from "$local_image")
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
for binary in agent-wrapper checkout-hook job-dispatcher populate-mirror; do
  said=$(buildah run "$container" -- "/usr/local/bin/$binary" --version) \
    || die "$binary does not run in the linux/$arch image: check its build (a glibc base, the right target)"
  [ "$said" = "$binary $version" ] \
    || die "$binary --version says '$said', not '$binary $version': the workspace version and the tag disagree; run check-version.sh"
done

echo "--- :arrow_up: pushing $IMAGE_REPO:$version-$arch"
registry_login
digest_file=$(mktemp)
buildah push --format oci --digestfile "$digest_file" "$local_image" "docker://$IMAGE_REPO:$version-$arch" \
  || die "could not push to $IMAGE_REPO: check REGISTRY and that REGISTRY_USERNAME may push there"
digest=$(cat "$digest_file")
is_digest "$digest" || die "buildah wrote '$digest' as the pushed digest: expected sha256:<64 hex>; check the buildah version"
buildkite-agent meta-data set "image-digest-$arch" "$digest"
echo "build-arch.sh: pushed $IMAGE_REPO:$version-$arch as $IMAGE_REPO@$digest" >&2
