#!/usr/bin/env bash
# Builds the podsteer image from deploy/Dockerfile with Debian's podman, as a user would, and
# writes it as an archive `ctr images import` reads. Nothing can be pulled on these machines,
# so the Debian bookworm base both stages start from is made here with debootstrap (minbase,
# from deb.debian.org or $DEBIAN_MIRROR) and passed as BASE_IMAGE. podman keeps its own
# storage under the cache dir (layers are reused by the next run) and builds with the host's
# network (no bridge is made on the host).
#
# usage: build-image.sh VERSION OUT.tar    (run from the repository root)
set -euo pipefail
VERSION=$1 OUT=$2
CACHE=${PODSTEER_CLUSTER_CACHE:-/var/cache/podsteer-cluster}
P=$CACHE/podman-v2  # -v2: podman refuses a store whose recorded tmp_dir differs (the first layout's)
rm -rf "$CACHE/podman"
mkdir -p "$P"/{storage,run,tmp} "$CACHE"
RUNROOT=$P/run
cat >"$P/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$P/storage"
runroot = "$RUNROOT"
CONF
# podman's own state stays below the cache dir too (its defaults are /run/libpod and
# /var/lib/containers/cache, whatever storage.conf says; the latter is removed below if this
# made it)
printf '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\nruntime = "runc"\ntmp_dir = "%s"\n' \
  "$P/run/libpod" >"$P/containers.conf"
[ -e /var/lib/containers ] || trap 'rm -rf /var/lib/containers' EXIT
printf 'unqualified-search-registries = []\n' >"$P/registries.conf"
pm() {
  CONTAINERS_STORAGE_CONF=$P/storage.conf CONTAINERS_CONF=$P/containers.conf \
    CONTAINERS_REGISTRIES_CONF=$P/registries.conf TMPDIR=$P/tmp podman "$@"
}
BASE=localhost/podsteer-debian:bookworm
if ! pm image exists "$BASE"; then
  command -v debootstrap >/dev/null || { echo "build-image: needs debootstrap (scripts/setup.sh)" >&2; exit 2; }
  mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d "$P/tmp/rootfs.XXXXXX")
  echo "build-image: debootstrap bookworm from $mirror (about a minute)" >&2
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$P/tmp/debootstrap.log" 2>&1 ||
    { tail -20 "$P/tmp/debootstrap.log" >&2; rm -rf "$rootfs"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | pm import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi
IMAGE=podsteer.local/podsteer:$VERSION
pm build --network host --pull=never -f deploy/Dockerfile --build-arg BASE_IMAGE="$BASE" \
  --build-arg VERSION="$VERSION" -t "$IMAGE" . >&2
rm -f "$OUT"
pm save --format docker-archive -o "$OUT" "$IMAGE" >&2
echo "$IMAGE"
