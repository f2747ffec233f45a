#!/usr/bin/env bash
# podsteer on one machine, as a node runs it: a node in a network namespace, pods made by
# a real container runtime (podman, where it is installed: busybox containers whose network
# comes from the real bridge + host-local CNI plugins with podsteer-cni chained; otherwise
# the same chain driven the way a runtime drives it, with test servers as the apps),
# podsteer-agent, podsteer-proxy as the node proxy, traffic between the pods, what the
# proxy captured, whom each app saw as its client, and `podsteer status`.
# Leaves nothing behind, also on Ctrl-C. DEMO_RUNTIME=cni skips podman.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "demo: installing packages and building (scripts/setup.sh, scripts/build.sh) ..."
scripts/setup.sh >/dev/null
scripts/build.sh >/dev/null

B=$PWD/build
TAG=demo$$
STATE=/sys/fs/bpf/podsteer-$TAG
CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG2/podsteer-$TAG               # the hook cgroup: the demo's "kubepods"
WORK=$(mktemp -d /tmp/podsteer-$TAG.XXXX)
NODE=$TAG-node
CNI_PATH_DIRS=/usr/lib/cni:$B/cni-hook
PIDS=()
PODS=()

CONFLIST=$WORK/10-podnet.conflist
# shellcheck source=lib/cni.sh
source scripts/lib/cni.sh
# shellcheck source=lib/podman.sh
source scripts/lib/podman.sh
# shellcheck source=lib/cleanup.sh
source scripts/lib/cleanup.sh
podnet_conflist cni0 10.250.0.0/24 "$WORK/ipam" "$WORK/cni.sock" >"$CONFLIST"
PODMAN_DIR=$WORK/podman
RUNTIME=${DEMO_RUNTIME:-podman}
command -v podman >/dev/null && command -v runc >/dev/null || RUNTIME=cni

cleanup() {
  set +e
  echo
  echo "demo: cleaning up"
  if [ "$RUNTIME" = podman ]; then podman_teardown; fi
  for p in "${PODS[@]}"; do cni DEL "$TAG-$p" x "$p" >/dev/null 2>&1; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  "$B/cli/podsteer" --state-dir "$STATE" uninstall >/dev/null
  for p in "${PODS[@]}"; do ip netns del "$TAG-$p" 2>/dev/null; done
  ip netns del "$NODE" 2>/dev/null
  unmount_under "$WORK"
  remove_cgroup "$CG2/podsteer-$TAG" /sys/fs/cgroup/*/"podsteer-$TAG"
  rm -rf "$WORK"
  echo "demo: nothing left behind"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
in_cgroup() { local cg=$1; shift; sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@"; }

say "node: netns $NODE; pods get their network from bridge + host-local, with podsteer-cni chained"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
mkdir -p "$CG/proxy" "$CG/app"

say "podsteer-agent (enrolls namespace 'ambient') and podsteer-proxy (the node proxy, over ZDS)"
"$B/controller/podsteer-agent" --state-dir "$STATE" --hook-cgroup "$CG" --cni-socket "$WORK/cni.sock" \
  --zds-socket "$WORK/ztunnel.sock" --http-port 15099 --enroll-namespaces ambient --node-netns "/var/run/netns/$NODE" \
  >"$WORK/agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$WORK/cni.sock" ] && break; sleep 0.1; done
in_cgroup "$CG/proxy" "$B/proxy/podsteer-proxy" --zds-socket "$WORK/ztunnel.sock" --drain-seconds 2 >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q snapshot_received "$WORK/proxy.log" 2>/dev/null && break; sleep 0.1; done
sed 's/^/   agent: /' "$WORK/agent.log"

if [ "$RUNTIME" = podman ]; then
  say "pods: podman containers ($(podman --version | awk '{print $3}'), runc), networked by the chain above"
  podman_setup "$WORK" "$B/cni-hook" /usr/lib/cni
  declare -A IP
  for spec in web:ambient:8080 db:ambient:5432 legacy:default:8080; do
    IFS=: read -r name podns port <<<"$spec"
    start=$(date +%s%N)
    CNI_ARGS="K8S_POD_NAMESPACE=$podns;K8S_POD_UID=uid-$TAG-$name" pm run -d --name "$TAG-$name" --network podnet \
      --cgroup-parent "/podsteer-$TAG/app" localhost/podsteer-busybox:latest httpd -f -p "$port" -h /www >/dev/null
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    IP[$name]=$(pm inspect -f '{{.NetworkSettings.Networks.podnet.IPAddress}}' "$TAG-$name")
    printf '   %-7s %-8s %-12s serves :%-5s podman run %4d ms (CNI ADD included)\n' "$name" "$podns" "${IP[$name]}" "$port" "$ms"
  done

  who() { plain_addr "$(pm exec "$TAG-$1" wget -qO- "http://$2:$3/cgi-bin/who" 2>&1)"; }
  say "traffic: each app (busybox httpd, CGI) answers with the client address it saw"
  printf '   web    (%s) -> db:5432      db saw %s\n' "${IP[web]}" "$(who web "${IP[db]}" 5432)"
  printf '   legacy (%s) -> web:8080     web saw %s\n' "${IP[legacy]}" "$(who legacy "${IP[web]}" 8080)"
  printf '   legacy (%s) -> db:5432      db saw %s\n' "${IP[legacy]}" "$(who legacy "${IP[db]}" 5432)"
  printf '   node   (kubelet probe) -> web:8080  web saw %s\n' \
    "$(plain_addr "$(nsenter --net="/var/run/netns/$NODE" busybox wget -qO- "http://${IP[web]}:8080/cgi-bin/who" 2>&1)")"
  echo "   (every app sees its real client: the proxy connects on from the client's own address, as ztunnel does;"
  echo "    the node's own connection - a kubelet probe - goes straight to the app, as under Istio's host rule)"
  sleep 0.3
else
  say "pods: CNI ADD through the chain (the runtime's view)"
  declare -A IP
  for spec in web:ambient db:ambient legacy:default; do
    name=${spec%%:*} podns=${spec#*:}
    ip netns add "$TAG-$name"
    ip -n "$TAG-$name" link set lo up
    PODS+=("$name")
    start=$(date +%s%N)
    result=$(cni ADD "$TAG-$name" "$podns" "$name")
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    IP[$name]=$(jq -r '.ips[0].address' <<<"$result" | cut -d/ -f1)
    printf '   %-7s %-8s %-12s CNI ADD %3d ms\n' "$name" "$podns" "${IP[$name]}" "$ms"
  done

  say "applications: web serves :8080, db serves :5432, both report who they saw"
  for spec in web:8080 db:5432; do
    in_cgroup "$CG/app" "$B/tests/testpeer" --netns "/var/run/netns/$TAG-${spec%%:*}" serve --port "${spec#*:}" >/dev/null &
    PIDS+=($!)
  done
  sleep 0.3

  client() { in_cgroup "$CG/app" "$B/tests/testpeer" --netns "/var/run/netns/$TAG-$1" connect --to "$2" --port "$3" --send "$4"; }
  say "traffic"
  printf '   web    -> db:5432      '; client web "${IP[db]}" 5432 "select 1" | jq -c '{peer, reply}'
  printf '   legacy -> web:8080     '; client legacy "${IP[web]}" 8080 "GET /" | jq -c '{peer, reply}'
  printf '   legacy -> db:5432      '; client legacy "${IP[db]}" 5432 "select 2" | jq -c '{peer, reply}'
  printf '   node (kubelet probe) -> web:8080  '
  "$B/tests/testpeer" --netns "/var/run/netns/$NODE" connect --to "${IP[web]}" --port 8080 --send probe | jq -c '{peer, reply}'
  echo "   (the node's own connection goes straight to the app, as under Istio's host rule: not in the proxy's list below)"
  sleep 0.3
fi

say "what podsteer-proxy captured: pod, direction, source, original destination, bytes"
grep '"connection"' "$WORK/proxy.log" | jq -r '"   \(.pod)  \(.direction)\t\(.src) -> \(.original_dst)  up \(.bytes_up)B down \(.bytes_down)B"'
echo "   (legacy is not enrolled: its outbound connections go direct; what it sends to web and db is captured"
echo "    inbound at those pods. web -> db is captured twice: outbound at web, inbound at db.)"

say "podsteer status"
"$B/cli/podsteer" --state-dir "$STATE" status | sed 's/^/   /'

say "agent /readyz and /metrics"
curl -s "http://127.0.0.1:15099/readyz" | sed 's/^/   /'
curl -s "http://127.0.0.1:15099/metrics" | grep -E '^podsteer_(pods_captured|cni_requests_total|pod_connections_total\{kind="redirected)' | sed 's/^/   /'
