# The stateless agent image: the official Buildkite agent image plus agent-wrapper (PID 1), the
# checkout and job hooks, populate-mirror, job-dispatcher (run by its own Deployment) and git's
# GitHub App credential helper (docs/credentials.md). Both bases are build arguments so the image
# can be built against local stand-ins (tests/tests/container_image.rs does) or a pinned digest.
#
#   podman build -t stateless-agent .          # or: docker build -t stateless-agent .
#
# The runtime base must be glibc-based: the default Alpine agent image cannot run these binaries.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG AGENT_IMAGE=docker.io/buildkite/agent:3-ubuntu-24.04

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
# Dependencies first: this layer is rebuilt only when a manifest or Cargo.lock changes.
COPY Cargo.toml Cargo.lock ./
COPY agent-wrapper/Cargo.toml agent-wrapper/
COPY core/Cargo.toml core/
COPY dispatcher/Cargo.toml dispatcher/
COPY git-credential-github-app/Cargo.toml git-credential-github-app/
COPY hooks/Cargo.toml hooks/
COPY populate-mirror/Cargo.toml populate-mirror/
COPY tests/Cargo.toml tests/
COPY image/dependency-stubs.sh image/
RUN image/dependency-stubs.sh \
 && cargo build --release --locked -p agent-wrapper -p dispatcher -p git-credential-github-app -p hooks -p populate-mirror \
 && rm -rf agent-wrapper/src core/src dispatcher/src git-credential-github-app/src hooks/src populate-mirror/src
# The test crate keeps its stubs: the image does not build it, so editing tests reuses the layers.
COPY agent-wrapper agent-wrapper
COPY core core
COPY dispatcher dispatcher
COPY git-credential-github-app git-credential-github-app
COPY hooks hooks
COPY populate-mirror populate-mirror
# COPY keeps the context's modification times, which can be older than the stubs' builds.
RUN find */src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p agent-wrapper -p dispatcher -p git-credential-github-app -p hooks -p populate-mirror \
 && mkdir /out \
 && cp target/release/agent-wrapper target/release/checkout-hook target/release/job-hook \
       target/release/job-dispatcher target/release/populate-mirror \
       target/release/git-credential-github-app /out/

FROM ${AGENT_IMAGE}
COPY --from=builder /out/ /usr/local/bin/
COPY image/buildkite-agent.cfg /buildkite/buildkite-agent.cfg
COPY image/install.sh /tmp/install.sh
RUN sh /tmp/install.sh && rm /tmp/install.sh
ENV BUILDKITE_AGENT_CONFIG=/buildkite/buildkite-agent.cfg \
    BUILDKITE_BUILD_PATH=/buildkite/builds \
    BUILDKITE_HOOKS_PATH=/buildkite/hooks
# Not root: nothing here needs it (docs/operating.md, "The image").
USER 10001:10001
WORKDIR /buildkite
ENTRYPOINT ["/usr/local/bin/agent-wrapper"]
# The agent image's CMD is `start`; the wrapper adds that itself, and takes extra agent
# arguments after `--`.
CMD []

# What the image is (docs/releases.md): the release pipeline passes VERSION (the tag's, which
# .buildkite/steps/check-version.sh holds equal to the binaries' --version) and REVISION (the
# commit). Declared last, so a new version rebuilds none of the layers above.
ARG AGENT_IMAGE
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="stateless-agent" \
      org.opencontainers.image.description="Buildkite agents as one-job-per-pod Kubernetes Jobs: the agent image with agent-wrapper, the checkout and job hooks, populate-mirror and job-dispatcher" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/stateless-agent/stateless-agent" \
      org.opencontainers.image.vendor="stateless-agent" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${AGENT_IMAGE}"
