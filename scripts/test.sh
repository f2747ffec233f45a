#!/usr/bin/env bash
# Runs every test: installs what is needed, builds, runs ctest (unit, BPF and the
# real-kernel integration tests, one at a time: they share the kernel), runs podman and
# containerd's CRI end to end, runs podsteer's DaemonSet on a real Kubernetes node (kubelet,
# API server, containerd), runs the ctest suite again from an AddressSanitizer + UBSan build, runs every fuzz
# target briefly, boots the Debian 6.1 kernel under qemu for the datapath and agent tests
# there, then sweeps for anything a test left behind. Prints what each part cost at the end (README, "Tests").
#
# PODSTEER_TEST_PARTS selects parts (default: all): any of
#   main e2e cluster asan fuzz kernels
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=" ${PODSTEER_TEST_PARTS:-main e2e cluster asan fuzz kernels} "
BUILD_DIR=${BUILD_DIR:-build}
status=0
timings=()
part() {  # part NAME COMMAND...: runs it, records its time and result, goes on after a failure
  local name=$1 start rc=0
  shift
  start=$(date +%s)
  echo "=== $name"
  "$@" || rc=$?
  timings+=("$(printf '%-44s %5ss  %s' "$name" $(($(date +%s) - start)) "$([ $rc -eq 0 ] && echo ok || echo FAILED)")")
  [ $rc -eq 0 ] || status=1
}
want() { [[ $PARTS == *" $1 "* ]]; }

tests/residue.sh --clean || echo "!!! residue of an earlier run could not all be removed: the final sweep will report it"
part "setup (Debian packages, bpffs)" scripts/setup.sh
part "build" scripts/build.sh
if want main; then
  part "build of two earlier releases (migration and upgrade tests)" env BUILD_DIR="$BUILD_DIR" scripts/build-previous.sh
  part "ctest: unit, BPF, integration" bash -c "cd '$BUILD_DIR' && ctest --output-on-failure"
fi
if want e2e; then
  part "podman creates the pods (tests/e2e/podman.sh)" env BUILD_DIR="$BUILD_DIR" tests/e2e/podman.sh
  part "containerd CRI creates the pods (tests/e2e/containerd.sh)" env BUILD_DIR="$BUILD_DIR" tests/e2e/containerd.sh
fi
if want cluster; then
  # the Kubernetes components from their Go modules and the image from deploy/Dockerfile are
  # built (and cached) first: most of this part's time on a clean machine
  # helm from its Go module (cached with the components): lint, template, the rendered manifests
  part "the Helm chart: lint, template, deploy/ rendered from it (tests/chart/check.sh)" tests/chart/check.sh
  part "a real node: kubelet, API server, the DaemonSet (scripts/cluster-e2e.sh)" scripts/cluster-e2e.sh
fi
if want asan; then
  part "build with ASan + UBSan (clang-14)" scripts/build-asan.sh
  # the 200,000-connection run is a load test, not a sanitizer test: 2,000 here
  part "ctest under ASan + UBSan" bash -c "cd build-asan && PODSTEER_TEST_CONNECTIONS=2000 \
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --output-on-failure -E 'Migrates|bench_smoke'"
fi
if want fuzz; then
  part "fuzz smoke: 8 targets x ${FUZZ_SECONDS:-20}s" env FUZZ_SECONDS="${FUZZ_SECONDS:-20}" scripts/fuzz.sh
fi
if want kernels; then
  # a subset on 6.1 (software-emulated here: ~10 s per test, ~40 s per compare case). The
  # compare and adversarial cases run podsteer's side only, against each case's expected
  # outcome: Istio's rules ran the same cases in the ctest part above. Each test's time
  # limit is scaled by 4 in the guest. All kernels, all tests, both sides:
  # PODSTEER_VM_TIMEOUT=7200 scripts/test-kernels.sh 6.1 6.12
  part "kernel 6.1 under qemu (datapath + agent subset)" env BUILD_DIR="$BUILD_DIR" PODSTEER_COMPARE_REFERENCE=skip \
    PODSTEER_VM_TESTS='bpf\.|DatapathTest\.(Outbound|Inbound|Hbone|Marked|DnsOverUdp|ProxyMissing|Enroll|Upgrade|SoOriginalDst|AFullTupleTable|TupleMaps|TransitEntries|ForeignTc)|AgentTest\.(Drift|Rolling|NonDefault|OnlyTheZds|AConnectionFromOutside)|Adversarial\.(AnApp|AProcessInThePodsNetns|AProcessOutsideTheHookCgroup|AConnectionAfterTheConnectHook|AFailOpenPodWithout)|SocketLb\.|SourceKept\.(InboundFromAnotherNode|ConnectionsTheNode)|DatapathTest\.BypassInbound' \
    scripts/test-kernels.sh 6.1
fi
part "residue sweep" tests/residue.sh
echo
echo "=== what each part cost"
printf '%s\n' "${timings[@]}"
exit $status
