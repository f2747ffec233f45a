# Shared by scripts/demo.sh and tests/e2e/podman.sh: podman with a private world - its own
# containers.conf, storage.conf and registries.conf under PODMAN_DIR, the CNI backend with
# the conflist dir given, every call in the node netns - and a busybox root filesystem and
# image for the pods (no registry needed). Needs PODMAN_DIR, NODE (the node netns name).
# shellcheck shell=bash

# A root filesystem from Debian's busybox-static: httpd serving "hello", a CGI that says
# whom the app sees (/cgi-bin/who), wget and a shell.
make_rootfs() {  # make_rootfs DIR
  local r=$1
  mkdir -p "$r/bin" "$r/www/cgi-bin" "$r/tmp" "$r/etc"
  cp "$(command -v busybox)" "$r/bin/busybox"
  for a in sh cat echo wget httpd sleep; do ln -sf busybox "$r/bin/$a"; done
  echo hello >"$r/www/index.html"
  printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$REMOTE_ADDR"\n' >"$r/www/cgi-bin/who"
  chmod +x "$r/www/cgi-bin/who"
}
# What an app saw as its peer, as busybox httpd (dual stack) reports it.
plain_addr() { local a=${1#"[::ffff:"}; echo "${a%"]"}"; }

# Every podman call runs as `nsenter --net=NODE podman` (not `ip netns exec`, whose private
# mount namespace would hide podman's overlay mounts), so the CNI plugins run in the node
# netns.
pm() {
  CONTAINERS_CONF=$PODMAN_DIR/containers.conf CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf \
    CONTAINERS_REGISTRIES_CONF=$PODMAN_DIR/registries.conf \
    nsenter --net=/var/run/netns/$NODE podman "$@"
}

# podman_setup CNI_CONF_DIR CNI_PLUGIN_DIR...: the config files, and the image
# localhost/podsteer-busybox:latest
podman_setup() {
  local conf_dir=$1 dirs="" d
  shift
  for d in "$@"; do dirs+="${dirs:+, }\"$d\""; done
  mkdir -p "$PODMAN_DIR"/{storage,run,tmp,image}
  # podman 4.3 keeps root's blob-info cache in /var/lib/containers/cache whatever
  # storage.conf says: remember whether it was there, so teardown removes only ours
  [ -e /var/lib/containers ] || PODMAN_MADE_VAR_LIB=1
  cat >"$PODMAN_DIR/containers.conf" <<CONF
[containers]
# root here lacks CAP_SYS_RESOURCE: podman's defaults for root would raise these
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[network]
network_backend = "cni"
cni_plugin_dirs = [$dirs]
network_config_dir = "$conf_dir"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$PODMAN_DIR/events.log"
# crun 1.8 refuses hybrid cgroup hosts
runtime = "runc"
tmp_dir = "$PODMAN_DIR/tmp"
volume_path = "$PODMAN_DIR/storage/volumes"
CONF
  cat >"$PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
runroot = "$PODMAN_DIR/run"
graphroot = "$PODMAN_DIR/storage"
CONF
  echo 'unqualified-search-registries = []' >"$PODMAN_DIR/registries.conf"
  make_rootfs "$PODMAN_DIR/image/rootfs"
  tar -C "$PODMAN_DIR/image/rootfs" -cf "$PODMAN_DIR/image/busybox.tar" .
  pm import -q "$PODMAN_DIR/image/busybox.tar" localhost/podsteer-busybox:latest >/dev/null
}

# Removes every container and podman's state (mounts included).
podman_teardown() {
  pm rm -af -t 0 >/dev/null 2>&1
  pm system reset -f >/dev/null 2>&1 </dev/null
  if [ -n "${PODMAN_MADE_VAR_LIB:-}" ]; then rm -rf /var/lib/containers; fi
}
