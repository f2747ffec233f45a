// Pod sources and enrollment policy. A pod source tells the agent about pods (the CNI
// hook on ADD/DEL; the Kubernetes watch comes as a second source) and an enrollment policy
// decides which of them belong in the mesh.
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pod_identity.h"

namespace podsteer {

// A pod as the agent knows it: who it is, where its netns is, and what its sources said
// about capturing it. The agent's one description of a pod (the table, capture, ZDS).
struct PodInfo : PodIdentity {
  std::string netns;     // path of the pod's netns
  uint64_t netns_cookie = 0;  // what the netns is, once opened (a path may go away, e.g. /proc/PID)
  std::string ifname;    // the interface the CNI made
  std::vector<std::string> ips;
  std::optional<bool> enroll_hint;  // an explicit yes/no from the source (e.g. CNI_ARGS)
  std::vector<std::string> enroll_namespaces;  // from the CNI network config, if any
  // per-pod settings from the pod's annotations (Kubernetes source); unset: the node's
  std::optional<bool> dns;
  bool bypass_inbound = false;
};

class EnrollmentPolicy {
 public:
  virtual ~EnrollmentPolicy() = default;
  virtual bool enrolled(const PodInfo& pod) const = 0;
};

// The CNI source's policy: an explicit hint in CNI_ARGS (PODSTEER_ENROLL=true|false) wins;
// otherwise the pod's namespace must be in the agent's --enroll-namespaces or the network
// config's "enrollNamespaces" ("*" means every namespace).
class CniEnrollmentPolicy : public EnrollmentPolicy {
 public:
  explicit CniEnrollmentPolicy(std::set<std::string> namespaces) : namespaces_(std::move(namespaces)) {}
  bool enrolled(const PodInfo& pod) const override {
    if (pod.enroll_hint) return *pod.enroll_hint;
    auto match = [&](const std::string& ns) { return ns == "*" || ns == pod.namespace_; };
    for (const auto& ns : namespaces_)
      if (match(ns)) return true;
    for (const auto& ns : pod.enroll_namespaces)
      if (match(ns)) return true;
    return false;
  }

 private:
  std::set<std::string> namespaces_;
};

}  // namespace podsteer
