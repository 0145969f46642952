#!/usr/bin/env bash
# Installs what the demo or the tests need on a Debian machine, as root; README's two commands
# start with it, and CI runs exactly those commands. Idempotent: a machine that has everything
# installs nothing and asks no registry.
#
#   bash tests/provision.sh           # everything the tests use
#   bash tests/provision.sh demo      # only what the demo uses
#   bash tests/provision.sh --require # everything, and fail if anything is still missing (CI)
#
# Without root or apt-get it only says what is missing: the scenarios that need a missing tool
# say so and skip, so the test command never fails for a missing package.
set -uo pipefail

scope=all
require=false
for arg in "$@"; do
  case "$arg" in
    demo) scope=demo ;;
    --require) require=true ;;
    *) echo "usage: $0 [demo] [--require]" >&2; exit 2 ;;
  esac
done

# command-or-path to look for, then the Debian package that provides it.
wanted=(git:git unshare:util-linux mount:mount tar:tar)
# Loopback servers and fixtures: sshd for the SSH scenarios, git-lfs for LFS, socat and openssl
# for the HTTPS front the remote-mirror scenario needs, kubectl to check the fake API server
# (Debian's is 1.20, whose kustomize is too old for the install unit: those scenarios say so and
# skip; these machines' Google Cloud CLI brings 1.27–1.33, found first), promtool for the alert
# rules, jq and shellcheck for the release pipeline's scripts.
[ "$scope" = all ] && wanted+=(/usr/sbin/sshd:openssh-server ssh-keygen:openssh-client
  git-lfs:git-lfs socat:socat openssl:openssl kubectl:kubernetes-client
  promtool:prometheus jq:jq shellcheck:shellcheck)
# The image scenarios: podman with runc, and debootstrap for the local base images. Installed with
# their recommends (the network plugins a build's RUN steps use, the archive keyring).
containers=()
[ "$scope" = all ] && containers=(podman:podman buildah:buildah runc:runc debootstrap:debootstrap)

present() { [ -x "$1" ] || command -v "$1" >/dev/null 2>&1; }
missing_of() {
  local entry
  for entry in "$@"; do present "${entry%%:*}" || printf '%s\n' "${entry#*:}"; done
}

mapfile -t plain < <(missing_of "${wanted[@]}")
mapfile -t recommended < <(missing_of "${containers[@]}")
if ((${#plain[@]} + ${#recommended[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    echo "provision: installing ${plain[*]} ${recommended[*]}"
    apt-get update -q >/dev/null || echo "provision: apt-get update failed" >&2
    ((${#plain[@]} == 0)) || apt-get install -y -q --no-install-recommends "${plain[@]}" >/dev/null \
      || echo "provision: could not install ${plain[*]}" >&2
    ((${#recommended[@]} == 0)) || apt-get install -y -q "${recommended[@]}" >/dev/null \
      || echo "provision: could not install ${recommended[*]}" >&2
  else
    echo "provision: not root or no apt-get; missing: ${plain[*]} ${recommended[*]}" >&2
  fi
fi

mapfile -t still < <(missing_of "${wanted[@]}" "${containers[@]}")
if command -v git >/dev/null && ! [ -x "$(git --exec-path)/git-http-backend" ]; then
  still+=("git-http-backend (Debian's git package)")
fi
if ((${#still[@]})); then
  echo "provision: still missing: ${still[*]}; the scenarios that need them will skip" >&2
  $require && exit 1
fi
exit 0
