/* What conn_test.bpf.c computes from the contexts its test fills, read back through .bss. */
#ifndef PODSTEER_CONN_TEST_H
#define PODSTEER_CONN_TEST_H

#include <linux/types.h>

#include "podsteer_abi.h"

struct conn_test_out {
	/* one outbound connection's podsteer_orig key, as each hook builds it */
	struct podsteer_origdst_key at_connect; /* sock_ops, the app's socket */
	struct podsteer_origdst_key at_sockopt; /* getsockopt, the proxy's accepted socket */
	struct podsteer_origdst_key at_peer;    /* getpeername, the app's socket */
	__u8 sockopt_local[16];
	__s32 peer_key_made;
	/* one connection of the proxy's from a client's address: its podsteer_transi key */
	struct podsteer_tuple_key at_proxy_connect; /* sock_ops connect, the proxy's socket */
	struct podsteer_tuple_key at_accept;        /* sock_ops passive established, the app's */
	/* the decisions, for t_mark, t_from, t_to, t_remote_port */
	__u32 role, plan, transit_mark, app_marked;
	/* recvmsg, for the context t_addr */
	__u32 dns_reply4, dns_reply6;
	/* getsockopt's answer for at_sockopt's key in t_cookie's netns */
	__u32 answer;
	struct podsteer_addr orig;
};

#endif
