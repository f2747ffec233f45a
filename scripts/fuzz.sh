#!/usr/bin/env bash
# Runs every libFuzzer target (tests/fuzz) from its seed corpus: FUZZ_RUNS executions each
# (default 1,000,000), or FUZZ_SECONDS seconds each when that is set (scripts/test.sh uses
# a short time). Builds build-asan/ first if needed. Prints executions, speed, coverage
# and corpus size per target; a crash, leak, sanitizer report or timeout fails the run,
# with the input that did it saved under build-asan/fuzz-artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${ASAN_BUILD_DIR:-build-asan}
TARGETS=(cni_request cni_plugin conflist kubeconfig kube_list kube_watch zds_frames api_answer)
[[ -x $BUILD_DIR/tests/fuzz/fuzz_zds_frames ]] || scripts/build-asan.sh
if [[ -n ${FUZZ_SECONDS:-} ]]; then limit=(-max_total_time="$FUZZ_SECONDS"); else limit=(-runs="${FUZZ_RUNS:-1000000}"); fi
mkdir -p "$BUILD_DIR/fuzz-artifacts"
work=$(mktemp -d /tmp/podsteer-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
status=0
printf '%-12s %12s %10s %6s %8s %s\n' target executions exec/s cov corpus result
for t in "${TARGETS[@]}"; do
  mkdir -p "$work/$t"
  log="$work/$t.log"
  # the seeds are read, never written: new inputs go to the scratch corpus
  if "$BUILD_DIR/tests/fuzz/fuzz_$t" "${limit[@]}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$BUILD_DIR/fuzz-artifacts/$t-" \
      "$work/$t" "tests/fuzz/corpus/$t" >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  runs=$(grep -oE 'number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}' | tail -1)
  speed=$(grep -oE 'average_exec_per_sec: +[0-9]+' "$log" | awk '{print $2}' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  corpus=$(find "$work/$t" -type f | wc -l)
  printf '%-12s %12s %10s %6s %8s %s\n' "$t" "${runs:-?}" "${speed:-?}" "${cov:-?}" "$corpus" "$result"
  if [[ $result != ok ]]; then
    grep -E 'ERROR|SUMMARY|Test unit written|==[0-9]+==' "$log" | head -40 || tail -40 "$log"
  fi
done
exit $status
