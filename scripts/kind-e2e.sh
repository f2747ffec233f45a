#!/usr/bin/env bash
# End-to-end on a real cluster: kind + Docker. It cannot run on a machine without a Docker
# engine and kind (the machines this project is developed on have neither); CI does not run
# it (scripts/cluster-e2e.sh runs the same manifests on a real kubelet here). What it does:
# build the image with the version's tag, create a kind cluster, load the image, install as
# the README says (kubectl apply -k deploy/, then the optional podsteer-proxy), create an
# ambient namespace with a pod, and check that the pod is captured (Istio's annotation).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: needs $tool (and a running Docker engine)"; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "kind-e2e: no Docker engine is running"; exit 2; }
CLUSTER=${CLUSTER:-podsteer-e2e}
trap 'kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true' EXIT

VERSION=$(sed -nE 's/^project\(podsteer VERSION ([0-9.]+).*/\1/p' CMakeLists.txt)
IMAGE=podsteer.local/podsteer:$VERSION   # the tag deploy/kustomization.yaml names (IfNotPresent: the loaded one)
docker build -f deploy/Dockerfile --build-arg VERSION="$VERSION" -t "$IMAGE" .
kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
kubectl apply -k deploy/
kubectl apply -f deploy/optional/proxy-daemonset.yaml
kubectl -n podsteer-system rollout status ds/podsteer-agent --timeout=120s
kubectl -n podsteer-system rollout status ds/podsteer-proxy --timeout=120s

kubectl create namespace shop
kubectl label namespace shop istio.io/dataplane-mode=ambient
kubectl -n shop run server --image="$IMAGE" --command -- /bin/sh -c 'sleep infinity'
kubectl -n shop wait --for=condition=Ready pod/server --timeout=120s
for _ in $(seq 30); do
  [ "$(kubectl -n shop get pod server -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}')" = enabled ] && break
  sleep 2
done
test "$(kubectl -n shop get pod server -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}')" = enabled
kubectl -n podsteer-system exec ds/podsteer-agent -- podsteer status
echo "kind-e2e: the pod is captured"
