// SPDX-License-Identifier: GPL-2.0
/* A socket load balancer of somebody else's, as Cilium's (bpf/bpf_sock.c, attached at the
 * cgroup root): connect4 rewrites a service VIP to a backend before any packet exists, and
 * getpeername4 shows the VIP again (its reverse translation). The coexistence test attaches
 * it at a parent of podsteer's hook cgroup. One service, one backend, set in .rodata. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

const volatile __u32 vip = 0;          /* network byte order */
const volatile __u32 backend = 0;
const volatile __u16 port = 0;         /* network byte order, the same on both sides */

__u64 balanced = 0, reversed = 0;

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 == vip && ctx->user_port == port) {
		ctx->user_ip4 = backend;
		__sync_fetch_and_add(&balanced, 1);
	}
	return 1;
}

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 == backend && ctx->user_port == port) {
		ctx->user_ip4 = vip;
		__sync_fetch_and_add(&reversed, 1);
	}
	return 1;
}

char LICENSE[] SEC("license") = "GPL";
