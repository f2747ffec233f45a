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
  # podsteer-cni links OpenSSL statically (libssl.a); the node suite makes test certificates
  libssl-dev openssl
  # scripts/test-kernels.sh: other kernels under qemu
  qemu-system-x86 busybox-static cpio kmod xz-utils
  # tests/e2e: a real container runtime calls the CNI chain (podman; containerd's CRI plugin,
  # driven by tests/cri/cri_client over gRPC)
  podman runc conmon containerd libgrpc++-dev protobuf-compiler-grpc golang-github-gogo-protobuf-dev
  # scripts/build-asan.sh, scripts/fuzz.sh: sanitizers and libFuzzer
  libclang-rt-14-dev
  # tests/adversarial: crafted packets
  python3-scapy
  # tests/chart/check.sh reads the rendered manifests
  python3-yaml
  # scripts/cluster-e2e.sh: a Debian base image made here (nothing can be pulled); the
  # Kubernetes components are built with the machine's Go (tests/cluster/build-components.sh)
  debootstrap
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

# The CRI protocol (tests/cri): api.proto ships in trixie's golang-github-kubernetes-cri-api-dev;
# the .deb is downloaded through a temporary sources list (nothing is installed from trixie)
# and only the proto is kept.
CRI_DIR=/var/cache/podsteer/cri-api
if [ ! -f "$CRI_DIR/api.proto" ]; then
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb http://deb.debian.org/debian trixie main" >"$tmp/sources.list"
  apt_opts=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache" -o APT::Sandbox::User=root)
  if apt-get "${apt_opts[@]}" update -qq >/dev/null 2>&1 &&
    (cd "$tmp" && apt-get "${apt_opts[@]}" download golang-github-kubernetes-cri-api-dev >/dev/null 2>&1); then
    dpkg-deb -x "$tmp"/golang-github-kubernetes-cri-api-dev_*.deb "$tmp/x"
    mkdir -p "$CRI_DIR"
    cp "$(find "$tmp/x" -path '*cri-api/pkg/apis/runtime/v1/api.proto')" "$CRI_DIR/api.proto"
    echo "setup: CRI api.proto from $(basename "$tmp"/golang-github-kubernetes-cri-api-dev_*.deb)"
  else
    echo "setup: could not fetch the CRI api.proto from trixie: the CRI tests will be skipped"
  fi
  rm -rf "$tmp"
fi

# The state dir lives on bpffs.
if ! mountpoint -q /sys/fs/bpf; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi
# Network namespaces made by tests live here.
mkdir -p /var/run/netns
echo "setup: ok"
