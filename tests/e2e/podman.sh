#!/usr/bin/env bash
# A real container runtime creates the pods: podman 4.3 (CNI backend, runc) runs busybox
# containers whose network comes from a conflist we control - bridge + host-local, then
# podsteer-cni - with all of its networking confined to a "node" netns, podsteer-agent
# and podsteer-proxy serving them. Shows:
#   - an enrolled container's outbound and inbound connections go through the proxy (its
#     log names the original destinations), and its app sees the real client's address
#   - a plain container is untouched
#   - podman rm runs DEL: the pod is released and the proxy told
#   - a container started while the agent is down never runs uncaptured (its start fails;
#     started again with the agent back, it is captured)
#   - nothing is left behind, podman's own state included
# podman runs with private containers.conf and storage.conf (no host config is read or
# written), its image imported from Debian's busybox-static (no registry needed), every call
# in the node netns (scripts/lib/podman.sh).
#
# Usage: tests/e2e/podman.sh   (root; BUILD_DIR=build by default). Exit 0: every check held.
set -uo pipefail
cd "$(dirname "$0")/../.."
E2E_NAME="PODMAN E2E"
# shellcheck source=tests/e2e/lib.sh
source tests/e2e/lib.sh
command -v podman >/dev/null || skip "podman is not installed (scripts/setup.sh installs it)"
command -v runc >/dev/null || skip "runc is not installed"

PODMAN_DIR=$DIR/podman
cleanup() {
  podman_teardown
  node_down
}
trap cleanup EXIT
node_up
mkdir -p "$DIR/cni/net.d"
podnet_conflist psbr0 10.213.0.0/24 "$DIR/ipam" "$DIR/cni.sock" '"enrollNamespaces": ["ambient"]' \
  >"$DIR/cni/net.d/podnet.conflist"
podman_setup "$DIR/cni/net.d" "$BUILD_DIR/cni-hook" /usr/lib/cni || { echo "podman setup failed"; exit 1; }

start_agent
start_proxy

run_pod() {  # run_pod NAME NAMESPACE COMMAND...: a container as a pod of that namespace
  local name=$1 ns=$2
  shift 2
  # podman passes K8S_POD_NAME=<name> and appends $CNI_ARGS
  CNI_ARGS="K8S_POD_NAMESPACE=$ns;K8S_POD_UID=uid-$ID-$name" pm run -d --name "$name" --network podnet \
    --cgroup-parent "/$CG_NAME/pods" localhost/podsteer-busybox:latest "$@"
}
ip_of() { pm inspect -f '{{.NetworkSettings.Networks.podnet.IPAddress}}' "$1"; }

echo "podman e2e ($(podman --version), $(runc --version | head -1)):"
run_pod web ambient httpd -f -p 9090 -h /www >/dev/null || fail "podman run web"
run_pod plain default httpd -f -p 8080 -h /www >/dev/null || fail "podman run plain"
run_pod plain2 default httpd -f -p 8080 -h /www >/dev/null || fail "podman run plain2"
echo hello-from-web | pm exec -i web sh -c 'cat > /www/index.html'
echo hello-from-plain2 | pm exec -i plain2 sh -c 'cat > /www/index.html'
WEB=$(ip_of web) PLAIN=$(ip_of plain) PLAIN2=$(ip_of plain2)
echo "  pods: web $WEB (ambient), plain $PLAIN, plain2 $PLAIN2 (default)"
check "the enrolled container is captured, the plain ones are not" [ "$(captured)" = "ambient/web " ]
check "its cgroup is under the hook cgroup" grep -q "$CG_NAME/pods" "/proc/$(pm inspect -f '{{.State.Pid}}' web)/cgroup"

out=$(pm exec web wget -qO- "http://$PLAIN:8080/" 2>&1)
check "web -> plain (outbound) works" [ "$out" = "hello" ]
check "  ... through the proxy, original destination $PLAIN:8080" \
  grep -q "\"direction\":\"outbound\".*\"original_dst\":\"$PLAIN:8080\"" "$DIR/proxy.log"
out=$(pm exec plain wget -qO- "http://$WEB:9090/" 2>&1)
check "plain -> web (inbound) works" [ "$out" = "hello-from-web" ]
check "  ... through the proxy, original destination $WEB:9090" grep -q "\"original_dst\":\"$WEB:9090\"" "$DIR/proxy.log"
seen=$(plain_addr "$(pm exec plain wget -qO- "http://$WEB:9090/cgi-bin/who" 2>&1)")
check "  ... and the app sees the real client, $PLAIN (it saw '$seen')" [ "$seen" = "$PLAIN" ]
before=$(wc -l <"$DIR/proxy.log")
out=$(pm exec plain wget -qO- "http://$PLAIN2:8080/" 2>&1)
check "plain -> plain2 works" [ "$out" = "hello-from-plain2" ]
check "  ... and the proxy never saw it" [ "$(proxy_connections_since "$before")" = 0 ]

pm rm -f -t 0 web >/dev/null
check "podman rm ran DEL: web released" [ "$(captured)" = "" ]
check "  ... and the proxy was told" grep -q '"event":"pod_removed".*"pod":"ambient/web"' "$DIR/proxy.log"

# the agent goes away; a container starting now must not run uncaptured
stop_agent
if run_pod late ambient httpd -f -p 9090 -h /www >/dev/null 2>"$DIR/late.err"; then
  fail "a container started with the agent down did not fail"
else
  pass "a container started with the agent down fails to start ($(grep -o 'podsteer[^"]*' "$DIR/late.err" | head -1 | cut -c1-80))"
fi
check "  ... and is not running" [ -z "$(pm ps -q --filter name=late)" ]
pm rm -f -t 0 late >/dev/null 2>&1
n=$(snapshots)
start_agent
proxy_resynced "$n"
run_pod late ambient httpd -f -p 9090 -h /www >/dev/null || fail "podman run late (agent back)"
check "with the agent back, it starts captured" [ "$(captured)" = "ambient/late " ]
LATE=$(ip_of late)
pm exec plain wget -qO- "http://$LATE:9090/" >/dev/null 2>&1
check "  ... and serves through the proxy" grep -q "\"original_dst\":\"$LATE:9090\"" "$DIR/proxy.log"

pm rm -af -t 0 >/dev/null
check "every container removed: nothing captured" [ "$(captured)" = "" ]
podman_teardown
check_nothing_left
finish
