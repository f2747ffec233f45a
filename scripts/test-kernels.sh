#!/usr/bin/env bash
# The kernel matrix: boots other kernels under qemu and runs podsteer's privileged tests in
# each, the way virtme-ng and Cilium's little-vm-helper do. The guest sees this machine's
# root read-only over virtiofs (with a tmpfs overlay on top), so it runs the very binaries
# built here; it has no network and touches nothing of the host.
#
#   scripts/test-kernels.sh [VERSION...]        default: 6.1 6.12 (5.10 also known)
#
# Environment:
#   PODSTEER_KERNEL_CACHE  where fetched kernels live (default /var/cache/podsteer-kernels)
#   PODSTEER_VM_ACCEL      kvm | tcg (default: kvm when the CPU has vmx/svm, else tcg)
#   PODSTEER_VM_TESTS      ctest -R regex of the tests to run in each guest (default: all
#                          privileged tests but the benchmark smoke run)
#   PODSTEER_VM_COMMAND    run this shell command in the guest instead of the tests
#   PODSTEER_VM_TIMEOUT    seconds per kernel before the guest is killed (default 2400)
#   PODSTEER_VM_TIMEOUT_SCALE  the guest multiplies each test's ctest time limit by this
#                          (default 4 under tcg, where everything runs 30-50x slower; 1 under kvm)
#   PODSTEER_COMPARE_REFERENCE=skip  the compare and adversarial cases run podsteer's side
#                          alone, against each case's expected outcome (Istio's rules are
#                          run against the same cases on this machine's kernel)
#   BUILD_DIR              the build to test (default build)
#
# Prints one summary line per kernel and exits non-zero if any kernel failed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BUILD_DIR=$(realpath "${BUILD_DIR:-build}")
CACHE=${PODSTEER_KERNEL_CACHE:-/var/cache/podsteer-kernels}
TIMEOUT=${PODSTEER_VM_TIMEOUT:-2400}
VERSIONS=("$@")
((${#VERSIONS[@]})) || VERSIONS=(6.1 6.12)

die() { echo "test-kernels: $*" >&2; exit 2; }

suite_of() {
  case "$1" in
    5.10) echo bullseye ;;
    6.1) echo bookworm ;;
    6.12) echo trixie ;;
    *) die "unknown kernel '$1': known are 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie)" ;;
  esac
}

for tool in qemu-system-x86_64 busybox cpio depmod modprobe; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/setup.sh --vm installs it)"
done
VIRTIOFSD=$(command -v virtiofsd || true)
[ -n "$VIRTIOFSD" ] || VIRTIOFSD=/usr/lib/qemu/virtiofsd
[ -x "$VIRTIOFSD" ] || die "virtiofsd is missing (Debian's qemu-system-common ships /usr/lib/qemu/virtiofsd)"
[ -x "$BUILD_DIR/tests/integration_tests" ] || die "no build in $BUILD_DIR (run scripts/build.sh first)"

accel=${PODSTEER_VM_ACCEL:-}
if [ -z "$accel" ]; then
  # /dev/kvm here may be a paravirtual hypervisor that stock kernels do not boot under;
  # hardware virtualization shows as vmx/svm in the CPU flags.
  if [ -w /dev/kvm ] && grep -qw -E 'vmx|svm' /proc/cpuinfo; then accel=kvm; else accel=tcg; fi
fi

# Fetches the Debian cloud kernel of SUITE once: package, vmlinuz, modules (depmod'ed).
# Prints the directory it lives in.
fetch_kernel() {
  local version=$1 suite dir apt
  suite=$(suite_of "$version")
  dir=$CACHE/$version
  if [ -f "$dir/ready" ]; then echo "$dir"; return; fi
  rm -rf "$dir" && mkdir -p "$dir"
  apt=$dir/apt
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  echo "deb http://deb.debian.org/debian $suite main" >"$apt/sources.list"
  local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists"
              -o "Dir::Cache=$apt/cache" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
  apt-get "${opts[@]}" update -qq >&2
  local pkg
  pkg=$(apt-cache "${opts[@]}" depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || die "no cloud kernel package found in $suite"
  (cd "$dir" && apt-get "${opts[@]}" download "$pkg" >&2)
  dpkg-deb -x "$dir"/*.deb "$dir/root"
  # trixie keeps modules under /usr/lib; depmod wants ROOT/lib/modules
  [ -e "$dir/root/lib" ] || ln -s usr/lib "$dir/root/lib"
  local kver
  kver=$(ls "$dir/root/lib/modules")
  depmod -b "$dir/root" "$kver"
  cp "$dir/root/boot/vmlinuz-$kver" "$dir/vmlinuz"
  echo "$kver" >"$dir/kver"
  rm -rf "$apt" "$dir"/*.deb
  touch "$dir/ready"
  echo "$dir"
}

# The initramfs: busybox, the modules that reach the host's root (virtio, virtiofs,
# overlay, the virtio console) in load order, and an /init that overlays a tmpfs on the
# shared root and switches to it.
build_initramfs() {
  local dir=$1 kver out work
  kver=$(cat "$dir/kver")
  out=$dir/initramfs.cpio.gz
  [ -f "$out" ] && { echo "$out"; return; }
  work=$(mktemp -d)
  mkdir -p "$work"/{bin,dev,proc,sys,mnt/host,mnt/upper,mnt/root,modules}
  cp /usr/bin/busybox "$work/bin/busybox"
  for app in sh mount umount mkdir insmod switch_root poweroff sleep cat echo ln; do ln -s busybox "$work/bin/$app"; done
  local order=() line mod
  while read -r line; do
    case "$line" in
      insmod*) mod=$(echo "$line" | awk '{print $2}')
               order+=("$(basename "${mod%.xz}")")
               case "$mod" in
                 *.xz) xz -dc "$mod" >"$work/modules/$(basename "${mod%.xz}")" ;;
                 *) cp "$mod" "$work/modules/" ;;
               esac ;;
    esac
  done < <(modprobe -d "$dir/root" -S "$kver" --show-depends -a virtio_pci virtio_console fuse virtiofs overlay 2>/dev/null)
  printf '%s\n' "${order[@]}" | awk '!seen[$0]++' >"$work/modules/order"
  cat >"$work/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m 2>/dev/null; done
mount -t virtiofs -o ro hostroot /mnt/host || { echo "PODSTEER_VM_EXIT=97 (no virtiofs)"; poweroff -f; }
mount -t tmpfs -o size=2g tmpfs /mnt/upper
mkdir -p /mnt/upper/up /mnt/upper/work
mount -t overlay overlay -o lowerdir=/mnt/host,upperdir=/mnt/upper/up,workdir=/mnt/upper/work /mnt/root || {
  echo "PODSTEER_VM_EXIT=98 (no overlay)"; poweroff -f; }
mkdir -p /mnt/root/mnt/podsteer-kernel
mount -t virtiofs -o ro kernel /mnt/root/mnt/podsteer-kernel 2>/dev/null || true
for arg in $(cat /proc/cmdline); do
  case "$arg" in podsteer.guest=*) guest=${arg#podsteer.guest=} ;; esac
done
umount /proc /sys
mount --move /dev /mnt/root/dev
exec switch_root /mnt/root /bin/bash "$guest"
EOF
  chmod +x "$work/init"
  (cd "$work" && find . | cpio -o -H newc 2>/dev/null | gzip -1) >"$out.tmp"
  mv "$out.tmp" "$out"
  rm -rf "$work"
  echo "$out"
}

# Boots KERNEL_DIR with the guest script and prints the guest's output; returns the exit
# code the guest reported (or 124 on timeout, 99 when it reported none).
run_vm() {
  local dir=$1 version=$2 log=$3 run
  run=$(mktemp -d /tmp/podsteer-vm-XXXXXX)
  local sock_root=$run/root.sock sock_kernel=$run/kernel.sock
  "$VIRTIOFSD" --socket-path="$sock_root" -o source=/ -o cache=auto -o sandbox=chroot >/dev/null 2>&1 &
  local vfs_root=$!
  "$VIRTIOFSD" --socket-path="$sock_kernel" -o source="$dir/root" -o cache=auto -o sandbox=chroot >/dev/null 2>&1 &
  local vfs_kernel=$!
  for _ in $(seq 50); do [ -S "$sock_root" ] && [ -S "$sock_kernel" ] && break; sleep 0.1; done
  cat >"$run/env" <<EOF
export PODSTEER_VM_KERNEL_DIR=/mnt/podsteer-kernel
export PODSTEER_VM_BUILD_DIR='$BUILD_DIR'
export PODSTEER_VM_REPO='$REPO'
export PODSTEER_VM_TESTS='${PODSTEER_VM_TESTS:-}'
export PODSTEER_VM_COMMAND='${PODSTEER_VM_COMMAND:-}'
export PODSTEER_VM_TIMEOUT_SCALE='${PODSTEER_VM_TIMEOUT_SCALE:-$([ "$accel" = tcg ] && echo 4 || echo 1)}'
export PODSTEER_COMPARE_REFERENCE='${PODSTEER_COMPARE_REFERENCE:-}'
EOF
  local mem=3G
  local status=0
  timeout "$TIMEOUT" qemu-system-x86_64 -machine q35 -accel "$accel" $([ "$accel" = tcg ] && echo "-accel tcg,thread=multi") \
    -cpu max -smp 2 -m "$mem" \
    -object memory-backend-memfd,id=mem,size=$mem,share=on -numa node,memdev=mem \
    -kernel "$dir/vmlinuz" -initrd "$(build_initramfs "$dir")" \
    -append "console=hvc0 quiet panic=-1 podsteer.guest=$REPO/scripts/lib/vm-guest.sh podsteer.env=$run/env" \
    -chardev socket,id=vfs0,path="$sock_root" -device vhost-user-fs-pci,chardev=vfs0,tag=hostroot \
    -chardev socket,id=vfs1,path="$sock_kernel" -device vhost-user-fs-pci,chardev=vfs1,tag=kernel \
    -device virtio-serial-pci -chardev file,id=con,path="$log" -device virtconsole,chardev=con \
    -display none -monitor none -serial none -no-reboot >/dev/null 2>&1 || status=$?
  kill "$vfs_root" "$vfs_kernel" 2>/dev/null || true
  wait "$vfs_root" "$vfs_kernel" 2>/dev/null || true
  rm -rf "$run"
  [ "$status" = 124 ] && return 124
  local rc
  rc=$(sed -n 's/.*PODSTEER_VM_EXIT=\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  [ -n "$rc" ] || return 99
  return "$rc"
}

failed=0
summary=()
for version in "${VERSIONS[@]}"; do
  dir=$(fetch_kernel "$version")
  kver=$(cat "$dir/kver")
  log=$BUILD_DIR/kernel-$version.log
  start=$(date +%s)
  echo "=== kernel $version ($kver, $accel): booting" >&2
  rc=0
  run_vm "$dir" "$version" "$log" || rc=$?
  secs=$(( $(date +%s) - start ))
  result=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -a -E '^[0-9]+% tests passed' | tail -n 1 || true)
  if [ "$rc" = 0 ]; then
    summary+=("kernel $version ($kver): PASS in ${secs}s ${result:+- $result}")
  else
    failed=1
    case $rc in 124) why="timed out after ${TIMEOUT}s" ;; 99) why="no exit code from the guest" ;; *) why="exit $rc" ;; esac
    summary+=("kernel $version ($kver): FAIL ($why) in ${secs}s ${result:+- $result} (log: $log)")
    tail -n 60 "$log" >&2 || true
  fi
done
printf '%s\n' "${summary[@]}"
exit $failed
