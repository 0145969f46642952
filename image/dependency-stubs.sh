#!/bin/sh
# Writes an empty source file for every target the workspace's manifests name, so the image's
# dependency layer compiles all dependencies from Cargo.toml and Cargo.lock alone and is rebuilt
# only when they change. (cargo-chef does this in general, but installing it adds about a minute
# of compiling to every cold image build on 2 cores, and these manifests only name targets by
# `path = "…"` and `[[bench]] name = "…"`.)
set -eu
for manifest in */Cargo.toml; do
  crate=${manifest%/Cargo.toml}
  mkdir -p "$crate/src"
  : > "$crate/src/lib.rs"
  sed -n 's/^path = "\(.*\)"$/\1/p' "$manifest" | while read -r target; do
    mkdir -p "$crate/$(dirname "$target")"
    echo 'fn main() {}' > "$crate/$target"
  done
  # A bench section's name line follows its header.
  sed -n '/^\[\[bench\]\]$/{n;s/^name = "\(.*\)"$/\1/p;}' "$manifest" | while read -r bench; do
    mkdir -p "$crate/benches"
    echo 'fn main() {}' > "$crate/benches/$bench.rs"
  done
done
