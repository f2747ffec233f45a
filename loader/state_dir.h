// The state dir on bpffs: where every pin lives, the lock every mutating step holds, the
// keys of the maps' entries, and the one conversion between the node's settings
// (NodeConfig) and the pinned podsteer_config the programs read.
//
//   maps/podsteer_*           every map, with BTF
//   links/<program>           the cgroup socket-hook links
//   pods/<cookie>/inbound     a pod's sk_lookup link (it holds the pod's program)
#pragma once

#include <cstdint>
#include <string>

#include "fd.h"
#include "pod_identity.h"
#include "podsteer_abi.h"
#include "result.h"

namespace podsteer {

struct NodeConfig;
struct Cidr;

inline std::string join(const std::string& a, const std::string& b) { return a + "/" + b; }

// A map's pin in a state dir
std::string map_pin(const std::string& state_dir, const std::string& name);
inline std::string links_dir(const std::string& state_dir) { return join(state_dir, "links"); }
inline std::string pod_dir(const std::string& state, uint64_t cookie) {
  return join(join(state, "pods"), std::to_string(cookie));
}
inline std::string inbound_pin(const std::string& state, uint64_t cookie) { return join(pod_dir(state, cookie), "inbound"); }

Status make_dir(const std::string& p);

// Every mutating step holds an exclusive lock on the state dir's parent (bpffs keeps no
// plain files), so two podsteer processes - CLIs, agents - never interleave their steps.
class StateLock {
 public:
  static Result<StateLock> take(const std::string& state_dir);

 private:
  explicit StateLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

// The pinned config a node's settings make (abi version and programs id included).
podsteer_config abi_config_of(const NodeConfig& node, const std::string& hook_cgroup);
// The ports and marks from one config to another: NodeConfig, podsteer_config, ABI 1's
// (they kept their names since ABI 1).
template <typename To, typename From>
void copy_ports_and_marks(To& to, const From& from) {
  to.outbound_port = from.outbound_port;
  to.inbound_port = from.inbound_port;
  to.hbone_port = from.hbone_port;
  to.dns_port = from.dns_port;
  to.proxy_mark = from.proxy_mark;
  to.proxy_mark_mask = from.proxy_mark_mask;
}
// The settings a pinned config holds (hook cgroup included; node netns and tc mode are
// not kept in the state).
NodeConfig node_config_of(const podsteer_config& c);
// Refuses, with what to do, when a setting the caller gave explicitly (NodeConfig::given)
// differs from the one the state was made with: ports and marks are chosen when the state
// dir is made, and the proxy on this node listens where they say.
Status check_pinned(const podsteer_config& pinned, const NodeConfig& want, const std::string& state_dir);

// A pod's identity in its meta entry, and back (each field cut to the entry's size)
PodIdentity identity_of(const podsteer_pod_meta& m);
void put_identity(podsteer_pod_meta& m, const PodIdentity& id);

podsteer_cidr_key cidr_key(uint64_t cookie, const Cidr& c);
// The netns cookie a CIDR key belongs to (it is stored big-endian, for the LPM trie's prefix).
uint64_t cookie_of(const podsteer_cidr_key& k);
podsteer_listener_key listener_key(uint64_t cookie, uint16_t port, uint16_t family);

}  // namespace podsteer
