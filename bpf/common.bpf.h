/* Maps and read-only settings shared by every podsteer BPF object. Declarations only:
 * no logic lives here. Both objects pin the same maps, so the loader opens them by pin. */
#ifndef PODSTEER_COMMON_BPF_H
#define PODSTEER_COMMON_BPF_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "podsteer_abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef SOCK_DGRAM
#define SOCK_DGRAM 2
#endif

/* Set by the loader before load; defaults are DESIGN.md's. An object loaded once per pod
 * defines PODSTEER_NO_RODATA and reads podsteer_config instead: a .rodata section would
 * make libbpf create a map of its own (8 KiB) for every pod. */
#ifndef PODSTEER_NO_RODATA
const volatile __u16 cfg_outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
const volatile __u16 cfg_inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
const volatile __u16 cfg_hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
const volatile __u16 cfg_dns_port = PODSTEER_DEFAULT_DNS_PORT;
const volatile __u32 cfg_proxy_mark = PODSTEER_DEFAULT_PROXY_MARK;
const volatile __u32 cfg_proxy_mark_mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;
const volatile __u32 cfg_app_mark = PODSTEER_DEFAULT_APP_MARK;
const volatile __u32 cfg_nr_cpus = 1; /* possible CPUs, for the podsteer_conns fallback */
#endif

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_pod);
} podsteer_pods SEC(".maps");

/* userspace only; not preallocated, so it costs memory per pod, not per slot */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct podsteer_pod_meta);
} podsteer_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct podsteer_port_key);
	__type(value, __u8);
} podsteer_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct podsteer_cidr_key);
	__type(value, __u8);
} podsteer_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_counters);
} podsteer_stats SEC(".maps");

/* A plain hash, not an LRU: an entry lives exactly as long as its connection, and a full
 * table is counted rather than making room by evicting a live connection's entry.
 * Preallocated, as podsteer_transi is: a connection's entry is made on the CPU that runs
 * connect() and removed on whichever one handles its close, and a map that allocates per
 * entry (BPF_F_NO_PREALLOC) then refills one CPU's cache while the other's overflows:
 * insert and delete cost 2-3x more (bench/tuplemap.bpf.c). The price is the memory of
 * every entry up front (bench/RESULTS.md). A map pinned by an earlier build keeps its
 * flags (loader: pin_maps_under). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct podsteer_origdst_key);
	__type(value, struct podsteer_addr);
} podsteer_orig SEC(".maps");

/* The application socket's original destination (outbound TCP, DNS). Lives and dies with
 * the socket, so nothing leaks when connections close. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct podsteer_addr);
} podsteer_skorig SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podsteer_conn_ring);
} podsteer_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podsteer_events);
} podsteer_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podsteer_full);
} podsteer_full SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 8192);
	__type(key, struct podsteer_listener_key);
	__type(value, __u64);
} podsteer_listen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct podsteer_tuple_key);
	__type(value, __u8);
} podsteer_transi SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podsteer_config);
} podsteer_config SEC(".maps");

/* Connections the node itself opened to a pod (kubelet probes: their socket exists in the
 * node's netns), found by the pod's TC ingress program at their SYN -> the SYN's time
 * (ktime ns). The pod's sk_lookup program leaves such a connection to the app for
 * PODSTEER_NODE_CONN_TTL_NS. An LRU: a probe to a closed port never completes, and no
 * entry must outlive its use for long; the time check, not eviction, keeps a stale entry
 * from exempting a later connection. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct podsteer_tuple_key);
	__type(value, __u64);
} podsteer_node SEC(".maps");

/* The node proxies' processes, by cgroup v2 id: read by the socket programs and by each
 * pod's TC egress program */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct podsteer_proxy);
} podsteer_proxy SEC(".maps");

/* Connections that left a pod unsteered (lookup.bpf.c: podsteer_pod_out). A plain hash
 * (events are rare): one entry per pod with events, counted with atomic adds. Declared here
 * so that the socket hooks' object, loaded at install and at upgrade, creates it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_hole);
} podsteer_holes SEC(".maps");

/* A per-pod event row, made at the pod's first event (zero: the map's value, all zeros) */
static __always_inline void *pod_row(void *map, __u64 *cookie, const void *zero)
{
	void *v = bpf_map_lookup_elem(map, cookie);
	if (v)
		return v;
	bpf_map_update_elem(map, cookie, zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, cookie);
}

static __always_inline struct podsteer_counters *pod_counters(__u64 cookie)
{
	return bpf_map_lookup_elem(&podsteer_stats, &cookie);
}

static __always_inline int is_mapped_v4(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline void map_v4(__u8 *dst16, __be32 v4)
{
	__u32 *w = (__u32 *)dst16;
	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0xffff);
	w[3] = v4;
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* 127.0.0.0/8 (v4-mapped) or ::1 */
static __always_inline int is_loopback(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	if (is_mapped_v4(a))
		return (bpf_ntohl(w[3]) >> 24) == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

/* Keeps clang from merging per-branch loads of context fields into one load through a
 * computed pointer, which the verifier rejects for sock_ops, sk_lookup and bpf_sock. */
#define CTX_BARRIER() asm volatile("" ::: "memory")

#define COUNT(c, field)                  \
	do {                                 \
		if (c)                           \
			(c)->field++;                \
	} while (0)

#endif
