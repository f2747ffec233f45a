// SPDX-License-Identifier: GPL-2.0
/* Runs the socket hooks' steering decision (bpf/steer.bpf.h, the code connect4/6 and
 * sendmsg4/6 run) under BPF_PROG_TEST_RUN: the test writes a case into test_in, fills the
 * maps, runs the program and reads test_out. A tc program only because every kernel can
 * test-run one; it never sees a packet. */
#include "steer.bpf.h"
#include "steer_test.h"

struct steer_case test_in = {};
struct steer_result test_out = {};

SEC("tc")
int steer_test(struct __sk_buff *skb)
{
	struct podsteer_pod *pod = NULL;
	__u8 addr[16], target[16] = {};
	__u16 port = 0;
	__builtin_memcpy(addr, test_in.addr, 16);
	/* as steer() does: the mark first, then the pod's entry, then the decision */
	enum verdict v = LEAVE;
	__u64 cookie = test_in.cookie;
	if (!marked_by_proxy(test_in.mark))
		pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	if (pod) {
		/* what decide() reads of a connect()'s context, in a copy on the stack */
		struct bpf_sock_addr ctx = {.type = test_in.type, .protocol = test_in.protocol};
		v = decide(&ctx, cookie, pod, addr, test_in.port, target, &port);
	}
	test_out.verdict = v;
	test_out.port = port;
	test_out.enrolled = pod != NULL;
	__builtin_memcpy(test_out.target, target, 16);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
