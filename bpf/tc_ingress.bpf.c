// SPDX-License-Identifier: GPL-2.0
/* Inbound capture: TC ingress on an enrolled pod's interfaces, inside the pod netns.
 * A new TCP connection (a SYN without ACK) for the pod is handed to the inbound listener
 * with bpf_sk_assign; the accepted socket then has the original destination as its local
 * address. Every other packet, including everything of connections that already exist,
 * passes untouched. */
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/pkt_cls.h>

#include "common.bpf.h"

#define TCP_LISTEN_STATE 10 /* BPF_TCP_LISTEN */

/* kubelet probe sources (DESIGN.md): never redirected inbound */
#define PROBE_SRC4 0xa9fe077f /* 169.254.7.127 */
static const __u8 probe_src6[16] = {0xfd, 0x16, 0x92, 0x54, 0x71, 0x27, 0x13, 0x37,
				    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static __always_inline int is_probe_src6(const __u8 *a)
{
#pragma unroll
	for (int i = 0; i < 16; i++)
		if (a[i] != probe_src6[i])
			return 0;
	return 1;
}

static __always_inline int port_excluded(__u64 cookie, __u16 port)
{
	struct podsteer_port_key k = {.netns_cookie = cookie, .port = port,
				      .direction = PODSTEER_DIR_INBOUND};
	return bpf_map_lookup_elem(&podsteer_ports, &k) != NULL;
}

/* Decide for one SYN. tuple/len describe the connection as the kernel sees it. */
static __always_inline int steer_syn(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
				     __u32 tuple_len, __be16 *dport_slot, int probe,
				     const struct podsteer_ip_key *dst)
{
	__u64 *pod_cookie = bpf_map_lookup_elem(&podsteer_ips, dst);
	if (!pod_cookie)
		return TC_ACT_OK;
	__u64 cookie = *pod_cookie;
	struct podsteer_pod *pod = bpf_map_lookup_elem(&podsteer_pods, &cookie);
	if (!pod)
		return TC_ACT_OK;

	__u16 dport = bpf_ntohs(*dport_slot);
	if (dport == cfg_hbone_port || dport == cfg_inbound_port)
		return TC_ACT_OK;

	struct podsteer_counters *c = pod_counters(cookie);
	if (probe || port_excluded(cookie, dport)) {
		COUNT(c, bypassed);
		return TC_ACT_OK;
	}

	/* A SYN for a connection the kernel already knows (a retransmit, or a request
	 * socket) belongs to whoever has it: never move an existing connection. */
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		int existing = sk->state != TCP_LISTEN_STATE;
		bpf_sk_release(sk);
		if (existing)
			return TC_ACT_OK;
	}

	*dport_slot = bpf_htons(cfg_inbound_port);
	sk = bpf_skc_lookup_tcp(skb, tuple, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (!sk || sk->state != TCP_LISTEN_STATE) {
		if (sk)
			bpf_sk_release(sk);
		COUNT(c, proxy_missing);
		/* fail closed: the SYN never reaches the application */
		return (pod->flags & PODSTEER_POD_FAIL_OPEN) ? TC_ACT_OK : TC_ACT_SHOT;
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		COUNT(c, proxy_missing);
		return (pod->flags & PODSTEER_POD_FAIL_OPEN) ? TC_ACT_OK : TC_ACT_SHOT;
	}
	COUNT(c, redirected_in);
	return TC_ACT_OK;
}

SEC("tc")
int podsteer_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;

	struct bpf_sock_tuple tuple = {};
	struct podsteer_ip_key dst = {};
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
			return TC_ACT_OK;
		if (ip->frag_off & bpf_htons(0x3fff)) /* fragments carry no TCP header we trust */
			return TC_ACT_OK;
		struct tcphdr *th = (void *)(ip + 1);
		if ((void *)(th + 1) > end || !th->syn || th->ack)
			return TC_ACT_OK;
		tuple.ipv4.saddr = ip->saddr;
		tuple.ipv4.daddr = ip->daddr;
		tuple.ipv4.sport = th->source;
		tuple.ipv4.dport = th->dest;
		dst.addr[10] = 0xff;
		dst.addr[11] = 0xff;
		__builtin_memcpy(&dst.addr[12], &ip->daddr, 4);
		return steer_syn(skb, &tuple, sizeof(tuple.ipv4), &tuple.ipv4.dport,
				 ip->saddr == bpf_htonl(PROBE_SRC4), &dst);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return TC_ACT_OK;
		struct tcphdr *th = (void *)(ip6 + 1);
		if ((void *)(th + 1) > end || !th->syn || th->ack)
			return TC_ACT_OK;
		__builtin_memcpy(tuple.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(tuple.ipv6.daddr, &ip6->daddr, 16);
		tuple.ipv6.sport = th->source;
		tuple.ipv6.dport = th->dest;
		__builtin_memcpy(dst.addr, &ip6->daddr, 16);
		return steer_syn(skb, &tuple, sizeof(tuple.ipv6), &tuple.ipv6.dport,
				 is_probe_src6((const __u8 *)&ip6->saddr), &dst);
	}
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
