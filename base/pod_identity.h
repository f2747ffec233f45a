// Who a pod is: the part every description of one pod shares. The agent's PodInfo, the
// loader's PodOptions (what enroll is given) and PodStatus (identity(), from the pod's meta
// entry) and the API server's kube::Pod are each a PodIdentity with what their job adds, so
// a pod's identity passes between them whole, never field by field.
#pragma once

#include <string>

namespace podsteer {

struct PodIdentity {
  std::string uid;              // the Kubernetes pod UID: the agent's key, ZDS's workload id; may be empty
  std::string namespace_, name; // may be empty (a pod enrolled by hand)
  std::string service_account;
  std::string container_id;     // the CNI container (sandbox) id

  // "namespace/name", or "" for a pod without names
  std::string full_name() const { return namespace_.empty() && name.empty() ? "" : namespace_ + "/" + name; }
  PodIdentity& identity() { return *this; }
  const PodIdentity& identity() const { return *this; }
  // Takes what this one lacks from other: the names as a pair, the rest one by one (a
  // re-enroll without names keeps the ones the pod had)
  void fill_from(const PodIdentity& other) {
    if (namespace_.empty() && name.empty()) {
      namespace_ = other.namespace_;
      name = other.name;
    }
    if (uid.empty()) uid = other.uid;
    if (service_account.empty()) service_account = other.service_account;
    if (container_id.empty()) container_id = other.container_id;
  }
};

}  // namespace podsteer
