// A small Kubernetes API client on libcurl: GET, streaming watch, merge PATCH. Config from
// a kubeconfig or the in-cluster service account; the bearer token is re-read from its
// file on every request, so a rotated token is picked up.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <functional>
#include <string>

#include "result.h"

namespace podsteer::kube {

struct Config {
  std::string server;      // https://host:port or http://host:port
  std::string token;       // static token (kubeconfig)
  std::string token_file;  // re-read on every request (in-cluster, or kubeconfig tokenFile)
  std::string ca_file;     // cluster CA to verify the server with
  bool insecure = false;   // kubeconfig insecure-skip-tls-verify
};

// A kubeconfig's current context (server, certificate-authority, token, tokenFile,
// insecure-skip-tls-verify). Malformed YAML or types are an error, never an exception.
Result<Config> parse_kubeconfig(const std::string& yaml, const std::string& where = "");
Result<Config> load_kubeconfig(const std::string& path);
// KUBERNETES_SERVICE_HOST/PORT and /var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}
Result<Config> in_cluster_config(const std::string& sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount");

// No API object is this long (etcd stops at 1.5 MB): a longer watch line is dropped.
constexpr size_t kMaxWatchLine = 4 << 20;

// Splits a watch stream into lines as its chunks arrive, however they are cut. A line
// longer than max_line is dropped whole and counted (tests/fuzz/kube_watch).
class LineSplitter {
 public:
  explicit LineSplitter(size_t max_line = kMaxWatchLine) : max_(max_line) {}
  // on_line gets each complete, non-empty line; false from it stops (and feed says false).
  bool feed(const char* data, size_t n, const std::function<bool(const std::string&)>& on_line);
  uint64_t oversized() const { return oversized_; }

 private:
  std::string buf_;
  bool skipping_ = false;  // inside an oversized line: drop until its end
  size_t max_;
  uint64_t oversized_ = 0;
};

class Client {
 public:
  explicit Client(Config cfg);
  // GET path; a non-2xx answer is an Error whose err is the HTTP status.
  Result<nlohmann::json> get(const std::string& path);
  Result<nlohmann::json> merge_patch(const std::string& path, const nlohmann::json& patch);
  // DELETE path (options as query parameters, e.g. ?propagationPolicy=Foreground)
  Result<nlohmann::json> del(const std::string& path);
  // Streams a watch: on_line gets each complete line (one event); on_line returning false,
  // or stop, ends it. Returns the HTTP status (0 when the connection failed).
  // Lines longer than kMaxWatchLine are dropped and counted in oversized_lines().
  long watch(const std::string& path, const std::function<bool(const std::string&)>& on_line,
             const std::atomic<bool>& stop);
  uint64_t oversized_lines() const { return oversized_; }

 private:
  Result<nlohmann::json> request(const std::string& method, const std::string& path, const std::string& body);
  std::string bearer();
  Config cfg_;
  std::atomic<uint64_t> oversized_{0};
};

}  // namespace podsteer::kube
