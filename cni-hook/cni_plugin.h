// What podsteer-cni reads before it asks the agent: CNI_ARGS and the network configuration
// on stdin. Type-checked; bad input is an error with the CNI error code to report, never an
// exception (tests/fuzz/cni_plugin_conf, tests/fuzz/cni_args).
#pragma once

#include <nlohmann/json.hpp>

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace podsteer::cni {

// CNI error codes (spec "Error" section) and ours (100+).
enum Code {
  kIncompatibleVersion = 1,
  kInvalidEnv = 4,
  kDecode = 6,
  kInvalidConfig = 7,
  kTryAgain = 11,
  kAgentRefused = 100,
};

struct PluginError {
  int code = 0;
  std::string msg, details;
};

// How podsteer-cni reaches the API server when the agent cannot be reached (written into
// its config by the agent's installer): the server, and files the agent keeps up to date
// on the node with its service account's token and the cluster CA.
struct KubeAccess {
  std::string server;
  std::string token_file;
  std::string ca_file;
};

struct PluginConf {
  std::string cni_version = "1.0.0";
  std::string agent_socket = "/var/run/podsteer/cni.sock";
  bool chained = false;                     // has a prevResult
  nlohmann::ordered_json prev_result;       // printed unchanged on ADD
  std::vector<std::string> ips;             // prevResult's addresses
  std::vector<std::string> enroll_namespaces;
  std::optional<KubeAccess> kubernetes;  // "kubernetes": {"server", "tokenFile", "caFile"}
  std::string enroll_label = "istio.io/dataplane-mode=ambient";  // "enrollment": {"label", ...}
  std::string system_namespace = "istio-system";                 // ... "systemNamespace"
  std::vector<std::string> exclude_namespaces;                   // ... "excludeNamespaces"
};

extern const std::vector<std::string> kSupportedVersions;

// "K1=V1;K2=V2" (empty items allowed); an item without '=' is an error.
bool parse_cni_args(const std::string& s, std::map<std::string, std::string>& out, PluginError& err);
bool parse_plugin_conf(const std::string& stdin_json, PluginConf& out, PluginError& err);

}  // namespace podsteer::cni
