#!/usr/bin/env bash
# Fails when a test run, the demo or the benchmark left anything of ours behind: state
# dirs, netns, cgroups, scratch dirs, or podsteer programs with no state dir holding them.
#
# --clean: removes what it finds instead (scripts/test.sh runs it first, so that objects a
# killed earlier run left are reported and cleared rather than charged to this run). It
# kills processes of ours too, so run one test run at a time on a machine (the tests share
# the kernel anyway).
set -uo pipefail
# shellcheck source=../scripts/lib/cleanup.sh
source "$(dirname "$0")/../scripts/lib/cleanup.sh"
clean=0
[ "${1:-}" = --clean ] && clean=1
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
shopt -s nullglob
left=(
  /sys/fs/bpf/podsteer-test-* /sys/fs/bpf/podsteer-bench-* /sys/fs/bpf/podsteer-demo*
  /var/run/netns/pst-* /var/run/netns/psb-* /var/run/netns/demo*-* /var/run/netns/bench*-*
  "$cg2"/podsteer-test-* "$cg2"/podsteer-bench-* "$cg2"/podsteer-demo*
  /tmp/podsteer-test-* /tmp/podsteer-bench-* /tmp/podsteer-demo* /tmp/podsteer-peer-*
  /tmp/podsteer-deploy-* /tmp/podsteer-kubectl-* /tmp/podsteer-fuzz.* /tmp/podsteer-cniconf-*
  /etc/netns/pst-* /etc/netns/demo*-*
  /tmp/podsteer-cluster-* /sys/fs/cgroup/*/podsteer-cluster-* "$cg2"/podsteer-cluster-*
)
# the return path's rules belong in pod netns only: one in the host's netns would steer
# this machine's own traffic
host_rules=$( (ip rule show; ip -6 rule show) 2>/dev/null | grep -E 'proto 112|lookup 100' || true)
[ -n "$host_rules" ] && left+=("host netns rules: $host_rules")
if [ ${#left[@]} -eq 0 ] && [ -z "$(ls -d /sys/fs/bpf/podsteer* 2>/dev/null)" ]; then
  progs=$(bpftool prog show 2>/dev/null | grep -E 'name podsteer_' || true)
  [ -n "$progs" ] && left+=("programs: $progs")
fi
# processes of ours still running: an agent, proxy, API server or peer of a test, the demo
# or the benchmark (an agent left running keeps putting its pins back)
ours='(/podsteer-(test|bench|demo|cluster)|/build[^ ]*/(controller/podsteer-agent|proxy/podsteer-proxy|tests/(kube-testserver|testpeer))( |$))'
procs=$(pgrep -a -f -- "$ours" 2>/dev/null | grep -v -E "^$$ |pgrep|residue.sh|ctest|test.sh" || true)
[ -n "$procs" ] && left+=("processes: $procs")
if [ $clean -eq 1 ]; then
  if [ ${#left[@]} -eq 0 ]; then echo "residue: none from earlier runs"; exit 0; fi
  echo "residue: an earlier run was killed and left these behind; removing them:"
  printf '  %s\n' "${left[@]}"
  # processes first: what they hold (pins, netns, cgroups) can go only after them
  if [ -n "$procs" ]; then
    kill -9 $(awk '{print $1}' <<<"$procs") 2>/dev/null
    sleep 0.2
  fi
  for x in "${left[@]}"; do
    case $x in
      /var/run/netns/*)
        n=${x##*/}
        pids=$(ip netns pids "$n" 2>/dev/null); [ -n "$pids" ] && kill -9 $pids 2>/dev/null
        ip netns delete "$n" 2>/dev/null || rm -f "$x" ;;
      "$cg2"/* | /sys/fs/cgroup/*) remove_cgroup "$x" ;;
      processes:*) ;;  # killed above
      /*) rm -rf "$x" ;;  # bpffs pins (unpinning a link detaches it), scratch dirs
      *) echo "  (not removed automatically: $x)" ;;
    esac
  done
  clean=0
  exec "$0"  # and check again
fi
if [ ${#left[@]} -gt 0 ]; then
  echo "residue check: FAILED, left behind:"
  printf '  %s\n' "${left[@]}"
  exit 1
fi
echo "residue check: nothing left behind"
