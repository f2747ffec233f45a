/* The socket hooks' steering decision for connect()/sendmsg(), apart from the socket:
 * plain values in, a verdict and a target out, so that a BPF unit test
 * (tests/bpf/steer_test.bpf.c, run with BPF_PROG_TEST_RUN) runs the very code the hooks
 * run, against prepared maps. Included by sock.bpf.c; nothing here touches a context. */
#ifndef PODSTEER_STEER_BPF_H
#define PODSTEER_STEER_BPF_H

#include "verdict.bpf.h"

/* The socket programs' own map (the per-pod instances of lookup.bpf.c do not use it) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct podsteer_guard);
} podsteer_guard SEC(".maps");

/* Is the calling process a node proxy's (process context only: connect, sendmsg, bind)? A
 * mark anyone with CAP_NET_RAW can set proves nothing by itself; the process's cgroup does. */
static __always_inline int proxy_process(void)
{
	/* the proxy's cgroup first: one lookup for the proxy's own connections; the node-wide
	 * "the mark alone" entry only for a mark from anyone else */
	__u64 key = bpf_get_current_cgroup_id();
	if (bpf_map_lookup_elem(&podsteer_proxy, &key))
		return 1;
	key = PODSTEER_PROXY_ANY;
	return bpf_map_lookup_elem(&podsteer_proxy, &key) != NULL;
}

enum guard_event { GUARD_FORGED_MARK, GUARD_BIND };

static __always_inline void count_guard(__u64 cookie, enum guard_event what)
{
	struct podsteer_guard zero = {};
	struct podsteer_guard *g = pod_row(&podsteer_guard, &cookie, &zero);
	if (!g)
		return;
	if (what == GUARD_BIND)
		g->bind_refused++;
	else
		g->forged_mark++;
}

static __always_inline int marked_by_proxy(__u32 mark)
{
	return mark_is_proxys(mark, cfg_proxy_mark, cfg_proxy_mark_mask);
}

/* What to do with a connect()/sendmsg() to addr16 (v4-mapped for IPv4):port, as under
 * Istio's nat OUTPUT chain: the proxy's own sockets are left alone; UDP 53 goes to the
 * DNS listener unless it stays in the pod (loopback, its own address: "! -o lo"); TCP 53
 * unless it goes to loopback ("! -d 127.0.0.1"); other TCP to the outbound listener
 * unless it stays in the pod. Excluded destinations go direct, DNS included. */
static __always_inline enum verdict classify(const struct bpf_sock_addr *ctx, __u64 cookie,
					     struct podsteer_pod *pod, const __u8 *addr16, __u16 port)
{
	int dns = port == DNS_PORT && (pod->flags & PODSTEER_POD_DNS);
	if (ctx->type == SOCK_DGRAM) {
		if (!dns || is_loopback(addr16) || own_address(pod, addr16))
			return LEAVE;
	} else if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP) {
		return LEAVE;
	} else if (tcp_stays_in_pod(pod, addr16, dns)) {
		return LEAVE;
	}
	/* the rest as tcp_verdict() (verdict.bpf.h), which the TC egress check runs; written out
	 * here because the shared form costs this program 60 instructions */
	if (excluded(pod, cookie, addr16, port)) {
		struct podsteer_counters *c = pod_counters(cookie);
		COUNT(c, bypassed);
		return LEAVE;
	}
	return dns ? TO_DNS : TO_OUTBOUND;
}

/* What steer() does with a connect()/sendmsg() to addr16 (v4-mapped for IPv4):port from
 * an enrolled pod's unmarked socket: LEAVE, or where to (target, *new_port). The caller has
 * checked marked_by_proxy() (the proxy's sockets connect as often as the apps, and leave
 * before any lookup) and found the pod's entry in podsteer_pods. Of ctx only type and
 * protocol are read, where they are needed (not before: a value read early would have to
 * live across the lookups, which costs the hooks instructions), so a test may pass a copy. */
static __always_inline enum verdict decide(const struct bpf_sock_addr *ctx, __u64 cookie, struct podsteer_pod *pod,
					   const __u8 *addr16, __u16 port, __u8 *target, __u16 *new_port)
{
	enum verdict v = classify(ctx, cookie, pod, addr16, port);
	if (v == TO_DNS) {
		dns_target(addr16, target);
		*new_port = cfg_dns_port;
	} else if (v == TO_OUTBOUND) {
		outbound_target(pod, is_mapped_v4(addr16), target);
		*new_port = cfg_outbound_port;
	}
	return v;
}

#endif
