#!/usr/bin/env bash
# podsteer on a real Kubernetes node, run by a real kubelet: the components are built from
# their Go modules (tests/cluster/build-components.sh, cached), the podsteer image from
# deploy/Dockerfile with podman (tests/cluster/build-image.sh), helm from its Go module
# (tests/cluster/build-helm.sh), and podsteer is installed as the README says (helm install
# with deploy/charts/podsteer, proxy.enabled for a node proxy, podsteer-proxy standing in for
# ztunnel), upgraded with helm upgrade and removed with helm uninstall. The node is confined as every test here
# is: its own network namespace (an address on a veth pair inside it, no host interface
# touched), its own mount namespace (/run, /var/log and bpffs are private: the DaemonSets'
# hostPaths land there), its own cgroups (the kubelet's cgroupRoot), state and logs under
# /tmp/podsteer-cluster-ID.
#
# Checks, through the API and from inside pods:
#   the agent DaemonSet Ready as the manifest gives it (not privileged; the API server refuses
#   privileged containers here); an ambient pod captured at sandbox creation, annotated as
#   istiod expects, outbound and inbound through the proxy with the client's address kept; a
#   plain pod untouched; httpGet and tcpSocket probes passing, also with the proxy refusing
#   plaintext inbound (--strict); no hole counted for the pods' own traffic, and a process
#   entered into a pod's netns from the node stopped and reported as one; delete releases,
#   labelling captures; a rolling update of the
#   agent under continuous connections; the agent's RBAC; removal as the README says.
#
# usage: scripts/cluster-e2e.sh [--keep]
#   --keep   leave the node up and print how to reach it (kubectl, and how to take it down)
#   --down DIR   take down a node left with --keep
# Exit 0: every check held. Needs root; skips loudly without it.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
E2E_NAME="CLUSTER E2E"

if [ -z "${PODSTEER_CLUSTER_INNER:-}" ]; then
  [ "$(id -u)" = 0 ] || { echo; echo "*** SKIPPING $E2E_NAME: needs root ***"; echo; exit 0; }
  if [ "${1:-}" = --down ]; then
    d=${2:?--down DIR}
    [ -f "$d/inner.pid" ] && kill "$(cat "$d/inner.pid")" 2>/dev/null
    for _ in $(seq 120); do [ -e "$d" ] || exit 0; sleep 0.5; done
    echo "cluster-e2e: $d is still there"; exit 1
  fi
  scripts/setup.sh >/dev/null || exit 2
  t0=$SECONDS
  BIN=$(tests/cluster/build-components.sh) || { echo "cluster-e2e: building the Kubernetes components failed"; exit 1; }
  HELM=$(tests/cluster/build-helm.sh) || { echo "cluster-e2e: building helm failed"; exit 1; }
  t_components=$((SECONDS - t0))
  VERSION=$(sed -nE 's/^project\(podsteer VERSION ([0-9.]+).*/\1/p' CMakeLists.txt)
  ID=c$$
  DIR=/tmp/podsteer-cluster-$ID
  mkdir -p "$DIR/logs"
  t0=$SECONDS
  tests/cluster/build-image.sh "$VERSION" "$DIR/podsteer.tar" >"$DIR/logs/image-build.log" 2>&1 ||
    { echo "cluster-e2e: the image did not build:"; tail -30 "$DIR/logs/image-build.log"; rm -rf "$DIR"; exit 1; }
  t_image=$((SECONDS - t0))
  echo "cluster-e2e: components ready in ${t_components}s, image built in ${t_image}s"
  # the kubelet rewrites machine-wide sysctls (protectKernelDefaults: false): put them back after
  sysctls=(vm.overcommit_memory kernel.panic kernel.panic_on_oops)
  saved=()
  for s in "${sysctls[@]}"; do saved+=("$s=$(sysctl -n "$s")"); done
  CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
  export PODSTEER_CLUSTER_INNER=1 BIN HELM VERSION ID DIR CG2 CG_NAME=podsteer-cluster-$ID
  # the node's namespaces: everything below runs in them (unshare execs: $inner is the inner
  # script); a TERM or INT here is passed on, and the cleanup below runs whatever happens
  unshare --mount --propagation private --net -- "$0" "$@" &
  inner=$!
  trap 'kill -TERM "$inner" 2>/dev/null' TERM INT
  rc=0
  wait "$inner" || rc=$?
  while kill -0 "$inner" 2>/dev/null; do wait "$inner" || rc=$?; done
  for s in "${saved[@]}"; do sysctl -q -w "$s" >/dev/null; done
  if [ -d "$DIR" ] && [ ! -f "$DIR/kept" ]; then
    # anything of the node's still running (the inner teardown did not finish), then the
    # cgroups the kubelet made (every controller's hierarchy and cgroup2's): the namespaces
    # go with their last process
    pkill -9 -f -- "$DIR" 2>/dev/null
    sleep 0.5
    source scripts/lib/cleanup.sh
    remove_cgroup /sys/fs/cgroup/*/"$CG_NAME" "$CG2/$CG_NAME"
    rm -rf "$DIR"
  fi
  exit $rc
fi

# ---------------------------------------------------------------- inside the node's namespaces
# shellcheck source=scripts/lib/cleanup.sh
source scripts/lib/cleanup.sh
# shellcheck source=scripts/lib/podman.sh
source scripts/lib/podman.sh  # make_rootfs
# shellcheck source=scripts/lib/containerd.sh
source scripts/lib/containerd.sh
NODE_NAME=e2e-node
# shellcheck source=tests/cluster/node.sh
source tests/cluster/node.sh
echo $$ >"$DIR/inner.pid"
failures=0
pass() { echo "  ok    $*"; }
fail() { echo "  FAIL  $*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
not() { ! "$@"; }

# The node's private world: a mount namespace whose mounts propagate among themselves only
# (the kubelet's HostToContainer volumes need shared mounts), with /run (ztunnel's and
# podsteer's sockets, the pods' netns), /var/log, /var/lib and /sys/fs/bpf of its own.
mount --make-rshared /
mount -t tmpfs tmpfs /run
mkdir -p /run/netns /run/lock "$DIR/varlog"
mount --bind "$DIR/varlog" /var/log
# /var/lib too: the kubelet keeps its device-plugin socket at /var/lib/kubelet/device-plugins
# whatever its --root-dir, and libcni caches results in /var/lib/cni (the node's containerd
# keeps its own root below $DIR)
mount -t tmpfs tmpfs /var/lib
mount -t bpf bpf /sys/fs/bpf
node_network

teardown() {
  set +e
  if [ "$KEEP" = 1 ]; then return; fi
  stop_node
  unmount_under "$DIR"
}
KEEP=0
[ "${1:-}" = --keep ] && KEEP=1
trap teardown EXIT
trap 'exit 143' TERM INT  # so that the EXIT trap runs

make_pki
start_control_plane || { tail -20 "$LOGS"/kube-apiserver.log; exit 1; }
start_containerd || exit 1
# images: podsteer's as built from deploy/Dockerfile, and busybox for the pods (and sandboxes)
ctr_k8s images import "$DIR/podsteer.tar" >/dev/null || { echo "cluster-e2e: ctr images import failed"; exit 1; }
make_rootfs "$DIR/busybox"
printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\nfor i in $(seq 30); do echo $i; sleep 1; done\n' \
  >"$DIR/busybox/www/cgi-bin/slow"
chmod +x "$DIR/busybox/www/cgi-bin/slow"
for a in seq timeout; do ln -sf busybox "$DIR/busybox/bin/$a"; done
python3 tests/e2e/image_archive.py "$DIR/busybox" podsteer.local/busybox:e2e "$DIR/busybox.tar" sleep 2147483647
ctr_k8s images import "$DIR/busybox.tar" >/dev/null || exit 1
start_kubelet || { tail -30 "$LOGS/kubelet.log"; exit 1; }
start_kube_proxy
node_ready() { [ "$(k get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
wait_for 60 "the node Ready" node_ready ||
  { tail -30 "$LOGS/kubelet.log"; exit 1; }
echo "cluster-e2e: node $NODE_NAME Ready ($("$BIN/kubectl" version --client -o json | jq -r .clientVersion.gitVersion), containerd $(containerd --version | awk '{print $3}'))"
# where containerd and runc put a pod's processes in the cgroup2 hierarchy on this machine
HOOK_CGROUP=$CG2/$CG_NAME/kubepods
[ -d "$HOOK_CGROUP" ] || { echo "cluster-e2e: no $HOOK_CGROUP: the kubelet's pods are elsewhere"; ls "$CG2/$CG_NAME"; exit 1; }

# ---------------------------------------------------------------- podsteer, as the README installs it
# helm install with the chart; the values a user of this node sets: its CNI directories and
# the cgroup its pods are under; podsteer-proxy as the node proxy. The image is the chart's
# (its appVersion: this version).
h() { "$HELM" --kubeconfig "$DIR/admin.conf" "$@"; }
check "the chart names the image of this version (appVersion $VERSION)" \
  grep -q "^appVersion: \"$VERSION\"" deploy/charts/podsteer/Chart.yaml
h install podsteer deploy/charts/podsteer -n podsteer-system --create-namespace --set cniConfDir="$CNI_CONF" \
  --set cniBinDir="$CNI_BIN" --set datapath.hookCgroup="$HOOK_CGROUP" --set proxy.enabled=true \
  --set 'excludeNamespaces={kube-system,infra}' >"$LOGS/helm-install.log" 2>&1 ||
  { echo "helm install failed:"; cat "$LOGS/helm-install.log"; exit 1; }
check "helm lists the release as deployed" grep -q deployed <<<"$(h -n podsteer-system list -o json | jq -r '.[0].status')"
ds_ready() { k -n podsteer-system rollout status "ds/$1" --timeout="${2:-120}s" >/dev/null; }
agent_logs() { k -n podsteer-system logs ds/podsteer-agent --tail=-1 2>/dev/null; }
proxy_logs() { k -n podsteer-system logs ds/podsteer-proxy --tail=-1 2>/dev/null; }
check "the agent DaemonSet becomes Ready" ds_ready podsteer-agent 180
check "the proxy DaemonSet becomes Ready" ds_ready podsteer-proxy
unprivileged() {
  k -n podsteer-system get pod -l app=podsteer-agent -o json | jq -e '.items[0].spec.containers[0].securityContext |
    (.privileged != true) and (.capabilities.add | index("SYS_ADMIN")) and (.capabilities.drop == ["ALL"])' >/dev/null
}
check "the agent runs as the manifest says: not privileged, capabilities as given" unprivileged
check "the API server refuses a privileged container (so none runs here)" \
  not k run priv --image=podsteer.local/busybox:e2e --privileged --restart=Never -- true 2>/dev/null
agent_pod() { k -n podsteer-system get pod -l app=podsteer-agent -o jsonpath='{.items[0].metadata.name}'; }
in_agent() { k -n podsteer-system exec "$(agent_pod)" -- "$@"; }
check "podsteer --version in the image says $VERSION" grep -q "$VERSION" <<<"$(in_agent podsteer --version)"
# the agent is hostNetwork: its /metrics is on the node's loopback, which is this netns's
check "podsteer_build_info carries the version" \
  grep -q "podsteer_build_info{version=\"$VERSION\"} 1" <<<"$(curl -s http://127.0.0.1:15099/metrics)"
# Prometheus' way: the pod's scrape annotations lead to the node's address, where /metrics
# (and nothing else) answers
scrape_target() {
  k -n podsteer-system get pod "$(agent_pod)" -o json |
    jq -r '.metadata.annotations | select(."prometheus.io/scrape" == "true") | "\(."prometheus.io/port")\(."prometheus.io/path")"'
}
target=$(scrape_target)
check "the agent's pod carries prometheus.io/scrape, port and path (${target:-none})" test "$target" = "15014/metrics"
check "/metrics answers on the node's address at that port" \
  grep -q "podsteer_build_info{version=\"$VERSION\"} 1" <<<"$(curl -s "http://$NODE_IP:15014/metrics")"
check "the log level cannot be changed there (only from the node's loopback)" \
  test "$(curl -s -o /dev/null -w '%{http_code}' -d level=debug "http://$NODE_IP:15014/logging")" = 404
chained() { jq -e '.plugins | map(.type) | index("podsteer-cni")' "$CNI_CONF/10-bridge.conflist" >/dev/null; }
excluded_in_plugin() {
  jq -e '.plugins[] | select(.type == "podsteer-cni") | .enrollment.excludeNamespaces == ["kube-system", "infra"]' \
    "$CNI_CONF/10-bridge.conflist" >/dev/null
}
check "podsteer-cni is chained into the primary CNI's conflist" chained
check "with the chart's excludeNamespaces in its config" excluded_in_plugin

# ---------------------------------------------------------------- pods
pod() {  # pod NAMESPACE NAME COMMAND [noprobes]: a busybox pod, with probes on the app's own port
  local probes="    readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 2}
    livenessProbe: {tcpSocket: {port: 8080}, periodSeconds: 2, failureThreshold: 2}"
  [ "${4:-}" = noprobes ] && probes=""
  cat <<YAML | k apply -f - >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: $2, namespace: $1, labels: {app: $2}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: podsteer.local/busybox:e2e
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "$3"]
$probes
YAML
}
ready() { k -n "$1" wait --for=condition=Ready "pod/$2" --timeout="${3:-90}s" >/dev/null; }
ip_of() { k -n "$1" get pod "$2" -o jsonpath='{.status.podIP}'; }
annotation() { k -n "$1" get pod "$2" -o jsonpath='{.metadata.annotations.ambient\.istio\.io/redirection}'; }
in_pod() { local ns=$1 p=$2; shift 2; k -n "$ns" exec "$p" -- "$@"; }
# busybox's wget crashes on its own -T (Debian's static build): timeout bounds it instead
fetch() { local ns=$1 p=$2; shift 2; in_pod "$ns" "$p" timeout "${T:-5}" wget -qO- "$@"; }
HTTPD="httpd -f -p 8080 -h /www"

k create namespace shop >/dev/null
k label namespace shop istio.io/dataplane-mode=ambient >/dev/null
k create namespace plain >/dev/null
# labelled ambient, but one of the chart's excludeNamespaces
k create namespace infra >/dev/null
k label namespace infra istio.io/dataplane-mode=ambient >/dev/null
pod infra tool "$HTTPD" noprobes
pod shop server "$HTTPD"
pod shop client "$HTTPD"
pod plain web "$HTTPD"
pod plain other "$HTTPD"
both_ready() { ready "$1" "$2" && ready "$1" "$3"; }
check "the ambient pods start and pass their probes" both_ready shop server client
check "the plain pods start" both_ready plain web other
SERVER=$(ip_of shop server) CLIENT=$(ip_of shop client) WEB=$(ip_of plain web) OTHER=$(ip_of plain other)
annotated() { [ "$(annotation "$1" "$2")" = enabled ]; }
both_annotated() { annotated "$1" "$2" && annotated "$1" "$3"; }
check "the ambient pod is annotated ambient.istio.io/redirection=enabled" wait_for 30 "annotation" annotated shop server
check "the plain pod is not annotated" test -z "$(annotation plain web)"
check "a pod in an excluded namespace starts, labelled ambient as it is" ready infra tool
check "and is not captured (not annotated)" test -z "$(annotation infra tool)"

# the proxy's log lines of this event that match (jq -e alone passes on no input)
proxy_events() {  # proxy_events JQ_CONDITION
  proxy_logs | jq -R -c "fromjson? | select($1)" 2>/dev/null
}
proxied() {  # proxied DIRECTION POD_NS/NAME DST: the proxy logged such a connection
  proxy_events ".event == \"connection\" and .direction == \"$1\" and .pod == \"$2\" and (.original_dst | startswith(\"$3:\"))" | grep -q .
}
who=$(fetch shop client "http://$SERVER:8080/cgi-bin/who" 2>&1)
check "client -> server answers, and the app sees the client's address ($who)" test "$(plain_addr "$who")" = "$CLIENT"
check "the connection went out through the proxy" wait_for 10 "outbound log" proxied outbound shop/client "$SERVER"
check "and in through the proxy" wait_for 10 "inbound log" proxied inbound shop/server "$SERVER"
who=$(fetch plain other "http://$WEB:8080/cgi-bin/who" 2>&1)
check "plain -> plain answers directly ($who)" test "$(plain_addr "$who")" = "$OTHER"
check "and the proxy never saw it" not proxied outbound plain/other "$WEB"
# the proxy mark is trusted from the proxy pod's process only (the agent found its cgroup
# from SO_PEERCRED, through the kubelet's and containerd's cgroup layout)
trusted() { in_agent podsteer status --json | jq -e '.proxy_identity == "process" and (.proxies | length) >= 1' >/dev/null; }
check "the agent trusts the proxy mark from the proxy pod's process only" trusted

# ---------------------------------------------------------------- labelling and deleting
k -n plain label pod web istio.io/dataplane-mode=ambient >/dev/null
check "labelling a running pod captures it (annotated)" wait_for 30 "annotation" annotated plain web
fetch shop client "http://$WEB:8080/" >/dev/null 2>&1
check "and its inbound now passes the proxy" wait_for 10 "inbound log" proxied inbound plain/web "$WEB"
# a running pod under Istio's in-pod rules (istio-cni's, as tests/lib/istio-inpod.sh applies
# them), then labelled: podsteer captures it and Istio's chains leave its netns
pod plain istioed "$HTTPD"
ready plain istioed >/dev/null
ISTIOED=$(ip_of plain istioed)
pid_of() {  # the pid of a pod's app container, by the pod's name
  local id
  id=$(k -n "$1" get pod "$2" -o jsonpath='{.status.containerStatuses[0].containerID}')
  ctr_k8s tasks ls | awk -v id="${id#containerd://}" '$1 == id {print $2}'
}
ISTIOED_NS=/proc/$(pid_of plain istioed)/ns/net
tests/lib/istio-inpod.sh apply "$ISTIOED_NS"
istio_chains() { nsenter --net="$ISTIOED_NS" iptables-save -t nat | grep -q ':ISTIO_'; }
check "Istio's in-pod rules are in the pod's netns" istio_chains
k -n plain label pod istioed istio.io/dataplane-mode=ambient >/dev/null
check "labelled, the pod is captured (annotated)" wait_for 30 "annotation" annotated plain istioed
check "and Istio's nat chains are gone from its netns" wait_for 10 "chains removed" not istio_chains
inbound_to() { proxy_events ".event == \"connection\" and .direction == \"inbound\" and (.original_dst | startswith(\"$1:\"))" | grep -c .; }
fetch shop client "http://$ISTIOED:8080/" >/dev/null 2>&1
sleep 1
check "a new connection to it passes the proxy once ($(inbound_to "$ISTIOED") inbound)" test "$(inbound_to "$ISTIOED")" = 1

# no false hole: every connection the captured pods made so far (the apps' through kubectl
# exec, which containerd puts in the container's cgroup; the kubelet's probes; the proxy's
# upstream connections from its own pod) was steered by the hooks or was the proxy's
no_hole() { in_agent podsteer status --json | jq -e '[.pods[].guard.unsteered_dropped] | add == 0' >/dev/null; }
check "no connection of a captured pod left it unsteered so far (no hole counted)" no_hole
# a process entered into the client pod's netns from the node (nsenter --net: in this
# script's cgroup, not below kubepods) is not seen by the socket hooks; the pod's TC egress
# check stops its SYN, and the agent reports the hole where an operator looks
CLIENT_NS=/proc/$(pid_of shop client)/ns/net
check "a process entered into the ambient pod's netns from the node does not reach the server" \
  not nsenter --net="$CLIENT_NS" curl -s -o /dev/null -m 3 "http://$SERVER:8080/"
client_holes() {
  in_agent podsteer status --json | jq -e '.pods[] | select(.pod == "shop/client") | .guard.unsteered_dropped == 1' >/dev/null
}
check "the agent counts it as a hole in that pod (podsteer status)" wait_for 10 "hole count" client_holes
hole_metric() {
  grep -q 'podsteer_pod_guard_total{kind="unsteered_dropped",namespace="shop",pod="client"} 1' \
    <<<"$(curl -s "http://$NODE_IP:15014/metrics")"
}
check "and in /metrics on the node's address" wait_for 10 "hole metric" hole_metric
hole_logged() { agent_logs | grep -q 'hole: shop/client: 1 TCP connection(s) left the pod without the socket hooks'; }
check "and warns in its log" wait_for 10 "hole log" hole_logged
check "while the app itself still reaches the server, steered" test "$(plain_addr "$(fetch shop client "http://$SERVER:8080/cgi-bin/who" 2>&1)")" = "$CLIENT"

pod shop gone "$HTTPD"
ready shop gone >/dev/null
GONE_UID=$(k -n shop get pod gone -o jsonpath='{.metadata.uid}')
# what the agent holds, by pod uid (podsteer status --json in the agent's container)
holds() { in_agent podsteer status --json | jq -e --arg u "$1" '[.pods[] | select(.uid == $u)] | length == 1' >/dev/null; }
check "a new ambient pod is held by the agent" wait_for 30 "capture" holds "$GONE_UID"
k -n shop delete pod gone --wait=true >/dev/null
released() { in_agent podsteer status --json | jq -e --arg u "$1" '[.pods[] | select(.uid == $u)] | length == 0' >/dev/null; }
check "deleting it releases it (the agent no longer holds it)" wait_for 30 "release" released "$GONE_UID"
told() { proxy_events '.event == "pod_removed" and .pod == "shop/gone"' | grep -q .; }
check "and the proxy was told (pod_removed)" wait_for 10 "pod_removed" told

# ---------------------------------------------------------------- a rolling update of the agent
# a pod that connects to the server every 200 ms, and one whose connection lasts 30 s,
# across the update (their logs say how each went)
pod shop looper "while :; do if timeout 3 wget -qO- http://$SERVER:8080/ >/dev/null 2>&1; then echo ok; else echo FAIL; fi; sleep 0.2; done" noprobes
pod shop slow "wget -qO- http://$SERVER:8080/cgi-bin/slow; echo done; sleep 3600" noprobes
both_ready shop looper slow
loops() { k -n shop logs looper | grep -c "$1"; }
looping() { [ "$(loops ok)" -gt 5 ]; }
wait_for 30 "the looper's first connections" looping
ctr_k8s images tag "podsteer.local/podsteer:$VERSION" "podsteer.local/podsteer:$VERSION-e2e.2" >/dev/null
h upgrade podsteer deploy/charts/podsteer -n podsteer-system --reuse-values --set tag="$VERSION-e2e.2" --set proxy.tag="$VERSION" \
  >"$LOGS/helm-upgrade.log" 2>&1 || { echo "helm upgrade failed:"; cat "$LOGS/helm-upgrade.log"; }
check "the agent DaemonSet rolls to the new tag" ds_ready podsteer-agent 180
sleep 3
check "no connection failed during the rolling update ($(loops ok) made, $(loops FAIL) failed)" test "$(loops FAIL)" = 0
slow_done() { k -n shop logs slow | grep -qx done; }
wait_for 40 "the slow download" slow_done
check "a connection open across the update finished whole (30 lines)" test "$(k -n shop logs slow | grep -cE '^[0-9]+$')" = 30
k -n shop delete pod looper slow --wait=false >/dev/null
check "no pod was released by the update (still annotated)" both_annotated shop server client
check "the new agent holds the pods" holds "$(k -n shop get pod server -o jsonpath='{.metadata.uid}')"

# ---------------------------------------------------------------- probes with a strict proxy
k -n podsteer-system patch ds podsteer-proxy --type json \
  -p '[{"op": "add", "path": "/spec/template/spec/containers/0/command/-", "value": "--strict"}]' >/dev/null
check "the proxy rolls to --strict (plaintext inbound refused, as ztunnel under STRICT)" ds_ready podsteer-proxy
sleep 8
check "a plaintext connection to the ambient pod is now refused" not fetch shop client "http://$SERVER:8080/"
restarts() { k -n shop get pod server -o jsonpath='{.status.containerStatuses[0].restartCount}'; }
ready_unrestarted() { ready shop server 5 && [ "$(restarts)" = 0 ]; }
check "the kubelet's probes still pass: Ready, never restarted" ready_unrestarted
check "and the kubelet logged no failed probe" test -z "$(k -n shop get events --field-selector reason=Unhealthy -o name)"

# ---------------------------------------------------------------- RBAC
as_agent() { k auth can-i --as=system:serviceaccount:podsteer-system:podsteer-agent "$@" >/dev/null 2>&1; }
for v in "list pods" "watch pods" "get pods" "patch pods --subresource=status" "list namespaces" "watch namespaces" \
  "get daemonsets.apps/podsteer-agent -n podsteer-system"; do
  # shellcheck disable=SC2086
  check "the agent's account may: $v" as_agent $v
done
for v in "patch pods" "create pods" "delete pods" "get secrets" "list secrets -n podsteer-system" "update daemonsets -n podsteer-system" \
  "patch namespaces" "get daemonsets.apps/other -n podsteer-system" "create pods/exec"; do
  # shellcheck disable=SC2086
  check "the agent's account may not: $v" not as_agent $v
done

# ---------------------------------------------------------------- a node whose agent is away
# The agent's pod leaves the node (its DaemonSet now selects another label) with the
# DaemonSet still there: podsteer-cni stays in the chain and, with no agent to ask, asks the
# API server itself (https through the kubernetes Service, the agent's token and CA)
k -n podsteer-system patch ds podsteer-agent --type merge \
  -p '{"spec": {"template": {"spec": {"nodeSelector": {"podsteer-e2e/away": "true"}}}}}' >/dev/null
gone_agent() { [ -z "$(agent_pod)" ]; }
wait_for 60 "the agent pod gone" gone_agent
pod plain late "$HTTPD"
check "with the agent away, a pod outside the mesh starts (podsteer-cni asked the API)" ready plain late 60
pod shop waiting "$HTTPD"
sleep 10
refused() { k -n shop get events --field-selector involvedObject.name=waiting,reason=FailedCreatePodSandBox -o json | jq -e '[.items[] | select(.message | contains("podsteer"))] | length > 0' >/dev/null; }
check "and an ambient pod does not start uncaptured (sandbox refused by podsteer-cni)" refused
k -n podsteer-system patch ds podsteer-agent --type json -p '[{"op": "remove", "path": "/spec/template/spec/nodeSelector/podsteer-e2e~1away"}]' >/dev/null
check "the agent back, the ambient pod starts" ready shop waiting 120
check "captured" wait_for 30 "annotation" annotated shop waiting

# ---------------------------------------------------------------- removal, as the README says
agent_logs >"$LOGS/agent.log"
# the agent's last words (it cleans up after its DaemonSet is gone)
k -n podsteer-system logs -f "$(agent_pod)" >"$LOGS/agent-removal.log" 2>&1 &
follow=$!
h uninstall podsteer -n podsteer-system --wait --timeout 120s >"$LOGS/helm-uninstall.log" 2>&1 ||
  { echo "helm uninstall failed:"; cat "$LOGS/helm-uninstall.log"; }
gone_agent_pods() { [ -z "$(k -n podsteer-system get pods -o name 2>/dev/null)" ]; }
wait_for 120 "the agent's and proxy's pods gone" gone_agent_pods
wait "$follow" 2>/dev/null
check "helm uninstall's pre-delete hook let the agent clean up before its RBAC went (no request denied)" \
  not grep -q "HTTP 403" "$LOGS/agent-removal.log"
check "removal takes podsteer-cni out of the chain" not chained
ours_in_cni=$(find "$CNI_CONF" "$CNI_BIN" -name '*podsteer*' -printf '%f ')
check "no podsteer files left in the CNI dirs ($ours_in_cni)" test -z "$ours_in_cni"
check "no pins left" not grep -q podsteer <<<"$(ls /sys/fs/bpf)"
check "no program at the hook cgroup" not grep -q podsteer <<<"$(bpftool cgroup show "$HOOK_CGROUP" 2>&1)"
tc_left() {  # every running pod's interfaces: no TC filter of ours
  local pid
  for pid in $(ctr_k8s tasks ls | awk 'NR > 1 && $3 == "RUNNING" {print $2}'); do
    nsenter -t "$pid" -n tc filter show dev eth0 ingress 2>/dev/null | grep -q podsteer && return 0
  done
  return 1
}
check "no TC filter left on any pod's interface" not tc_left
check "the pods are released (no annotation)" test -z "$(annotation shop server)"
who=$(fetch shop client "http://$SERVER:8080/cgi-bin/who" 2>&1)
check "and keep working, directly ($who)" test "$(plain_addr "$who")" = "$CLIENT"
pod shop after "$HTTPD"
check "a new ambient pod starts (nothing fails closed)" ready shop after

if [ "$KEEP" = 1 ]; then
  touch "$DIR/kept"
  echo
  echo "cluster-e2e: the node stays up ($DIR). Reach it with"
  echo "  nsenter --mount=/proc/$$/ns/mnt --net=/proc/$$/ns/net $BIN/kubectl --kubeconfig $DIR/admin.conf get pods -A"
  echo "and take it down with: scripts/cluster-e2e.sh --down $DIR"
  trap - EXIT
  # keep this process (and so the namespaces) alive until --down kills it
  trap 'stop_node; unmount_under "$DIR"; exit 0' TERM
  while :; do sleep 3600 & wait $!; done
fi
echo
if [ "$failures" -gt 0 ]; then
  echo "$E2E_NAME: $failures check(s) FAILED"
  [ -s "$LOGS/agent.log" ] || agent_logs >"$LOGS/agent.log"
  echo "--- agent log (tail)"; tail -30 "$LOGS/agent.log"
  [ -s "$LOGS/agent-removal.log" ] && { echo "--- agent log at removal (tail)"; tail -15 "$LOGS/agent-removal.log"; }
  for f in kubelet containerd kube-apiserver kube-controller-manager; do
    echo "--- $f log (last errors)"; grep -E '^E[0-9]|level=error' "$LOGS/$f.log" | tail -8 | cut -c1-400
  done
  exit 1
fi
echo "$E2E_NAME: every check held"
