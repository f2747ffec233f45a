#!/usr/bin/env bash
# Builds the podsteer CLI of the last release with map ABI 1 (commit 6b5e075) into
# $BUILD_DIR/previous-abi1/, so the migration test can make a real ABI 1 state and watch
# this build migrate it. ~30 s. Without that commit in this checkout (a shallow clone) it
# says so and the test skips loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=$(realpath -m "${BUILD_DIR:-build}")
rev=6b5e075
out=$BUILD_DIR/previous-abi1
[ -x "$out/cli/podsteer" ] && exit 0
if ! git cat-file -e "$rev^{commit}" 2>/dev/null; then
  echo "build-previous: commit $rev is not in this checkout (shallow clone?): the ABI 1 migration test will skip"
  exit 0
fi
rm -rf "$out" && mkdir -p "$out/src"
git archive "$rev" | tar -x -C "$out/src"
cmake -S "$out/src" -B "$out" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$out" --target podsteer -j"$(nproc)" >/dev/null
echo "build-previous: $out/cli/podsteer (map ABI 1)"
