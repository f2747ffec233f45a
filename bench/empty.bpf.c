// SPDX-License-Identifier: GPL-2.0
/* Programs that do nothing, one of each type podsteer attaches. The benchmark attaches
 * them next to podsteer's for its bpf_stats runs: what bpf_stats reports for them is the
 * cost of a run itself (the hook's call and the timing), which podsteer's figures
 * include too and no change to podsteer's code can remove. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("sockops")
int empty_sockops(struct bpf_sock_ops *ops) { return 1; }

SEC("cgroup/connect4")
int empty_connect4(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/connect6")
int empty_connect6(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/getsockopt")
int empty_getsockopt(struct bpf_sockopt *ctx) { return 1; }

SEC("cgroup/getpeername4")
int empty_getpeername4(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/getpeername6")
int empty_getpeername6(struct bpf_sock_addr *ctx) { return 1; }

SEC("sk_lookup")
int empty_lookup(struct bpf_sk_lookup *ctx) { return SK_PASS; }

/* "no verdict" (TC_ACT_UNSPEC): the chain goes on, as podsteer's TC programs return */
SEC("tc")
int empty_tc_egress(struct __sk_buff *skb) { return -1; }

char LICENSE[] SEC("license") = "GPL";
