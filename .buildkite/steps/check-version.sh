#!/usr/bin/env bash
# Release step (and a check anyone can run): the git tag decides the release's version, and it must
# be the version everything else already says, so that the binaries' --version, the image's tag and
# label, and the manifests users apply all agree.
#
#   .buildkite/steps/check-version.sh v0.1.0     # prints 0.1.0, or fails with one line
#   .buildkite/steps/check-version.sh            # the tag is BUILDKITE_TAG
#
# A tag vX.Y.Z releases X.Y.Z; it must equal [workspace.package] version in Cargo.toml (what every
# binary's --version prints), each workspace crate's version in Cargo.lock (the image is built
# --locked), and the newTag of every overlay's `images:` in image/overlays/*/kustomization.yaml.
set -euo pipefail
cd "$(dirname "$0")/../.."
me=check-version.sh

tag=${1:-${BUILDKITE_TAG:-}}
[ -n "$tag" ] || { echo "$me: no tag: this pipeline releases git tags vX.Y.Z only; push one (git tag vX.Y.Z && git push origin vX.Y.Z)" >&2; exit 1; }
[[ $tag =~ ^v([0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?)$ ]] \
  || { echo "$me: tag $tag is not vX.Y.Z (semantic version, optional -pre-release): tag the release as v<version>" >&2; exit 1; }
version=${BASH_REMATCH[1]}

# [workspace.package] version = "..." in Cargo.toml.
workspace=$(awk '
  /^\[/ { in_section = ($0 == "[workspace.package]") }
  in_section && /^version[[:space:]]*=/ { sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit }
' Cargo.toml)
[ -n "$workspace" ] || { echo "$me: Cargo.toml has no [workspace.package] version: add it (the crates inherit it)" >&2; exit 1; }
if [ "$workspace" != "$version" ]; then
  echo "$me: tag $tag releases $version but Cargo.toml's workspace version is $workspace: set [workspace.package] version = \"$version\" (and the overlays' newTag), commit, and move the tag there" >&2
  exit 1
fi

# The workspace's own crates in Cargo.lock (packages without a source).
while read -r name locked; do
  if [ "$locked" != "$version" ]; then
    echo "$me: tag $tag releases $version but Cargo.lock has $name $locked: run cargo update --workspace, commit Cargo.lock, and move the tag there" >&2
    exit 1
  fi
done < <(awk '
  function flush() { if (name != "" && !sourced) print name, version }
  /^\[\[package\]\]/ { flush(); name = ""; version = ""; sourced = 0 }
  /^name = /    { name = $3; gsub(/"/, "", name) }
  /^version = / { version = $3; gsub(/"/, "", version) }
  /^source = /  { sourced = 1 }
  END { flush() }
' Cargo.lock)

# Every overlay's newTag (the overlays pin the image by tag; the release manifests by digest).
overlays=0
for kustomization in image/overlays/*/kustomization.yaml; do
  [ -f "$kustomization" ] || continue
  while read -r newtag; do
    overlays=$((overlays + 1))
    if [ "$newtag" != "$version" ]; then
      echo "$me: tag $tag releases $version but $kustomization's newTag is $newtag: set newTag: \"$version\" there, commit, and move the tag there" >&2
      exit 1
    fi
  done < <(sed -nE 's/^[[:space:]]*newTag:[[:space:]]*["'\'']?([^"'\''[:space:]#]*)["'\'']?.*$/\1/p' "$kustomization")
done
[ "$overlays" -gt 0 ] || { echo "$me: no newTag in image/overlays/*/kustomization.yaml: the overlays must name the release's image (images: newTag)" >&2; exit 1; }

echo "$me: $tag releases $version: Cargo.toml, Cargo.lock and every overlay's newTag ($overlays) agree" >&2
echo "$version"
