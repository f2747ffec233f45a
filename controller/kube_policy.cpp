#include "kube_policy.h"

namespace podsteer::kube {

using json = nlohmann::json;

using namespace json_read;


bool LabelPolicy::enrolled(const Pod& pod, const Labels* ns_labels) const {
  auto label = [](const Labels& l, const std::string& k) {
    auto it = l.find(k);
    return it == l.end() ? std::string() : it->second;
  };
  bool ambient = label(pod.labels, key) == value || (ns_labels && label(*ns_labels, key) == value);
  if (!ambient || label(pod.labels, key) == opt_out || pod.host_network) return false;
  if (excluded_namespaces.count(pod.namespace_)) return false;
  if (pod.annotations.count("sidecar.istio.io/status")) return false;  // a sidecar pod: never both
  if (pod.namespace_ == proxy_namespace && proxy_apps.count(label(pod.labels, "app"))) return false;
  return true;
}

LabelPolicy LabelPolicy::from(const std::string& label, const std::string& system_namespace,
                              const std::vector<std::string>& excluded_namespaces) {
  LabelPolicy p;
  if (auto eq = label.find('='); eq != std::string::npos) {
    p.key = label.substr(0, eq);
    p.value = label.substr(eq + 1);
  }
  p.proxy_namespace = system_namespace;
  p.excluded_namespaces = {excluded_namespaces.begin(), excluded_namespaces.end()};
  return p;
}

std::optional<bool> parse_go_bool(const std::string& s) {
  for (const char* t : {"1", "t", "T", "TRUE", "true", "True"})
    if (s == t) return true;
  for (const char* f : {"0", "f", "F", "FALSE", "false", "False"})
    if (s == f) return false;
  return std::nullopt;
}

PodOverrides pod_overrides(const Pod& pod, std::vector<std::string>* ignored) {
  PodOverrides o;
  auto read = [&](const char* key) -> std::optional<bool> {
    auto it = pod.annotations.find(key);
    if (it == pod.annotations.end()) return std::nullopt;
    auto v = parse_go_bool(it->second);
    if (!v && ignored) ignored->push_back(std::string(key) + "='" + it->second + "' is not a boolean");
    return v;
  };
  o.bypass_inbound = read("ambient.istio.io/bypass-inbound-capture").value_or(false);
  o.dns = read("ambient.istio.io/dns-capture");
  return o;
}

Result<Pod> parse_pod(const json& o) {
  const json& m = obj(o, "metadata");
  Pod p;
  p.uid = str(m, "uid");
  p.name = str(m, "name");
  p.namespace_ = str(m, "namespace");
  if (p.uid.empty() || p.name.empty() || p.namespace_.empty()) return invalid("pod without uid, name or namespace");
  p.labels = string_map(obj(m, "labels"));
  p.annotations = string_map(obj(m, "annotations"));
  const json& spec = obj(o, "spec");
  const json& status = obj(o, "status");
  const json* hn = field(spec, "hostNetwork");
  p.host_network = hn && hn->is_boolean() && hn->get<bool>();
  p.service_account = str(spec, "serviceAccountName");
  if (p.service_account.empty()) p.service_account = "default";  // what the API server fills in
  p.phase = str(status, "phase");
  const json* ips = field(status, "podIPs");
  if (ips && ips->is_array()) {
    for (const auto& ip : *ips)
      if (auto s = str(ip, "ip"); !s.empty()) p.ips.push_back(s);
  } else if (auto s = str(status, "podIP"); !s.empty()) {
    p.ips.push_back(s);
  }
  return p;
}

Result<std::pair<std::string, Labels>> parse_namespace(const json& o) {
  const json& m = obj(o, "metadata");
  std::string name = str(m, "name");
  if (name.empty()) return invalid("namespace without a name");
  return std::make_pair(name, string_map(obj(m, "labels")));
}


}  // namespace podsteer::kube
