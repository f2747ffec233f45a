/* Where a connection from an enrolled pod goes, apart from any context: shared by the socket
 * hooks (steer.bpf.h: classify) and the pod's TC egress check (lookup.bpf.c:
 * podsteer_pod_out), so that the check stops exactly what the hooks would have steered. */
#ifndef PODSTEER_VERDICT_BPF_H
#define PODSTEER_VERDICT_BPF_H

#include "common.bpf.h"

#define DNS_PORT 53

/* EXCLUDED: an excluded destination (classify counts it and leaves it) */
enum verdict { LEAVE = 0, TO_OUTBOUND = 1, TO_DNS = 2, EXCLUDED = 3 };

static __always_inline int mark_is_proxys(__u32 mark, __u32 proxy_mark, __u32 mask)
{
	return (mark & mask) == (proxy_mark & mask);
}

static __always_inline int own_address(const struct podsteer_pod *pod, const __u8 *a)
{
	if (is_mapped_v4(a))
		return (pod->flags & PODSTEER_POD_HAS_IP4) && ((const __u32 *)a)[3] == pod->ip4;
	return (pod->flags & PODSTEER_POD_HAS_IP6) && same_addr(a, pod->ip6);
}

static __always_inline int excluded(const struct podsteer_pod *pod, __u64 cookie, const __u8 *a, __u16 port)
{
	struct podsteer_port_key pk = {.netns_cookie = cookie, .port = port,
				       .direction = PODSTEER_DIR_OUTBOUND};
	if (!(pod->flags & PODSTEER_POD_NO_OUT_PORTS) && bpf_map_lookup_elem(&podsteer_ports, &pk))
		return 1;
	if (pod->flags & PODSTEER_POD_NO_OUT_CIDRS)
		return 0;
	struct podsteer_cidr_key ck = {
		.prefixlen = PODSTEER_CIDR_COOKIE_BITS + 128,
		.netns_cookie_hi = bpf_htonl((__u32)(cookie >> 32)),
		.netns_cookie_lo = bpf_htonl((__u32)cookie),
	};
	__builtin_memcpy(ck.addr, a, 16);
	return bpf_map_lookup_elem(&podsteer_cidrs, &ck) != NULL;
}

/* A TCP connection to addr16 (v4-mapped for IPv4):port, as under Istio's nat OUTPUT chain:
 * TCP 53 (dns: the pod captures DNS) to the DNS listener unless it goes to loopback ("! -d
 * 127.0.0.1"); other TCP to the outbound listener unless it stays in the pod ("! -o lo").
 * Excluded destinations go direct, DNS included. */
static __always_inline int tcp_stays_in_pod(const struct podsteer_pod *pod, const __u8 *addr16, int dns)
{
	return is_loopback(addr16) || (!dns && own_address(pod, addr16));
}

static __always_inline enum verdict tcp_verdict(const struct podsteer_pod *pod, __u64 cookie, const __u8 *addr16,
						__u16 port, int dns)
{
	if (tcp_stays_in_pod(pod, addr16, dns))
		return LEAVE;
	if (excluded(pod, cookie, addr16, port))
		return EXCLUDED;
	return dns ? TO_DNS : TO_OUTBOUND;
}

/* ::1 */
static __always_inline void set_loopback6(__u8 *a)
{
	__u32 *w = (__u32 *)a;
	w[0] = 0;
	w[1] = 0;
	w[2] = 0;
	w[3] = bpf_htonl(1);
}

/* The outbound listener address in this pod: its own address, else loopback. */
static __always_inline void outbound_target(const struct podsteer_pod *pod, int want_v4,
					    __u8 *target)
{
	if (want_v4) {
		map_v4(target, (pod->flags & PODSTEER_POD_HAS_IP4) ? pod->ip4
								   : bpf_htonl(0x7f000001));
	} else if (pod->flags & PODSTEER_POD_HAS_IP6) {
		__builtin_memcpy(target, pod->ip6, 16);
	} else {
		set_loopback6(target);
	}
}

/* The DNS listener: 127.0.0.1, or [::1] for an IPv6 resolver (ztunnel listens on both) */
static __always_inline void dns_target(const __u8 *resolver, __u8 *target)
{
	if (is_mapped_v4(resolver))
		map_v4(target, bpf_htonl(0x7f000001));
	else
		set_loopback6(target);
}

#endif
