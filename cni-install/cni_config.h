// Installing podsteer-cni into the node's CNI configuration: the binary into the CNI bin
// dir, our plugin at the end of the primary CNI's config (the first .conf, .conflist or
// .json by name, as libcni picks it; a single-plugin .conf or .json becomes a .conflist),
// and back out again. Every write is atomic and keeps the file's mode.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <vector>

#include "result.h"

namespace podsteer::cni {

struct InstallOptions {
  std::string bin_dir = "/opt/cni/bin";
  std::string conf_dir = "/etc/cni/net.d";
  std::string plugin_binary;  // the podsteer-cni to copy
  std::string agent_socket = "/var/run/podsteer/cni.sock";
  // more keys of our plugin's entry (the API access for when the agent is away)
  nlohmann::json plugin_settings = nlohmann::json::object();
  // Tests: runs between reading a config file and putting our version in its place (where
  // a primary CNI's rewrite must not get lost).
  std::function<void()> before_replace;
};

// The primary config file in conf_dir, or an error when there is none.
Result<std::string> primary_conflist(const std::string& conf_dir);

// The primary config's content with our plugin appended, or our entry brought up to date
// with settings (false: it is there already, as it should be). Type-checked, never throws
// (tests/fuzz/conflist).
Result<bool> chain_into(const std::string& content, const std::string& agent_socket, std::string& out,
                        const nlohmann::json& settings = nlohmann::json::object());

// Adds our plugin to the primary conflist if it is missing; returns whether it changed
// the file. Idempotent: safe to call whenever the primary CNI rewrote its file.
Result<bool> ensure_chained(const InstallOptions& o);

Status install(const InstallOptions& o);

// podsteer-cni's own way to the API server, for when the agent cannot be reached: the
// agent's token and the cluster CA in files beside the CNI config (token root-only; as
// istio-cni keeps its kubeconfig there), named in our entry's "kubernetes" settings with
// the enrollment rules. Rewrites a file only when its content changed (a rotated token).
extern const char* const kTokenFile;  // in conf_dir
extern const char* const kCaFile;
Status set_api_access(InstallOptions& o, const std::string& server, const std::string& token, const std::string& ca_pem,
                      const std::string& enroll_label, const std::string& system_namespace,
                      const std::vector<std::string>& exclude_namespaces = {});
// Removes our plugin from every conflist in conf_dir and the binary from bin_dir; an empty
// dir is skipped.
Status uninstall(const InstallOptions& o);

}  // namespace podsteer::cni
