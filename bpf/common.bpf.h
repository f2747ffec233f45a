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

/* Set by the loader before load; defaults are DESIGN.md's. */
const volatile __u16 cfg_outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
const volatile __u16 cfg_inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
const volatile __u16 cfg_hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
const volatile __u16 cfg_dns_port = PODSTEER_DEFAULT_DNS_PORT;
const volatile __u32 cfg_proxy_mark = PODSTEER_DEFAULT_PROXY_MARK;
const volatile __u32 cfg_proxy_mark_mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_pod);
} podsteer_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_pod_meta);
} podsteer_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct podsteer_ip_key);
	__type(value, __u64);
} podsteer_ips SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
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
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct podsteer_config);
} podsteer_config SEC(".maps");

static __always_inline struct podsteer_counters *pod_counters(__u64 cookie)
{
	return bpf_map_lookup_elem(&podsteer_stats, &cookie);
}

#define COUNT(c, field)                  \
	do {                                 \
		if (c)                           \
			(c)->field++;                \
	} while (0)

#endif
