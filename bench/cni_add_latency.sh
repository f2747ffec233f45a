#!/usr/bin/env bash
# CNI ADD latency and agent memory: N pods (default 100) added through the real chain
# (bridge + host-local, then podsteer-cni), the agent warm (a few pods first, not counted).
# Times only the podsteer-cni exec, as the runtime makes it: agent round trip, TC attach in the pod netns, map
# writes, and the proxy's AddWorkload ack. Prints p50/p90/p99/max and the agent's RSS
# before and after, then removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
WARM=5
scripts/setup.sh >/dev/null
scripts/build.sh >/dev/null
B=$PWD/build
TAG=bench$$
STATE=/sys/fs/bpf/podsteer-$TAG
CG2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
CG=$CG2/podsteer-$TAG
WORK=$(mktemp -d /tmp/podsteer-$TAG.XXXX)
NODE=$TAG-node
CNI_PATH_DIRS=/usr/lib/cni:$B/cni-hook
CONFLIST=$WORK/podnet.conflist
source scripts/lib/cni.sh
# shellcheck source=../scripts/lib/cleanup.sh
source scripts/lib/cleanup.sh
PIDS=()
PODS=()
podnet_conflist cni0 10.252.0.0/16 "$WORK/ipam" "$WORK/cni.sock" >"$CONFLIST"

cleanup() {
  set +e
  for p in "${PODS[@]}"; do cni DEL "$p" ambient "$p" >/dev/null 2>&1; ip netns del "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  "$B/cli/podsteer" --state-dir "$STATE" uninstall >/dev/null
  ip netns del "$NODE" 2>/dev/null
  remove_cgroup "$CG"
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NODE"
mkdir -p "$CG/proxy"
"$B/controller/podsteer-agent" --state-dir "$STATE" --hook-cgroup "$CG" --cni-socket "$WORK/cni.sock" \
  --zds-socket "$WORK/zds.sock" --http-port 15098 --enroll-namespaces ambient >"$WORK/agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
for _ in $(seq 50); do [ -S "$WORK/cni.sock" ] && break; sleep 0.1; done
sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG/proxy" "$B/proxy/podsteer-proxy" --zds-socket "$WORK/zds.sock" --drain-seconds 2 >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q snapshot_received "$WORK/proxy.log" 2>/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' /proc/$AGENT/status; }
# Kernel memory of the install, as the kernel reports it (bytes_memlock; BTF by size):
# "maps" = the node's pinned maps plus each pod's own .rodata map, "progs" = each pod's
# sk_lookup program and its BTF. Printed as "maps progs".
kernel_bytes() {
  local maps=0 progs=0 m link prog
  for m in "$STATE"/maps/*; do maps=$((maps + $(bpftool map show pinned "$m" -j | jq .bytes_memlock))); done
  for link in "$STATE"/pods/*/inbound; do
    [ -e "$link" ] || continue
    prog=$(bpftool prog show id "$(bpftool link show pinned "$link" -j | jq .prog_id)" -j)
    progs=$((progs + $(jq .bytes_memlock <<<"$prog")))
    btf=$(jq '.btf_id // empty' <<<"$prog")
    [ -n "$btf" ] && progs=$((progs + $(bpftool btf show id "$btf" -j | jq .size)))
    # the maps pinned under maps/ are counted once above; a .rodata would be this pod's own
    for m in $(jq '.map_ids[]' <<<"$prog"); do
      maps=$((maps + $(bpftool map show id "$m" -j | jq 'if (.name | endswith(".rodata")) then .bytes_memlock else 0 end')))
    done
  done
  echo "$maps $progs"
}
RSS0=$(rss)

LAT=()
PLUGIN=$(plugin_path podsteer-cni)
T_ALL0=${EPOCHREALTIME/./}
for i in $(seq 1 $((N + WARM))); do
  pod=$TAG-p$i
  ip netns add "$pod"
  PODS+=("$pod")
  prev=$(cni_plugin ADD "$pod" ambient "p$i" "$(cni_conf 0)")
  conf=$(cni_conf 1 "$prev")
  # What the runtime does for the chained plugin: one exec, from a process already in the
  # node netns, with the CNI environment. Timed with bash's clock inside that shell, so
  # neither nsenter nor a date exec is counted (together ~1.5 ms here).
  us=$(nsenter --net=/var/run/netns/$NODE bash -c '
    t0=${EPOCHREALTIME/./}
    CNI_COMMAND=ADD CNI_CONTAINERID="ctr-$1" CNI_NETNS=/var/run/netns/$1 CNI_IFNAME=eth0 CNI_PATH="$2" \
      CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=ambient;K8S_POD_NAME=$3;K8S_POD_UID=uid-$3" "$4" <<<"$5" >"$6" || exit 1
    t1=${EPOCHREALTIME/./}
    echo $((t1 - t0))' _ "$pod" "$CNI_PATH_DIRS" "p$i" "$PLUGIN" "$conf" "$WORK/out") ||
    { echo "podsteer-cni ADD failed for $pod:"; cat "$WORK/out"; tail -5 "$WORK/agent.log"; exit 1; }
  [ "$i" -gt "$WARM" ] && LAT+=("$us")
  [ "$i" -eq "$WARM" ] && read -r KMAPS0 KPROGS0 < <(kernel_bytes)
done
T_ALL1=${EPOCHREALTIME/./}
read -r KMAPS1 KPROGS1 < <(kernel_bytes)
RSS1=$(rss)
captured=$("$B/cli/podsteer" --state-dir "$STATE" status --json | jq '.pods | length')
sorted=($(printf '%s\n' "${LAT[@]}" | sort -n))
pct() { echo "${sorted[$(( ($1 * ${#sorted[@]} + 99) / 100 - 1 ))]}"; }
echo "podsteer-cni ADD latency over $N pods (agent warm, proxy acking; microseconds):"
echo "  p50 $(pct 50)  p90 $(pct 90)  p99 $(pct 99)  max ${sorted[-1]}"
agent_us=($(grep -o 'captured  ([0-9]* us)' "$WORK/agent.log" | tr -dc '0-9\n' | tail -n "$N" | sort -n))
echo "  of which inside the agent (enroll + proxy ack): p50 ${agent_us[$(( ${#agent_us[@]} / 2 ))]}  p99 ${agent_us[$(( ${#agent_us[@]} * 99 / 100 ))]}"
echo "agent RSS: ${RSS0} KiB with 0 pods, ${RSS1} KiB with $((N + WARM)) pods captured ($captured in podsteer status)"
echo "kernel memory per pod (bytes_memlock, $N pods): maps $(( (KMAPS1 - KMAPS0) / N )) B, sk_lookup program + BTF $(( (KPROGS1 - KPROGS0) / N )) B; the node's maps: $((KMAPS0 / 1024)) KiB with $WARM pods"
sum=0
for l in "${LAT[@]}"; do sum=$((sum + l)); done
echo "$N pods enrolled one after another: $((sum / 1000)) ms in podsteer-cni; $(( (T_ALL1 - T_ALL0) / 1000 )) ms for all $((N + WARM)) from nothing (netns, bridge + host-local, podsteer-cni)"
echo "agent drift repair pass over them: $(curl -s localhost:15098/metrics | awk '$1 == "podsteer_repair_pass_seconds" {printf "%.1f ms", $2 * 1000}') (every 500 ms)"
