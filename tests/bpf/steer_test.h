/* The case and result steer_test.bpf.c exchanges with its test through .bss. */
#ifndef PODSTEER_STEER_TEST_H
#define PODSTEER_STEER_TEST_H

#include <linux/types.h>

struct steer_case {
	__u32 mark, type, protocol;
	__u16 port;
	__u16 pad;
	__u64 cookie;
	__u8 addr[16];
};

struct steer_result {
	__s32 verdict;
	__u16 port;
	__u8 enrolled;
	__u8 pad;
	__u8 target[16];
};

#endif
