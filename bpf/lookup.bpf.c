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

/* A connection the node itself opened (a kubelet probe), as the pod's TC ingress program
 * found it at its SYN, within PODSTEER_NODE_CONN_TTL_NS of that SYN. */
static __always_inline int opened_by_node(const struct podsteer_tuple_key *t)
{
	__u64 *syn_ns = bpf_map_lookup_elem(&podsteer_node, t);
	return syn_ns && bpf_ktime_get_ns() - *syn_ns < PODSTEER_NODE_CONN_TTL_NS;
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
	if (pod->flags & PODSTEER_POD_NO_INBOUND)
		return SK_PASS; /* outbound-only pod: inbound goes where it was addressed */
	struct podsteer_port_key pk = {.netns_cookie = cookie, .port = port, .direction = PODSTEER_DIR_INBOUND};
	if (probe || (!(pod->flags & PODSTEER_POD_NO_IN_PORTS) && bpf_map_lookup_elem(&podsteer_ports, &pk)) ||
	    opened_by_node(&t)) {
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

/* ---- TC ingress on the pod's interfaces: connections the node itself opened
 *
 * Istio exempts the kubelet's probes by a rule in the node's netns that SNATs every
 * connection whose socket exists on the node (-m owner --socket-exists) to 169.254.7.127.
 * podsteer asks the same question from inside the pod, at the SYN: does the node's netns
 * hold the connecting socket of this tuple (SYN_SENT)? Traffic forwarded through the node
 * (kube-proxy's NodePort paths, masqueraded to the node's address) has no socket there
 * and stays captured. The answer goes to podsteer_node for the pod's sk_lookup program;
 * every packet goes on unchanged (TC_ACT_UNSPEC: "no verdict" under clsact, TCX_NEXT
 * under tcx), so other programs on the interface keep their chain. */

/* The node's netns id as seen from this pod's netns (its veth peer's), written over this
 * placeholder before load (loader/lookup_cookie.h) */
static __always_inline __u64 node_nsid(void)
{
	__u64 id;
	asm volatile("%0 = " PODSTEER_NODE_NSID_MAGIC_STR " ll" : "=r"(id));
	return id;
}

#define ETH_HLEN_ 14
#define ETH_P_IP_ 0x0800
#define ETH_P_IPV6_ 0x86DD
#define TC_NO_VERDICT (-1) /* TC_ACT_UNSPEC, TCX_NEXT */
#define TCP_SYN_SENT_ 2    /* BPF_TCP_SYN_SENT */

struct tcp_ports_flags {
	__be16 source, dest;
	__be32 seq, ack_seq;
	__u8 off, flags;
};
#define TCPF_SYN_ 0x02
#define TCPF_ACK_ 0x10

struct ip4_hdr {
	__u8 ihl_version, tos;
	__be16 tot_len, id, frag_off;
	__u8 ttl, protocol;
	__sum16 check;
	__be32 saddr, daddr;
};

struct ip6_hdr {
	__be32 vtc_flow;
	__be16 payload_len;
	__u8 nexthdr, hop_limit;
	__u8 saddr[16], daddr[16];
};

SEC("tc")
int podsteer_node_in(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct podsteer_tuple_key t = {};
	/* The tuple as the node's socket would receive a packet of this connection (lookup
	 * helpers take the remote end as "source"): from the pod back to the node. */
	struct bpf_sock_tuple r = {};
	struct tcp_ports_flags *tcp;
	__u32 rlen;
	if (skb->protocol == bpf_htons(ETH_P_IP_)) {
		struct ip4_hdr *ip = data + ETH_HLEN_;
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || (ip->frag_off & bpf_htons(0x1fff)))
			return TC_NO_VERDICT;
		tcp = (void *)ip + (ip->ihl_version & 0xf) * 4;
		if ((void *)(tcp + 1) > end || (tcp->flags & (TCPF_SYN_ | TCPF_ACK_)) != TCPF_SYN_)
			return TC_NO_VERDICT;
		r.ipv4.saddr = ip->daddr;
		r.ipv4.daddr = ip->saddr;
		r.ipv4.sport = tcp->dest;
		r.ipv4.dport = tcp->source;
		rlen = sizeof(r.ipv4);
		map_v4(t.src_addr, ip->saddr);
		map_v4(t.dst_addr, ip->daddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6_)) {
		struct ip6_hdr *ip6 = data + ETH_HLEN_;
		/* a SYN behind extension headers is left to sk_lookup: captured, as by default */
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_NO_VERDICT;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end || (tcp->flags & (TCPF_SYN_ | TCPF_ACK_)) != TCPF_SYN_)
			return TC_NO_VERDICT;
		__builtin_memcpy(r.ipv6.saddr, ip6->daddr, 16);
		__builtin_memcpy(r.ipv6.daddr, ip6->saddr, 16);
		r.ipv6.sport = tcp->dest;
		r.ipv6.dport = tcp->source;
		rlen = sizeof(r.ipv6);
		__builtin_memcpy(t.src_addr, ip6->saddr, 16);
		__builtin_memcpy(t.dst_addr, ip6->daddr, 16);
	} else {
		return TC_NO_VERDICT;
	}
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &r, rlen, node_nsid(), 0);
	if (!sk)
		return TC_NO_VERDICT;
	/* only a connecting socket: a listener on the node that happens to own the source
	 * port says nothing about who sent this SYN */
	int state = sk->state;
	bpf_sk_release(sk);
	if (state != TCP_SYN_SENT_)
		return TC_NO_VERDICT;
	t.netns_cookie = pod_cookie();
	t.dst_port = bpf_ntohs(tcp->dest);
	t.src_port = bpf_ntohs(tcp->source);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&podsteer_node, &t, &now, BPF_ANY);
	return TC_NO_VERDICT;
}

char LICENSE[] SEC("license") = "GPL";
