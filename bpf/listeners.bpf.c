// SPDX-License-Identifier: GPL-2.0
/* A TCP socket iterator, run once in a pod's netns when it is enrolled or repaired: the
 * proxy's inbound listeners that already exist go into podsteer_listen (sock_ops only
 * sees listen() calls made after the socket hooks were attached). Loaded only then: it
 * needs the kernel's BTF, which takes libbpf milliseconds to read. */
#include "common.bpf.h"

const volatile __u64 cfg_pod_cookie = 0;

#define TCP_LISTEN_STATE 10

/* The few kernel fields read here, relocated against the running kernel's BTF (CO-RE). */
struct bpf_iter_meta {
	void *seq;
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned short skc_family;
	volatile unsigned char skc_state;
	__u16 skc_num;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u32 sk_mark;
} __attribute__((preserve_access_index));

struct tcp_sock;

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

SEC("iter/tcp")
int podsteer_find_listeners(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc || skc->skc_state != TCP_LISTEN_STATE || skc->skc_num != cfg_inbound_port)
		return 0;
	struct sock *sk = (struct sock *)bpf_skc_to_tcp_sock(skc);
	if (!sk)
		return 0;
	__u32 mark = sk->sk_mark;
	if ((mark & cfg_proxy_mark_mask) != (cfg_proxy_mark & cfg_proxy_mark_mask))
		return 0;
	struct podsteer_listener_key k = {.netns_cookie = cfg_pod_cookie, .port = cfg_inbound_port,
					  .family = skc->skc_family};
	bpf_map_update_elem(&podsteer_listen, &k, sk, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
