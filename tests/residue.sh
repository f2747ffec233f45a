#!/usr/bin/env bash
# Fails when a test run left anything of ours behind: test state dirs, netns, cgroups, or
# podsteer programs with no state dir holding them.
set -uo pipefail
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
left=$(ls -d /sys/fs/bpf/podsteer-test-* /var/run/netns/pst-* "$cg2"/podsteer-test-* 2>/dev/null)
if [ -z "$(ls -d /sys/fs/bpf/podsteer* 2>/dev/null)" ]; then
  progs=$(bpftool prog show 2>/dev/null | grep -E 'name podsteer_' || true)
  [ -n "$progs" ] && left="$left"$'\n'"programs: $progs"
fi
if [ -n "${left//[$'\n ']/}" ]; then
  echo "residue check: FAILED, left behind:"
  echo "$left"
  exit 1
fi
echo "residue check: nothing left behind"
