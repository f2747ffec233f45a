#include "api_fallback.h"

#include <fstream>

#include "http_get.h"
#include "kube_policy.h"

namespace podsteer::cni {

namespace {

using json = nlohmann::json;

// GET path from the API server: its JSON, or an error naming the status.
Result<json> api_get(const KubeAccess& k, const std::string& token, const std::string& path) {
  auto res = http_get(k.server, path, token, k.ca_file, 5);
  if (!res) return res.error();
  if (res->status < 200 || res->status > 299)
    return Error{"API server answered HTTP " + std::to_string(res->status), 0, path};
  auto j = json::parse(res->body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid("API server's answer is not a JSON object", path);
  return j;
}

}  // namespace

Result<bool> enrolled_by_api(const PluginConf& conf, const std::string& pod_namespace, const std::string& pod_name,
                             const std::string& pod_uid) {
  if (!conf.kubernetes) return invalid("no \"kubernetes\" access in podsteer-cni's config (the CNI-only pod source)");
  if (pod_namespace.empty() || pod_name.empty()) return invalid("CNI_ARGS name no Kubernetes pod");
  const KubeAccess& k = *conf.kubernetes;
  std::string token;
  if (!k.token_file.empty()) {
    std::ifstream in(k.token_file);
    if (!in || !std::getline(in, token)) return invalid("cannot read the API token", k.token_file);
  }
  auto pod_json = api_get(k, token, "/api/v1/namespaces/" + pod_namespace + "/pods/" + pod_name);
  if (!pod_json) return pod_json.error();
  auto pod = kube::parse_pod(*pod_json);
  if (!pod) return pod.error();
  if (!pod_uid.empty() && pod->uid != pod_uid)
    return invalid("the API has another pod of this name (uid " + pod->uid + "), not yet the one being created");
  auto ns_json = api_get(k, token, "/api/v1/namespaces/" + pod_namespace);
  if (!ns_json) return ns_json.error();
  auto ns = kube::parse_namespace(*ns_json);
  if (!ns) return ns.error();

  return kube::LabelPolicy::from(conf.enroll_label, conf.system_namespace, conf.exclude_namespaces)
      .enrolled(*pod, &ns->second);
}

}  // namespace podsteer::cni
