#!/usr/bin/env bash
# Builds podsteer with clang-14 under AddressSanitizer + UndefinedBehaviorSanitizer into
# build-asan/ (ASAN_BUILD_DIR overrides), with libFuzzer coverage in every library and
# the fuzz targets (tests/fuzz). scripts/test.sh runs the unit and integration tests from
# this build once more, and the fuzz targets briefly; scripts/fuzz.sh runs them long.
set -euo pipefail
# Line tables are what the sanitizers' and the fuzzers' stack traces need (file:line); full
# debug info made this build the slowest part of CI after the emulated kernel.
cd "$(dirname "$0")/.."
BUILD_DIR=${ASAN_BUILD_DIR:-build-asan}
FLAGS="-O1 -gline-tables-only -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -fsanitize=fuzzer-no-link"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Debug -DPODSTEER_FUZZ=ON \
  -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_C_FLAGS="$FLAGS" -DCMAKE_CXX_FLAGS="$FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)"
