#!/usr/bin/env bash
# Fails when a test run, the demo or the benchmark left anything of ours behind: state
# dirs, netns, cgroups, scratch dirs, or podsteer programs with no state dir holding them.
set -uo pipefail
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
shopt -s nullglob
left=(
  /sys/fs/bpf/podsteer-test-* /sys/fs/bpf/podsteer-bench-* /sys/fs/bpf/podsteer-demo*
  /var/run/netns/pst-* /var/run/netns/psb-* /var/run/netns/demo*-* /var/run/netns/bench*-*
  "$cg2"/podsteer-test-* "$cg2"/podsteer-bench-* "$cg2"/podsteer-demo*
  /tmp/podsteer-test-* /tmp/podsteer-bench-* /tmp/podsteer-demo* /tmp/podsteer-peer-*
  /tmp/podsteer-deploy-* /tmp/podsteer-kubectl-* /tmp/podsteer-fuzz.* /tmp/podsteer-cniconf-*
  /etc/netns/pst-* /etc/netns/demo*-*
)
# the return path's rules belong in pod netns only: one in the host's netns would steer
# this machine's own traffic
host_rules=$( (ip rule show; ip -6 rule show) 2>/dev/null | grep -E 'proto 112|lookup 100' || true)
[ -n "$host_rules" ] && left+=("host netns rules: $host_rules")
if [ ${#left[@]} -eq 0 ] && [ -z "$(ls -d /sys/fs/bpf/podsteer* 2>/dev/null)" ]; then
  progs=$(bpftool prog show 2>/dev/null | grep -E 'name podsteer_' || true)
  [ -n "$progs" ] && left+=("programs: $progs")
fi
if [ ${#left[@]} -gt 0 ]; then
  echo "residue check: FAILED, left behind:"
  printf '  %s\n' "${left[@]}"
  exit 1
fi
echo "residue check: nothing left behind"
