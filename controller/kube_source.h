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
#include "kube_policy.h"
#include "pod_source.h"

namespace podsteer::kube {

struct Snapshot {
  std::map<std::string, Pod> pods;          // by uid
  std::map<std::string, Labels> namespaces;  // name -> labels
  bool synced = false;  // both lists done at least once
};

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
  // when the last watch event arrived (Unix ms), 0 before the first
  int64_t last_event_ms() const { return last_event_ms_; }

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
  std::atomic<int64_t> last_event_ms_{0};
};

}  // namespace podsteer::kube
