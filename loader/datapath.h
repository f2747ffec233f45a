// The node's datapath: the BPF objects loaded once per node and pinned under the state
// dir, the socket hooks attached once at the hook cgroup, and per-pod TC attachments
// inside each pod's netns. Knows nothing of Kubernetes.
//
// State dir layout (bpffs):
//   maps/podsteer_*           every map, with BTF
//   progs/tc_ingress          the TC program, attached per pod
//   links/<program>           the cgroup socket-hook links
//   pods/<cookie>/tc_<ifidx>  a pod's tcx links
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fd.h"
#include "map.h"
#include "netns.h"
#include "podsteer_abi.h"
#include "result.h"

namespace podsteer {

struct NodeConfig {
  uint16_t outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
  uint16_t inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
  uint16_t hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
  uint16_t dns_port = PODSTEER_DEFAULT_DNS_PORT;
  uint32_t proxy_mark = PODSTEER_DEFAULT_PROXY_MARK;
  uint32_t proxy_mark_mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;
  std::string hook_cgroup;  // empty: the default (kubepods cgroup, else cgroup2 root)
};

enum class TcMode { Auto, Tcx, Clsact };

struct Cidr {
  uint8_t addr[16] = {};  // v4-mapped for IPv4
  unsigned prefix = 0;    // in IPv6 terms (IPv4 /n is 96+n)
  std::string text;
};

Result<std::vector<uint16_t>> parse_ports(const std::string& list);
Result<std::vector<Cidr>> parse_cidrs(const std::string& list);
Result<Cidr> parse_cidr(const std::string& text);

struct PodOptions {
  std::string pod;                      // "namespace/name", may be empty
  std::string uid;                      // Kubernetes pod UID (the agent's key), may be empty
  std::string service_account;
  std::string container_id;
  std::vector<std::string> interfaces;  // empty: every non-loopback interface
  std::vector<uint16_t> exclude_inbound_ports;
  std::vector<uint16_t> exclude_outbound_ports;
  std::vector<Cidr> exclude_outbound_cidrs;
  bool dns = false;
  bool fail_open = false;
  TcMode tc_mode = TcMode::Auto;
};

// The interfaces enroll will attach to: the named ones, or every non-loopback one.
Result<std::vector<Interface>> choose_interfaces(const Netns& ns, const PodOptions& opts);

struct PodStatus {
  uint64_t cookie = 0;
  bool has_entry = false;  // the datapath switch: false only for a half-removed pod
  podsteer_pod entry{};
  podsteer_pod_meta meta{};
  podsteer_counters counters{};
  bool netns_alive = false;  // the netns path still opens and has this cookie
  std::vector<uint16_t> excluded_inbound_ports, excluded_outbound_ports;
  std::vector<std::string> excluded_cidrs;
  std::vector<std::string> addresses;  // podsteer_ips entries: where TC finds the pod
};

struct CgroupLink {
  std::string program;
  uint32_t link_id = 0;
  uint32_t prog_id = 0;
  uint64_t cgroup_id = 0;
};

enum class EnrollOutcome { Enrolled, Updated, Unchanged };

class Datapath {
 public:
  // Adopts the pinned datapath in state_dir; with install_if_missing, loads, pins and
  // attaches it first when the state dir holds none. Returns an error, and leaves
  // nothing behind, when any step fails.
  static Result<Datapath> open(const std::string& state_dir, const NodeConfig& want,
                               bool install_if_missing);

  // Attaches TC in the pod's netns and writes its entries; the pod entry is written
  // last, so a failure at any step leaves nothing half-attached.
  // chosen: the interfaces, when the caller already ran choose_interfaces (to validate
  // before anything was installed); otherwise enroll chooses them.
  Result<EnrollOutcome> enroll(const Netns& ns, const PodOptions& opts,
                               const std::vector<Interface>* chosen = nullptr);
  Status unenroll(uint64_t cookie);
  // The cookie of an enrolled pod by the netns path it was enrolled with, or by the
  // namespace itself when it still exists.
  Result<uint64_t> find_pod(const std::string& netns_path);

  // Full also reads each pod's exclusions and addresses: every key of those maps, which
  // with thousands of CIDRs is too much for the agent's per-request lookups.
  enum class Detail { Summary, Full };
  Result<std::vector<PodStatus>> pods(Detail detail = Detail::Full);
  Result<std::vector<CgroupLink>> cgroup_links();
  const podsteer_config& config() const { return config_; }
  const std::string& state_dir() const { return state_dir_; }
  uint32_t tc_prog_id() const { return tc_prog_id_; }

  // Removes everything of ours under state_dir: pods' TC attachments, cgroup links,
  // programs, maps and the directory itself. Works on a broken or partial state dir.
  static Status uninstall(const std::string& state_dir);

 private:
  Datapath() = default;
  static Status install(const std::string& state_dir, const NodeConfig& want);
  static Status remove_all(const std::string& state_dir);  // uninstall, lock already held
  Status adopt();
  Status attach_tc(const Netns& ns, const std::vector<unsigned>& ifindexes, TcMode mode,
                   podsteer_pod_meta& meta);
  void detach_tc(uint64_t cookie, const podsteer_pod_meta& meta);
  Status write_exclusions(uint64_t cookie, const PodOptions& opts);
  void erase_exclusions(uint64_t cookie, const PodOptions* keep);
  void erase_pod_ips(uint64_t cookie);

  std::string state_dir_;
  podsteer_config config_{};
  std::optional<Map<__u64, podsteer_pod>> pods_;
  std::optional<Map<__u64, podsteer_pod_meta>> meta_;
  std::optional<Map<podsteer_ip_key, __u64>> pod_ips_;
  std::optional<Map<podsteer_port_key, __u8>> ports_;
  std::optional<Map<podsteer_cidr_key, __u8>> cidrs_;
  std::optional<PercpuMap<__u64, podsteer_counters>> stats_;
  Fd tc_prog_;
  uint32_t tc_prog_id_ = 0;
};

// Names of the maps, for dump and uninstall.
const std::vector<std::string>& map_names();
std::string map_pin(const std::string& state_dir, const std::string& name);

podsteer_cidr_key cidr_key(uint64_t cookie, const Cidr& c);

}  // namespace podsteer
