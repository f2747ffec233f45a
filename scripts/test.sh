#!/usr/bin/env bash
# Runs every test: installs what is needed, builds, runs ctest (unit, BPF and the
# real-kernel integration tests, one at a time: they share the kernel), then sweeps for
# anything a test left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
BUILD_DIR=${BUILD_DIR:-build}
BUILD_DIR=$BUILD_DIR scripts/build-previous.sh  # the ABI 1 release, for the migration test
status=0
(cd "$BUILD_DIR" && ctest --output-on-failure) || status=$?
tests/residue.sh || status=1
exit $status
