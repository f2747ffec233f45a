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
	struct podsteer_pod *pod;
	__u8 addr[16], target[16] = {};
	__u16 port = 0;
	__builtin_memcpy(addr, test_in.addr, 16);
	enum verdict v = decide(test_in.mark, test_in.type, test_in.protocol, test_in.cookie, addr, test_in.port, &pod,
				target, &port);
	test_out.verdict = v;
	test_out.port = port;
	test_out.enrolled = pod != NULL;
	__builtin_memcpy(test_out.target, target, 16);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
