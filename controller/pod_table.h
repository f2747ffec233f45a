// The agent's pod table: every pod the agent has captured, in memory, found by uid,
// container id, netns cookie or address. It is the agent's answer to "is this pod
// captured?" (CNI DEL and CHECK, the Kubernetes pass, removal): none of them re-reads the
// BPF maps or enters a pod's netns. The maps are the table's projection into the kernel;
// the repair pass checks one against the other (agent_repair.cpp).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "pod_source.h"

namespace podsteer {

class PodTable {
 public:
  // Adds or replaces the pod with pod.netns_cookie (which must be set).
  void put(const PodInfo& pod);
  // Removes the pod with this cookie; returns it if it was there.
  std::optional<PodInfo> erase(uint64_t cookie);
  // The pod that key names: by uid, else container id, else netns cookie (as a CNI
  // request, a Kubernetes pod or a map entry name it).
  std::optional<PodInfo> find(const PodInfo& key) const;
  std::optional<PodInfo> by_cookie(uint64_t cookie) const;
  std::optional<PodInfo> by_address(const std::string& ip) const;
  std::vector<PodInfo> all() const;
  size_t size() const;

 private:
  void unindex(const PodInfo& p);
  mutable std::mutex mu_;  // guards the four maps below; held only inside these methods
  std::map<uint64_t, PodInfo> by_cookie_;
  std::map<std::string, uint64_t> by_uid_, by_container_, by_address_;
};

}  // namespace podsteer
