#!/usr/bin/env bash
# The call a kubelet makes: containerd 1.6's CRI plugin runs the CNI chain for
# RunPodSandbox, driven by tests/cri/cri_client (gRPC, the CRI's own api.proto) with pod
# metadata as a kubelet sends it, so podsteer-cni gets the exact CNI_ARGS a cluster
# produces (K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID, K8S_POD_INFRA_CONTAINER_ID).
# containerd runs in a node netns with a private root, state, socket, CNI conf_dir/bin_dir
# and a sandbox image imported from a local archive. The agent watches kube-testserver,
# which holds the same pods: the Kubernetes path and the CNI path must agree. Shows:
#   - a pod of an enrolled namespace is captured at RunPodSandbox with the identity from the
#     API (service account), outbound and inbound through the proxy, its app sees the client
#   - the Kubernetes path then finds the same pod (through /proc, by its UID) and agrees: no
#     second capture, the annotation set
#   - a plain pod untouched; labelled later, it is captured through the Kubernetes path and
#     RemovePodSandbox's DEL (matched by UID) releases it
#   - RemovePodSandbox releases; RunPodSandbox with the agent down fails (the kubelet
#     retries) and succeeds captured once the agent is back
#   - nothing left: containerd's mounts, netns, shims, leases
#
# Usage: tests/e2e/containerd.sh   (root; BUILD_DIR=build by default). Exit 0: every check held.
set -uo pipefail
cd "$(dirname "$0")/../.."
E2E_NAME="CONTAINERD CRI E2E"
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh
# shellcheck source=scripts/lib/containerd.sh
source scripts/lib/containerd.sh
command -v containerd >/dev/null || skip "containerd is not installed (scripts/setup.sh installs it)"
command -v runc >/dev/null || skip "runc is not installed"
CRI=$BUILD_DIR/tests/cri/cri_client
[ -x "$CRI" ] || skip "no cri_client in $BUILD_DIR (needs the CRI api.proto and grpc++: scripts/setup.sh)"
KUBE_SERVER=$BUILD_DIR/tests/kube-testserver
CONTAINERD_PID="" KUBE_PID=""

cleanup() {
  set +e
  if [ -S "$DIR/containerd.sock" ]; then
    for s in $("$CRI" --socket "$DIR/containerd.sock" version >/dev/null 2>&1 && ls "$DIR/sandboxes" 2>/dev/null); do
      "$CRI" --socket "$DIR/containerd.sock" remove-pod --sandbox "$s" >/dev/null 2>&1
    done
  fi
  [ -n "$CONTAINERD_PID" ] && kill "$CONTAINERD_PID" 2>/dev/null && sleep 0.5
  [ -n "$CONTAINERD_PID" ] && kill -9 "$CONTAINERD_PID" 2>/dev/null
  pkill -9 -f "containerd-shim-runc-v2 -namespace k8s.io .* -address $DIR/containerd.sock" 2>/dev/null
  [ -n "$KUBE_PID" ] && kill -9 "$KUBE_PID" 2>/dev/null
  node_down
}
trap cleanup EXIT
node_up
mkdir -p "$DIR"/{cni-bin,net.d,logs,image,sandboxes}

# --- the API server, with the pods a scheduler bound to this node
"$KUBE_SERVER" --port-file "$DIR/kube.port" >"$DIR/kube.log" 2>&1 &
KUBE_PID=$!
for _ in $(seq 100); do [ -s "$DIR/kube.port" ] && break; sleep 0.05; done
API=http://127.0.0.1:$(cat "$DIR/kube.port")
api() { curl -s -X "$1" -H 'Content-Type: application/json' "$API$2" ${3:+-d "$3"}; }
cat >"$DIR/kubeconfig" <<CONF
apiVersion: v1
kind: Config
current-context: t
clusters: [{name: t, cluster: {server: "$API"}}]
contexts: [{name: t, context: {cluster: t, user: u}}]
users: [{name: u, user: {}}]
CONF
UID_WEB=6b1f3c1e-0000-4000-8000-$(printf '%012d' $$)
UID_PLAIN=6b1f3c1e-0001-4000-8000-$(printf '%012d' $$)
UID_LATE=6b1f3c1e-0002-4000-8000-$(printf '%012d' $$)
api POST /api/v1/namespaces '{"metadata":{"name":"shop","labels":{"istio.io/dataplane-mode":"ambient"}}}' >/dev/null
api POST /api/v1/namespaces '{"metadata":{"name":"default"}}' >/dev/null
pod_json() {  # NAME UID SA: Pending, no IP yet, as the kubelet finds it
  echo "{\"metadata\":{\"name\":\"$1\",\"uid\":\"$2\"},\"spec\":{\"nodeName\":\"$ID\",\"serviceAccountName\":\"$3\"},\"status\":{\"phase\":\"Pending\"}}"
}
api POST /api/v1/namespaces/shop/pods "$(pod_json web "$UID_WEB" web-sa)" >/dev/null
api POST /api/v1/namespaces/default/pods "$(pod_json plain "$UID_PLAIN" plain-sa)" >/dev/null
api POST /api/v1/namespaces/shop/pods "$(pod_json late "$UID_LATE" late-sa)" >/dev/null

# --- containerd, confined: its CNI dirs are ours (the CRI plugin takes one bin_dir)
for p in bridge host-local loopback; do ln -s "/usr/lib/cni/$p" "$DIR/cni-bin/$p"; done
ln -s "$BUILD_DIR/cni-hook/podsteer-cni" "$DIR/cni-bin/podsteer-cni"
podnet_conflist crbr0 10.215.0.0/24 "$DIR/ipam" "$DIR/cni.sock" >"$DIR/net.d/10-podnet.conflist"
containerd_config "$DIR" "$DIR/cni-bin" "$DIR/net.d" >"$DIR/containerd.toml"
nsenter --net=/var/run/netns/$NODE containerd --config "$DIR/containerd.toml" >"$DIR/containerd.log" 2>&1 &
CONTAINERD_PID=$!
for _ in $(seq 100); do "$CRI" --socket "$DIR/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
make_rootfs "$DIR/image/rootfs"
/usr/bin/python3 tests/e2e/image_archive.py "$DIR/image/rootfs" podsteer.local/busybox:e2e "$DIR/image/busybox.tar" \
  sleep 2147483647
ctr --address "$DIR/containerd.sock" -n k8s.io images import "$DIR/image/busybox.tar" >/dev/null ||
  { echo "ctr images import failed"; exit 1; }

AGENT_FLAGS=(--kubeconfig "$DIR/kubeconfig" --node-name "$ID")
start_agent
start_proxy

run_pod() {  # run_pod NAME NAMESPACE UID COMMAND...: prints the cri_client answer
  local name=$1 ns=$2 uid=$3
  shift 3
  "$CRI" --socket "$DIR/containerd.sock" run-pod --name "$name" --namespace "$ns" --uid "$uid" \
    --cgroup-parent "/$CG_NAME/pods/pod$uid" --log-dir "$DIR/logs/$name" --image podsteer.local/busybox:e2e -- "$@"
}
exec_in() { local c=$1; shift; "$CRI" --socket "$DIR/containerd.sock" exec --container "$c" -- "$@" | jq -r .stdout; }
remove_pod() { "$CRI" --socket "$DIR/containerd.sock" remove-pod --sandbox "$1" >/dev/null && rm -f "$DIR/sandboxes/$1"; }
running() {  # running NAME ANSWER: records the sandbox for cleanup
  local s
  s=$(jq -r .sandbox <<<"$2")
  [ -n "$s" ] && [ "$s" != null ] && touch "$DIR/sandboxes/$s"
  jq -e .ok <<<"$2" >/dev/null
}
set_running() {  # NAME NAMESPACE IP: the kubelet reports the pod Running with its IP
  api PATCH "/api/v1/namespaces/$2/pods/$1/status" "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$3\",\"podIPs\":[{\"ip\":\"$3\"}]}}" >/dev/null
}

echo "containerd CRI e2e ($(containerd --version | awk '{print $3}'), $(runc --version | head -1)):"
WEB_POD=$(run_pod web shop "$UID_WEB" httpd -f -p 9090 -h /www)
running web "$WEB_POD" || fail "RunPodSandbox web: $WEB_POD"
PLAIN_POD=$(run_pod plain default "$UID_PLAIN" httpd -f -p 8080 -h /www)
running plain "$PLAIN_POD" || fail "RunPodSandbox plain: $PLAIN_POD"
WEB=$(jq -r .ip <<<"$WEB_POD") PLAIN=$(jq -r .ip <<<"$PLAIN_POD")
WEB_C=$(jq -r .container <<<"$WEB_POD") PLAIN_C=$(jq -r .container <<<"$PLAIN_POD")
echo "  pods: shop/web $WEB, default/plain $PLAIN"
check "RunPodSandbox of shop/web captured it (the namespace label, from the API)" [ "$(captured)" = "shop/web " ]
check "  ... with its service account from the API (web-sa)" \
  grep -q '"event":"pod_added".*"pod":"shop/web","service_account":"web-sa"' "$DIR/proxy.log"
check "  ... and the CNI_ARGS a kubelet's pod produces (uid $UID_WEB)" \
  [ "$(status_json | jq -r '.pods[0].uid')" = "$UID_WEB" ]

out=$(exec_in "$WEB_C" wget -qO- "http://$PLAIN:8080/")
check "web -> plain (outbound) works" [ "$out" = "hello" ]
check "  ... through the proxy, original destination $PLAIN:8080" \
  grep -q "\"direction\":\"outbound\".*\"original_dst\":\"$PLAIN:8080\"" "$DIR/proxy.log"
seen=$(plain_addr "$(exec_in "$PLAIN_C" wget -qO- "http://$WEB:9090/cgi-bin/who")")
check "plain -> web (inbound) through the proxy, the app sees the real client $PLAIN (saw '$seen')" [ "$seen" = "$PLAIN" ]
check "  ... original destination $WEB:9090 in the proxy's log" grep -q "\"original_dst\":\"$WEB:9090\"" "$DIR/proxy.log"

# the kubelet reports both Running: the Kubernetes path now sees web too, and agrees
set_running web shop "$WEB"
set_running plain default "$PLAIN"
ann=""
for _ in $(seq 50); do
  ann=$(api GET /api/v1/namespaces/shop/pods/web | jq -r '.metadata.annotations["ambient.istio.io/redirection"] // ""')
  [ "$ann" = true ] && break
  sleep 0.1
done
check "the Kubernetes path agrees: shop/web annotated ambient.istio.io/redirection=enabled" [ "$ann" = enabled ]
check "  ... and captured once: one AddWorkload for it" [ "$(grep -c '"event":"pod_added".*"pod":"shop/web"' "$DIR/proxy.log")" = 1 ]
# plain's connection to web was captured at web (inbound), never at plain (outbound)
check "plain's own side is untouched: no connection captured in default/plain" \
  [ "$(grep -c '"event":"connection".*"pod":"default/plain"' "$DIR/proxy.log")" = 0 ]

# plain is labelled into the mesh while it runs: the Kubernetes path captures it (found
# through /proc by its UID); RemovePodSandbox's DEL then releases it by UID
api PATCH /api/v1/namespaces/default/pods/plain '{"metadata":{"labels":{"istio.io/dataplane-mode":"ambient"}}}' >/dev/null
for _ in $(seq 60); do [ "$(captured)" = "default/plain shop/web " ] && break; sleep 0.1; done
check "labelled while running: default/plain captured through the Kubernetes path" [ "$(captured)" = "default/plain shop/web " ]
remove_pod "$(jq -r .sandbox <<<"$PLAIN_POD")"
check "RemovePodSandbox of plain released it (DEL matched by UID)" [ "$(captured)" = "shop/web " ]
remove_pod "$(jq -r .sandbox <<<"$WEB_POD")"
check "RemovePodSandbox of web released it" [ "$(captured)" = "" ]
check "  ... and the proxy was told" grep -q '"event":"pod_removed".*"pod":"shop/web"' "$DIR/proxy.log"

# the agent goes away: RunPodSandbox fails (the kubelet retries), nothing runs uncaptured
stop_agent
LATE_POD=$(run_pod late shop "$UID_LATE" httpd -f -p 9090 -h /www)
running late "$LATE_POD" && fail "RunPodSandbox with the agent down succeeded" ||
  pass "RunPodSandbox with the agent down fails ($(jq -r .error <<<"$LATE_POD" | grep -o 'podsteer[^:]*' | head -1))"
n=$(snapshots)
start_agent
proxy_resynced "$n"
LATE_POD=$(run_pod late shop "$UID_LATE" httpd -f -p 9090 -h /www)
running late "$LATE_POD" || fail "RunPodSandbox late (agent back): $LATE_POD"
check "the kubelet's retry, with the agent back, starts it captured" [ "$(captured)" = "shop/late " ]
remove_pod "$(jq -r .sandbox <<<"$LATE_POD")"
check "every pod removed: nothing captured" [ "$(captured)" = "" ]

kill "$CONTAINERD_PID"
wait "$CONTAINERD_PID" 2>/dev/null
CONTAINERD_PID=""
check "no containerd shim left" [ -z "$(pgrep -f "containerd-shim-runc-v2 .*-address $DIR/containerd.sock")" ]
check_nothing_left
finish
