#include "cni_request.h"

#include <nlohmann/json.hpp>

namespace podsteer {

using json = nlohmann::json;

namespace {

// A string field, or an error naming it when it has another type. Absent is "".
Result<std::string> str(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::string();
  if (!it->is_string()) return invalid(std::string("field '") + key + "' is not a string");
  return it->get<std::string>();
}

Result<std::vector<std::string>> strings(const json& j, const char* key) {
  std::vector<std::string> out;
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return out;
  if (!it->is_array()) return invalid(std::string("field '") + key + "' is not an array");
  for (const auto& v : *it) {
    if (!v.is_string()) return invalid(std::string("field '") + key + "' holds a non-string");
    out.push_back(v.get<std::string>());
  }
  return out;
}

}  // namespace

Result<CniRequest> parse_cni_request(const std::string& line) {
  auto j = json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid("malformed request: not a JSON object");
  CniRequest r;
  struct Field {
    const char* key;
    std::string* into;
  } fields[] = {{"command", &r.command},        {"pod_uid", &r.pod.uid},
                {"pod_name", &r.pod.name},      {"pod_namespace", &r.pod.namespace_},
                {"service_account", &r.pod.service_account}, {"container_id", &r.pod.container_id},
                {"netns", &r.pod.netns},        {"ifname", &r.pod.ifname}};
  for (const auto& f : fields) {
    auto v = str(j, f.key);
    if (!v) return invalid("malformed request: " + v.error().op);
    *f.into = *v;
  }
  auto ips = strings(j, "ips");
  if (!ips) return invalid("malformed request: " + ips.error().op);
  r.pod.ips = *ips;
  auto nss = strings(j, "enroll_namespaces");
  if (!nss) return invalid("malformed request: " + nss.error().op);
  r.pod.enroll_namespaces = *nss;
  if (auto it = j.find("enroll"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) return invalid("malformed request: field 'enroll' is not a boolean");
    r.pod.enroll_hint = it->get<bool>();
  }
  if (r.command != "ADD" && r.command != "DEL" && r.command != "CHECK")
    return invalid("unknown command '" + r.command + "'");
  return r;
}

}  // namespace podsteer
