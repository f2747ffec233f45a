#!/usr/bin/env bash
# The plain manifests (kubectl apply -k deploy/) are rendered from the Helm chart: one source
# of truth. Run after changing deploy/charts/podsteer; scripts/test.sh runs it with --check,
# which fails when the committed files are not what the chart renders.
#   deploy/podsteer.yaml                   the chart with its default values
#   deploy/optional/proxy-daemonset.yaml   podsteer-proxy as the node proxy (proxy.enabled)
# usage: scripts/render-manifests.sh [--check]
set -euo pipefail
cd "$(dirname "$0")/.."
HELM=${HELM:-$(tests/cluster/build-helm.sh)}
NS=podsteer-system
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
header() {
  echo "# Rendered from deploy/charts/podsteer by scripts/render-manifests.sh ($1): do not edit;"
  echo "# change the chart (or, for one cluster, kustomize over this file) and render again."
}
{
  header "helm template podsteer deploy/charts/podsteer -n $NS --no-hooks"
  # no hooks: the pre-delete Job would delete the DaemonSet the moment kubectl applied it
  "$HELM" template podsteer deploy/charts/podsteer -n "$NS" --no-hooks
} >"$out/podsteer.yaml"
{
  header "the same with --set proxy.enabled=true, that template only"
  echo "# Optional, and never beside ztunnel: apply after kubectl apply -k deploy/ (it uses its namespace):"
  echo "#   kubectl apply -f deploy/optional/proxy-daemonset.yaml"
  "$HELM" template podsteer deploy/charts/podsteer -n "$NS" --set proxy.enabled=true \
    --show-only templates/proxy-daemonset.yaml
} >"$out/proxy-daemonset.yaml"
if [ "${1:-}" = --check ]; then
  rc=0
  for f in podsteer.yaml optional/proxy-daemonset.yaml; do
    diff -u "deploy/$f" "$out/$(basename "$f")" || { echo "deploy/$f is not what the chart renders: run scripts/render-manifests.sh"; rc=1; }
  done
  exit $rc
fi
cp "$out/podsteer.yaml" deploy/podsteer.yaml
cp "$out/proxy-daemonset.yaml" deploy/optional/proxy-daemonset.yaml
echo "rendered deploy/podsteer.yaml and deploy/optional/proxy-daemonset.yaml"
