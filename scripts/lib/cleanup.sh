# Cleanup helpers shared by the demo, the end-to-end tests, the CNI latency bench and
# tests/residue.sh.

# remove_cgroup DIR...: kills every process in each cgroup tree, then removes the tree
# deepest first. Missing dirs are skipped.
remove_cgroup() {
  local d
  for d in "$@"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null
    sleep 0.2
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  return 0
}

# unmount_under DIR: lazily unmounts everything mounted below DIR, deepest first.
unmount_under() {
  grep -o " $1[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  return 0
}
