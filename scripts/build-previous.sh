#!/usr/bin/env bash
# Builds the podsteer CLI of earlier releases from git history, for the tests that watch
# this build take over a state a release made:
#   6b5e075 -> $BUILD_DIR/previous-abi1/         map ABI 1 (the migration test)
#   6924881 -> $BUILD_DIR/previous-cgroup-skb/   the last with the per-packet cgroup_skb
#                                                program (the upgrade-in-place test)
# ~30 s each. Without a commit in this checkout (a shallow clone) it says so and the test
# skips loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=$(realpath -m "${BUILD_DIR:-build}")
for pair in 6b5e075:previous-abi1 6924881:previous-cgroup-skb; do
  rev=${pair%%:*}
  out=$BUILD_DIR/${pair#*:}
  [ -x "$out/cli/podsteer" ] && continue
  if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
    echo "build-previous: commit $rev is not in this checkout (shallow clone?): its test will skip"
    continue
  fi
  rm -rf "$out" && mkdir -p "$out/src"
  git archive "$rev" | tar -x -C "$out/src"
  cmake -S "$out/src" -B "$out" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$out" --target podsteer -j"$(nproc)" >/dev/null
  echo "build-previous: $out/cli/podsteer ($rev)"
done
