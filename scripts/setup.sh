#!/usr/bin/env bash
# Installs every Debian package podsteer's build and tests need, and mounts bpffs.
# Idempotent; works on a fresh Debian bookworm machine as root.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  clang-14 llvm-14 libbpf-dev bpftool libelf-dev zlib1g-dev
  libfmt-dev libspdlog-dev libcli11-dev nlohmann-json3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  iproute2 procps containernetworking-plugins iperf3 curl util-linux jq iptables nftables conntrack gnuplot-nox
  protobuf-compiler libprotobuf-dev libcpp-httplib-dev prometheus-cpp-dev libcurl4-openssl-dev libyaml-cpp-dev
  libnl-3-dev libnl-route-3-dev
  # scripts/test-kernels.sh: other kernels under qemu
  qemu-system-x86 busybox-static cpio kmod xz-utils
  # tests/e2e: a real container runtime calls the CNI chain
  podman runc conmon
  # scripts/build-asan.sh, scripts/fuzz.sh: sanitizers and libFuzzer
  libclang-rt-14-dev
  # tests/adversarial: crafted packets
  python3-scapy
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The state dir lives on bpffs.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
# Network namespaces made by tests live here.
mkdir -p /var/run/netns
echo "setup: ok"
