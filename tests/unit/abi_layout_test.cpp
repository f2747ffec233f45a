// Pins every shared layout: the BPF side compiles the same header, so a change here
// that is not deliberate (and not an ABI version bump) fails the build.
#include <gtest/gtest.h>

#include <cstddef>

#include "podsteer_abi.h"
#include "podsteer_abi_v1.h"

// 3 renamed two maps (pins) and changed no layout
static_assert(PODSTEER_ABI_VERSION == 3, "bump the layout checks with the ABI version");
static_assert(sizeof(podsteer_pod) == 32);
static_assert(offsetof(podsteer_pod, flags) == 0);
static_assert(offsetof(podsteer_pod, ip4) == 4);
static_assert(offsetof(podsteer_pod, ip6) == 8);
static_assert(offsetof(podsteer_pod, enrolled_ns) == 24);
static_assert(sizeof(podsteer_pod_meta) == 3 * 256 + 64 + 128 + 256 + 4 * 4 + 8);
static_assert(offsetof(podsteer_pod_meta, name) == 256);
static_assert(offsetof(podsteer_pod_meta, service_account) == 512);
static_assert(offsetof(podsteer_pod_meta, uid) == 768);
static_assert(offsetof(podsteer_pod_meta, container_id) == 832);
static_assert(offsetof(podsteer_pod_meta, netns_path) == 960);
static_assert(offsetof(podsteer_pod_meta, n_excluded_cidrs) == 1216);
static_assert(offsetof(podsteer_pod_meta, netns_setup) == 1220);
static_assert(offsetof(podsteer_pod_meta, fwmark_accept_before) == 1224);
static_assert(offsetof(podsteer_pod_meta, flags) == 1228);
static_assert(offsetof(podsteer_pod_meta, netns_ino) == 1232);
static_assert(sizeof(podsteer_port_key) == 16);
static_assert(sizeof(podsteer_conn_slot) == 32);
static_assert(sizeof(podsteer_conn_ring) == 4 * 32 + 8);
static_assert(offsetof(podsteer_conn_ring, next) == 128);
static_assert(sizeof(podsteer_events) == 16);
static_assert(sizeof(podsteer_full) == 16);
static_assert(offsetof(podsteer_port_key, port) == 8);
static_assert(offsetof(podsteer_port_key, direction) == 10);
static_assert(sizeof(podsteer_cidr_key) == 28);
static_assert(offsetof(podsteer_cidr_key, netns_cookie_hi) == 4);
static_assert(offsetof(podsteer_cidr_key, addr) == 12);
static_assert(sizeof(podsteer_counters) == 40);
static_assert(sizeof(podsteer_addr) == 24);
static_assert(offsetof(podsteer_addr, port) == 16);
static_assert(offsetof(podsteer_addr, family) == 18);
static_assert(sizeof(podsteer_origdst_key) == 32);
static_assert(offsetof(podsteer_origdst_key, peer_addr) == 8);
static_assert(offsetof(podsteer_origdst_key, peer_port) == 24);
static_assert(offsetof(podsteer_origdst_key, local_port) == 26);
static_assert(sizeof(podsteer_listener_key) == 16);
static_assert(offsetof(podsteer_listener_key, port) == 8);
static_assert(offsetof(podsteer_listener_key, family) == 10);
static_assert(sizeof(podsteer_tuple_key) == 48);
static_assert(offsetof(podsteer_tuple_key, dst_addr) == 8);
static_assert(offsetof(podsteer_tuple_key, src_addr) == 24);
static_assert(offsetof(podsteer_tuple_key, dst_port) == 40);
static_assert(offsetof(podsteer_tuple_key, src_port) == 42);
static_assert(sizeof(podsteer_config) == 48 + 256);
static_assert(offsetof(podsteer_config, app_mark) == 20);
static_assert(offsetof(podsteer_config, programs_id) == 40);
static_assert(offsetof(podsteer_config, hook_cgroup) == 48);

// ABI 1, as its podsteer wrote it (read only, for migration)
static_assert(sizeof(podsteer_pod_meta_v1) == 128 + 256 + 3 * 4 * 8 + 16 + 64 + 64 + 80);
static_assert(offsetof(podsteer_pod_meta_v1, netns_path) == 128);
static_assert(offsetof(podsteer_pod_meta_v1, attach_mode) == 484);
static_assert(offsetof(podsteer_pod_meta_v1, uid) == 496);
static_assert(offsetof(podsteer_pod_meta_v1, container_id) == 624);
static_assert(sizeof(podsteer_config_v1) == 24 + 256);

TEST(AbiLayout, LpmKeyHasNoHoleBeforeData) {
  // The LPM trie compares the bytes after prefixlen; a hole would hold garbage.
  EXPECT_EQ(offsetof(podsteer_cidr_key, netns_cookie_hi), sizeof(__u32));
  EXPECT_EQ(sizeof(podsteer_cidr_key), sizeof(__u32) + 8 + 16);
}
