#!/usr/bin/env bash
# Release step: signs the released image and attaches its SBOMs, by digest, never by tag.
#
#   .buildkite/steps/sign.sh
#
# - cosign sign --recursive: the manifest list and each architecture's image, so a check of either
#   digest finds a signature;
# - syft makes each architecture's SBOM (SPDX JSON) from the image in the registry;
# - cosign attest --type spdxjson attaches each SBOM to its architecture's image and to the list
#   (the digest the release manifests pin, where admission policies look);
# - then verifies all of it as a user would (cosign verify, cosign verify-attestation).
#
# SIGNING=keyless (the default): a Fulcio certificate for the job's Buildkite OIDC token (audience
# sigstore), which names the pipeline (https://buildkite.com/<org>/<pipeline>); nothing to keep.
# SIGNING=key: the cosign key pair in the Buildkite secrets COSIGN_PRIVATE_KEY and COSIGN_PASSWORD
# (cosign generate-key-pair), whose public key is committed as .buildkite/cosign.pub; it is
# published with the release as cosign.pub too.
# The digest is the build's meta-data image-digest (push-manifest.sh), or IMAGE_DIGEST when set.
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

need skopeo "install skopeo on the release agents"
need jq "install jq on the release agents"
version=$(release_version)
mode=$(signing_mode)
digest=$(meta_get image-digest IMAGE_DIGEST)
is_digest "$digest" || die "the manifest step recorded '$digest', not a digest: re-run the manifest step"
ref="$IMAGE_REPO@$digest"
install_tool cosign
install_tool syft
registry_login
out=${RELEASE_DIR:-release}
mkdir -p "$out"

if [ "$mode" = key ]; then
  COSIGN_PRIVATE_KEY=$(secret COSIGN_PRIVATE_KEY)
  COSIGN_PASSWORD=$(secret COSIGN_PASSWORD)
  export COSIGN_PRIVATE_KEY COSIGN_PASSWORD
  cosign public-key --key env://COSIGN_PRIVATE_KEY >"$out/cosign.pub" \
    || die "COSIGN_PRIVATE_KEY is not a cosign private key for COSIGN_PASSWORD: make one with cosign generate-key-pair and store both secrets"
  # Users check the published key against the tagged source's: the two must be the same key.
  [ -f "$STEPS_DIR/../cosign.pub" ] \
    || die "SIGNING=key but .buildkite/cosign.pub is not committed: commit the public key of COSIGN_PRIVATE_KEY there, then tag"
  [ "$(tr -d '[:space:]' <"$out/cosign.pub")" = "$(tr -d '[:space:]' <"$STEPS_DIR/../cosign.pub")" ] \
    || die "COSIGN_PRIVATE_KEY is not the key of .buildkite/cosign.pub: store the matching private key, or commit its public key"
fi

# cosign with a fresh signing identity (an OIDC token lives minutes).
cosign_signing() {
  local text flags
  text=$(cosign_sign_flags) || exit 1
  mapfile -t flags <<<"$text"
  cosign "$1" --yes "${flags[@]}" "${@:2}"
}

echo "--- :lock: signing $ref ($mode)"
cosign_signing sign --recursive "$ref" || die "cosign could not sign $ref: see its output above"

echo "--- :page_facing_up: SBOMs"
skopeo inspect --raw "docker://$ref" >"$out/index.json" || die "could not read $ref back from the registry"
mapfile -t platforms < <(jq -r '.manifests[] | "\(.platform.architecture) \(.digest)"' "$out/index.json")
[ "${#platforms[@]}" -gt 0 ] || die "$ref lists no images: re-run the manifest step"
for entry in "${platforms[@]}"; do
  arch=${entry%% *}
  arch_digest=${entry#* }
  sbom="$out/stateless-agent-$version-linux-$arch.spdx.json"
  syft scan "registry:$IMAGE_REPO@$arch_digest" --platform "linux/$arch" \
    --source-name stateless-agent --source-version "$version" -o "spdx-json=$sbom" \
    || die "syft could not make the linux/$arch SBOM from $IMAGE_REPO@$arch_digest: see its output above"
  for subject in "$IMAGE_REPO@$arch_digest" "$ref"; do
    cosign_signing attest --type spdxjson --predicate "$sbom" "$subject" \
      || die "cosign could not attach the linux/$arch SBOM to $subject: see its output above"
  done
done

echo "--- :white_check_mark: verifying as a user would"
text=$(cosign_verify_flags "$out/cosign.pub")
mapfile -t verify <<<"$text"
cosign verify "${verify[@]}" "$ref" >/dev/null \
  || die "cosign verify of $ref failed right after signing: the release notes' command would fail too; check SIGNING and the identity"
cosign verify-attestation --type spdxjson "${verify[@]}" "$ref" >/dev/null \
  || die "cosign verify-attestation of $ref failed right after attesting: check SIGNING and the identity"
buildkite-agent artifact upload "$out/*.spdx.json"
[ "$mode" = keyless ] || buildkite-agent artifact upload "$out/cosign.pub"
echo "sign.sh: signed $ref and its ${#platforms[@]} images, SBOMs attached ($mode)" >&2
