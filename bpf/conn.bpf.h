/* How the socket hooks find one connection again, and what they decide about it, apart
 * from the hooks. Each hook sees the connection from its own side: sock_ops from the app's
 * socket at connect (its SYN leaving), getsockopt from the proxy's accepted socket,
 * getpeername and recvmsg from the app's socket again; the proxy's connection to an app
 * from the proxy's socket and then from the app's accepted one. The keys each builds must
 * be the same bytes, in each context's byte order. Contexts come in as pointers and are
 * only read here, so tests/bpf/conn_test.bpf.c runs this very code (BPF_PROG_TEST_RUN) over
 * copies of the contexts that its test fills. Included by sock.bpf.c. */
#ifndef PODSTEER_CONN_BPF_H
#define PODSTEER_CONN_BPF_H

#include "steer.bpf.h"

#define TCP_SYN_SENT_STATE 2 /* BPF_TCP_SYN_SENT */
#define TCP_CLOSE_STATE 7    /* BPF_TCP_CLOSE */

/* The app mark under the proxy's mask: what the proxy's connection from a client's address
 * carries (on_connect sets it), and the app's socket accepted from it (tcp_fwmark_accept) */
static __always_inline int app_marked(__u32 mark)
{
	return (mark & cfg_proxy_mark_mask) == (cfg_app_mark & cfg_proxy_mark_mask);
}

/* The mark on_connect gives the proxy's socket: the app mark under the mask, the bits
 * outside it as they were */
static __always_inline __u32 transit_mark(__u32 mark)
{
	return (mark & ~cfg_proxy_mark_mask) | (cfg_app_mark & cfg_proxy_mark_mask);
}

/* A port of ours a redirected app socket is connected to (sock_ops: remote_port is in
 * network byte order in its upper 16 bits, read with bpf_ntohl) */
static __always_inline int to_our_listener(__u16 port)
{
	return port == cfg_outbound_port || port == cfg_dns_port;
}

enum conn_role { CONN_NONE = 0, CONN_PROXY = 1, CONN_APP = 2 };

/* sock_ops' connect callback: the proxy's socket (its transit entry, when it connects from
 * an address not its pod's), an app's socket connect4 sent to a listener of ours (its
 * original destination), or neither */
static __always_inline enum conn_role connect_role(__u32 mark, __u32 remote_port)
{
	if (marked_by_proxy(mark))
		return CONN_PROXY;
	return to_our_listener((__u16)bpf_ntohl(remote_port)) ? CONN_APP : CONN_NONE;
}

#define CLOSE_TRANSIT 1 /* delete the socket's transit entry; if one was there, that is all */
#define CLOSE_ORIG 2    /* else delete its podsteer_orig entry */
#define CLOSE_MISSING 4 /* else, too: count proxy_missing (the connect never left SYN_SENT) */

/* sock_ops' state callback (only sockets on_connect asked it for): nothing but the close
 * acts. The proxy's connection from a client's address (on_connect gave it the app mark;
 * one made before that build still has the proxy's) has a transit entry, unless the app's
 * side completed the handshake (on_passive_established took it then). An app socket that
 * carries the app mark of its own has no transit entry, and goes on to its orig entry. */
static __always_inline __u32 close_plan(__u32 from, __u32 to, __u32 mark, __u32 remote_port)
{
	if (to != TCP_CLOSE_STATE)
		return 0;
	__u32 plan = 0;
	if (marked_by_proxy(mark))
		return CLOSE_TRANSIT;
	if (app_marked(mark))
		plan = CLOSE_TRANSIT;
	if (!to_our_listener((__u16)bpf_ntohl(remote_port)))
		return plan;
	plan |= CLOSE_ORIG;
	if (from == TCP_SYN_SENT_STATE)
		plan |= CLOSE_MISSING;
	return plan;
}

/* The connection's two addresses as sock_ops sees them (local = this socket's side) */
static __always_inline void sockops_addrs(struct bpf_sock_ops *ops, __u8 *local, __u8 *remote)
{
	if (ops->family == AF_INET) {
		__u32 l = ops->local_ip4;
		CTX_BARRIER();
		__u32 r = ops->remote_ip4;
		CTX_BARRIER();
		map_v4(local, l);
		map_v4(remote, r);
		return;
	}
	__u32 *l = (__u32 *)local, *r = (__u32 *)remote;
	l[0] = ops->local_ip6[0];
	CTX_BARRIER();
	l[1] = ops->local_ip6[1];
	CTX_BARRIER();
	l[2] = ops->local_ip6[2];
	CTX_BARRIER();
	l[3] = ops->local_ip6[3];
	CTX_BARRIER();
	r[0] = ops->remote_ip6[0];
	CTX_BARRIER();
	r[1] = ops->remote_ip6[1];
	CTX_BARRIER();
	r[2] = ops->remote_ip6[2];
	CTX_BARRIER();
	r[3] = ops->remote_ip6[3];
	CTX_BARRIER();
}

/* podsteer_transi key of a proxy socket connecting to an app: the app is the remote */
static __always_inline void transit_key(struct bpf_sock_ops *ops, __u64 cookie, struct podsteer_tuple_key *t)
{
	t->netns_cookie = cookie;
	sockops_addrs(ops, t->src_addr, t->dst_addr);
	t->dst_port = (__u16)bpf_ntohl(ops->remote_port);
	t->src_port = (__u16)ops->local_port;
	t->pad = 0;
}

/* podsteer_orig key of an app socket redirected to the outbound listener */
static __always_inline void orig_key(struct bpf_sock_ops *ops, __u64 cookie, struct podsteer_origdst_key *k)
{
	__u8 remote[16];
	k->netns_cookie = cookie;
	sockops_addrs(ops, k->peer_addr, remote);
	k->peer_port = (__u16)ops->local_port;
	k->local_port = (__u16)bpf_ntohl(ops->remote_port);
	k->pad = 0;
}

/* podsteer_transi key of the app's socket accepted from the proxy's connection: the app is
 * the local side, the client's address the remote; the same key transit_key made */
static __always_inline void passive_transit_key(struct bpf_sock_ops *ops, __u64 cookie,
						struct podsteer_tuple_key *t)
{
	t->netns_cookie = cookie;
	sockops_addrs(ops, t->dst_addr, t->src_addr);
	t->dst_port = (__u16)ops->local_port;
	t->src_port = (__u16)bpf_ntohl(ops->remote_port);
	t->pad = 0;
}

/* getpeername/recvmsg on the app's TCP socket: the podsteer_orig key of its connection to
 * our listener at user_port (network byte order), which orig_key made at connect. 0: the
 * socket is not connected to a listener of ours. */
static __always_inline int peer_orig_key(struct bpf_sock_addr *ctx, struct bpf_sock *sk, __u64 cookie,
					 struct podsteer_origdst_key *k)
{
	__u16 peer_port = bpf_ntohs((__u16)ctx->user_port);
	if (!to_our_listener(peer_port))
		return 0;
	k->netns_cookie = cookie;
	k->peer_port = (__u16)sk->src_port;
	k->local_port = peer_port;
	k->pad = 0;
	if (sk->family == AF_INET) {
		map_v4(k->peer_addr, sk->src_ip4);
	} else {
		__u32 *w = (__u32 *)k->peer_addr;
		w[0] = sk->src_ip6[0];
		CTX_BARRIER();
		w[1] = sk->src_ip6[1];
		CTX_BARRIER();
		w[2] = sk->src_ip6[2];
		CTX_BARRIER();
		w[3] = sk->src_ip6[3];
	}
	return 1;
}

/* getsockopt on the proxy's accepted socket: the podsteer_orig key (the app is its peer, our
 * listener its local side) and its local address */
static __always_inline void sockopt_orig_key(struct bpf_sock *sk, __u64 cookie, struct podsteer_origdst_key *k,
					     __u8 *local)
{
	k->netns_cookie = cookie;
	k->peer_port = bpf_ntohs((__be16)sk->dst_port);
	k->local_port = (__u16)sk->src_port;
	k->pad = 0;
	__u32 *w = (__u32 *)k->peer_addr, *l = (__u32 *)local;
	if (sk->family == AF_INET) {
		__u32 dst4 = sk->dst_ip4;
		CTX_BARRIER();
		__u32 src4 = sk->src_ip4;
		map_v4(k->peer_addr, dst4);
		map_v4(local, src4);
	} else {
		w[0] = sk->dst_ip6[0];
		CTX_BARRIER();
		w[1] = sk->dst_ip6[1];
		CTX_BARRIER();
		w[2] = sk->dst_ip6[2];
		CTX_BARRIER();
		w[3] = sk->dst_ip6[3];
		CTX_BARRIER();
		l[0] = sk->src_ip6[0];
		CTX_BARRIER();
		l[1] = sk->src_ip6[1];
		CTX_BARRIER();
		l[2] = sk->src_ip6[2];
		CTX_BARRIER();
		l[3] = sk->src_ip6[3];
	}
}

enum sockopt_answer { ANSWER_KERNEL = 0, ANSWER_ORIG = 1, ANSWER_LOCAL = 2 };

/* SO_ORIGINAL_DST, once the kernel's own answer said nothing: the app's original destination
 * for a connection accepted on our outbound or DNS listener (connect4 rewrote it); the local
 * address for any other connection of an enrolled pod (inbound ones steered by sk_lookup keep
 * their original destination as local address, as conntrack would say); the kernel's answer
 * for a netns not enrolled. An entry is made only for an enrolled pod's socket, so finding
 * one needs no pod lookup. */
static __always_inline enum sockopt_answer sockopt_original(__u64 cookie, const struct podsteer_origdst_key *k,
							    struct podsteer_addr **o)
{
	*o = NULL;
	if (to_our_listener(k->local_port))
		*o = bpf_map_lookup_elem(&podsteer_orig, k);
	if (*o)
		return ANSWER_ORIG;
	return bpf_map_lookup_elem(&podsteer_pods, &cookie) ? ANSWER_LOCAL : ANSWER_KERNEL;
}

/* recvmsg4: a datagram from the DNS listener (127.0.0.1 at the DNS port) */
static __always_inline int dns_reply4(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip4 == bpf_htonl(0x7f000001) && ctx->user_port == bpf_htons(cfg_dns_port);
}

/* recvmsg6: from [::1] or, on a dual-stack socket, ::ffff:127.0.0.1 at the DNS port */
static __always_inline int dns_reply6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != bpf_htons(cfg_dns_port) || ctx->user_ip6[0] || ctx->user_ip6[1])
		return 0;
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	if (w2 == 0 && w3 == bpf_htonl(1))
		return 1;
	if (w2 == bpf_htonl(0xffff) && w3 == bpf_htonl(0x7f000001))
		return 1;
	return 0;
}

#endif
