# containerd confined to one directory, for tests/e2e/containerd.sh and scripts/cluster-e2e.sh.
# shellcheck shell=bash

# containerd_config DIR CNI_BIN_DIR CNI_CONF_DIR: a config whose root, state, sockets and CNI
# directories are all below DIR or given; the CRI plugin's sandbox image is
# podsteer.local/busybox:e2e (imported from a local archive: nothing is pulled)
containerd_config() {
  local dir=$1 bin=$2 conf=$3
  cat <<CONF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "podsteer.local/busybox:e2e"
  # the kubelet asks for oom_score_adj -998 for sandboxes; processes on these machines lack
  # CAP_SYS_RESOURCE and may not go below their parent's
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$bin"
    conf_dir = "$conf"
    max_conf_num = 1
CONF
}
