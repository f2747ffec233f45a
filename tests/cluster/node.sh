# A real Kubernetes node for scripts/cluster-e2e.sh: etcd, kube-apiserver (TLS, service-account
# tokens, Node and RBAC authorization), kube-controller-manager, kube-scheduler, kube-proxy and
# a kubelet on Debian's containerd, with the bridge and host-local plugins as the primary CNI.
# Sourced inside the private mount namespace and network namespace cluster-e2e.sh makes; every
# path is below $DIR, the cgroups below $CG_NAME. Needs DIR, BIN, NODE_NAME, CG_NAME, REPO.
# shellcheck shell=bash

NODE_IP=10.217.0.1
POD_CIDR=10.218.0.0/24
SERVICE_CIDR=10.96.0.0/24
API=https://$NODE_IP:6443
PKI=$DIR/pki
LOGS=$DIR/logs
CNI_CONF=$DIR/cni/net.d
CNI_BIN=$DIR/cni/bin
PIDS=()

k() { "$BIN/kubectl" --kubeconfig "$DIR/admin.conf" "$@"; }

# --- certificates: one CA signs every server and client certificate, as kubeadm does
cert() {  # cert NAME CN [O] [SANS]
  local name=$1 cn=$2 o=${3:-} sans=${4:-}
  openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -out "$PKI/$name.csr" \
    -subj "/CN=$cn${o:+/O=$o}" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=serverAuth,clientAuth"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } >"$PKI/$name.ext"
  openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
}
kubeconfig() {  # kubeconfig FILE CERT_NAME
  cat >"$1" <<CONF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "$API", certificate-authority: "$PKI/ca.crt"}}]
users: [{name: u, user: {client-certificate: "$PKI/$2.crt", client-key: "$PKI/$2.key"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: u}}]
current-context: e2e
CONF
}
make_pki() {
  mkdir -p "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 2 \
    -subj "/CN=podsteer-e2e-ca" 2>/dev/null
  cert apiserver kube-apiserver "" \
    "IP:$NODE_IP,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  cert admin kubernetes-admin system:masters
  cert controller-manager system:kube-controller-manager
  cert scheduler system:kube-scheduler
  cert kube-proxy system:kube-proxy
  cert kubelet "system:node:$NODE_NAME" system:nodes "IP:$NODE_IP,DNS:$NODE_NAME"
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  kubeconfig "$DIR/admin.conf" admin
  kubeconfig "$DIR/controller-manager.conf" controller-manager
  kubeconfig "$DIR/scheduler.conf" scheduler
  kubeconfig "$DIR/kube-proxy.conf" kube-proxy
  kubeconfig "$DIR/kubelet.conf" kubelet
}

start() {  # start NAME COMMAND...: in the background, its output in $LOGS/NAME.log
  local name=$1
  shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$DIR/$name.pid"
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2 i
  shift 2
  for ((i = 0; i < t * 4; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "cluster-e2e: $what did not happen within ${t}s" >&2
  return 1
}

# The node's own network: an address of the node's (on a veth pair whose two ends are both in
# the node netns) and a default route there, as a node has.
node_network() {
  ip link set lo up
  ip link add e2e0 type veth peer name e2e1
  ip addr add "$NODE_IP/24" dev e2e0
  ip link set e2e0 up
  ip link set e2e1 up
  ip route add default dev e2e0
}

start_control_plane() {
  start etcd "$BIN/etcd" --name e2e --data-dir "$DIR/etcd" --log-level warn \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster e2e=http://127.0.0.1:2380
  wait_for 30 "etcd answering" curl -sf http://127.0.0.1:2379/health || return 1
  # --allow-privileged is left false: a privileged container is refused
  start kube-apiserver "$BIN/kube-apiserver" --etcd-servers http://127.0.0.1:2379 \
    --advertise-address "$NODE_IP" --bind-address 0.0.0.0 --secure-port 6443 \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
  wait_for 90 "kube-apiserver ready" k get --raw /readyz || return 1
  start kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$DIR/controller-manager.conf" \
    --authentication-kubeconfig "$DIR/controller-manager.conf" --authorization-kubeconfig "$DIR/controller-manager.conf" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials --leader-elect=false --bind-address 127.0.0.1
  start kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$DIR/scheduler.conf" \
    --authentication-kubeconfig "$DIR/scheduler.conf" --authorization-kubeconfig "$DIR/scheduler.conf" \
    --leader-elect=false --bind-address 127.0.0.1
}

start_containerd() {
  mkdir -p "$CNI_CONF" "$CNI_BIN"
  for p in bridge host-local loopback portmap; do cp "/usr/lib/cni/$p" "$CNI_BIN/$p"; done
  # the primary CNI, as a cluster's network add-on writes it
  cat >"$CNI_CONF/10-bridge.conflist" <<CONF
{"cniVersion": "1.0.0", "name": "e2e-pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": "$DIR/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
CONF
  containerd_config "$DIR" "$CNI_BIN" "$CNI_CONF" >"$DIR/containerd.toml"
  start containerd containerd --config "$DIR/containerd.toml"
  wait_for 30 "containerd answering" ctr --address "$DIR/containerd.sock" version
}

ctr_k8s() { ctr --address "$DIR/containerd.sock" -n k8s.io "$@"; }

start_kubelet() {
  mkdir -p "$DIR/kubelet"
  echo "nameserver $NODE_IP" >"$DIR/resolv.conf"
  cat >"$DIR/kubelet.yaml" <<CONF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
tlsCertFile: "$PKI/kubelet.crt"
tlsPrivateKeyFile: "$PKI/kubelet.key"
containerRuntimeEndpoint: "unix://$DIR/containerd.sock"
# this machine's cgroups are hybrid (cgroup v1 controllers, cgroup2 at /sys/fs/cgroup/unified);
# the node's pods go below /$CG_NAME, never at the machine's cgroup root
cgroupDriver: cgroupfs
cgroupRoot: /$CG_NAME
failCgroupV1: false
failSwapOn: false
resolvConf: "$DIR/resolv.conf"
clusterDomain: cluster.local
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# nothing is ever evicted or garbage-collected for the disk of the machine this runs on
evictionHard: {memory.available: "1Mi", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
CONF
  # the kubelet wants its cgroupRoot in every hierarchy (cgroup v1's controllers, the named
  # systemd one, and cgroup2's)
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -e "$h/cgroup.procs" ] && mkdir -p "$h$CG_NAME"
  done
  start kubelet "$BIN/kubelet" --config "$DIR/kubelet.yaml" --kubeconfig "$DIR/kubelet.conf" \
    --root-dir "$DIR/kubelet" --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --v 1
  wait_for 60 "the node registered" k get node "$NODE_NAME"
}

start_kube_proxy() {
  cat >"$DIR/kube-proxy.yaml" <<CONF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$DIR/kube-proxy.conf"}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
conntrack: {maxPerCore: 0}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
CONF
  start kube-proxy "$BIN/kube-proxy" --config "$DIR/kube-proxy.yaml"
}

# Stops every component and removes what the node made (pods first, through the kubelet's
# runtime, so the CNI chain's DEL runs).
stop_node() {
  set +e
  if [ -S "$DIR/containerd.sock" ]; then
    for s in $(ctr_k8s containers ls -q 2>/dev/null); do ctr_k8s tasks kill -s KILL "$s" >/dev/null 2>&1; done
  fi
  local p
  for p in kubelet kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$DIR/$p.pid" ] && kill "$(cat "$DIR/$p.pid")" 2>/dev/null
  done
  sleep 1
  for p in kubelet kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$DIR/$p.pid" ] && kill -9 "$(cat "$DIR/$p.pid")" 2>/dev/null
  done
  pkill -9 -f "containerd-shim-runc-v2 .*-address $DIR/containerd.sock" 2>/dev/null
  pkill -9 -f -- "--kubeconfig $DIR/admin.conf" 2>/dev/null
  [ -f "$DIR/containerd.pid" ] && kill -9 "$(cat "$DIR/containerd.pid")" 2>/dev/null
  sleep 0.5
}
