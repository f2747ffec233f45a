// The Kubernetes pod source: list then watch this node's pods (fieldSelector
// spec.nodeName) and all namespaces, resuming from the last resourceVersion, relisting on
// 410 Gone and, with backoff, on any other watch ERROR, accepting BOOKMARKs, reconnecting
// with backoff. Malformed or unexpected input (wrong types, missing fields, oversized lines,
// invalid UTF-8) is logged and counted, never fatal: the parsers below check types before
// they read and never throw (tests/fuzz). Every change, once both lists are done, calls
// on_change.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "kube_client.h"
#include "pod_source.h"

namespace podsteer::kube {

using Labels = std::map<std::string, std::string>;

struct Pod {
  std::string uid, name, namespace_, service_account, phase;
  bool host_network = false;
  Labels labels, annotations;
  std::vector<std::string> ips;
};

struct Snapshot {
  std::map<std::string, Pod> pods;          // by uid
  std::map<std::string, Labels> namespaces;  // name -> labels
  bool synced = false;  // both lists done at least once
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
  bool enrolled(const Pod& pod, const Labels* ns_labels) const;
};

// Istio's per-pod settings (istio-cni: getPodLevelTrafficOverrides), read as Go's
// strconv.ParseBool reads them; a value that does not parse is ignored.
struct PodOverrides {
  std::optional<bool> dns;      // ambient.istio.io/dns-capture; unset: the node's default
  bool bypass_inbound = false;  // ambient.istio.io/bypass-inbound-capture
};
PodOverrides pod_overrides(const Pod& pod);
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

struct ListAnswer {
  std::vector<nlohmann::json> items;
  std::string resource_version;
};
Result<ListAnswer> parse_list(const nlohmann::json& list);

struct WatchEvent {
  std::string type;  // ADDED, MODIFIED, DELETED, BOOKMARK, ERROR
  nlohmann::json object;
  std::string resource_version;  // of the object, when it has one
  int error_code = 0;            // ERROR: the Status code (410: Gone)
};
Result<WatchEvent> parse_watch_event(const std::string& line);

class Source {
 public:
  using OnChange = std::function<void()>;  // read snapshot() for the new state
  Source(Client& client, std::string node_name, OnChange on_change);
  ~Source();
  void start();
  void stop();
  Snapshot snapshot();
  std::optional<Pod> pod(const std::string& uid);
  std::optional<Labels> namespace_labels(const std::string& name);
  bool synced();
  uint64_t event_errors() const { return event_errors_ + client_.oversized_lines(); }
  uint64_t relists() const { return relists_; }

 private:
  enum class Kind { Pods, Namespaces };
  void run(Kind kind);
  bool list(Kind kind, std::string& rv);
  bool apply(Kind kind, const std::string& type, const nlohmann::json& obj);
  void notify();

  Client& client_;
  std::string node_;
  OnChange on_change_;
  std::mutex mu_;
  Snapshot snap_;
  bool pods_listed_ = false, ns_listed_ = false;
  std::atomic<bool> stop_{false};
  std::thread pods_thread_, ns_thread_;
  std::atomic<uint64_t> event_errors_{0}, relists_{0};
};

}  // namespace podsteer::kube
