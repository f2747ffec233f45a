#!/usr/bin/env bash
# podsteer on one machine: a small "node" of network namespaces, two pods (one enrolled,
# one not) and a remote service, the capture datapath, a node proxy in the enrolled pod,
# traffic, and what the proxy saw next to `podsteer status`. Cleans up on exit and Ctrl-C.
#
# The proxy here is tests/testpeer's L4 proxy (SO_ORIGINAL_DST, forwards, logs each
# connection); podsteer-proxy and the agent replace it when they land.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
scripts/build.sh >/dev/null

B=build
TAG=demo$$
STATE=/sys/fs/bpf/podsteer-$TAG
CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG2/podsteer-$TAG
NODE=$TAG-node WEB=$TAG-web OTHER=$TAG-other REMOTE=$TAG-remote
PIDS=()

cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  "$B/cli/podsteer" --state-dir "$STATE" uninstall >/dev/null 2>&1
  for ns in $WEB $OTHER $REMOTE $NODE; do ip netns del "$ns" 2>/dev/null; done
  for d in "$CG"/proxy "$CG"/app "$CG"; do rmdir "$d" 2>/dev/null; done
  echo "demo: cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "a node: bridge br0 in netns $NODE, pods $WEB (enrolled), $OTHER (not) and $REMOTE"
ip netns add $NODE
ip -n $NODE link add br0 type bridge
ip -n $NODE addr add 10.88.0.1/24 dev br0
ip -n $NODE link set br0 up
ip -n $NODE link set lo up
i=2
for pod in $WEB $OTHER $REMOTE; do
  ip netns add $pod
  ip -n $NODE link add v$i type veth peer name eth0 netns $pod
  ip -n $NODE link set v$i master br0 up
  ip -n $pod addr add 10.88.0.$i/24 dev eth0
  ip -n $pod link set eth0 up
  ip -n $pod link set lo up
  ip -n $pod route add default via 10.88.0.1
  echo "   $pod  10.88.0.$i"
  i=$((i + 1))
done
WEB_IP=10.88.0.2 OTHER_IP=10.88.0.3 REMOTE_IP=10.88.0.4
mkdir -p "$CG"/proxy "$CG"/app

say "services: remote:8080 and web:9090 (echo servers that report who they saw)"
$B/tests/testpeer --netns /var/run/netns/$REMOTE serve --port 8080 >/dev/null & PIDS+=($!)
$B/tests/testpeer --netns /var/run/netns/$WEB serve --port 9090 >/dev/null & PIDS+=($!)

say "node proxy in $WEB: listens on 15001/15006/15008 and 127.0.0.1:15053, SO_MARK 0x539"
PROXY_LOG=$(mktemp)
$B/tests/testpeer --netns /var/run/netns/$WEB --cgroup "$CG"/proxy proxy --mark 0x539 >"$PROXY_LOG" 2>&1 & PIDS+=($!)
sleep 0.5

say "podsteer enroll (socket hooks at $CG, state in $STATE)"
$B/cli/podsteer --state-dir "$STATE" --hook-cgroup "$CG" enroll --netns /var/run/netns/$WEB --pod default/web

app() { $B/tests/testpeer --netns /var/run/netns/$1 --cgroup "$CG"/app connect --to "$2" --port "$3" --send "$4"; }
say "traffic"
echo "web -> remote:8080 (outbound, captured):"; app $WEB $REMOTE_IP 8080 hello-out
echo "web -> [remote] over an AF_INET6 socket (v4-mapped, captured):"
$B/tests/testpeer --netns /var/run/netns/$WEB --cgroup "$CG"/app connect --v6 --to $REMOTE_IP --port 8080 --send mapped
echo "remote -> web:9090 (inbound, captured):"; app $REMOTE $WEB_IP 9090 hello-in
echo "other -> remote:8080 (pod not enrolled, direct):"; app $OTHER $REMOTE_IP 8080 not-enrolled
echo "web -> 127.0.0.1 is never captured; neither are the proxy's own marked connections."

say "what the proxy captured (listener, peer it saw, original destination from SO_ORIGINAL_DST)"
sleep 0.3
grep '"accept"' "$PROXY_LOG" || true
rm -f "$PROXY_LOG"

say "podsteer status"
$B/cli/podsteer --state-dir "$STATE" status

say "the same state through bpftool"
echo "\$ bpftool map dump pinned $STATE/maps/podsteer_pods"
bpftool map dump pinned "$STATE/maps/podsteer_pods"

say "podsteer uninstall"
$B/cli/podsteer --state-dir "$STATE" uninstall
