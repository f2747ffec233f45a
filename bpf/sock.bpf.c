// SPDX-License-Identifier: GPL-2.0
/* Socket hooks, attached once per node at the hook cgroup. They act only for sockets
 * whose netns cookie has a podsteer_pods entry (the proxy's listeners excepted, below).
 *
 *  connect4/6     TCP connect -> the outbound listener in the same netns (dst = the pod's own
 *                 address, so the proxy sees the pod as peer); TCP/UDP 53 -> DNS listener
 *  sock_ops       the app's SYN leaves: record (pod addr, port) -> original destination for
 *                 the proxy's SO_ORIGINAL_DST, removed when the app's socket closes;
 *                 the proxy listens on its inbound port: remember the listener for
 *                 sk_lookup; the proxy connects from a client's address: remember the tuple
 *                 until the app's side has the connection, so sk_lookup lets it reach the
 *                 app, and give
 *                 the socket the app mark before its SYN leaves: tcp_fwmark_accept copies
 *                 the SYN's mark onto the app's new socket, whose replies then follow the
 *                 pod's policy rule back to the proxy (Istio: connmark 0x111 on the app's side)
 *  getsockopt     answer SO_ORIGINAL_DST at SOL_IP / SOL_IPV6 unless the kernel knows better
 *  getpeername4/6 the application sees the original destination as its peer
 *  sendmsg4/6     unconnected UDP 53 -> DNS listener
 *  recvmsg4/6     replies from the DNS listener appear to come from the original resolver
 *  bind4/6        the proxy's ports in an enrolled pod are for a proxy's process only
 *
 * The proxy is a process in a cgroup of podsteer_proxy that marks its socket (steer.bpf.h:
 * proxy_process): a mark alone is an app's, captured and counted. */
#include <linux/tcp.h>
#include "conn.bpf.h"

#define SOL_IP_LEVEL 0
#define SOL_IPV6_LEVEL 41
#define SO_ORIGINAL_DST_OPT 80 /* also IP6T_SO_ORIGINAL_DST */
#define SOL_SOCKET_LEVEL 1
#define SO_MARK_OPT 36

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

/* A redirected TCP socket's original destination, for sock_ops in the same connect():
 * into this CPU's ring, keyed by socket cookie (no per-socket allocation). */
static __always_inline int stash(struct bpf_sock_addr *ctx, const __u8 *addr16, __be16 port, __u16 family)
{
	__u32 zero = 0;
	struct podsteer_conn_ring *r = bpf_map_lookup_elem(&podsteer_conns, &zero);
	if (!r)
		return -1;
	__u32 i = r->next & (PODSTEER_CONN_SLOTS - 1);
	r->next = i + 1;
	struct podsteer_conn_slot *s = &r->slot[i];
	s->sock_cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(s->orig.addr, addr16, 16);
	s->orig.port = port;
	s->orig.family = family;
	s->orig.pad = 0;
	return 0;
}

/* Is anything listening on target (v4-mapped or v6):port in this netns? */
static __always_inline int listening(struct bpf_sock_addr *ctx, const __u8 *target, __u16 port, int udp)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	if (is_mapped_v4(target)) {
		t.ipv4.daddr = ((const __u32 *)target)[3];
		t.ipv4.dport = bpf_htons(port);
		sk = udp ? bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0)
			 : bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		__builtin_memcpy(t.ipv6.daddr, target, 16);
		t.ipv6.dport = bpf_htons(port);
		sk = udp ? bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0)
			 : bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Shared by connect4/connect6/sendmsg4/sendmsg6. addr16 is the destination, v4-mapped
 * for IPv4. On redirect, target receives the new destination and the new port is
 * returned; 0 means leave the call alone, -1 means refuse it. */
static __always_inline int steer(struct bpf_sock_addr *ctx, const __u8 *addr16, __be16 nport,
				 __u16 family, __u8 *target, int connecting)
{
	/* the proxy's own sockets first: they connect as often as the apps, and need no pod
	 * lookup. The mark alone proves nothing (CAP_NET_RAW sets it): the process must be a
	 * proxy's too. An app's socket pays nothing for that check. */
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	__u32 mark = sk->mark;
	int forged = 0;
	if (marked_by_proxy(mark)) {
		if (proxy_process())
			return 0;
		forged = 1;
	}
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	if (!pod)
		return 0;
	if (forged) {
		/* an app's socket with the proxy's mark: captured like any other, and counted. At
		 * connect the socket loses the mark's bits for good, so that sock_ops, getsockopt and
		 * routing see what it is; a sendmsg decides again at each call. */
		count_guard(cookie, GUARD_FORGED_MARK);
		if (connecting) {
			int m = (int)(mark & ~cfg_proxy_mark_mask);
			bpf_setsockopt(ctx, SOL_SOCKET_LEVEL, SO_MARK_OPT, &m, sizeof(m));
		}
	}
	__u16 port;
	enum verdict v = decide(ctx, cookie, pod, addr16, bpf_ntohs(nport), target, &port);
	if (v == LEAVE)
		return 0;
	struct podsteer_counters *c = pod_counters(cookie);
	/* Only a fail-open pod needs to know now whether the proxy listens (a socket lookup
	 * costs about a quarter of this program). Fail closed, the connection is sent to the
	 * listener regardless: without one the kernel refuses it, and sock_ops counts that. */
	if ((pod->flags & PODSTEER_POD_FAIL_OPEN) && !listening(ctx, target, port, ctx->type == SOCK_DGRAM)) {
		COUNT(c, proxy_missing);
		return 0;
	}
	/* TCP: sock_ops takes it over in this same connect(); UDP (DNS): kept with the socket,
	 * for recvmsg to restore the resolver's address on every reply */
	if (ctx->type == SOCK_STREAM ? stash(ctx, addr16, nport, family) : remember(ctx, addr16, nport, family))
		return -1;
	if (v == TO_DNS)
		COUNT(c, dns_redirected);
	else
		COUNT(c, redirected_out);
	return port;
}

static __always_inline int steer4(struct bpf_sock_addr *ctx, int connecting)
{
	__u8 a[16], target[16];
	map_v4(a, ctx->user_ip4);
	int port = steer(ctx, a, (__be16)ctx->user_port, AF_INET, target, connecting);
	if (port < 0)
		return 0;
	if (port > 0) {
		ctx->user_ip4 = ((__u32 *)target)[3];
		ctx->user_port = bpf_htons((__u16)port);
	}
	return 1;
}

static __always_inline int steer6(struct bpf_sock_addr *ctx, int connecting)
{
	__u8 a[16], target[16];
	__u32 *w = (__u32 *)a;
	w[0] = ctx->user_ip6[0];
	w[1] = ctx->user_ip6[1];
	w[2] = ctx->user_ip6[2];
	w[3] = ctx->user_ip6[3];
	int port = steer(ctx, a, (__be16)ctx->user_port, AF_INET6, target, connecting);
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
int podsteer_connect4(struct bpf_sock_addr *ctx) { return steer4(ctx, 1); }

SEC("cgroup/connect6")
int podsteer_connect6(struct bpf_sock_addr *ctx) { return steer6(ctx, 1); }

SEC("cgroup/sendmsg4")
int podsteer_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_DGRAM || ctx->user_port != bpf_htons(DNS_PORT))
		return 1;
	return steer4(ctx, 0);
}

SEC("cgroup/sendmsg6")
int podsteer_sendmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_DGRAM || ctx->user_port != bpf_htons(DNS_PORT))
		return 1;
	return steer6(ctx, 0);
}

/* The proxy's ports are the proxy's: in an enrolled pod, a bind to the outbound, inbound,
 * HBONE or DNS port by a process that is not a proxy's fails with EPERM, and is counted. An
 * app that bound one before the proxy would receive what was meant for it (under Istio's
 * rules too). Every other bind is left alone, and costs one comparison of the port. */
static __always_inline int guard_bind(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	if (port != cfg_outbound_port && port != cfg_inbound_port && port != cfg_hbone_port && port != cfg_dns_port)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	if (!bpf_map_lookup_elem(&podsteer_pods, &cookie) || proxy_process())
		return 1;
	count_guard(cookie, GUARD_BIND);
	return 0;
}

SEC("cgroup/bind4")
int podsteer_bind4(struct bpf_sock_addr *ctx) { return guard_bind(ctx); }

SEC("cgroup/bind6")
int podsteer_bind6(struct bpf_sock_addr *ctx) { return guard_bind(ctx); }

/* The application's socket sees its original destination: a reply from the DNS listener
 * comes from the resolver, getpeername() returns what connect() was given. A TCP socket's
 * is in podsteer_orig (sock_ops put it there, keyed by the tuple); a UDP socket's, and one
 * redirected by an older build, in its socket storage. */
static __always_inline struct podsteer_addr *original_of(struct bpf_sock_addr *ctx, struct bpf_sock *sk)
{
	if (sk->type == SOCK_STREAM) {
		/* connected to a port not ours: nothing to restore, and no storage to look up */
		struct podsteer_origdst_key k;
		if (!peer_orig_key(ctx, sk, bpf_get_netns_cookie(ctx), &k))
			return NULL;
		struct podsteer_addr *o = bpf_map_lookup_elem(&podsteer_orig, &k);
		if (o)
			return o;
	}
	return bpf_sk_storage_get(&podsteer_skorig, sk, 0, 0);
}

static __always_inline int restore4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct podsteer_addr *o = original_of(ctx, sk);
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
	struct podsteer_addr *o = original_of(ctx, sk);
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
	return dns_reply4(ctx) ? restore4(ctx) : 1;
}

SEC("cgroup/recvmsg6")
int podsteer_recvmsg6(struct bpf_sock_addr *ctx)
{
	return dns_reply6(ctx) ? restore6(ctx) : 1;
}

SEC("cgroup/getpeername4")
int podsteer_getpeername4(struct bpf_sock_addr *ctx) { return restore4(ctx); }

SEC("cgroup/getpeername6")
int podsteer_getpeername6(struct bpf_sock_addr *ctx) { return restore6(ctx); }


/* Takes slot i's entry if it is this socket's (and frees the slot). */
static __always_inline int take_slot(struct podsteer_conn_ring *r, __u32 i, __u64 cookie, struct podsteer_addr *out)
{
	struct podsteer_conn_slot *s = &r->slot[i & (PODSTEER_CONN_SLOTS - 1)];
	if (s->sock_cookie != cookie)
		return 0;
	__builtin_memcpy(out, &s->orig, sizeof(*out));
	s->sock_cookie = 0;
	return 1;
}

static __always_inline int take_from_ring(struct podsteer_conn_ring *r, __u64 cookie, struct podsteer_addr *out)
{
	return take_slot(r, 0, cookie, out) || take_slot(r, 1, cookie, out) || take_slot(r, 2, cookie, out) ||
	       take_slot(r, 3, cookie, out);
}

struct search_ctx {
	__u64 cookie;
	int found;
	struct podsteer_addr out;
};

static long search_cpu(__u32 cpu, void *data)
{
	struct search_ctx *c = data;
	__u32 zero = 0;
	struct podsteer_conn_ring *r = bpf_map_lookup_percpu_elem(&podsteer_conns, &zero, cpu);
	if (r && take_from_ring(r, c->cookie, &c->out)) {
		c->found = 1;
		return 1; /* stop */
	}
	return 0;
}

/* The original destination connect4/6 stashed for this socket: on this CPU's ring, or,
 * if the task moved to another CPU between the two hooks, on that one's. */
static __always_inline int take_stashed(struct bpf_sock_ops *ops, struct podsteer_addr *out)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	__u32 zero = 0;
	struct podsteer_conn_ring *r = bpf_map_lookup_elem(&podsteer_conns, &zero);
	if (r && take_from_ring(r, cookie, out))
		return 1;
	struct search_ctx c = {.cookie = cookie, .found = 0};
	bpf_loop(cfg_nr_cpus, search_cpu, &c, 0);
	if (c.found)
		__builtin_memcpy(out, &c.out, sizeof(*out));
	struct podsteer_events *e = bpf_map_lookup_elem(&podsteer_events, &zero);
	if (e) {
		/* not found at all: a socket of an older build (socket storage), or lost */
		if (c.found)
			e->stash_migrated++;
	}
	return c.found;
}

/* An entry that did not fit (its table full: the only way an update of these fails) */
static __always_inline void count_full(int orig)
{
	__u32 zero = 0;
	struct podsteer_full *f = bpf_map_lookup_elem(&podsteer_full, &zero);
	if (!f)
		return;
	if (orig)
		f->orig++;
	else
		f->transit++;
}

static __always_inline int on_listen(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	/* Every proxy listener on the inbound port, enrolled netns or not: the proxy may
	 * listen before enroll writes the pod entry, and sk_lookup only ever asks for its
	 * own pod's. A closed listener leaves the map by itself. */
	if (ops->local_port != cfg_inbound_port)
		return 1;
	struct podsteer_listener_key k = {.netns_cookie = bpf_get_netns_cookie(ops),
					  .port = cfg_inbound_port, .family = (__u16)ops->family};
	bpf_sock_hash_update(ops, &podsteer_listen, &k, BPF_ANY);
	return 1;
}

static __always_inline int on_connect(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	__u64 cookie = bpf_get_netns_cookie(ops);
	enum conn_role role = connect_role(sk->mark, ops->remote_port);
	if (role == CONN_PROXY) {
		/* the proxy connecting from an address that is not its pod's own: to an app in
		 * the pod, from a client's address (IP_TRANSPARENT) */
		struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
		if (!pod)
			return 1;
		struct podsteer_tuple_key t;
		transit_key(ops, cookie, &t);
		if (own_address(pod, t.src_addr))
			return 1;
		/* The app's answers must come back through lo, not leave for the client's address:
		 * its socket will take the mark of this SYN (tcp_fwmark_accept), and the SYN takes
		 * this socket's. Set here, before the SYN is built: the kernel routes the socket
		 * again after this callback. One call per connection, where a cgroup_skb program
		 * marking the SYN would run for every packet of every socket. Whatever the
		 * destination: any local address of the pod (one added after enroll too), and a
		 * connection from a client's address to anywhere else could not complete anyway,
		 * its answers going to the client. */
		int mark = (int)transit_mark(sk->mark);
		bpf_setsockopt(ops, SOL_SOCKET_LEVEL, SO_MARK_OPT, &mark, sizeof(mark));
		__u8 one = 1;
		if (bpf_map_update_elem(&podsteer_transi, &t, &one, BPF_ANY))
			count_full(0);
		bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	/* only a socket connect4 sent to a listener of ours can carry an original destination */
	if (role != CONN_APP)
		return 1;
	struct podsteer_addr o;
	/* connect4 stashes only for an enrolled pod: a stash found needs no pod lookup */
	if (!take_stashed(ops, &o)) {
		if (!bpf_map_lookup_elem(&podsteer_pods, &cookie))
			return 1;
		struct podsteer_addr *so = bpf_sk_storage_get(&podsteer_skorig, sk, 0, 0);
		if (!so) {
			/* to the proxy's port with nothing recorded: an app that connected to the
			 * port itself, or a stash overwritten after a migration. Counted. */
			__u32 zero = 0;
			struct podsteer_events *e = bpf_map_lookup_elem(&podsteer_events, &zero);
			if (e)
				e->stash_missing++;
			return 1;
		}
		__builtin_memcpy(&o, so, sizeof(o));
	}
	struct podsteer_origdst_key k;
	orig_key(ops, cookie, &k);
	if (bpf_map_update_elem(&podsteer_orig, &k, &o, BPF_ANY))
		count_full(1);
	/* for the entry's removal at close, and to count a listener that was missing */
	bpf_sock_ops_cb_flags_set(ops, ops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* Only sockets on_connect turned the state callback on for get here. Every transition comes
 * (established, fin-wait, ...): only the close acts (close_plan), and the others leave before
 * any helper call. */
static __always_inline int on_state(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	__u32 plan = close_plan(ops->args[0], ops->args[1], sk->mark, ops->remote_port);
	if (!plan)
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ops);
	if (plan & CLOSE_TRANSIT) {
		/* The tuple cannot come from anyone else while this socket holds it. The entry went
		 * already if the app's side completed the handshake (with SYN cookies the app's side
		 * keeps no request socket, so the completing ACK goes through sk_lookup again). */
		struct podsteer_tuple_key t;
		transit_key(ops, cookie, &t);
		if (bpf_map_delete_elem(&podsteer_transi, &t) == 0)
			return 1;
	}
	if (plan & CLOSE_MISSING) {
		struct podsteer_counters *c = pod_counters(cookie);
		COUNT(c, proxy_missing);
	}
	if (plan & CLOSE_ORIG) {
		struct podsteer_origdst_key k;
		orig_key(ops, cookie, &k);
		bpf_map_delete_elem(&podsteer_orig, &k);
	}
	return 1;
}

/* An app's socket accepted from the proxy's connection from a client's address (it carries
 * the app mark that connection's SYN had: tcp_fwmark_accept): the handshake is complete on
 * the app's side, and sk_lookup will not be asked about this tuple again while the
 * connection lives, so its transit entry goes now rather than at the proxy's close. The
 * table then holds handshakes in flight, not live connections. (The proxy's close still
 * deletes, for a handshake that never completed here.) */
static __always_inline int on_passive_established(struct bpf_sock_ops *ops, struct bpf_sock *sk)
{
	if (!app_marked(sk->mark))
		return 1;
	struct podsteer_tuple_key t;
	passive_transit_key(ops, bpf_get_netns_cookie(ops), &t);
	bpf_map_delete_elem(&podsteer_transi, &t);
	return 1;
}

SEC("sockops")
int podsteer_sockops(struct bpf_sock_ops *ops)
{
	__u32 op = ops->op;
	if (op != BPF_SOCK_OPS_STATE_CB && op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_TCP_LISTEN_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	struct bpf_sock *sk = ops->sk;
	if (!sk)
		return 1;
	if (op == BPF_SOCK_OPS_STATE_CB)
		return on_state(ops, sk);
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB)
		return on_connect(ops, sk);
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return on_passive_established(ops, sk);
	return marked_by_proxy(sk->mark) ? on_listen(ops, sk) : 1;
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

/* Is the sockaddr the kernel put in optval the socket's own local address:port? */
static __always_inline int kernel_answer_is_local(struct bpf_sockopt *ctx, const __u8 *local, __u16 port)
{
	void *optval = ctx->optval, *end = ctx->optval_end;
	if (ctx->level == SOL_IP_LEVEL) {
		struct sockaddr_in *sin = optval;
		if ((void *)(sin + 1) > end)
			return 0;
		return sin->sin_port == bpf_htons(port) && sin->sin_addr.s_addr == ((const __u32 *)local)[3];
	}
	struct sockaddr_in6 *sin6 = optval;
	if ((void *)(sin6 + 1) > end)
		return 0;
	__u8 a[16];
	__builtin_memcpy(a, &sin6->sin6_addr, 16);
	return sin6->sin6_port == bpf_htons(port) && same_addr(a, local);
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
	struct podsteer_origdst_key k;
	__u8 local[16];
	sockopt_orig_key(sk, cookie, &k, local);
	/* The kernel answered (conntrack knows the connection). If a NAT rule redirected it,
	 * its answer is the true original destination and stands. Without NAT it is the
	 * socket's own address, which says nothing: connect4 rewrote the destination before
	 * conntrack saw the connection. */
	if (ctx->retval == 0 && !kernel_answer_is_local(ctx, local, (__u16)sk->src_port))
		return 1;
	struct podsteer_addr *o;
	enum sockopt_answer a = sockopt_original(cookie, &k, &o);
	if (a == ANSWER_KERNEL)
		return 1;
	int len = a == ANSWER_ORIG && o ? put_sockaddr(ctx, o->addr, o->port)
					: put_sockaddr(ctx, local, bpf_htons((__u16)sk->src_port));
	if (!len)
		return 1;
	ctx->optlen = len;
	/* keep the two stores apart: merged into one 8-byte store the verifier rejects it */
	CTX_BARRIER();
	ctx->retval = 0;
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
