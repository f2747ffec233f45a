/* The map layouts of map ABI 1 that ABI 2 changed, kept so that a podsteer of ABI 2 can
 * read a state dir an ABI 1 podsteer made and migrate it (loader/migrate.cpp). Never
 * changed: this is a record of what ABI 1 was. podsteer_pod, podsteer_port_key and
 * podsteer_cidr_key are the same in both. Pinned in tests/unit/abi_layout_test.cpp. */
#ifndef PODSTEER_ABI_V1_H
#define PODSTEER_ABI_V1_H

#include <linux/types.h>

#define PODSTEER_V1_ATTACH_TCX 1
#define PODSTEER_V1_ATTACH_CLSACT 2
#define PODSTEER_V1_MAX_IFACES 8

struct podsteer_pod_meta_v1 {
	char pod[128]; /* "namespace/name" */
	char netns_path[256];
	__u32 ifindex[PODSTEER_V1_MAX_IFACES]; /* interfaces with the TC program */
	__u32 tc_prio[PODSTEER_V1_MAX_IFACES]; /* clsact: the filter's priority */
	__u32 tc_handle[PODSTEER_V1_MAX_IFACES];
	__u32 n_ifaces;
	__u32 attach_mode; /* PODSTEER_V1_ATTACH_* */
	__u32 n_excluded_cidrs;
	__u32 reserved_0;
	char uid[64];
	char service_account[64];
	char container_id[80];
};

struct podsteer_config_v1 {
	__u32 abi_version;
	__u16 outbound_port;
	__u16 inbound_port;
	__u16 hbone_port;
	__u16 dns_port;
	__u32 proxy_mark;
	__u32 proxy_mark_mask;
	__u32 reserved_0;
	char hook_cgroup[256];
};

#endif
