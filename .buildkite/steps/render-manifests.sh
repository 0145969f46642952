#!/usr/bin/env bash
# Release step: the install manifests a release publishes, with the image pinned by digest, so that
# what a user applies runs exactly the image that was signed, whatever later happens to its tag.
#
#   .buildkite/steps/render-manifests.sh REGISTRY DIGEST OUTDIR
#   .buildkite/steps/render-manifests.sh ghcr.io/stateless-agent sha256:<64 hex> release/
#
# writes OUTDIR/install.yaml (image/overlays/quick-start) and OUTDIR/second-queue.yaml
# (image/overlays/second-queue): each overlay as `kubectl kustomize` renders it, through a temporary
# overlay on top whose `images:` entry turns the overlay's image (name:tag) into
# REGISTRY/stateless-agent@DIGEST (kustomize's `digest:`). Nothing else changes. The agent Job
# template inside the dispatcher's ConfigMap keeps its placeholder `image: stateless-agent`:
# job-dispatcher puts its own image there, which is this pinned one. Fails if any other image is
# left unpinned.
set -euo pipefail

[ $# -eq 3 ] || { echo "render-manifests.sh: usage: render-manifests.sh REGISTRY DIGEST OUTDIR (e.g. ghcr.io/stateless-agent sha256:<64 hex> release/)" >&2; exit 2; }
REGISTRY=$1
digest=$2
outdir=$3
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

[[ $REGISTRY =~ ^[A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*$ ]] \
  || die "REGISTRY '$REGISTRY' is not a registry host and path (no scheme, no tag): e.g. ghcr.io/stateless-agent"
is_digest "$digest" || die "DIGEST '$digest' is not sha256:<64 lowercase hex>: pass the manifest list's digest the push step read back"
need kubectl "install kubectl 1.27 or later (kustomize 5), or run install_tool kubectl"
need realpath "install coreutils"
pinned="$IMAGE_REPO@$digest"
placeholder=stateless-agent

# The `image:` values of a rendered stream, one a line.
images_of() {
  sed -nE 's/^[[:space:]]*(-[[:space:]]+)?image:[[:space:]]*["'\'']?([^"'\''[:space:]]+).*$/\2/p' "$1"
}

mkdir -p "$outdir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

for pair in quick-start:install.yaml second-queue:second-queue.yaml; do
  overlay_name=${pair%%:*}
  file=${pair#*:}
  overlay="$REPO_ROOT/image/overlays/$overlay_name"
  [ -f "$overlay/kustomization.yaml" ] || die "$overlay has no kustomization.yaml: the release renders image/overlays/$overlay_name; restore it or change this script"

  # The image name the overlay gives the workloads (its `images:` newName), from its own render.
  kubectl kustomize "$overlay" >"$work/$overlay_name.orig.yaml" 2>"$work/err" \
    || die "kubectl kustomize $overlay failed: $(tr '\n' ' ' <"$work/err")"
  mapfile -t named < <(images_of "$work/$overlay_name.orig.yaml" | grep -vxF "$placeholder" | sort -u)
  [ "${#named[@]}" -eq 1 ] \
    || die "$overlay renders ${#named[@]} image names (${named[*]:-none}), not one: its images: entry must name every workload's image"
  name=${named[0]%@*}
  [[ ${name##*/} == *:* ]] && name=${name%:*}

  mkdir "$work/$overlay_name"
  cat >"$work/$overlay_name/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$work/$overlay_name" "$overlay")
images:
  - name: $name
    newName: $IMAGE_REPO
    digest: $digest
YAML
  kubectl kustomize "$work/$overlay_name" >"$work/$file" 2>"$work/err" \
    || die "kubectl kustomize of the pinned $overlay_name failed: $(tr '\n' ' ' <"$work/err")"

  # Every image is the pinned one, but for the template's placeholder the dispatcher fills.
  mapfile -t unpinned < <(images_of "$work/$file" | grep -vxF -e "$pinned" -e "$placeholder" | sort -u)
  [ "${#unpinned[@]}" -eq 0 ] || die "$file still has images not pinned to $pinned: ${unpinned[*]}; add their names to the overlay's images: entry"
  grep -qF "image: $pinned" "$work/$file" || die "$file pins no image to $pinned: the overlay's image name $name matched nothing"

  {
    echo "# stateless-agent, image/overlays/$overlay_name rendered by .buildkite/steps/render-manifests.sh"
    echo "# with every workload's image pinned to $pinned"
    echo "# (the agent template's placeholder is filled by job-dispatcher with its own, pinned, image)."
    echo "# Apply after what image/overlays/$overlay_name/kustomization.yaml asks for (docs/releases.md):"
    echo "#   kubectl apply -f $file"
    cat "$work/$file"
  } >"$outdir/$file"
  echo "render-manifests.sh: wrote $outdir/$file ($overlay_name; images pinned to $pinned: $(grep -cF "image: $pinned" "$work/$file"))" >&2
done
