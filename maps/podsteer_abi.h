/* podsteer map ABI: the one definition of every key, value and constant that the BPF
 * programs and the C++ side share. Plain C with explicit padding; never reorder fields,
 * rename retired ones reserved_N, and bump PODSTEER_ABI_VERSION when a layout changes.
 * tests/unit/abi_layout_test.cpp pins every layout with static_assert. */
#ifndef PODSTEER_ABI_H
#define PODSTEER_ABI_H

#include <linux/types.h>

/* 2: inbound moved from TC to sk_lookup (podsteer_ips and the TC fields of podsteer_meta
 *    are gone), the listener and transit maps, Kubernetes-sized names.
 * 3: no layout changed; podsteer_listeners and podsteer_transit are named (and pinned) as the
 *    kernel keeps them, podsteer_listen and podsteer_transi, so that `bpftool map dump name`
 *    finds every map. A node of ABI 2 is migrated by renaming those two pins: the maps, their
 *    entries and the connections that need them are kept (loader/migrate.cpp). */
#define PODSTEER_ABI_VERSION 3
/* the pins ABI 3 renamed: {ABI 2's, ABI 3's} */
#define PODSTEER_ABI2_LISTENERS_PIN "podsteer_listeners"
#define PODSTEER_ABI2_TRANSIT_PIN "podsteer_transit"

/* Defaults: ztunnel's in-pod constants and Istio's in-pod rules (DESIGN.md). */
#define PODSTEER_DEFAULT_OUTBOUND_PORT 15001
#define PODSTEER_DEFAULT_INBOUND_PORT 15006
#define PODSTEER_DEFAULT_HBONE_PORT 15008
#define PODSTEER_DEFAULT_DNS_PORT 15053
#define PODSTEER_DEFAULT_PROXY_MARK 0x539
#define PODSTEER_DEFAULT_PROXY_MARK_MASK 0xfff
/* The app's side of a connection the proxy made from a client's address carries this
 * mark, and a policy rule sends it to a table whose only route is local: its replies
 * reach the proxy (Istio: connmark 0x111, `fwmark 0x111/0xfff pref 32764 lookup 100`). */
#define PODSTEER_DEFAULT_APP_MARK 0x111
#define PODSTEER_DEFAULT_ROUTE_TABLE 100
#define PODSTEER_DEFAULT_RULE_PREF 32764
/* rtm_protocol of the rules and routes podsteer makes: what carries it is ours to remove */
#define PODSTEER_RT_PROTO 112

/* podsteer_pods value flags */
#define PODSTEER_POD_DNS (1u << 0)       /* redirect UDP/TCP 53 to the DNS listener */
#define PODSTEER_POD_FAIL_OPEN (1u << 1) /* proxy not listening: go direct instead of refusing */
#define PODSTEER_POD_HAS_IP4 (1u << 2)   /* ip4 holds the pod's IPv4 address */
#define PODSTEER_POD_HAS_IP6 (1u << 3)   /* ip6 holds the pod's IPv6 address */
/* Shortcuts, set by enroll: nothing to look up. (Negative, so that an entry written by an
 * older build without them still gets the lookups.) */
#define PODSTEER_POD_NO_OUT_PORTS (1u << 4) /* no excluded outbound ports */
#define PODSTEER_POD_NO_OUT_CIDRS (1u << 5) /* no excluded outbound CIDRs: no LPM trie lookup */
#define PODSTEER_POD_NO_IN_PORTS (1u << 6)  /* no excluded inbound ports */
/* Istio's ambient.istio.io/bypass-inbound-capture: outbound (and DNS) captured, inbound left
 * alone (istio-cni's "ingress mode", for gateways that take non-mesh traffic) */
#define PODSTEER_POD_NO_INBOUND (1u << 7)
/* the settings a pod was enrolled with, kept in podsteer_meta so a lost entry is rebuilt */
#define PODSTEER_POD_SETTINGS (PODSTEER_POD_DNS | PODSTEER_POD_FAIL_OPEN | PODSTEER_POD_NO_INBOUND)

/* podsteer_ports direction */
#define PODSTEER_DIR_INBOUND 1
#define PODSTEER_DIR_OUTBOUND 2

/* podsteer_pod_meta.netns_setup: what enroll made in the pod's netns (and unenroll
 * removes); a rule or route that was there before is not ours and is left alone. */
#define PODSTEER_SETUP_RULE4 (1u << 0)
#define PODSTEER_SETUP_RULE6 (1u << 1)
#define PODSTEER_SETUP_ROUTE4 (1u << 2)
#define PODSTEER_SETUP_ROUTE6 (1u << 3)
#define PODSTEER_SETUP_FWMARK_ACCEPT (1u << 4) /* we set net.ipv4.tcp_fwmark_accept */

#define PODSTEER_NAME_LEN 256 /* Kubernetes names are at most 253 characters */
#define PODSTEER_PATH_LEN 256

/* podsteer_pods: netns cookie -> what the datapath needs to know about an enrolled pod.
 * The presence of an entry is what turns the hooks on for that netns. */
struct podsteer_pod {
	__u32 flags;
	__be32 ip4;    /* the pod's own IPv4: outbound connections are sent to ip4:outbound_port,
	                  so the proxy sees the pod's address as peer, as under REDIRECT */
	__u8 ip6[16];  /* the pod's own IPv6, same purpose */
	__u64 enrolled_ns; /* CLOCK_REALTIME when enrolled, for status */
};

/* podsteer_meta: netns cookie -> what userspace needs to report, restore and hand to the
 * node proxy. The datapath never reads it; the agent keeps its pod table here, so a
 * restarted agent has nothing else to load. */
struct podsteer_pod_meta {
	char namespace_[PODSTEER_NAME_LEN];
	char name[PODSTEER_NAME_LEN];
	char service_account[PODSTEER_NAME_LEN];
	char uid[64];             /* Kubernetes pod UID, the ZDS workload id */
	char container_id[128];   /* the CNI container (sandbox) id */
	char netns_path[PODSTEER_PATH_LEN]; /* as given at enroll */
	__u32 n_excluded_cidrs;
	__u32 netns_setup;        /* PODSTEER_SETUP_* */
	__u32 fwmark_accept_before; /* net.ipv4.tcp_fwmark_accept before enroll */
	__u32 flags;              /* PODSTEER_POD_DNS / FAIL_OPEN as enrolled: a lost pod entry is rebuilt */
	__u64 netns_ino;          /* the netns inode: a /proc/PID path whose PID exits is found again */
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

/* podsteer_conns (per-CPU, one entry): connect4/6 hand a redirected TCP socket's original
 * destination to sock_ops (the same connect() call, microseconds later) through a small
 * ring on the CPU they ran on, keyed by socket cookie: no allocation per connection. A task
 * that migrated between the two hooks finds it on the other CPU's ring. */
#define PODSTEER_CONN_SLOTS 4 /* a power of two */
struct podsteer_conn_slot {
	__u64 sock_cookie; /* 0: free */
	struct podsteer_addr orig;
};
struct podsteer_conn_ring {
	struct podsteer_conn_slot slot[PODSTEER_CONN_SLOTS];
	__u32 next;
	__u32 pad;
};

/* podsteer_events (per-CPU, one entry): node-wide datapath events worth knowing about */
struct podsteer_events {
	__u64 stash_migrated; /* sock_ops found connect4's stash on another CPU (task migrated) */
	__u64 stash_missing;  /* a connection of an enrolled pod to the proxy's port with no original
	                         destination recorded: an app connecting to that port itself, or a
	                         migrated task's stash overwritten before sock_ops took it */
};

/* podsteer_full (per-CPU, one entry): connections whose entry did not fit, their table
 * full. A map of its own, not fields of podsteer_events: a state pinned by an earlier
 * build keeps its podsteer_events and gains this map at the upgrade. */
struct podsteer_full {
	__u64 orig;    /* podsteer_orig: the proxy will not learn where the app connected (it is
	                  told its own listener's address, and refuses the call) */
	__u64 transit; /* podsteer_transi: the proxy's connection from a client's address looks
	                  like a client's own to sk_lookup, and comes back to the proxy */
};

/* podsteer_proxy: the node proxies, by the cgroup v2 id of their process: only a process in
 * one of these cgroups (bpf_get_current_cgroup_id() at connect, sendmsg and bind) may use the
 * proxy mark and bind the proxy's ports in an enrolled pod. The agent writes an entry for the
 * peer of each ZDS connection (SO_PEERCRED) and removes it once that process is gone;
 * `podsteer proxy trust --pid` writes one by hand. Key PODSTEER_PROXY_ANY present: the node
 * trusts the mark alone, as Istio's in-pod rules do (--proxy-identity mark). A map of its own
 * (like podsteer_full): a state pinned by an earlier build gains it at the upgrade. */
#define PODSTEER_PROXY_ANY 0
struct podsteer_proxy {
	__u32 pid;        /* the process the entry was made for (host pid namespace) */
	__u32 pad;
	__u64 start_time; /* its start time (/proc/PID/stat, clock ticks): a reused pid is not it */
};

/* podsteer_guard (per-CPU, per pod netns cookie; made by the programs at the first event,
 * removed at unenroll): what the proxy's guards stopped in the pod */
struct podsteer_guard {
	__u64 forged_mark;  /* a connect or sendmsg with the proxy mark by a process not a proxy's:
	                       captured like any app's (and, at connect, the mark taken off) */
	__u64 bind_refused; /* a bind to one of the proxy's ports by a process not a proxy's: EPERM */
};

/* podsteer_holes (per pod netns cookie; made by the pod's TC egress program at the first
 * event, removed at unenroll): TCP connections that left the pod's interface although the
 * socket hooks should have steered them (a process outside the hook cgroup, socket hooks
 * detached): the SYN of a socket not a proxy's, to a destination the hooks would send to the
 * proxy. Counted once per socket (last_sock: the socket cookie counted last; a retransmitted
 * SYN is not counted again). A map of its own: a state pinned by an earlier build gains it
 * at the upgrade. */
struct podsteer_hole {
	__u64 dropped;   /* stopped at the interface (its SYN dropped): a hole, the agent warns */
	__u64 passed;    /* let through: a fail-open pod whose proxy is not listening, as the
	                    socket hooks would have */
	__u64 last_sock; /* the socket cookie last counted */
};

/* podsteer_orig: the proxy's accepted outbound connection -> original destination.
 * Keyed by the accepted socket's peer (the application's local address and port) and
 * local port, in the pod's netns. Written by sock_ops when the application's SYN leaves,
 * removed when the application's socket closes. */
struct podsteer_origdst_key {
	__u64 netns_cookie;
	__u8 peer_addr[16]; /* v4-mapped for IPv4 */
	__u16 peer_port;    /* host byte order */
	__u16 local_port;   /* host byte order: the outbound listener port */
	__u32 pad;
};

/* podsteer_listen (SOCKHASH): the proxy's inbound listener in each pod netns, put
 * there by sock_ops when the proxy calls listen(); sk_lookup hands new inbound
 * connections to it. */
struct podsteer_listener_key {
	__u64 netns_cookie;
	__u16 port;   /* host byte order */
	__u16 family; /* AF_INET6 for a dual-stack listener */
	__u32 pad;
};

/* podsteer_transi: connections the proxy makes to an app in its own pod from another
 * address (a client's: IP_TRANSPARENT), for as long as they live: sk_lookup lets their
 * SYN (and, with SYN cookies, their completing ACK) through to the app instead of steering
 * them back to the proxy. Seen from the app's side: dst is the app, src the address the
 * proxy connects from. */
struct podsteer_tuple_key {
	__u64 netns_cookie;
	__u8 dst_addr[16]; /* v4-mapped for IPv4 */
	__u8 src_addr[16];
	__u16 dst_port;    /* host byte order */
	__u16 src_port;
	__u32 pad;
};

/* The placeholder for the pod's netns cookie in each pod's sk_lookup instance */
#define PODSTEER_LOOKUP_COOKIE_HEX 0x7ea5c00c1e5eed51
#define PODSTEER_PASTE_ULL_(x) x##ULL
#define PODSTEER_XPASTE_ULL_(x) PODSTEER_PASTE_ULL_(x)
#define PODSTEER_STR_(x) #x
#define PODSTEER_XSTR_(x) PODSTEER_STR_(x)
#define PODSTEER_LOOKUP_COOKIE_MAGIC PODSTEER_XPASTE_ULL_(PODSTEER_LOOKUP_COOKIE_HEX)
#define PODSTEER_LOOKUP_COOKIE_MAGIC_STR PODSTEER_XSTR_(PODSTEER_LOOKUP_COOKIE_HEX)
/* ... and for the node's netns id as the pod's netns numbers it, in each pod's TC program */
#define PODSTEER_NODE_NSID_HEX 0x7ea5c00c0de5eed5
#define PODSTEER_NODE_NSID_MAGIC PODSTEER_XPASTE_ULL_(PODSTEER_NODE_NSID_HEX)
#define PODSTEER_NODE_NSID_MAGIC_STR PODSTEER_XSTR_(PODSTEER_NODE_NSID_HEX)
/* How long after its SYN a connection the node opened is left to the app by sk_lookup: the
 * handshake, SYN retransmits and a SYN-cookie ACK fit; a later connection that happens to
 * reuse the tuple (conntrack keeps it from doing so sooner) is captured again. */
#define PODSTEER_NODE_CONN_TTL_NS (10ULL * 1000 * 1000 * 1000)

/* podsteer_config: one entry, the node-wide settings chosen when the state dir was made.
 * The socket programs carry the same values in .rodata; each pod's sk_lookup instance reads
 * its ports here (a .rodata of its own would be a map per pod); userspace and bpftool too. */
struct podsteer_config {
	__u32 abi_version;
	__u16 outbound_port;
	__u16 inbound_port;
	__u16 hbone_port;
	__u16 dns_port;
	__u32 proxy_mark;
	__u32 proxy_mark_mask;
	__u32 app_mark;
	__u32 route_table;
	__u32 rule_pref;
	__u32 reserved_0;
	__u64 programs_id; /* which build's programs are loaded: a newer one replaces them in place */
	char hook_cgroup[PODSTEER_PATH_LEN];
};

#endif
