# Shared by demo.sh, bench/cni_add_latency.sh and the e2e tests: drive CNI plugins the way a container
# runtime (libcni) does. Needs CONFLIST, NODE (the node netns name) and CNI_PATH_DIRS.

plugin_path() { local d; for d in ${CNI_PATH_DIRS//:/ }; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done; }

# One plugin: CONF on stdin, the runtime's environment, inside the node netns.
cni_plugin() {
  local cmd=$1 pod=$2 podns=$3 name=$4 conf=$5
  echo "$conf" | nsenter --net=/var/run/netns/$NODE env CNI_COMMAND="$cmd" CNI_CONTAINERID="ctr-$pod" \
    CNI_NETNS=/var/run/netns/$pod CNI_IFNAME=eth0 CNI_PATH="$CNI_PATH_DIRS" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$podns;K8S_POD_NAME=$name;K8S_POD_INFRA_CONTAINER_ID=ctr-$pod;K8S_POD_UID=uid-$name" \
    "$(plugin_path "$(jq -r .type <<<"$conf")")"
}

# Plugin I of the conflist as the runtime hands it over, with PREV as prevResult.
cni_conf() {
  jq -c --argjson i "$1" --arg prev "${2:-}" \
    '.plugins[$i] + {cniVersion: .cniVersion, name: .name} + (if $prev == "" then {} else {prevResult: ($prev | fromjson)} end)' \
    "$CONFLIST"
}

# The whole chain: in order for ADD (each plugin gets the previous result as prevResult),
# in reverse for DEL. Prints the final result.
cni() {
  local cmd=$1 pod=$2 podns=$3 name=$4 prev="" out n i order
  n=$(jq '.plugins | length' "$CONFLIST")
  order=$(seq 0 $((n - 1)))
  [ "$cmd" = DEL ] && order=$(seq $((n - 1)) -1 0)
  for i in $order; do
    out=$(cni_plugin "$cmd" "$pod" "$podns" "$name" "$(cni_conf "$i" "$prev")") || { echo "$out"; return 1; }
    [ "$cmd" = ADD ] && prev=$out
  done
  echo "$prev"
}

# podnet_conflist BRIDGE SUBNET IPAM_DIR AGENT_SOCKET [MORE]: the conflist every node here
# uses - bridge + host-local, then podsteer-cni (MORE: extra podsteer-cni fields, as JSON
# members).
podnet_conflist() {
  cat <<JSON
{"cniVersion": "1.0.0", "name": "podnet", "plugins": [
  {"type": "bridge", "bridge": "$1", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "subnet": "$2", "dataDir": "$3"}},
  {"type": "podsteer-cni", "agentSocket": "$4"${5:+, $5}}]}
JSON
}
