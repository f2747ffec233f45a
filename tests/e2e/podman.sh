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
# written), its image imported from Debian's busybox-static (no registry needed).
#
# Usage: tests/e2e/podman.sh   (root; BUILD_DIR=build by default). Exit 0: every check held.
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=$(realpath "${BUILD_DIR:-build}")

skip() { echo; echo "*** SKIPPING PODMAN E2E: $* ***"; echo; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root"
command -v podman >/dev/null || skip "podman is not installed (scripts/setup.sh installs it)"
command -v runc >/dev/null || skip "runc is not installed"
[ -x "$BUILD_DIR/controller/podsteer-agent" ] || { echo "podman e2e: no build in $BUILD_DIR" >&2; exit 2; }

ID=e2e$$
DIR=/tmp/podsteer-test-$ID
NODE=pst-$ID-node
CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG_NAME=podsteer-test-$ID
CG=$CG2/$CG_NAME
STATE=/sys/fs/bpf/podsteer-test-$ID
SUBNET=10.213.0
HTTP_PORT=$((22000 + $$ % 10000))
failures=0
AGENT_PID="" PROXY_PID=""

pass() { echo "  ok    $*"; }
fail() { echo "  FAIL  $*"; failures=$((failures + 1)); }
check() {  # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

pm() {  # podman in the node netns, with our private config and storage only
  CONTAINERS_CONF=$DIR/containers.conf CONTAINERS_STORAGE_CONF=$DIR/storage.conf \
    CONTAINERS_REGISTRIES_CONF=$DIR/registries.conf \
    nsenter --net=/var/run/netns/$NODE podman "$@"
}

start_agent() {
  "$BUILD_DIR/controller/podsteer-agent" --state-dir "$STATE" --hook-cgroup "$CG" \
    --cni-socket "$DIR/cni.sock" --zds-socket "$DIR/zds.sock" --http-port "$HTTP_PORT" \
    --enroll-namespaces ambient >>"$DIR/agent.log" 2>&1 &
  AGENT_PID=$!
  for _ in $(seq 100); do [ -S "$DIR/cni.sock" ] && grep -q "http: /metrics" "$DIR/agent.log" && return; sleep 0.05; done
  echo "agent did not start:"; cat "$DIR/agent.log"
}

cleanup() {
  set +e
  pm rm -af -t 0 >/dev/null 2>&1
  pm system reset -f >/dev/null 2>&1 </dev/null
  [ -n "$PROXY_PID" ] && kill -9 "$PROXY_PID" 2>/dev/null
  [ -n "$AGENT_PID" ] && kill -9 "$AGENT_PID" 2>/dev/null
  "$BUILD_DIR/cli/podsteer" --state-dir "$STATE" uninstall >/dev/null 2>&1
  # anything podman or runc mounted under our dirs
  grep -o " $DIR[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
  for d in "$CG2/$CG_NAME" /sys/fs/cgroup/*/"$CG_NAME"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -9 2>/dev/null
    sleep 0.2
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT

# podman names its pod netns /run/netns/netns-<uuid> (not configurable): all must go again
NETNS_BEFORE=$(ls /run/netns | grep '^netns-' | sort)
mkdir -p "$DIR"/{cni/net.d,storage,run,tmp,image} "$CG/proxy" "$CG/pods"
ip netns add "$NODE" && ip -n "$NODE" link set lo up

# --- podman's private world
cat >"$DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
netns = "private"
[network]
network_backend = "cni"
cni_plugin_dirs = ["$BUILD_DIR/cni-hook", "/usr/lib/cni"]
network_config_dir = "$DIR/cni/net.d"
default_network = "podnet"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$DIR/events.log"
runtime = "runc"
tmp_dir = "$DIR/tmp"
volume_path = "$DIR/storage/volumes"
EOF
cat >"$DIR/storage.conf" <<EOF
[storage]
driver = "overlay"
runroot = "$DIR/run"
graphroot = "$DIR/storage"
EOF
echo 'unqualified-search-registries = []' >"$DIR/registries.conf"
cat >"$DIR/cni/net.d/podnet.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "podnet", "plugins": [
  {"type": "bridge", "bridge": "psbr0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "subnet": "$SUBNET.0/24", "dataDir": "$DIR/ipam"}},
  {"type": "podsteer-cni", "agentSocket": "$DIR/cni.sock", "enrollNamespaces": ["ambient"]}]}
EOF

# an image from Debian's busybox-static: httpd, wget and a shell
mkdir -p "$DIR/image/rootfs/bin" "$DIR/image/rootfs/www" "$DIR/image/rootfs/tmp" "$DIR/image/rootfs/etc"
cp "$(command -v busybox)" "$DIR/image/rootfs/bin/busybox"
for a in sh cat echo wget httpd sleep; do ln -sf busybox "$DIR/image/rootfs/bin/$a"; done
echo hello >"$DIR/image/rootfs/www/index.html"
mkdir -p "$DIR/image/rootfs/www/cgi-bin"  # the app tells whom it sees: busybox httpd CGI
printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n' >"$DIR/image/rootfs/www/cgi-bin/who"
chmod +x "$DIR/image/rootfs/www/cgi-bin/who"
tar -C "$DIR/image/rootfs" -cf "$DIR/image/busybox.tar" .
pm import -q "$DIR/image/busybox.tar" localhost/podsteer-busybox:e2e >/dev/null || { echo "podman import failed"; exit 1; }

# --- the node's agent and proxy
start_agent
nsenter --net=/var/run/netns/$NODE "$BUILD_DIR/proxy/podsteer-proxy" --zds-socket "$DIR/zds.sock" >"$DIR/proxy.log" 2>&1 &
PROXY_PID=$!
echo "$PROXY_PID" >"$CG/proxy/cgroup.procs"
for _ in $(seq 100); do grep -q snapshot_received "$DIR/proxy.log" && break; sleep 0.05; done

run_pod() {  # run_pod NAME NAMESPACE COMMAND...: a container as a pod of that namespace
  local name=$1 ns=$2
  shift 2
  CNI_ARGS="K8S_POD_NAMESPACE=$ns;K8S_POD_UID=uid-$ID-$name" pm run -d --name "$name" --network podnet \
    --cgroup-parent "/$CG_NAME/pods" localhost/podsteer-busybox:e2e "$@"
}
ip_of() { pm inspect -f '{{.NetworkSettings.Networks.podnet.IPAddress}}' "$1"; }
status() { "$BUILD_DIR/cli/podsteer" --state-dir "$STATE" status --json; }
captured() { status | jq -r '.pods[].pod' 2>/dev/null | sort | tr '\n' ' '; }
proxy_saw() { grep -c "$1" "$DIR/proxy.log"; }

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
  grep -q "\"direction\":\"outbound\".*\"original_dst\":\"$PLAIN:8080\"\|\"original_dst\":\"$PLAIN:8080\".*outbound" "$DIR/proxy.log"
out=$(pm exec plain wget -qO- "http://$WEB:9090/" 2>&1)
check "plain -> web (inbound) works" [ "$out" = "hello-from-web" ]
check "  ... through the proxy, original destination $WEB:9090" grep -q "\"original_dst\":\"$WEB:9090\"" "$DIR/proxy.log"
seen=$(pm exec plain wget -qO- "http://$WEB:9090/cgi-bin/who" 2>&1)
seen=${seen#"[::ffff:"}  # busybox httpd listens dual-stack: IPv4 peers come v4-mapped
seen=${seen%"]"}
check "  ... and the app sees the real client, $PLAIN (it saw '$seen')" [ "$seen" = "$PLAIN" ]
before=$(wc -l <"$DIR/proxy.log")
out=$(pm exec plain wget -qO- "http://$PLAIN2:8080/" 2>&1)
check "plain -> plain2 works" [ "$out" = "hello-from-plain2" ]
check "  ... and the proxy never saw it" [ "$(tail -n +$((before + 1)) "$DIR/proxy.log" | grep -c connection)" = 0 ]

pm rm -f -t 0 web >/dev/null
check "podman rm ran DEL: web released" [ "$(captured)" = "" ]
check "  ... and the proxy was told" grep -q '"event":"pod_removed","pod":"ambient/web"\|"pod_removed".*"ambient/web"' "$DIR/proxy.log"

# the agent goes away; a container starting now must not run uncaptured
kill -9 "$AGENT_PID"
AGENT_PID=""
if run_pod late ambient httpd -f -p 9090 -h /www >/dev/null 2>"$DIR/late.err"; then
  fail "a container started with the agent down did not fail"
else
  pass "a container started with the agent down fails to start ($(grep -o 'podsteer[^"]*' "$DIR/late.err" | head -1 | cut -c1-80))"
fi
check "  ... and is not running" [ -z "$(pm ps -q --filter name=late)" ]
pm rm -f -t 0 late >/dev/null 2>&1
start_agent
for _ in $(seq 60); do grep -q '"snapshot_received"' <(tail -n 3 "$DIR/proxy.log") && break; sleep 0.1; done
sleep 0.5
run_pod late ambient httpd -f -p 9090 -h /www >/dev/null || fail "podman run late (agent back)"
check "with the agent back, it starts captured" [ "$(captured)" = "ambient/late " ]
LATE=$(ip_of late)
out=$(pm exec plain wget -qO- "http://$LATE:9090/" 2>&1)
check "  ... and serves through the proxy" grep -q "\"original_dst\":\"$LATE:9090\"" "$DIR/proxy.log"

pm rm -af -t 0 >/dev/null
check "every container removed: nothing captured" [ "$(captured)" = "" ]
pm system reset -f >/dev/null 2>&1 </dev/null
check "no mount of podman's left under $DIR" [ -z "$(grep " $DIR" /proc/self/mountinfo)" ]
check "no container process left in the pods' cgroup" [ -z "$(cat "$CG/pods"/*/cgroup.procs "$CG/pods/cgroup.procs" 2>/dev/null)" ]
check "no pod netns of podman's left in /run/netns" [ "$(ls /run/netns | grep '^netns-' | sort)" = "$NETNS_BEFORE" ]
check "host-local leases all released" [ -z "$(ls "$DIR/ipam/podnet" 2>/dev/null | grep -v -E 'last_reserved|lock')" ]

echo
if [ "$failures" -gt 0 ]; then
  echo "podman e2e: $failures check(s) FAILED"
  echo "--- agent log (tail)"; tail -30 "$DIR/agent.log"
  echo "--- proxy log (tail)"; tail -20 "$DIR/proxy.log"
  exit 1
fi
echo "podman e2e: every check held"
