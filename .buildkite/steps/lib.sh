# shellcheck shell=bash
# What every release step (.buildkite/steps/*.sh, run by .buildkite/release.yml) shares: where the
# image goes, how a step fails, the release's version, the pinned tools, the registry login and
# the signing identity. Sourced by the steps, never run; docs/releases.md describes the pipeline.

# A step that fails inside $(...) fails the step too (bash leaves errexit off there otherwise).
shopt -s inherit_errexit

STEPS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2034 # used by the steps that source this
REPO_ROOT=$(cd "$STEPS_DIR/../.." && pwd)

# Where the image is pushed: REGISTRY (a registry host and path) + /stateless-agent.
REGISTRY=${REGISTRY:-ghcr.io/stateless-agent}
REGISTRY=${REGISTRY%/}
# shellcheck disable=SC2034
IMAGE_REPO="$REGISTRY/stateless-agent"
# The architectures released, each built natively on an agent tagged arch=<arch>.
# shellcheck disable=SC2034
PLATFORMS=(amd64 arm64)
# The OIDC issuer of Buildkite's job tokens, as Fulcio records it in a keyless certificate.
BUILDKITE_OIDC_ISSUER=https://agent.buildkite.com

# One line on stderr naming the step, the cause and the fix; then exit 1.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# need TOOL HOW: fails unless TOOL is on PATH, saying HOW to get it.
need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not installed: $2"
}

# The release's version (X.Y.Z), checked against the workspace and the overlays.
release_version() {
  "$STEPS_DIR/check-version.sh" "${BUILDKITE_TAG:-}"
}

# is_digest VALUE: whether VALUE is a sha256 digest as registries print it.
is_digest() {
  [[ $1 =~ ^sha256:[0-9a-f]{64}$ ]]
}

# The agent's architecture in the image platform's terms.
host_arch() {
  case "$(uname -m)" in
    x86_64 | amd64) echo amd64 ;;
    aarch64 | arm64) echo arm64 ;;
    *) uname -m ;;
  esac
}

# meta_get KEY [ENV]: the value ENV holds if set (a local run), else the build's meta-data KEY.
meta_get() {
  local key=$1 env=${2:-}
  if [ -n "$env" ] && [ -n "${!env:-}" ]; then
    printf '%s\n' "${!env}"
    return
  fi
  need buildkite-agent "run this inside a Buildkite job, or set ${env:-the value} yourself"
  buildkite-agent meta-data get "$key"
}

# secret NAME: the environment variable NAME if set, else the Buildkite secret NAME (redacted from
# the log by the agent).
secret() {
  if [ -n "${!1:-}" ]; then
    printf '%s' "${!1}"
    return
  fi
  need buildkite-agent "set $1, or run this in a Buildkite job whose cluster has the secret $1"
  buildkite-agent secret get "$1" || die "no Buildkite secret $1: create it in the release cluster, or set $1 in the job's environment"
}

# The pinned tools. Their versions are set in .buildkite/release.yml (env); install_tool puts that
# exact version on PATH, from the project's own release, checked against its published checksums.
TOOLS_DIR=${RELEASE_TOOLS_DIR:-${TMPDIR:-/tmp}/stateless-agent-release-tools}
install_tool() {
  local tool=$1 arch version url sums file dir
  arch=$(host_arch)
  case "$tool" in
    cosign)
      version=${COSIGN_VERSION:?COSIGN_VERSION is not set: release.yml pins it}
      file="cosign-linux-$arch"
      url="https://github.com/sigstore/cosign/releases/download/$version/$file"
      sums="https://github.com/sigstore/cosign/releases/download/$version/cosign_checksums.txt"
      ;;
    syft)
      version=${SYFT_VERSION:?SYFT_VERSION is not set: release.yml pins it}
      file="syft_${version#v}_linux_$arch.tar.gz"
      url="https://github.com/anchore/syft/releases/download/$version/$file"
      sums="https://github.com/anchore/syft/releases/download/$version/syft_${version#v}_checksums.txt"
      ;;
    kubectl)
      version=${KUBECTL_VERSION:?KUBECTL_VERSION is not set: release.yml pins it}
      file=kubectl
      url="https://dl.k8s.io/release/$version/bin/linux/$arch/kubectl"
      sums="$url.sha256"
      ;;
    *) die "no pinned version of $tool: add it to install_tool in lib.sh and to release.yml's env" ;;
  esac
  dir="$TOOLS_DIR/$tool-$version-$arch"
  if ! [ -x "$dir/$tool" ]; then
    need curl "install curl on the release agents"
    need sha256sum "install coreutils on the release agents"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    (
      cd "$dir.partial" || exit 1
      curl -fsSLo "$file" "$url" || die "could not download $url: check $tool's version ($version) and the agent's network"
      curl -fsSLo sums "$sums" || die "could not download $sums: check $tool's version ($version)"
      if [ "$tool" = kubectl ]; then
        echo "$(cat sums)  $file" >sums
      fi
      grep -E "[[:space:]][*]?$file\$" sums | sha256sum --check --status \
        || die "$file does not match $tool $version's published checksum: do not use it; retry, or report it upstream"
      case "$file" in
        *.tar.gz) tar -xzf "$file" "$tool" ;;
        "$tool") ;;
        *) mv "$file" "$tool" ;;
      esac
      chmod +x "$tool"
    )
    mv "$dir.partial" "$dir"
  fi
  PATH="$dir:$PATH"
  export PATH
}

# Logs buildah, skopeo, cosign and syft in to REGISTRY's host with REGISTRY_USERNAME and the secret
# REGISTRY_PASSWORD, through one auth file all four read (a job-local docker config.json).
registry_login() {
  local host=${REGISTRY%%/*} auth_dir
  [ -n "${REGISTRY_USERNAME:-}" ] || die "REGISTRY_USERNAME is not set: set it in the pipeline's environment (with the secret REGISTRY_PASSWORD) to push to $host"
  auth_dir=${RELEASE_AUTH_DIR:-$(mktemp -d)}
  export DOCKER_CONFIG="$auth_dir" REGISTRY_AUTH_FILE="$auth_dir/config.json"
  local password
  password=$(secret REGISTRY_PASSWORD)
  printf '%s' "$password" | buildah login --authfile "$REGISTRY_AUTH_FILE" \
    --username "$REGISTRY_USERNAME" --password-stdin "$host" >/dev/null \
    || die "the registry $host refused $REGISTRY_USERNAME: check REGISTRY_USERNAME and the secret REGISTRY_PASSWORD (it needs push rights)"
}

# The signing mode: keyless (a Fulcio certificate for the job's Buildkite OIDC token, the default)
# or key (a cosign key pair from the Buildkite secrets COSIGN_PRIVATE_KEY and COSIGN_PASSWORD).
signing_mode() {
  case "${SIGNING:-keyless}" in
    keyless | key) echo "${SIGNING:-keyless}" ;;
    *) die "SIGNING is '$SIGNING': set it to keyless (Buildkite OIDC) or key (a cosign key from Buildkite secrets)" ;;
  esac
}

# The keyless certificate's identity: Fulcio names a Buildkite job by its pipeline's URL.
signing_identity() {
  if [ -z "${BUILDKITE_ORGANIZATION_SLUG:-}" ] || [ -z "${BUILDKITE_PIPELINE_SLUG:-}" ]; then
    die "BUILDKITE_ORGANIZATION_SLUG and BUILDKITE_PIPELINE_SLUG are not set: run this in the release pipeline's job (Buildkite sets both), or set them"
  fi
  echo "https://buildkite.com/$BUILDKITE_ORGANIZATION_SLUG/$BUILDKITE_PIPELINE_SLUG"
}

# cosign's signing flags for one signature: a fresh OIDC token each time (they live minutes), or
# the key from the environment.
cosign_sign_flags() {
  local mode
  mode=$(signing_mode)
  case "$mode" in
    keyless)
      local token
      token=$(buildkite-agent oidc request-token --audience sigstore) \
        || die "this agent could not get an OIDC token: allow OIDC for the release pipeline, or set SIGNING=key with the secrets COSIGN_PRIVATE_KEY and COSIGN_PASSWORD"
      printf '%s\n' --identity-token "$token"
      ;;
    key) printf '%s\n' --key env://COSIGN_PRIVATE_KEY ;;
  esac
}

# cosign's verification flags, as a user runs them: the certificate's identity and issuer, or the
# release's public key (KEY_FILE, published beside the release as cosign.pub).
cosign_verify_flags() {
  local key_file=${1:-cosign.pub} mode
  mode=$(signing_mode)
  case "$mode" in
    keyless)
      local identity
      identity=$(signing_identity)
      printf '%s\n' --certificate-identity "$identity" --certificate-oidc-issuer "$BUILDKITE_OIDC_ISSUER"
      ;;
    key) printf '%s\n' --key "$key_file" ;;
  esac
}
