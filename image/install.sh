#!/bin/sh
# Runs once as root while the image is built: the unprivileged user, the agent's directories and
# the global hooks.
set -eu
# uid 10001: clear of the base image's own users (Ubuntu's 1000) and of host users.
if ! getent passwd buildkite >/dev/null; then
  useradd --uid 10001 --user-group --create-home --shell /bin/bash buildkite
fi
mkdir -p /buildkite/builds /buildkite/plugins /buildkite/hooks
chown buildkite:buildkite /buildkite/builds /buildkite/plugins
# Global hooks stay root-owned: a job must not be able to change the next one's checkout.
# The agent runs compiled hooks directly (by default since 3.85; agent-wrapper requires 3.136.0 or
# later anyway, checked against the version recorded below); job-hook tells its phase by its name.
ln -sf /usr/local/bin/checkout-hook /buildkite/hooks/checkout
ln -sf /usr/local/bin/job-hook /buildkite/hooks/environment
ln -sf /usr/local/bin/job-hook /buildkite/hooks/pre-exit
# Fail the build now, not in a pod, if the binaries cannot run on this base (e.g. musl).
for bin in agent-wrapper checkout-hook job-dispatcher populate-mirror git-credential-github-app; do
  /usr/local/bin/$bin --version >/dev/null
done
# The agent's version, which agent-wrapper checks against its minimum at every start: recorded
# once here rather than by running the agent an extra time in every pod.
mkdir -p /etc/stateless-agent
buildkite-agent --version > /etc/stateless-agent/agent-version
