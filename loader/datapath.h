// The node's datapath: the socket programs loaded once per node, pinned under the state
// dir and attached once at the hook cgroup, and per pod an sk_lookup program linked to the
// pod's netns plus the pod's return-path rules. Knows nothing of Kubernetes.
//
// The state dir's layout, lock and config: state_dir.h.
//
// Jobs by file: install.cpp (install, adopt, uninstall), enroll.cpp (enroll, unenroll),
// inbound.cpp (per-pod sk_lookup), pod_netns.cpp (rules, routes, sysctl in the pod
// netns), status.cpp (what is there), parse.cpp (exclusion lists).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fd.h"
#include "map.h"
#include "netns.h"
#include "pod_identity.h"
#include "pod_netns.h"
#include "podsteer_abi.h"
#include "result.h"
#include "state_dir.h"

namespace podsteer {

// How the pod's TC program attaches: a cls_bpf filter under clsact (every kernel), or a
// tcx link (6.6+; each attach waits for an RCU grace period, milliseconds per pod start).
enum class TcMode { Clsact, Tcx };

struct NodeConfig {
  uint16_t outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
  uint16_t inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
  uint16_t hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
  uint16_t dns_port = PODSTEER_DEFAULT_DNS_PORT;
  uint32_t proxy_mark = PODSTEER_DEFAULT_PROXY_MARK;
  uint32_t proxy_mark_mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;
  uint32_t app_mark = PODSTEER_DEFAULT_APP_MARK;
  uint32_t route_table = PODSTEER_DEFAULT_ROUTE_TABLE;
  uint32_t rule_pref = PODSTEER_DEFAULT_RULE_PREF;
  std::string hook_cgroup;  // empty: the default (kubepods cgroup, else cgroup2 root)
  // The node's own netns: a connection whose socket exists there (a kubelet probe) reaches
  // the app. Empty: the netns this process runs in (the agent runs with hostNetwork).
  // Not kept in the state: every process that enrolls or repairs names the same one.
  std::string node_netns;
  TcMode tc_mode = TcMode::Clsact;  // for new attachments; existing ones keep theirs
  // Who may use the proxy mark (and bind the proxy's ports) in an enrolled pod: a node
  // proxy's process (podsteer_proxy), or anyone who sets the mark (Istio's rule). Kept in
  // the state; applied at a fresh install and when given (kProxyIdentity).
  enum class ProxyIdentity { Process, Mark };
  ProxyIdentity proxy_identity = ProxyIdentity::Process;

  // Which settings the caller gave explicitly (a flag, the ConfigMap): those must match a
  // state that exists (check_pinned); the others are taken from it.
  enum Setting : unsigned {
    kOutboundPort = 1u << 0, kInboundPort = 1u << 1, kHbonePort = 1u << 2, kDnsPort = 1u << 3,
    kProxyMark = 1u << 4, kProxyMarkMask = 1u << 5, kAppMark = 1u << 6, kRouteTable = 1u << 7,
    kRulePref = 1u << 8, kProxyIdentity = 1u << 9,
  };
  unsigned given = 0;
};

struct Cidr {
  uint8_t addr[16] = {};  // v4-mapped for IPv4
  unsigned prefix = 0;    // in IPv6 terms (IPv4 /n is 96+n)
  std::string text;
};

Result<std::vector<uint16_t>> parse_ports(const std::string& list);
Result<std::vector<Cidr>> parse_cidrs(const std::string& list);
Result<Cidr> parse_cidr(const std::string& text);

// What enroll is given: who the pod is, and its capture settings
struct PodOptions : PodIdentity {
  std::vector<uint16_t> exclude_inbound_ports;
  std::vector<uint16_t> exclude_outbound_ports;
  std::vector<Cidr> exclude_outbound_cidrs;
  bool dns = false;
  bool fail_open = false;
  bool bypass_inbound = false;  // outbound only (Istio's ambient.istio.io/bypass-inbound-capture)
};

// One of the pod's TC programs on one interface: ingress (connections the node opened) or
// egress (connections the socket hooks did not steer).
struct TcHook {
  unsigned ifindex = 0;
  bool egress = false;
  std::string mode;       // "tcx" (a pinned link) or "clsact" (a cls_bpf filter of ours)
  uint32_t id = 0;        // the tcx link's id, or the filter's program id
  uint32_t prio = 0;      // clsact: the filter's priority (handle 0x5053)
  bool attached = false;  // running on that interface now
};

// The inbound side of one pod as the kernel has it now.
struct InboundStatus {
  uint32_t link_id = 0, prog_id = 0;  // the pod's sk_lookup link; 0: missing
  bool attached = false;              // the link still runs in the pod's netns
  bool proxy_listening = false;       // a proxy listener is in podsteer_listen
  std::vector<TcHook> node_in;        // the TC ingress program, per interface
  std::vector<unsigned> node_in_missing;  // veth interfaces without it (netns alive only)
  std::vector<TcHook> pod_out;        // the TC egress program (the hole check), per interface
  std::vector<unsigned> pod_out_missing;  // veth interfaces without it (netns alive only)
};

struct PodStatus {
  uint64_t cookie = 0;
  bool has_entry = false;  // the datapath switch: false only for a half-removed pod
  podsteer_pod entry{};
  podsteer_pod_meta meta{};
  podsteer_counters counters{};
  podsteer_guard guard{};  // what the proxy's guards stopped (summed over CPUs)
  podsteer_hole hole{};    // connections that left the pod unsteered (the TC egress check)
  bool netns_alive = false;  // the netns path still opens and has this cookie
  std::vector<uint16_t> excluded_inbound_ports, excluded_outbound_ports;
  std::vector<std::string> excluded_cidrs;
  InboundStatus inbound;
  ReturnPathState return_path;  // what is in the pod's netns now (Full detail only)
  std::vector<std::string> addresses;  // the pod's addresses now (Full detail only)

  // Who the pod is, as its meta entry records it
  PodIdentity identity() const;
  std::string full_name() const { return identity().full_name(); }
  // What a whole capture has and this pod lacks, in words; empty when whole.
  std::vector<std::string> missing() const;
};

struct CgroupLink {
  std::string program;
  uint32_t link_id = 0;
  uint32_t prog_id = 0;
  uint64_t cgroup_id = 0;
};

enum class EnrollOutcome { Enrolled, Updated, Unchanged };

// A node proxy's process, whose sockets may carry the proxy mark (podsteer_proxy)
struct ProxyProcess {
  uint64_t cgroup_id = 0;  // its cgroup v2 id, what the programs compare
  uint32_t pid = 0;        // host pid namespace; 0: a cgroup trusted by hand (`podsteer proxy trust --cgroup`)
  uint64_t start_time = 0; // /proc/PID/stat's, in clock ticks
  std::string cgroup;      // the cgroup's path under the cgroup2 mount (for people; may be empty)
};
// The process with this pid: its cgroup v2 id (from /proc/PID/cgroup, checked against the
// cgroup's cgroup.procs, or found by walking the hierarchy when the path is outside this
// process's cgroup namespace) and its start time.
Result<ProxyProcess> proxy_process_of(uint32_t pid, const std::string& proc_root = "/proc");
// A cgroup v2 directory trusted by hand (pid 0: kept until forgotten), for a proxy that
// binds its ports as it starts, before its pid could be given
Result<ProxyProcess> proxy_cgroup_of(const std::string& dir);
// Still the same process (the pid runs, with the same start time), and, when p.cgroup is
// known, still in that cgroup?
bool still_running(const ProxyProcess& p, const std::string& proc_root = "/proc");

class Datapath {
 public:
  // Adopts the pinned datapath in state_dir; with install_if_missing, loads, pins and
  // attaches it first when the state dir holds none. Returns an error, and leaves
  // nothing behind, when any step fails.
  static Result<Datapath> open(const std::string& state_dir, const NodeConfig& want,
                               bool install_if_missing);

  // Links the pod's sk_lookup program, makes its return path and writes its entries; the
  // pod entry is written last, so a failure at any step leaves nothing half-attached.
  // Enrolling an enrolled pod updates its settings in place.
  Result<EnrollOutcome> enroll(const Netns& ns, const PodOptions& opts);
  Status unenroll(uint64_t cookie);
  // Puts the proxy's existing inbound listeners of the pod into podsteer_listen when
  // none is known (then it is one map lookup): a proxy that listened before the pod was
  // enrolled (sock_ops only sees listen() calls made while the hooks are attached), or one
  // that marks its listener only after listen() (ztunnel with INPOD_PORT_REUSE=false: the
  // agent calls this after the proxy's ack). Needs kernel BTF.
  Status find_listeners(const Netns& ns);
  // The cookie of an enrolled pod by the netns path it was enrolled with, or by the
  // namespace itself when it still exists.
  Result<uint64_t> find_pod(const std::string& netns_path);

  // Full also reads each pod's exclusions (every key of those maps, which with thousands
  // of CIDRs is too much for the agent's per-request lookups) and looks into its netns.
  enum class Detail { Summary, Full };
  Result<std::vector<PodStatus>> pods(Detail detail = Detail::Full);
  Result<PodStatus> pod(uint64_t cookie, Detail detail = Detail::Full);
  // Whether the maps hold anything of this pod (its meta or its entry).
  bool has_pod(uint64_t cookie);
  Result<std::vector<CgroupLink>> cgroup_links();
  // Node-wide datapath events, summed over CPUs (zeros for a state without the map yet).
  podsteer_events events() const;
  // Connections whose entry did not fit in a full table, summed over CPUs
  podsteer_full full() const;

  // The node proxies trusted with the mark (podsteer_proxy), and who may use it
  Status trust_proxy(const ProxyProcess& p);
  Status forget_proxy(uint64_t cgroup_id);
  Result<std::vector<ProxyProcess>> proxies() const;
  Status set_proxy_identity(NodeConfig::ProxyIdentity mode);
  NodeConfig::ProxyIdentity proxy_identity() const;
  // Is the install this object adopted still the one pinned (not uninstalled or replaced)?
  Status check_installed() const { return still_installed(); }
  // Socket hooks whose link is gone or detached from the hook cgroup.
  std::vector<std::string> missing_hooks();
  // Attaches every missing socket hook again, from this build's programs.
  Status repair_hooks();
  const podsteer_config& config() const { return config_; }
  const std::string& state_dir() const { return state_dir_; }

  // Removes everything of ours under state_dir: pods' links and netns rules, cgroup
  // links, programs, maps and the directory itself. Works on a broken or partial state
  // dir, and on one another podsteer version made.
  static Status uninstall(const std::string& state_dir);

 private:
  Datapath() = default;
  static Status install(const std::string& state_dir, const NodeConfig& want);
  // Replaces the pinned programs with this build's, link by link (bpf_link_update): no
  // pod is detached and no connection notices. Lock held.
  Status upgrade_programs();
  static Status remove_all(const std::string& state_dir);  // uninstall, lock already held
  Status adopt();
  // Under the state lock: is the install we adopted still the one pinned? Another process
  // may have uninstalled (and reinstalled) it since.
  Status still_installed() const;
  Status unenroll_locked(uint64_t cookie);
  Result<EnrollOutcome> enroll_locked(const Netns& ns, const PodOptions& opts);
  // A state dir made by map ABI 1 becomes this ABI's, pods captured throughout
  // (migrate.cpp). Lock held.
  static Status migrate_from_abi1(const std::string& state_dir);
  // ABI 2 -> 3: two pins renamed, the config's ABI written; idempotent (an interrupted one
  // is finished by the next open).
  static Status migrate_from_abi2(const std::string& state_dir);
  ReturnPath return_path() const;
  Status attach_inbound(const Netns& ns);
  Status upgrade_inbound(uint64_t cookie);
  // netns_fd: the pod's netns, -1 when it is gone (its TC filters went with it)
  void detach_inbound(uint64_t cookie, int netns_fd);
  // known: the pod's links when the caller has just read them
  InboundStatus inbound_status(uint64_t cookie, const Netns* ns, const NodeLinks* known = nullptr) const;
  // The pod's veths and the node's netns id there (with assign, given one if it has none;
  // -1 if it has none or cannot be had)
  NodeLinks node_links_of(const Netns& pod, bool assign) const;
  Status write_exclusions(uint64_t cookie, const PodOptions& opts);
  void erase_exclusions(uint64_t cookie, const PodOptions* keep);
  void erase_connections(uint64_t cookie);
  // Every pod's exclusion keys, read once for a listing (none unless detail is Full)
  struct ExclusionKeys {
    std::vector<podsteer_port_key> ports;
    std::vector<podsteer_cidr_key> cidrs;
  };
  Result<ExclusionKeys> exclusion_keys(Detail detail);
  Result<PodStatus> status_of(uint64_t cookie, Detail detail, const ExclusionKeys& keys);

  std::string state_dir_;
  std::string node_netns_ = "/proc/self/ns/net";
  TcMode tc_mode_ = TcMode::Clsact;
  podsteer_config config_{};
  uint32_t config_map_id_ = 0;
  std::optional<Map<__u64, podsteer_pod>> pods_;
  std::optional<Map<__u64, podsteer_pod_meta>> meta_;
  std::optional<Map<podsteer_port_key, __u8>> ports_;
  std::optional<Map<podsteer_cidr_key, __u8>> cidrs_;
  std::optional<PercpuMap<__u64, podsteer_counters>> stats_;
  std::optional<Map<podsteer_origdst_key, podsteer_addr>> orig_;
  std::optional<Map<podsteer_tuple_key, __u8>> transit_;
  // absent in a state from before it until this build's programs are loaded there
  std::optional<PercpuMap<__u64, podsteer_guard>> guard_;
  std::optional<Map<__u64, podsteer_hole>> holes_;
  Fd listeners_;  // SOCKHASH: values are sockets, looked up by key only
};

// Whether state_dir holds a state map ABI 1 made.
bool is_abi1_state(const std::string& state_dir);
bool is_abi2_state(const std::string& state_dir);

// Identifies this build's BPF programs (a hash of the objects it embeds).
uint64_t programs_id();


}  // namespace podsteer
