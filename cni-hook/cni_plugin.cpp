#include "cni_plugin.h"

#include <algorithm>

namespace podsteer::cni {

using ojson = nlohmann::ordered_json;

const std::vector<std::string> kSupportedVersions = {"0.3.0", "0.3.1", "0.4.0", "1.0.0"};

bool parse_cni_args(const std::string& s, std::map<std::string, std::string>& out, PluginError& err) {
  size_t start = 0;
  while (start <= s.size()) {
    size_t semi = s.find(';', start);
    std::string kv = s.substr(start, semi == std::string::npos ? std::string::npos : semi - start);
    if (!kv.empty()) {
      auto eq = kv.find('=');
      if (eq == std::string::npos) {
        err = {kInvalidEnv, "invalid CNI_ARGS", "'" + kv + "' is not KEY=VALUE"};
        return false;
      }
      out[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    if (semi == std::string::npos) break;
    start = semi + 1;
  }
  return true;
}

bool parse_plugin_conf(const std::string& stdin_json, PluginConf& out, PluginError& err) {
  auto conf = ojson::parse(stdin_json, nullptr, false);
  if (conf.is_discarded() || !conf.is_object()) {
    err = {kDecode, "failed to decode the network configuration on stdin", "not a JSON object"};
    return false;
  }
  auto str = [&](const char* key, std::string& into) {
    auto it = conf.find(key);
    if (it == conf.end() || it->is_null()) return true;
    if (!it->is_string()) {
      err = {kDecode, "failed to decode the network configuration on stdin", std::string("'") + key + "' is not a string"};
      return false;
    }
    into = it->get<std::string>();
    return true;
  };
  if (!str("cniVersion", out.cni_version) || !str("agentSocket", out.agent_socket)) return false;
  if (std::find(kSupportedVersions.begin(), kSupportedVersions.end(), out.cni_version) == kSupportedVersions.end()) {
    err = {kIncompatibleVersion, "incompatible CNI version",
           "podsteer-cni supports 0.3.0, 0.3.1, 0.4.0 and 1.0.0, not " + out.cni_version};
    out.cni_version = "1.0.0";  // the error itself is reported in a version we speak
    return false;
  }
  // a list of strings, absent or null for none
  auto strings_list = [&](const nlohmann::json& in, const char* key, const std::string& name,
                          std::vector<std::string>& into) {
    auto it = in.find(key);
    if (it == in.end() || it->is_null()) return true;
    if (!it->is_array()) {
      err = {kInvalidConfig, "invalid network configuration", "'" + name + "' is not a list"};
      return false;
    }
    for (const auto& v : *it) {
      if (!v.is_string()) {
        err = {kInvalidConfig, "invalid network configuration", "'" + name + "' holds a non-string"};
        return false;
      }
      into.push_back(v.get<std::string>());
    }
    return true;
  };
  if (!strings_list(conf, "enrollNamespaces", "enrollNamespaces", out.enroll_namespaces)) return false;
  // an object of strings: a key of another type is a decode error
  auto strings = [&](const char* name, const std::vector<std::pair<const char*, std::string*>>& fields) {
    auto it = conf.find(name);
    if (it == conf.end() || it->is_null()) return true;
    if (!it->is_object()) {
      err = {kInvalidConfig, "invalid network configuration", std::string("'") + name + "' is not an object"};
      return false;
    }
    for (const auto& [key, into] : fields) {
      auto f = it->find(key);
      if (f == it->end() || f->is_null()) continue;
      if (!f->is_string()) {
        err = {kInvalidConfig, "invalid network configuration", std::string("'") + name + "." + key + "' is not a string"};
        return false;
      }
      *into = f->get<std::string>();
    }
    return true;
  };
  KubeAccess kube;
  if (!strings("kubernetes", {{"server", &kube.server}, {"tokenFile", &kube.token_file}, {"caFile", &kube.ca_file}}) ||
      !strings("enrollment", {{"label", &out.enroll_label}, {"systemNamespace", &out.system_namespace}}))
    return false;
  if (auto e = conf.find("enrollment"); e != conf.end() && e->is_object() &&
      !strings_list(*e, "excludeNamespaces", "enrollment.excludeNamespaces", out.exclude_namespaces))
    return false;
  if (!kube.server.empty()) out.kubernetes = kube;
  if (auto it = conf.find("prevResult"); it != conf.end() && it->is_object()) {
    out.chained = true;
    out.prev_result = *it;
    if (auto ips = it->find("ips"); ips != it->end() && ips->is_array())
      for (const auto& ip : *ips)
        if (ip.is_object())
          if (auto a = ip.find("address"); a != ip.end() && a->is_string()) out.ips.push_back(a->get<std::string>());
  }
  return true;
}

}  // namespace podsteer::cni
