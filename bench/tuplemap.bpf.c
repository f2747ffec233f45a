// SPDX-License-Identifier: GPL-2.0
/* The tuple map's per-connection work, an insert and later a delete, on the same key and
 * value types and size as podsteer_orig: once preallocated, as podsteer makes it, once
 * with BPF_F_NO_PREALLOC (memory per live entry), as builds before it did. The benchmark
 * runs the inserts and deletes under BPF_PROG_TEST_RUN in batches, on one CPU, and with
 * the deletes on another CPU, as a connection's close may be handled on another CPU than
 * its connect(). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "podsteer_abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct podsteer_origdst_key);
	__type(value, struct podsteer_addr);
} tuple_prealloc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct podsteer_origdst_key);
	__type(value, struct podsteer_addr);
} tuple_noprealloc SEC(".maps");

/* connections made and closed so far; only one CPU runs each kind at a time */
__u64 next_insert = 0, next_delete = 0;

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

static __always_inline int insert(void *map)
{
	struct podsteer_origdst_key k;
	struct podsteer_addr v = {.port = 0x5000, .family = 2};
	conn_key(&k, next_insert++);
	return bpf_map_update_elem(map, &k, &v, BPF_ANY) ? 1 : 0;
}

static __always_inline int delete(void *map)
{
	struct podsteer_origdst_key k;
	conn_key(&k, next_delete++);
	return bpf_map_delete_elem(map, &k) ? 1 : 0;
}

SEC("tc")
int prealloc_insert(struct __sk_buff *skb) { return insert(&tuple_prealloc); }

SEC("tc")
int prealloc_delete(struct __sk_buff *skb) { return delete(&tuple_prealloc); }

SEC("tc")
int noprealloc_insert(struct __sk_buff *skb) { return insert(&tuple_noprealloc); }

SEC("tc")
int noprealloc_delete(struct __sk_buff *skb) { return delete(&tuple_noprealloc); }

char LICENSE[] SEC("license") = "GPL";
