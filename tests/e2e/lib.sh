# Shared by tests/e2e/*.sh: a hermetic node (netns, hook cgroup, state dir, scratch dir),
# podsteer-agent and podsteer-proxy on it, a busybox root filesystem for the pods, checks,
# and a cleanup that leaves nothing behind. Source it after setting E2E_NAME.
# shellcheck shell=bash

BUILD_DIR=$(realpath "${BUILD_DIR:-build}")
# shellcheck source=scripts/lib/podman.sh
source scripts/lib/podman.sh  # make_rootfs, plain_addr (and pm for the podman test)
# shellcheck source=scripts/lib/cleanup.sh
source scripts/lib/cleanup.sh
# shellcheck source=scripts/lib/cni.sh
source scripts/lib/cni.sh  # podnet_conflist
skip() { echo; echo "*** SKIPPING $E2E_NAME: $* ***"; echo; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root"
[ -x "$BUILD_DIR/controller/podsteer-agent" ] || { echo "$E2E_NAME: no build in $BUILD_DIR" >&2; exit 2; }

ID=e2e$$
DIR=/tmp/podsteer-test-$ID
NODE=pst-$ID-node
CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG_NAME=podsteer-test-$ID
CG=$CG2/$CG_NAME
STATE=/sys/fs/bpf/podsteer-test-$ID
HTTP_PORT=$((22000 + $$ % 10000))
failures=0
AGENT_PID="" PROXY_PID=""
AGENT_FLAGS=()
# runtimes name their pod netns themselves (podman: netns-<uuid>, containerd: cni-<uuid>):
# the same set must be there at the end
NETNS_BEFORE=$(ls /run/netns | grep -E '^(netns|cni)-' | sort)

pass() { echo "  ok    $*"; }
fail() { echo "  FAIL  $*"; failures=$((failures + 1)); }
check() {  # check DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}

node_up() {
  mkdir -p "$DIR" "$CG/proxy" "$CG/pods"
  ip netns add "$NODE" && ip -n "$NODE" link set lo up
}

start_agent() {
  "$BUILD_DIR/controller/podsteer-agent" --state-dir "$STATE" --hook-cgroup "$CG" \
    --cni-socket "$DIR/cni.sock" --zds-socket "$DIR/zds.sock" --http-port "$HTTP_PORT" \
    --enroll-namespaces ambient "${AGENT_FLAGS[@]}" >>"$DIR/agent.log" 2>&1 &
  AGENT_PID=$!
  for _ in $(seq 100); do [ -S "$DIR/cni.sock" ] && grep -q "http: /metrics" "$DIR/agent.log" && return; sleep 0.05; done
  echo "agent did not start:"; cat "$DIR/agent.log"
}
stop_agent() { kill -9 "$AGENT_PID" 2>/dev/null; wait "$AGENT_PID" 2>/dev/null; AGENT_PID=""; }

start_proxy() {  # in the node netns, in the proxy's cgroup
  # in its cgroup before it starts: the agent trusts the cgroup it is in when it says hello
  sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG/proxy" \
    nsenter --net=/var/run/netns/$NODE "$BUILD_DIR/proxy/podsteer-proxy" --zds-socket "$DIR/zds.sock" >"$DIR/proxy.log" 2>&1 &
  PROXY_PID=$!
  for _ in $(seq 100); do grep -q snapshot_received "$DIR/proxy.log" && break; sleep 0.05; done
}
snapshots() { grep -c snapshot_received "$DIR/proxy.log"; }
# Waits until the proxy has had more than N snapshots (after an agent restart).
proxy_resynced() {  # proxy_resynced N
  for _ in $(seq 100); do [ "$(snapshots)" -gt "$1" ] && return; sleep 0.05; done
}

status_json() { "$BUILD_DIR/cli/podsteer" --state-dir "$STATE" status --json; }
captured() { status_json | jq -r '.pods[].pod' 2>/dev/null | sort | tr '\n' ' '; }
proxy_connections_since() { tail -n +"$(($1 + 1))" "$DIR/proxy.log" | grep -c '"event":"connection"'; }

# Nothing of the runtime's may be left: mounts under our dir, pod netns, processes in
# our cgroups.
check_nothing_left() {
  check "no mount left under $DIR" [ -z "$(grep " $DIR" /proc/self/mountinfo)" ]
  check "no pod netns of the runtime's left in /run/netns" [ "$(ls /run/netns | grep -E '^(netns|cni)-' | sort)" = "$NETNS_BEFORE" ]
  check "no process left in the pods' cgroup" [ -z "$(find "$CG/pods" -name cgroup.procs -exec cat {} + 2>/dev/null)" ]
  check "host-local leases all released" [ -z "$(ls "$DIR/ipam/podnet" 2>/dev/null | grep -v -E 'last_reserved|lock')" ]
}

node_down() {
  set +e
  [ -n "$PROXY_PID" ] && kill -9 "$PROXY_PID" 2>/dev/null
  [ -n "$AGENT_PID" ] && kill -9 "$AGENT_PID" 2>/dev/null
  "$BUILD_DIR/cli/podsteer" --state-dir "$STATE" uninstall >/dev/null 2>&1
  unmount_under "$DIR"
  remove_cgroup "$CG2/$CG_NAME" /sys/fs/cgroup/*/"$CG_NAME"
  ip netns del "$NODE" 2>/dev/null
  rm -rf "$DIR"
}

finish() {
  echo
  if [ "$failures" -gt 0 ]; then
    echo "$E2E_NAME: $failures check(s) FAILED"
    echo "--- agent log (tail)"; tail -30 "$DIR/agent.log"
    echo "--- proxy log (tail)"; tail -20 "$DIR/proxy.log"
    exit 1
  fi
  echo "$E2E_NAME: every check held"
}
