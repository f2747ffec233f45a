#!/bin/bash
# PID 1 of a scripts/test-kernels.sh guest: this machine's root, read-only, under a tmpfs
# overlay. Mounts what the tests need, makes the guest kernel's modules loadable, runs the
# privileged tests (or PODSTEER_VM_COMMAND) and reports the exit code on the console.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/null >/dev/hvc0 2>&1

finish() {
  echo "PODSTEER_VM_EXIT=$1"
  sync
  echo o >/proc/sysrq-trigger
  sleep 5
  busybox poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sys /sys

# Read before /tmp is mounted over: the env file lives in the host's /tmp.
envfile=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^podsteer.env=//p')
# shellcheck disable=SC1090
. "$envfile" || finish 96

mount -t tmpfs -o mode=755 tmpfs /run
# A fresh /tmp hides the host's; a checkout or build dir that lives under it is carried over
# (bind-mounted aside, then moved back to the same path: ctest's files name absolute paths).
kept=()
for d in "$PODSTEER_VM_REPO" "$PODSTEER_VM_BUILD_DIR"; do
  case $d in /tmp/*) ;; *) continue ;; esac
  inside=0
  for k in "${kept[@]}"; do case $d/ in "$k"/*) inside=1 ;; esac; done
  [ $inside -eq 1 ] && continue
  mkdir -p "/run/kept${#kept[@]}" && mount --bind "$d" "/run/kept${#kept[@]}" || finish 93
  kept+=("$d")
done
mount -t tmpfs tmpfs /tmp
for i in "${!kept[@]}"; do
  mkdir -p "${kept[$i]}" && mount --move "/run/kept$i" "${kept[$i]}" || finish 93
done
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /run/netns /run/lock

# The guest kernel's modules, where modprobe (and the kernel's request_module) look.
kver=$(uname -r)
mkdir -p "/usr/lib/modules/$kver"
mount --bind "$PODSTEER_VM_KERNEL_DIR/lib/modules/$kver" "/usr/lib/modules/$kver" || finish 95
echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe
ip link set lo up
hostname "podsteer-vm-${kver%%-*}"

echo "guest: kernel $kver, $(nproc) CPUs, $(awk '/MemTotal/ {print int($2/1024) " MiB"}' /proc/meminfo)"
cd "$PODSTEER_VM_BUILD_DIR" || finish 94
rc=0
if [ -n "$PODSTEER_VM_COMMAND" ]; then
  bash -c "$PODSTEER_VM_COMMAND" || rc=$?
else
  # software emulation is ~50x slower: the 200,000-connection load test runs 20,000 here
  export PODSTEER_TEST_CONNECTIONS=${PODSTEER_TEST_CONNECTIONS:-20000}
  # The time limits in the build's test files are set for this machine's own kernel; under
  # emulation they are scaled (the files here are the guest's overlay copies, the host's
  # build is read-only and untouched).
  scale=${PODSTEER_VM_TIMEOUT_SCALE:-1}
  if [ "$scale" != 1 ]; then
    for f in tests/*_tests.cmake tests/CTestTestfile.cmake; do
      [ -f "$f" ] || continue
      SCALE=$scale perl -pi -e 's/\bTIMEOUT (\d+)/"TIMEOUT " . $1 * $ENV{SCALE}/ge' "$f" || finish 92
    done
    echo "guest: every test's time limit scaled by $scale"
  fi
  args=(-L privileged -E '^bench_smoke$' --output-on-failure --timeout $((600 * scale)))
  [ -n "$PODSTEER_VM_TESTS" ] && args+=(-R "$PODSTEER_VM_TESTS")
  ctest "${args[@]}" || rc=$?
  "$PODSTEER_VM_REPO/tests/residue.sh" || rc=1
fi
finish "$rc"
