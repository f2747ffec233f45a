#!/usr/bin/env bash
# Side-by-side benchmark (bench/main.cpp and its parts, bench/bench.h): direct vs podsteer vs Istio's in-pod
# iptables rules through the same proxy, interleaved in one run. Writes bench/results.json,
# bench/RESULTS.md and bench/connection_rate.png. Extra arguments go to the benchmark
# (e.g. --rounds 5 --seconds 3, or --smoke for a few seconds without thresholds).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
scripts/build.sh >/dev/null
exec build/bench/podsteer_bench --podsteer build/cli/podsteer --proxy build/proxy/podsteer-proxy --out-dir bench "$@"
