// SPDX-License-Identifier: GPL-2.0
/* Inbound capture: an sk_lookup program attached to one enrolled pod's network namespace.
 *
 * The kernel runs it when a packet in this netns matches no existing connection and is
 * about to be handed to a listening socket: a SYN, the ACK that completes a SYN cookie,
 * a SYN that reuses the tuple of a TIME_WAIT socket. It runs after the kernel has parsed
 * and reassembled the packet, for every local address of the netns, so IP options,
 * extension headers, fragments and addresses added after enroll need nothing here. The
 * new connection goes to the proxy's inbound listener; connections the pod makes to
 * itself (loopback, its own address, the proxy's connections to the app) go where they
 * were addressed.
 *
 * sk_lookup programs cannot read the netns cookie, so each pod gets its own instance
 * with the cookie written into its code: the program knows its pod by where it runs.
 * Settings come from podsteer_config, so an instance makes no map of its own. */
#define PODSTEER_NO_RODATA
#include "common.bpf.h"

/* The loader replaces this 64-bit immediate with the pod's netns cookie before load
 * (loader/lookup_cookie.h, PODSTEER_LOOKUP_COOKIE_MAGIC): exactly one ld_imm64 carries it. */
static __always_inline __u64 pod_cookie(void)
{
	__u64 c;
	asm volatile("%0 = " PODSTEER_LOOKUP_COOKIE_MAGIC_STR " ll" : "=r"(c));
	return c;
}

/* kubelet probe sources (DESIGN.md): never redirected inbound */
#define PROBE_SRC4 0xa9fe077f /* 169.254.7.127 */

static __always_inline int is_probe_src6(const __u8 *a)
{
	const __u32 *w = (const __u32 *)a;
	return w[0] == bpf_htonl(0xfd169254) && w[1] == bpf_htonl(0x71271337) && w[2] == 0xffffffff &&
	       w[3] == 0xffffffff;
}

/* Hands the connection to the proxy's inbound listener in this pod; 0 when it did. The
 * AF_INET6 listener is asked first: ztunnel binds [::], which serves IPv4 clients too, so
 * the usual case is one lookup. An IPv6-only listener refuses an IPv4 client, and then
 * an AF_INET one is tried. */
static __always_inline long assign_listener(struct bpf_sk_lookup *ctx, __u64 cookie, __u16 inbound_port)
{
	struct podsteer_listener_key k = {.netns_cookie = cookie, .port = inbound_port, .family = AF_INET6};
	struct bpf_sock *sk = bpf_map_lookup_elem(&podsteer_listeners, &k);
	long err = -1;
	if (sk) {
		err = bpf_sk_assign(ctx, sk, 0);
		bpf_sk_release(sk);
	}
	if (err && ctx->family == AF_INET) {
		k.family = AF_INET;
		sk = bpf_map_lookup_elem(&podsteer_listeners, &k);
		if (sk) {
			err = bpf_sk_assign(ctx, sk, 0);
			bpf_sk_release(sk);
		}
	}
	return err;
}

SEC("sk_lookup")
int podsteer_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u32 zero = 0;
	struct podsteer_config *cfg = bpf_map_lookup_elem(&podsteer_config, &zero);
	if (!cfg)
		return SK_PASS;
	__u16 port = (__u16)ctx->local_port, inbound_port = cfg->inbound_port;
	/* the proxy's own listeners (a client that calls 15001 or 15006 directly reaches the
	 * proxy, which refuses calls to itself) and HBONE, which is never redirected */
	if (port == inbound_port || port == cfg->hbone_port || port == cfg->outbound_port)
		return SK_PASS;
	__u64 cookie = pod_cookie();
	struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	if (!pod)
		return SK_PASS; /* being unenrolled: the pod entry goes first */

	struct podsteer_tuple_key t = {.netns_cookie = cookie, .dst_port = port,
				       .src_port = bpf_ntohs(ctx->remote_port)};
	int probe;
	if (ctx->family == AF_INET) {
		__u32 dst = ctx->local_ip4;
		CTX_BARRIER();
		__u32 src = ctx->remote_ip4;
		CTX_BARRIER();
		map_v4(t.dst_addr, dst);
		map_v4(t.src_addr, src);
		probe = src == bpf_htonl(PROBE_SRC4);
	} else {
		__u32 *d = (__u32 *)t.dst_addr, *s = (__u32 *)t.src_addr;
		d[0] = ctx->local_ip6[0];
		CTX_BARRIER();
		d[1] = ctx->local_ip6[1];
		CTX_BARRIER();
		d[2] = ctx->local_ip6[2];
		CTX_BARRIER();
		d[3] = ctx->local_ip6[3];
		CTX_BARRIER();
		s[0] = ctx->remote_ip6[0];
		CTX_BARRIER();
		s[1] = ctx->remote_ip6[1];
		CTX_BARRIER();
		s[2] = ctx->remote_ip6[2];
		CTX_BARRIER();
		s[3] = ctx->remote_ip6[3];
		CTX_BARRIER();
		probe = is_probe_src6(t.src_addr);
	}
	/* Made inside the pod: a source that is loopback or the destination itself can only
	 * be local (the kernel drops such sources arriving on an interface); the proxy's
	 * connections from a client's address are in podsteer_transit while their SYN flies.
	 * (Not by where the SYN arrived: bpf_sk_lookup.ingress_ifindex of a packet the pod
	 * sends to its own address is the interface that holds the address, not lo.) */
	if (is_loopback(t.src_addr) || same_addr(t.src_addr, t.dst_addr) ||
	    bpf_map_lookup_elem(&podsteer_transit, &t))
		return SK_PASS;

	struct podsteer_counters *c = pod_counters(cookie);
	struct podsteer_port_key pk = {.netns_cookie = cookie, .port = port, .direction = PODSTEER_DIR_INBOUND};
	if (probe || (!(pod->flags & PODSTEER_POD_NO_IN_PORTS) && bpf_map_lookup_elem(&podsteer_ports, &pk))) {
		COUNT(c, bypassed);
		return SK_PASS;
	}
	if (assign_listener(ctx, cookie, inbound_port)) { /* none, or none that takes this family */
		COUNT(c, proxy_missing);
		return (pod->flags & PODSTEER_POD_FAIL_OPEN) ? SK_PASS : SK_DROP;
	}
	COUNT(c, redirected_in);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
