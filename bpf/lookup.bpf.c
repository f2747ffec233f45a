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
#include "verdict.bpf.h"

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
	struct bpf_sock *sk = bpf_map_lookup_elem(&podsteer_listen, &k);
	long err = -1;
	if (sk) {
		err = bpf_sk_assign(ctx, sk, 0);
		bpf_sk_release(sk);
	}
	if (err && ctx->family == AF_INET) {
		k.family = AF_INET;
		sk = bpf_map_lookup_elem(&podsteer_listen, &k);
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
	 * connections from a client's address are in podsteer_transi while their SYN flies.
	 * (Not by where the SYN arrived: bpf_sk_lookup.ingress_ifindex of a packet the pod
	 * sends to its own address is the interface that holds the address, not lo.) */
	if (is_loopback(t.src_addr) || same_addr(t.src_addr, t.dst_addr) ||
	    bpf_map_lookup_elem(&podsteer_transi, &t))
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

/* A TCP SYN without ACK: its addresses (v4-mapped for IPv4) and ports, as in the packet */
struct syn {
	__u8 src[16], dst[16];
	__be16 sport, dport;
	int v4;
};

#define NEXTHDR_HOP_ 0
#define NEXTHDR_ROUTING_ 43
#define NEXTHDR_FRAGMENT_ 44
#define NEXTHDR_DEST_ 60
/* The extension headers a socket can put before TCP (ipv6_txoptions: hop-by-hop,
 * destination options, routing header, destination options) and a fragment header: a local
 * socket's SYN carries at most these five. */
#define IP6_EXT_MAX 5

struct ip6_ext {
	__u8 nexthdr, hdrlen;
	__be16 frag_off; /* a fragment header's offset and flags (its hdrlen byte is reserved) */
};

/* The TCP header of an IPv6 packet, past its extension headers: NULL if the packet is not
 * TCP, is a fragment other than the first, or has more headers than a socket can add. An
 * unprivileged IPV6_RTHDR (or, with CAP_NET_RAW, hop-by-hop or destination options) must not
 * hide a SYN from the checks. */
static __always_inline void *ip6_tcp(struct ip6_hdr *ip6, void *end)
{
	__u8 nh = ip6->nexthdr;
	void *p = ip6 + 1;
#pragma unroll
	for (int i = 0; i < IP6_EXT_MAX; i++) {
		if (nh == IPPROTO_TCP)
			return p;
		if (nh != NEXTHDR_HOP_ && nh != NEXTHDR_ROUTING_ && nh != NEXTHDR_DEST_ && nh != NEXTHDR_FRAGMENT_)
			return NULL;
		struct ip6_ext *e = p;
		if ((void *)(e + 1) > end)
			return NULL;
		if (nh == NEXTHDR_FRAGMENT_) {
			if (e->frag_off & bpf_htons(0xfff8))
				return NULL; /* not the first fragment: no TCP header in it */
			p += 8;
		} else {
			p += (e->hdrlen + 1) * 8;
		}
		nh = e->nexthdr;
	}
	return nh == IPPROTO_TCP ? p : NULL;
}

/* Fills s from skb's packet if it is a TCP SYN without ACK (IPv4 unfragmented, IPv6 past its
 * extension headers); 0 for any other packet, the fast path of both TC programs. */
static __always_inline int parse_syn(struct __sk_buff *skb, struct syn *s)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct tcp_ports_flags *tcp;
	if (skb->protocol == bpf_htons(ETH_P_IP_)) {
		struct ip4_hdr *ip = data + ETH_HLEN_;
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || (ip->frag_off & bpf_htons(0x1fff)))
			return 0;
		tcp = (void *)ip + (ip->ihl_version & 0xf) * 4;
		if ((void *)(tcp + 1) > end || (tcp->flags & (TCPF_SYN_ | TCPF_ACK_)) != TCPF_SYN_)
			return 0;
		map_v4(s->src, ip->saddr);
		map_v4(s->dst, ip->daddr);
		s->v4 = 1;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6_)) {
		struct ip6_hdr *ip6 = data + ETH_HLEN_;
		if ((void *)(ip6 + 1) > end)
			return 0;
		tcp = ip6_tcp(ip6, end);
		if (!tcp || (void *)(tcp + 1) > end || (tcp->flags & (TCPF_SYN_ | TCPF_ACK_)) != TCPF_SYN_)
			return 0;
		__builtin_memcpy(s->src, ip6->saddr, 16);
		__builtin_memcpy(s->dst, ip6->daddr, 16);
		s->v4 = 0;
	} else {
		return 0;
	}
	s->sport = tcp->source;
	s->dport = tcp->dest;
	return 1;
}

SEC("tc")
int podsteer_node_in(struct __sk_buff *skb)
{
	struct syn s;
	if (!parse_syn(skb, &s))
		return TC_NO_VERDICT;
	/* The tuple as the node's socket would receive a packet of this connection (lookup
	 * helpers take the remote end as "source"): from the pod back to the node. */
	struct bpf_sock_tuple r = {};
	__u32 rlen;
	if (s.v4) {
		r.ipv4.saddr = ((__u32 *)s.dst)[3];
		r.ipv4.daddr = ((__u32 *)s.src)[3];
		r.ipv4.sport = s.dport;
		r.ipv4.dport = s.sport;
		rlen = sizeof(r.ipv4);
	} else {
		__builtin_memcpy(r.ipv6.saddr, s.dst, 16);
		__builtin_memcpy(r.ipv6.daddr, s.src, 16);
		r.ipv6.sport = s.dport;
		r.ipv6.dport = s.sport;
		rlen = sizeof(r.ipv6);
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
	struct podsteer_tuple_key t = {.netns_cookie = pod_cookie(), .dst_port = bpf_ntohs(s.dport),
				       .src_port = bpf_ntohs(s.sport)};
	__builtin_memcpy(t.src_addr, s.src, 16);
	__builtin_memcpy(t.dst_addr, s.dst, 16);
	__u64 now = bpf_ktime_get_ns();
	bpf_map_update_elem(&podsteer_node, &t, &now, BPF_ANY);
	return TC_NO_VERDICT;
}

/* ---- TC egress on the pod's interfaces: the connections the socket hooks did not see
 *
 * Istio's rules live in the pod's netns and catch every process in it; podsteer's socket
 * hooks catch the processes below the hook cgroup. A process in the pod's netns but outside
 * that cgroup (entered from the node, started by a runtime elsewhere), or any process once
 * someone detached the hooks, would leave the mesh unseen. Every connection the hooks steer
 * stays inside the pod (to the proxy's listener on loopback or the pod's own address, over
 * lo), so a SYN on the pod's interface is either the proxy's (its upstream connections), a
 * connection the hooks leave alone (excluded, fail-open without a proxy), or a hole. A hole
 * is stopped here, its SYN dropped, and counted in podsteer_holes; a fail-open pod whose
 * proxy is not listening goes direct by design, only counted. Every other packet returns
 * after the parse (parse_syn). */

#define TC_ACT_SHOT_ 2 /* also TCX_DROP */

/* Is the packet's socket a node proxy's: its cgroup (the cgroup of the process that made
 * it) in podsteer_proxy, or, on a node that trusts the mark alone, the proxy mark? */
static __always_inline int proxys_socket(struct __sk_buff *skb, const struct podsteer_config *cfg)
{
	__u64 key = bpf_skb_cgroup_id(skb);
	if (key && bpf_map_lookup_elem(&podsteer_proxy, &key))
		return 1;
	key = PODSTEER_PROXY_ANY;
	return mark_is_proxys(skb->mark, cfg->proxy_mark, cfg->proxy_mark_mask) &&
	       bpf_map_lookup_elem(&podsteer_proxy, &key);
}

/* Does anything listen on target (v4-mapped or v6):port in the pod's netns? */
static __always_inline int listening_at(struct __sk_buff *skb, const __u8 *target, __u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	if (is_mapped_v4(target)) {
		t.ipv4.daddr = ((const __u32 *)target)[3];
		t.ipv4.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(t.ipv6.daddr, target, 16);
		t.ipv6.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Counts a hole once per socket: a retransmitted SYN has the same socket cookie. */
static __always_inline void count_hole(__u64 cookie, __u64 sock, int passed)
{
	struct podsteer_hole zero = {};
	struct podsteer_hole *h = pod_row(&podsteer_holes, &cookie, &zero);
	if (!h)
		return;
	if (h->last_sock == sock)
		return;
	h->last_sock = sock;
	if (passed)
		__sync_fetch_and_add(&h->passed, 1);
	else
		__sync_fetch_and_add(&h->dropped, 1);
}

SEC("tc")
int podsteer_pod_out(struct __sk_buff *skb)
{
	struct syn s;
	if (!parse_syn(skb, &s) || !skb->sk)
		return TC_NO_VERDICT; /* a packet without a socket here was forwarded, not made here */
	__u64 cookie = pod_cookie();
	struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	__u32 zero = 0;
	struct podsteer_config *cfg = bpf_map_lookup_elem(&podsteer_config, &zero);
	if (!pod || !cfg || proxys_socket(skb, cfg))
		return TC_NO_VERDICT;
	__u16 port = bpf_ntohs(s.dport);
	int dns = port == DNS_PORT && (pod->flags & PODSTEER_POD_DNS);
	enum verdict v = tcp_verdict(pod, cookie, s.dst, port, dns);
	if (v == LEAVE || v == EXCLUDED)
		return TC_NO_VERDICT;
	int passed = 0;
	if (pod->flags & PODSTEER_POD_FAIL_OPEN) {
		__u8 target[16];
		if (v == TO_DNS)
			dns_target(s.dst, target);
		else
			outbound_target(pod, s.v4, target);
		passed = !listening_at(skb, target, v == TO_DNS ? cfg->dns_port : cfg->outbound_port);
	}
	count_hole(cookie, bpf_get_socket_cookie(skb), passed);
	return passed ? TC_NO_VERDICT : TC_ACT_SHOT_;
}

char LICENSE[] SEC("license") = "GPL";
