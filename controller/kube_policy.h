// Who is captured, and how, decided from API objects alone as istio-cni decides it: shared
// by the agent and by podsteer-cni, which asks the API itself when the agent is away. Only
// JSON and the standard library here, so the plugin stays a binary that runs on any node.
#pragma once

#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "pod_identity.h"
#include "result.h"

namespace podsteer::kube {

using Labels = std::map<std::string, std::string>;

// Readers of API JSON that check the type first: a field of another type reads as absent.
namespace json_read {
inline const nlohmann::json* field(const nlohmann::json& o, const char* key) {
  if (!o.is_object()) return nullptr;
  auto it = o.find(key);
  return it == o.end() ? nullptr : &*it;
}
inline std::string str(const nlohmann::json& o, const char* key) {
  const nlohmann::json* f = field(o, key);
  return f && f->is_string() ? f->get<std::string>() : "";
}
inline const nlohmann::json& obj(const nlohmann::json& o, const char* key) {
  static const nlohmann::json empty = nlohmann::json::object();
  const nlohmann::json* f = field(o, key);
  return f && f->is_object() ? *f : empty;
}
inline Labels string_map(const nlohmann::json& j) {
  Labels out;
  if (j.is_object())
    for (const auto& [k, v] : j.items())
      if (v.is_string()) out[k] = v.get<std::string>();
  return out;
}
}  // namespace json_read


// A pod as the API server describes it (no container id: that is the runtime's)
struct Pod : PodIdentity {
  std::string phase;
  bool host_network = false;
  Labels labels, annotations;
  std::vector<std::string> ips;
};


// istio-cni's enablement (cni/pkg/util/podutil.go, PodRedirectionEnabled): the label on the
// pod or its namespace, unless the pod is labelled "none"; never hostNetwork pods, pods
// with a sidecar (sidecar.istio.io/status) or the node proxy's own pods.
struct LabelPolicy {
  std::string key = "istio.io/dataplane-mode";
  std::string value = "ambient";
  std::string opt_out = "none";
  // the node proxy's pods: this namespace and label app=one of these (Istio: istio-system, ztunnel)
  std::string proxy_namespace = "istio-system";
  std::set<std::string> proxy_apps = {"ztunnel", "podsteer-proxy"};
  // namespaces never captured, whatever their labels (istio-cni's excludeNamespaces)
  std::set<std::string> excluded_namespaces;
  bool enrolled(const Pod& pod, const Labels* ns_labels) const;
  // From "KEY=VALUE" (the agent's --enroll-label), the node proxy's namespace and the
  // excluded namespaces
  static LabelPolicy from(const std::string& label, const std::string& system_namespace,
                          const std::vector<std::string>& excluded_namespaces = {});
};

// Istio's per-pod settings (istio-cni: getPodLevelTrafficOverrides), read as Go's
// strconv.ParseBool reads them; a value that does not parse is ignored.
struct PodOverrides {
  std::optional<bool> dns;      // ambient.istio.io/dns-capture; unset: the node's default
  bool bypass_inbound = false;  // ambient.istio.io/bypass-inbound-capture
};
PodOverrides pod_overrides(const Pod& pod, std::vector<std::string>* ignored = nullptr);
std::optional<bool> parse_go_bool(const std::string& s);

// The annotation istiod reads (ambient.istio.io/redirection) and its values.
inline constexpr const char* kRedirectionAnnotation = "ambient.istio.io/redirection";
inline constexpr const char* kRedirectionEnabled = "enabled";
inline constexpr const char* kRedirectionPending = "pending";

// A pod object as the API sends it. The service account is "default" when the spec has
// none, as the API server fills it in.
Result<Pod> parse_pod(const nlohmann::json& obj);
// A namespace object: its name and labels.
Result<std::pair<std::string, Labels>> parse_namespace(const nlohmann::json& obj);


}  // namespace podsteer::kube
