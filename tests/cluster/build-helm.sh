#!/usr/bin/env bash
# Builds helm from its Go module (tests/cluster/helm: go.mod and go.sum pin it and every module
# it needs; no source is kept here) into a cache keyed by those files. Prints the binary's path.
# helm v4: the library's list prefers it to v3 (helm.sh/helm/v3 is served too); the chart is
# apiVersion v2, which both read.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
HELM_VERSION=$(grep -Eo 'helm.sh/helm/v4 v[0-9.]+' "$here/helm/go.mod" | awk '{print $2}' | head -1)
key=$(cat "$here"/helm/go.{mod,sum} "$0" | sha256sum | cut -c1-16)
CACHE=${PODSTEER_CLUSTER_CACHE:-/var/cache/podsteer-cluster}
BIN=$CACHE/helm-$HELM_VERSION-$key
if [ ! -x "$BIN/helm" ]; then
  command -v go >/dev/null || { echo "build-helm: needs Go (the polyglot machines have it)" >&2; exit 2; }
  echo "build-helm: building helm $HELM_VERSION into $BIN (first time: about 2 minutes)" >&2
  mkdir -p "$BIN.tmp"
  # what helm's Makefile writes into the binary, so `helm version` says which it is
  (cd "$here/helm" && GOBIN="$BIN.tmp" GOFLAGS=-mod=mod go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" tool) >&2
  [ -x "$BIN.tmp/helm" ] || { echo "build-helm: helm was not built" >&2; exit 1; }
  rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
fi
echo "$BIN/helm"
