// SPDX-License-Identifier: GPL-2.0
/* Somebody else's TC programs (a CNI's, say) for the coexistence tests: each counts the
 * TCP packets and SYNs it sees in its own slot and lets the packet go on to whatever runs
 * next (TCX_NEXT / TC_ACT_UNSPEC, both -1). */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct seen {
	__u64 tcp;
	__u64 syn;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct seen);
} foreign_seen SEC(".maps");

static __always_inline int count(struct __sk_buff *skb, __u32 slot)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *th = 0;
	if ((void *)(eth + 1) > end)
		return -1;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
			return -1;
		th = (void *)(ip + 1);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		th = (void *)(ip6 + 1);
	}
	if (!th || (void *)(th + 1) > end)
		return -1;
	struct seen *s = bpf_map_lookup_elem(&foreign_seen, &slot);
	if (s) {
		__sync_fetch_and_add(&s->tcp, 1);
		if (th->syn && !th->ack)
			__sync_fetch_and_add(&s->syn, 1);
	}
	return -1;
}

SEC("tc") int foreign_first(struct __sk_buff *skb) { return count(skb, 0); }
SEC("tc") int foreign_last(struct __sk_buff *skb) { return count(skb, 1); }
SEC("tc") int foreign_clsact(struct __sk_buff *skb) { return count(skb, 2); }
SEC("tc") int foreign_clsact_after(struct __sk_buff *skb) { return count(skb, 3); }

char LICENSE[] SEC("license") = "GPL";
