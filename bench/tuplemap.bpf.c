// SPDX-License-Identifier: GPL-2.0
/* The tuple map's per-connection work, insert then delete, on the same key and value
 * types and size as podsteer_orig: once as podsteer has it (BPF_F_NO_PREALLOC, memory
 * per live entry), once preallocated (every entry's memory at creation). The benchmark
 * runs each under BPF_PROG_TEST_RUN with `live` entries kept in the map, to show what
 * preallocating would save before anyone changes a pinned map for it. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "podsteer_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct podsteer_origdst_key);
	__type(value, struct podsteer_addr);
} tuple_noprealloc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct podsteer_origdst_key);
	__type(value, struct podsteer_addr);
} tuple_prealloc SEC(".maps");

__u64 next_conn = 0; /* connection number, counts up across runs */
__u32 live = 64;     /* entries kept: run n deletes the entry of run n - live */
__u32 fill = 0;      /* nonzero: only insert (to bring the map to `live` entries) */

/* connection n of a node: pods by netns cookie, each one's ephemeral ports */
static __always_inline void conn_key(struct podsteer_origdst_key *k, __u64 n)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->netns_cookie = 4096 + (n >> 15);
	__u32 *w = (__u32 *)k->peer_addr;
	w[2] = 0xffff0000; /* ::ffff:10.x.y.z, network order on x86 */
	w[3] = 0x0a | (__u32)((n >> 15) & 0xffff) << 8;
	k->peer_port = 32768 + (__u16)(n & 0x7fff);
	k->local_port = 15001;
}

static __always_inline int one_connection(void *map)
{
	__u64 n = __sync_fetch_and_add(&next_conn, 1);
	struct podsteer_origdst_key k;
	struct podsteer_addr v = {.port = 0x5000, .family = 2};
	conn_key(&k, n);
	bpf_map_update_elem(map, &k, &v, BPF_ANY);
	if (!fill && n >= live) {
		conn_key(&k, n - live);
		bpf_map_delete_elem(map, &k);
	}
	return 0;
}

SEC("tc")
int tuple_noprealloc_conn(struct __sk_buff *skb) { return one_connection(&tuple_noprealloc); }

SEC("tc")
int tuple_prealloc_conn(struct __sk_buff *skb) { return one_connection(&tuple_prealloc); }

char LICENSE[] SEC("license") = "GPL";
