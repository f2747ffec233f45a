// SPDX-License-Identifier: GPL-2.0
/* Outbound and DNS capture: cgroup socket hooks attached once per node at the hook
 * cgroup. They act only for sockets whose netns cookie has a podsteer_pods entry.
 *
 *  connect4/6     TCP connect -> the outbound listener in the same netns (dst = the pod's own
 *                 address, so the proxy sees the pod as peer); TCP/UDP 53 -> DNS listener
 *  sock_ops       when the SYN leaves, record (pod addr, port) -> original destination for
 *                 the proxy's SO_ORIGINAL_DST
 *  getsockopt     answer SO_ORIGINAL_DST at SOL_IP / SOL_IPV6
 *  getpeername4/6 the application sees the original destination as its peer
 *  sendmsg4/6     unconnected UDP 53 -> DNS listener
 *  recvmsg4/6     replies from the DNS listener appear to come from the original resolver */
#include <linux/tcp.h>
#include "common.bpf.h"

#define SOL_IP_LEVEL 0
#define SOL_IPV6_LEVEL 41
#define SO_ORIGINAL_DST_OPT 80 /* also IP6T_SO_ORIGINAL_DST */
#define DNS_PORT 53

enum verdict { LEAVE = 0, TO_OUTBOUND = 1, TO_DNS = 2 };

static __always_inline void map_v4(__u8 *dst16, __be32 v4)
{
	__u32 *w = (__u32 *)dst16;
	w[0] = 0;
	w[1] = 0;
	w[2] = bpf_htonl(0xffff);
	w[3] = v4;
}

static __always_inline int is_mapped_v4(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

static __always_inline int is_loopback(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	if (is_mapped_v4(a))
		return (bpf_ntohl(w[3]) >> 24) == 127;
	return w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == bpf_htonl(1);
}

static __always_inline int same_addr(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int marked_by_proxy(struct bpf_sock *sk)
{
	return (sk->mark & cfg_proxy_mark_mask) == (cfg_proxy_mark & cfg_proxy_mark_mask);
}

static __always_inline int own_address(const struct podsteer_pod *pod, const __u8 *a)
{
	if (is_mapped_v4(a))
		return (pod->flags & PODSTEER_POD_HAS_IP4) && ((const __u32 *)a)[3] == pod->ip4;
	return (pod->flags & PODSTEER_POD_HAS_IP6) && same_addr(a, pod->ip6);
}

static __always_inline int excluded(__u64 cookie, const __u8 *a, __u16 port)
{
	struct podsteer_port_key pk = {.netns_cookie = cookie, .port = port,
				       .direction = PODSTEER_DIR_OUTBOUND};
	if (bpf_map_lookup_elem(&podsteer_ports, &pk))
		return 1;
	struct podsteer_cidr_key ck = {
		.prefixlen = PODSTEER_CIDR_COOKIE_BITS + 128,
		.netns_cookie_hi = bpf_htonl((__u32)(cookie >> 32)),
		.netns_cookie_lo = bpf_htonl((__u32)cookie),
	};
	__builtin_memcpy(ck.addr, a, 16);
	return bpf_map_lookup_elem(&podsteer_cidrs, &ck) != NULL;
}

/* What to do with a connect()/sendmsg() to addr16 (v4-mapped for IPv4):port. */
static __always_inline enum verdict classify(struct bpf_sock_addr *ctx, __u64 cookie,
					     struct podsteer_pod *pod, const __u8 *addr16,
					     __u16 port, struct podsteer_counters *c)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk || marked_by_proxy(sk))
		return LEAVE;
	if (ctx->type == SOCK_DGRAM)
		return (port == DNS_PORT && (pod->flags & PODSTEER_POD_DNS)) ? TO_DNS : LEAVE;
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return LEAVE;
	if (port == DNS_PORT && (pod->flags & PODSTEER_POD_DNS))
		return TO_DNS;
	if (is_loopback(addr16) || own_address(pod, addr16))
		return LEAVE;
	if (excluded(cookie, addr16, port)) {
		COUNT(c, bypassed);
		return LEAVE;
	}
	return TO_OUTBOUND;
}

static __always_inline int remember(struct bpf_sock_addr *ctx, const __u8 *addr16, __be16 port,
				    __u16 family)
{
	struct podsteer_addr *o = bpf_sk_storage_get(&podsteer_skorig, ctx->sk, 0,
						     BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return -1;
	__builtin_memcpy(o->addr, addr16, 16);
	o->port = port;
	o->family = family;
	o->pad = 0;
	return 0;
}

/* Is anything listening on target (v4-mapped or v6):port in this netns? */
static __always_inline int listening(struct bpf_sock_addr *ctx, const __u8 *target, __u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	if (is_mapped_v4(target)) {
		t.ipv4.daddr = ((const __u32 *)target)[3];
		t.ipv4.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(t.ipv6.daddr, target, 16);
		t.ipv6.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
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
		__u32 *w = (__u32 *)target;
		w[0] = 0;
		w[1] = 0;
		w[2] = 0;
		w[3] = bpf_htonl(1);
	}
}

/* Shared by connect4/connect6/sendmsg4/sendmsg6. addr16 is the destination, v4-mapped
 * for IPv4. On redirect, target receives the new destination and the new port is
 * returned; 0 means leave the call alone, -1 means refuse it. */
static __always_inline int steer(struct bpf_sock_addr *ctx, const __u8 *addr16, __be16 nport,
				 __u16 family, __u8 *target)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	if (!pod)
		return 0;
	struct podsteer_counters *c = pod_counters(cookie);
	enum verdict v = classify(ctx, cookie, pod, addr16, bpf_ntohs(nport), c);
	if (v == LEAVE)
		return 0;
	if (v == TO_DNS) {
		/* DESIGN.md: the DNS listener is on 127.0.0.1 */
		map_v4(target, bpf_htonl(0x7f000001));
		if (remember(ctx, addr16, nport, family))
			return -1;
		COUNT(c, dns_redirected);
		return cfg_dns_port;
	}
	outbound_target(pod, is_mapped_v4(addr16), target);
	/* Only a fail-open pod needs to know now whether the proxy listens (a socket lookup
	 * costs about a quarter of this program). Fail closed, the connection is sent to the
	 * listener regardless: without one the kernel refuses it, and sock_ops counts that. */
	if ((pod->flags & PODSTEER_POD_FAIL_OPEN) && !listening(ctx, target, cfg_outbound_port)) {
		COUNT(c, proxy_missing);
		return 0;
	}
	COUNT(c, redirected_out);
	if (remember(ctx, addr16, nport, family))
		return -1;
	return cfg_outbound_port;
}

static __always_inline int steer4(struct bpf_sock_addr *ctx)
{
	__u8 a[16], target[16];
	map_v4(a, ctx->user_ip4);
	int port = steer(ctx, a, (__be16)ctx->user_port, AF_INET, target);
	if (port < 0)
		return 0;
	if (port > 0) {
		ctx->user_ip4 = ((__u32 *)target)[3];
		ctx->user_port = bpf_htons((__u16)port);
	}
	return 1;
}

static __always_inline int steer6(struct bpf_sock_addr *ctx)
{
	__u8 a[16], target[16];
	__u32 *w = (__u32 *)a;
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	int port = steer(ctx, a, (__be16)ctx->user_port, AF_INET6, target);
	if (port < 0)
		return 0;
	if (port > 0) {
		__u32 *t = (__u32 *)target;
		ctx->user_ip6[0] = t[0];
		ctx->user_ip6[1] = t[1];
		ctx->user_ip6[2] = t[2];
		ctx->user_ip6[3] = t[3];
		ctx->user_port = bpf_htons((__u16)port);
	}
	return 1;
}

SEC("cgroup/connect4")
int podsteer_connect4(struct bpf_sock_addr *ctx) { return steer4(ctx); }

SEC("cgroup/connect6")
int podsteer_connect6(struct bpf_sock_addr *ctx) { return steer6(ctx); }

SEC("cgroup/sendmsg4")
int podsteer_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_DGRAM || ctx->user_port != bpf_htons(DNS_PORT))
		return 1;
	return steer4(ctx);
}

SEC("cgroup/sendmsg6")
int podsteer_sendmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_DGRAM || ctx->user_port != bpf_htons(DNS_PORT))
		return 1;
	return steer6(ctx);
}

/* The application's socket sees its original destination: a reply from the DNS listener
 * comes from the resolver, getpeername() returns what connect() was given. */
static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct podsteer_addr *o = bpf_sk_storage_get(&podsteer_skorig, sk, 0, 0);
	if (!o || !is_mapped_v4(o->addr))
		return 1;
	ctx->user_ip4 = ((__u32 *)o->addr)[3];
	ctx->user_port = o->port;
	return 1;
}

static __always_inline int restore6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct podsteer_addr *o = bpf_sk_storage_get(&podsteer_skorig, sk, 0, 0);
	if (!o)
		return 1;
	__u32 *w = (__u32 *)o->addr;
	ctx->user_ip6[0] = w[0];
	ctx->user_ip6[1] = w[1];
	ctx->user_ip6[2] = w[2];
	ctx->user_ip6[3] = w[3];
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/recvmsg4")
int podsteer_recvmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(0x7f000001) || ctx->user_port != bpf_htons(cfg_dns_port))
		return 1;
	return restore4(ctx);
}

SEC("cgroup/recvmsg6")
int podsteer_recvmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip6[0] || ctx->user_ip6[1] || ctx->user_ip6[2] != bpf_htonl(0xffff) ||
	    ctx->user_ip6[3] != bpf_htonl(0x7f000001) || ctx->user_port != bpf_htons(cfg_dns_port))
		return 1;
	return restore6(ctx);
}

SEC("cgroup/getpeername4")
int podsteer_getpeername4(struct bpf_sock_addr *ctx) { return restore4(ctx); }

SEC("cgroup/getpeername6")
int podsteer_getpeername6(struct bpf_sock_addr *ctx) { return restore6(ctx); }

#define TCP_SYN_SENT_STATE 2 /* BPF_TCP_SYN_SENT */
#define TCP_CLOSE_STATE 7    /* BPF_TCP_CLOSE */

SEC("sockops")
int podsteer_sockops(struct bpf_sock_ops *ops)
{
	if (ops->op == BPF_SOCK_OPS_STATE_CB) {
		/* only redirected sockets get here, and only until they are established */
		if (ops->args[0] == TCP_SYN_SENT_STATE && ops->args[1] == TCP_CLOSE_STATE) {
			/* the connect never got past SYN_SENT: nothing listened */
			struct podsteer_counters *c = pod_counters(bpf_get_netns_cookie(ops));
			COUNT(c, proxy_missing);
		} else if (ops->args[1] != TCP_CLOSE_STATE) {
			/* it got an answer: no more state callbacks for this connection */
			bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		return 1;
	}
	if (ops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return 1;
	struct podsteer_addr *o = bpf_sk_storage_get(&podsteer_skorig, sk, 0, 0);
	if (!o)
		return 1;
	struct podsteer_origdst_key k = {
		.netns_cookie = bpf_get_netns_cookie(ops),
		.peer_port = (__u16)ops->local_port,
		.local_port = (__u16)bpf_ntohl(ops->remote_port),
	};
	if (ops->family == AF_INET) {
		map_v4(k.peer_addr, ops->local_ip4);
	} else {
		__u32 *w = (__u32 *)k.peer_addr;
		w[0] = ops->local_ip6[0];
		w[1] = ops->local_ip6[1];
		w[2] = ops->local_ip6[2];
		w[3] = ops->local_ip6[3];
	}
	bpf_map_update_elem(&podsteer_orig, &k, o, BPF_ANY);
	/* to count a listener that was missing (see BPF_SOCK_OPS_STATE_CB above) */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* Build the answer for SO_ORIGINAL_DST into optval; returns its length, 0 if none fits. */
static __always_inline int put_sockaddr(struct bpf_sockopt *ctx, const __u8 *addr16, __be16 port)
{
	void *optval = ctx->optval, *end = ctx->optval_end;
	if (ctx->level == SOL_IP_LEVEL) {
		struct sockaddr_in *sin = optval;
		if (!is_mapped_v4(addr16) || (void *)(sin + 1) > end)
			return 0;
		__builtin_memset(sin, 0, sizeof(*sin));
		sin->sin_family = AF_INET;
		sin->sin_port = port;
		sin->sin_addr.s_addr = ((const __u32 *)addr16)[3];
		return sizeof(*sin);
	}
	struct sockaddr_in6 *sin6 = optval;
	if ((void *)(sin6 + 1) > end)
		return 0;
	__builtin_memset(sin6, 0, sizeof(*sin6));
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = port;
	__builtin_memcpy(&sin6->sin6_addr, addr16, 16);
	return sizeof(*sin6);
}

SEC("cgroup/getsockopt")
int podsteer_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST_OPT ||
	    (ctx->level != SOL_IP_LEVEL && ctx->level != SOL_IPV6_LEVEL))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->type != SOCK_STREAM)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&podsteer_pods, &cookie))
		return 1;

	struct podsteer_origdst_key k = {
		.netns_cookie = cookie,
		.peer_port = bpf_ntohs((__be16)sk->dst_port),
		.local_port = (__u16)sk->src_port,
	};
	__u8 local[16];
	__u32 *w = (__u32 *)k.peer_addr, *l = (__u32 *)local;
	/* one load per field, each with a constant offset: the verifier forbids pointer
	 * arithmetic on a sock, which clang produces if the two branches share code */
	if (sk->family == AF_INET) {
		__u32 dst4 = sk->dst_ip4;
		asm volatile("" ::: "memory");
		__u32 src4 = sk->src_ip4;
		map_v4(k.peer_addr, dst4);
		map_v4(local, src4);
	} else {
		w[0] = sk->dst_ip6[0];
		asm volatile("" ::: "memory");
		w[1] = sk->dst_ip6[1];
		asm volatile("" ::: "memory");
		w[2] = sk->dst_ip6[2];
		asm volatile("" ::: "memory");
		w[3] = sk->dst_ip6[3];
		asm volatile("" ::: "memory");
		l[0] = sk->src_ip6[0];
		asm volatile("" ::: "memory");
		l[1] = sk->src_ip6[1];
		asm volatile("" ::: "memory");
		l[2] = sk->src_ip6[2];
		asm volatile("" ::: "memory");
		l[3] = sk->src_ip6[3];
	}
	int len;
	struct podsteer_addr *o = bpf_map_lookup_elem(&podsteer_orig, &k);
	if (o)
		len = put_sockaddr(ctx, o->addr, o->port);
	else /* not an outbound redirect: like conntrack, the original destination is the
	      * local address (inbound connections steered by TC keep it) */
		len = put_sockaddr(ctx, local, bpf_htons((__u16)sk->src_port));
	if (!len)
		return 1;
	ctx->optlen = len;
	/* keep the two stores apart: merged into one 8-byte store the verifier rejects it */
	asm volatile("" ::: "memory");
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
