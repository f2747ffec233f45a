// SPDX-License-Identifier: GPL-2.0
/* Runs what the socket hooks build and decide about a connection (bpf/conn.bpf.h: the code
 * sock_ops, getsockopt, getpeername and recvmsg run) under BPF_PROG_TEST_RUN. The test
 * fills copies of the hooks' contexts in .bss as the kernel would show one connection to
 * each hook, runs the program, and reads every key and decision in t_out. A tc program
 * only because every kernel can test-run one; it never sees a packet. */
#include "conn.bpf.h"
#include "conn_test.h"

struct bpf_sock_ops t_ops_app = {};      /* the app's socket, its SYN leaving (sock_ops) */
struct bpf_sock t_sk_proxy = {};         /* the proxy's accepted socket (getsockopt) */
struct bpf_sock t_sk_app = {};           /* the app's socket (getpeername) */
struct bpf_sock_addr t_addr = {};        /* getpeername's or recvmsg's context */
struct bpf_sock_ops t_ops_proxy = {};    /* the proxy connecting from a client's address */
struct bpf_sock_ops t_ops_accepted = {}; /* the app's socket accepted from that connection */
__u64 t_cookie = 0;
__u32 t_mark = 0, t_from = 0, t_to = 0, t_remote_port = 0;
struct conn_test_out t_out = {};

SEC("tc")
int conn_test(struct __sk_buff *skb)
{
	__u64 cookie = t_cookie;
	orig_key(&t_ops_app, cookie, &t_out.at_connect);
	sockopt_orig_key(&t_sk_proxy, cookie, &t_out.at_sockopt, t_out.sockopt_local);
	t_out.peer_key_made = peer_orig_key(&t_addr, &t_sk_app, cookie, &t_out.at_peer);
	transit_key(&t_ops_proxy, cookie, &t_out.at_proxy_connect);
	passive_transit_key(&t_ops_accepted, cookie, &t_out.at_accept);

	t_out.role = connect_role(t_mark, t_remote_port);
	t_out.plan = close_plan(t_from, t_to, t_mark, t_remote_port);
	t_out.transit_mark = transit_mark(t_mark);
	t_out.app_marked = app_marked(t_mark);

	t_out.dns_reply4 = dns_reply4(&t_addr);
	t_out.dns_reply6 = dns_reply6(&t_addr);

	struct podsteer_addr *o;
	t_out.answer = sockopt_original(cookie, &t_out.at_sockopt, &o);
	if (o)
		__builtin_memcpy(&t_out.orig, o, sizeof(*o));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
