/* podsteer map ABI: the one definition of every key, value and constant that the BPF
 * programs and the C++ side share. Plain C with explicit padding; never reorder fields,
 * rename retired ones reserved_N, and bump PODSTEER_ABI_VERSION when a layout changes.
 * tests/unit/abi_layout_test.cpp pins every layout with static_assert. */
#ifndef PODSTEER_ABI_H
#define PODSTEER_ABI_H

#include <linux/types.h>

#define PODSTEER_ABI_VERSION 1

/* Defaults: ztunnel's in-pod constants (DESIGN.md, "The datapath contract"). */
#define PODSTEER_DEFAULT_OUTBOUND_PORT 15001
#define PODSTEER_DEFAULT_INBOUND_PORT 15006
#define PODSTEER_DEFAULT_HBONE_PORT 15008
#define PODSTEER_DEFAULT_DNS_PORT 15053
#define PODSTEER_DEFAULT_PROXY_MARK 0x539
#define PODSTEER_DEFAULT_PROXY_MARK_MASK 0xfff

/* podsteer_pods value flags */
#define PODSTEER_POD_DNS (1u << 0)       /* redirect UDP/TCP 53 to the DNS listener */
#define PODSTEER_POD_FAIL_OPEN (1u << 1) /* proxy not listening: go direct instead of refusing */
#define PODSTEER_POD_HAS_IP4 (1u << 2)   /* ip4 holds the pod's IPv4 address */
#define PODSTEER_POD_HAS_IP6 (1u << 3)   /* ip6 holds the pod's IPv6 address */

/* podsteer_ports direction */
#define PODSTEER_DIR_INBOUND 1
#define PODSTEER_DIR_OUTBOUND 2

/* Attach modes recorded in podsteer_meta */
#define PODSTEER_ATTACH_TCX 1
#define PODSTEER_ATTACH_CLSACT 2

#define PODSTEER_MAX_IFACES 8
#define PODSTEER_NAME_LEN 128
#define PODSTEER_PATH_LEN 256

/* podsteer_pods: netns cookie -> what the datapath needs to know about an enrolled pod.
 * The presence of an entry is what turns the socket hooks on for that netns. */
struct podsteer_pod {
	__u32 flags;
	__be32 ip4;    /* the pod's own IPv4: outbound connections are sent to ip4:outbound_port,
	                  so the proxy sees the pod's address as peer, as under REDIRECT */
	__u8 ip6[16];  /* the pod's own IPv6, same purpose */
	__u64 enrolled_ns; /* CLOCK_REALTIME when enrolled, for status */
};

/* podsteer_meta: netns cookie -> what userspace needs to detach and report. The
 * datapath never reads it. */
struct podsteer_pod_meta {
	char pod[PODSTEER_NAME_LEN];         /* "namespace/name", may be empty */
	char netns_path[PODSTEER_PATH_LEN];  /* as given at enroll */
	__u32 ifindex[PODSTEER_MAX_IFACES];  /* interfaces with our TC program, in the pod netns */
	__u32 tc_prio[PODSTEER_MAX_IFACES];  /* clsact mode: our filter's priority */
	__u32 tc_handle[PODSTEER_MAX_IFACES];/* clsact mode: our filter's handle */
	__u32 n_ifaces;
	__u32 attach_mode;                   /* PODSTEER_ATTACH_* */
	__u32 n_excluded_cidrs;
	__u32 reserved_0;
	char uid[64];             /* Kubernetes pod UID, the ZDS workload id */
	char service_account[64];
	char container_id[80];    /* the CNI container (sandbox) id */
};

/* podsteer_ips: a pod's address -> its netns cookie. TC ingress finds the pod by the
 * destination of the SYN: pod addresses are unique on a node, and bpf_get_netns_cookie on
 * an ingress skb does not name the pod's netns on every kernel. */
struct podsteer_ip_key {
	__u8 addr[16]; /* v4-mapped for IPv4 */
};

/* podsteer_ports: excluded ports, per pod and direction */
struct podsteer_port_key {
	__u64 netns_cookie;
	__u16 port;      /* host byte order */
	__u8 direction;  /* PODSTEER_DIR_* */
	__u8 pad[5];
};

/* podsteer_cidrs: LPM trie of excluded outbound destinations, per pod. IPv4 is stored
 * v4-mapped (::ffff:a.b.c.d) so one trie serves both families; prefixlen counts the 64
 * cookie bits plus the address bits. */
struct podsteer_cidr_key {
	__u32 prefixlen;
	__u32 netns_cookie_hi; /* big endian halves so the trie compares them as bytes */
	__u32 netns_cookie_lo;
	__u8 addr[16];
};
#define PODSTEER_CIDR_COOKIE_BITS 64

/* podsteer_stats: per-CPU counters per pod */
struct podsteer_counters {
	__u64 redirected_out;
	__u64 redirected_in;
	__u64 dns_redirected;
	__u64 bypassed;        /* excluded port or CIDR, probe source */
	__u64 proxy_missing;   /* redirect target had no listener */
};

/* An address with family, used for original destinations. IPv4 is stored v4-mapped. */
struct podsteer_addr {
	__u8 addr[16];
	__be16 port;
	__u16 family; /* AF_INET or AF_INET6: the family the application used */
	__u32 pad;
};

/* podsteer_orig: the proxy's accepted outbound connection -> original destination.
 * Keyed by the accepted socket's peer (the application's local address and port) and
 * local port, in the pod's netns. Written by sock_ops when the application's SYN leaves. */
struct podsteer_origdst_key {
	__u64 netns_cookie;
	__u8 peer_addr[16]; /* v4-mapped for IPv4 */
	__u16 peer_port;    /* host byte order */
	__u16 local_port;   /* host byte order: the outbound listener port */
	__u32 pad;
};

/* podsteer_config: one entry, the node-wide settings chosen when the state dir was made.
 * The programs carry the same values in .rodata; this copy is for userspace and bpftool. */
struct podsteer_config {
	__u32 abi_version;
	__u16 outbound_port;
	__u16 inbound_port;
	__u16 hbone_port;
	__u16 dns_port;
	__u32 proxy_mark;
	__u32 proxy_mark_mask;
	__u32 reserved_0;
	char hook_cgroup[PODSTEER_PATH_LEN];
};

#endif
