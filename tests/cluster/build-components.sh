#!/usr/bin/env bash
# Builds the real Kubernetes components and etcd that scripts/cluster-e2e.sh runs, from their Go
# modules (tests/cluster/k8s and tests/cluster/etcd: go.mod and go.sum pin every module; no
# source is kept here), into a cache keyed by those files. Prints the bin directory.
#
# Kubernetes v1.34.4: the newest release whose kubelet still supports containerd 1.x (Debian
# bookworm has 1.6) and runs on cgroup v1 without being told to (failCgroupV1 defaults to true
# from 1.35, and this machine's cgroups are hybrid: cgroup2 only at /sys/fs/cgroup/unified).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
K8S_VERSION=$(grep -Eo 'k8s.io/kubernetes v[0-9.]+' "$here/k8s/go.mod" | awk '{print $2}' | head -1)
key=$(cat "$here"/k8s/go.{mod,sum} "$here"/etcd/go.{mod,sum} "$0" | sha256sum | cut -c1-16)
CACHE=${PODSTEER_CLUSTER_CACHE:-/var/cache/podsteer-cluster}
BIN=$CACHE/bin-$K8S_VERSION-$key
want=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd)
have=1
for b in "${want[@]}"; do [ -x "$BIN/$b" ] || have=0; done
if [ "$have" = 0 ]; then
  command -v go >/dev/null || { echo "build-components: needs Go (the polyglot machines have it)" >&2; exit 2; }
  mkdir -p "$BIN.tmp"
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  # what the release build writes into every binary (hack/lib/version.sh): kubectl version,
  # the node's kubeletVersion and the API server's /version say v1.34.4, not v0.0.0
  ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ld+=" -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  echo "build-components: building Kubernetes $K8S_VERSION and etcd into $BIN (first time: minutes)" >&2
  (cd "$here/k8s" && GOBIN="$BIN.tmp" GOFLAGS=-mod=mod go install -trimpath -ldflags "$ld" tool) >&2
  (cd "$here/etcd" && GOBIN="$BIN.tmp" GOFLAGS=-mod=mod go install -trimpath -ldflags "-s -w" tool) >&2
  [ -x "$BIN.tmp/server" ] && mv "$BIN.tmp/server" "$BIN.tmp/etcd"
  for b in "${want[@]}"; do [ -x "$BIN.tmp/$b" ] || { echo "build-components: $b was not built" >&2; exit 1; }; done
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
