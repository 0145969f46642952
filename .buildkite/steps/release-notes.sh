#!/usr/bin/env bash
# Release step helper: the release notes (Markdown, on stdout): the image by digest, what was
# published, how to install pinned, and how to verify the signature and the SBOMs, with the exact
# cosign commands for the way the release was signed (SIGNING, as sign.sh signed it).
#
#   .buildkite/steps/release-notes.sh VERSION REGISTRY DIGEST [INDEX_JSON] > RELEASE-NOTES.md
#
# INDEX_JSON (the manifest list as the registry serves it; needs jq) adds each architecture's
# digest. Keyless notes name the signing pipeline from BUILDKITE_ORGANIZATION_SLUG and
# BUILDKITE_PIPELINE_SLUG, which Buildkite sets in the job.
set -euo pipefail

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
  echo "release-notes.sh: usage: release-notes.sh VERSION REGISTRY DIGEST [INDEX_JSON]" >&2
  exit 2
fi
version=$1
REGISTRY=$2
digest=$3
index=${4:-}
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

[[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] || die "VERSION '$version' is not X.Y.Z: pass the version check-version.sh printed"
is_digest "$digest" || die "DIGEST '$digest' is not sha256:<64 lowercase hex>: pass the manifest list's digest"
ref="$IMAGE_REPO@$digest"
mode=$(signing_mode)
identity=
[ "$mode" = key ] || identity=$(signing_identity)
flags_text=$(cosign_verify_flags cosign.pub)
mapfile -t flags <<<"$flags_text"
# The flags as a user pastes them: one per line after the command.
verify_flags=""
for ((i = 0; i < ${#flags[@]}; i += 2)); do
  verify_flags+=" \\"$'\n'"        ${flags[i]} ${flags[i + 1]}"
done

cat <<NOTES
# stateless-agent $version

The image, for linux/amd64 and linux/arm64, by digest (what the manifests below pin):

    $ref

Also tagged \`$IMAGE_REPO:$version\`; a tag can be moved, the digest cannot, so pin the digest.
NOTES

if [ -n "$index" ]; then
  need jq "install jq, or leave INDEX_JSON out"
  echo
  echo "| platform | image digest |"
  echo "|---|---|"
  jq -r '.manifests[] | "| \(.platform.os)/\(.platform.architecture) | `\(.digest)` |"' "$index"
fi

cat <<NOTES

## Install

The release's artifacts hold the install manifests, rendered from the overlays of \`v$version\`
with every image pinned to the digest above:

- \`install.yaml\`: \`image/overlays/quick-start\` (job-dispatcher for the queue \`kubernetes\` in
  the namespace \`buildkite\`, and its mirror volume);
- \`second-queue.yaml\`: \`image/overlays/second-queue\` (one more queue, \`gpu\`, beside it).

Follow the quick start of \`docs/operating.md\` at \`v$version\` (the namespace, the agent token's
Secret, the repositories' ConfigMap, then the first populate), applying the pinned file in place
of its \`kubectl apply -k …/image/overlays/quick-start?ref=v$version\` line:

    kubectl apply -f install.yaml

Or pin the digest in your own overlay on top of \`image/overlays/quick-start?ref=v$version\`:

    images:
      - name: ghcr.io/stateless-agent/stateless-agent
        newName: $IMAGE_REPO
        digest: $digest

## Verify

The manifest list and each architecture's image are signed with cosign, and each architecture's
SBOM (SPDX JSON, made by syft) is attached to both as a signed attestation, in Sigstore's bundle
format. With cosign 3 (cosign 2.6: add \`--new-bundle-format\`):

    cosign verify $ref${verify_flags}

    cosign verify-attestation --type spdxjson $ref${verify_flags}

The second prints the attestations (one per architecture); each one's predicate is that
architecture's SPDX document.
NOTES

if [ "$mode" = keyless ]; then
  cat <<NOTES

Signed keyless: the certificate was issued by Sigstore's Fulcio to the Buildkite job that ran the
release, and names its pipeline, \`$identity\`; the signature is in Sigstore's
transparency log.
NOTES
else
  cat <<NOTES

Signed with the project's cosign key: \`cosign.pub\` is among the release's artifacts, and is
\`.buildkite/cosign.pub\` in the source of \`v$version\` (the sign step refuses any other key).
NOTES
fi

cat <<NOTES

The SBOMs are also among the artifacts (\`stateless-agent-$version-linux-<arch>.spdx.json\`), and
\`SHA256SUMS\` lists every artifact's checksum. docs/releases.md explains all of it.
NOTES
