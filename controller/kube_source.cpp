#include "kube_source.h"

#include <curl/curl.h>

#include "log.h"

namespace podsteer::kube {

using json = nlohmann::json;

bool LabelPolicy::enrolled(const Pod& pod, const std::map<std::string, std::string>* ns_labels) const {
  if (pod.host_network) return false;
  auto it = pod.labels.find(key);
  if (it != pod.labels.end()) return it->second == value;  // "none" (or anything else) opts out
  if (ns_labels) {
    auto n = ns_labels->find(key);
    if (n != ns_labels->end() && n->second == value) return true;
  }
  return false;
}

static std::map<std::string, std::string> string_map(const json& j) {
  std::map<std::string, std::string> out;
  if (j.is_object())
    for (const auto& [k, v] : j.items())
      if (v.is_string()) out[k] = v;
  return out;
}

Result<Pod> parse_pod(const json& obj) {
  if (!obj.is_object() || !obj.contains("metadata") || !obj["metadata"].is_object())
    return invalid("pod event without metadata");
  const auto& m = obj["metadata"];
  Pod p;
  p.uid = m.value("uid", "");
  p.name = m.value("name", "");
  p.namespace_ = m.value("namespace", "");
  if (p.uid.empty() || p.name.empty() || p.namespace_.empty()) return invalid("pod without uid, name or namespace");
  p.labels = string_map(m.value("labels", json::object()));
  p.annotations = string_map(m.value("annotations", json::object()));
  json spec = obj.value("spec", json::object()), status = obj.value("status", json::object());
  if (!spec.is_object() || !status.is_object()) return invalid("pod spec or status is not an object");
  p.host_network = spec.value("hostNetwork", false);
  p.service_account = spec.value("serviceAccountName", "");
  p.phase = status.value("phase", "");
  if (status.contains("podIPs") && status["podIPs"].is_array()) {
    for (const auto& ip : status["podIPs"])
      if (ip.is_object() && ip.contains("ip") && ip["ip"].is_string()) p.ips.push_back(ip["ip"]);
  } else if (status.contains("podIP") && status["podIP"].is_string()) {
    p.ips.push_back(status["podIP"]);
  }
  return p;
}

Source::Source(Client& client, std::string node_name, OnChange on_change)
    : client_(client), node_(std::move(node_name)), on_change_(std::move(on_change)) {}

Source::~Source() { stop(); }

void Source::start() {
  pods_thread_ = std::thread([this] { run(Kind::Pods); });
  ns_thread_ = std::thread([this] { run(Kind::Namespaces); });
}

void Source::stop() {
  if (stop_.exchange(true)) return;
  if (pods_thread_.joinable()) pods_thread_.join();
  if (ns_thread_.joinable()) ns_thread_.join();
}

Snapshot Source::snapshot() {
  std::lock_guard<std::mutex> g(mu_);
  return snap_;
}

void Source::notify() {
  bool synced;
  {
    std::lock_guard<std::mutex> g(mu_);
    synced = snap_.synced = pods_listed_ && ns_listed_;
  }
  if (synced) on_change_();
}

static std::string path_for(const std::string& node, bool pods) {
  if (!pods) return "/api/v1/namespaces";
  char* esc = curl_easy_escape(nullptr, ("spec.nodeName=" + node).c_str(), 0);
  std::string p = std::string("/api/v1/pods?fieldSelector=") + esc;
  curl_free(esc);
  return p;
}

bool Source::list(Kind kind, std::string& rv) {
  auto r = client_.get(path_for(node_, kind == Kind::Pods));
  if (!r) {
    spdlog::warn("kube: list {}: {}", kind == Kind::Pods ? "pods" : "namespaces", r.error().message());
    return false;
  }
  const json& l = *r;
  if (!l.contains("items") || !l["items"].is_array()) {
    event_errors_++;
    spdlog::warn("kube: list answer without items");
    return false;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if (kind == Kind::Pods) {
      snap_.pods.clear();
      for (const auto& item : l["items"]) {
        auto p = parse_pod(item);
        if (p) snap_.pods[p->uid] = *p;
        else event_errors_++;
      }
      pods_listed_ = true;
    } else {
      snap_.namespaces.clear();
      for (const auto& item : l["items"])
        if (item.contains("metadata") && item["metadata"].is_object())
          snap_.namespaces[item["metadata"].value("name", "")] = string_map(item["metadata"].value("labels", json::object()));
      ns_listed_ = true;
    }
  }
  rv = l.value("metadata", json::object()).value("resourceVersion", "");
  notify();
  return true;
}

bool Source::apply(Kind kind, const std::string& type, const json& obj) {
  std::lock_guard<std::mutex> g(mu_);
  if (kind == Kind::Pods) {
    auto p = parse_pod(obj);
    if (!p) return false;
    if (type == "DELETED") snap_.pods.erase(p->uid);
    else snap_.pods[p->uid] = *p;
  } else {
    if (!obj.contains("metadata") || !obj["metadata"].is_object()) return false;
    std::string name = obj["metadata"].value("name", "");
    if (name.empty()) return false;
    if (type == "DELETED") snap_.namespaces.erase(name);
    else snap_.namespaces[name] = string_map(obj["metadata"].value("labels", json::object()));
  }
  return true;
}

void Source::run(Kind kind) {
  const char* what = kind == Kind::Pods ? "pods" : "namespaces";
  std::string rv;
  int backoff_ms = 100;
  bool need_list = true;
  while (!stop_) {
    if (need_list) {
      if (!list(kind, rv)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
        backoff_ms = std::min(backoff_ms * 2, 5000);
        continue;
      }
      need_list = false;
      backoff_ms = 100;
    }
    std::string path = path_for(node_, kind == Kind::Pods);
    path += (path.find('?') == std::string::npos ? "?" : "&") +
            std::string("watch=1&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion=") + rv;
    bool gone = false;
    auto status = client_.watch(
        path,
        [&](const std::string& line) {
          auto ev = json::parse(line, nullptr, false);
          if (ev.is_discarded() || !ev.is_object() || !ev.contains("type") || !ev["type"].is_string() ||
              !ev.contains("object")) {
            event_errors_++;
            spdlog::warn("kube: malformed {} watch event ignored: {}", what, line.substr(0, 120));
            return true;
          }
          std::string type = ev["type"];
          const json& obj = ev["object"];
          if (type == "ERROR") {
            if (obj.is_object() && obj.value("code", 0) == 410) gone = true;
            else event_errors_++;
            return false;
          }
          std::string new_rv = obj.is_object() && obj.contains("metadata") && obj["metadata"].is_object()
                                    ? obj["metadata"].value("resourceVersion", "")
                                    : "";
          if (type == "BOOKMARK") {
            if (!new_rv.empty()) rv = new_rv;
            return true;
          }
          if (type != "ADDED" && type != "MODIFIED" && type != "DELETED") {
            event_errors_++;
            spdlog::warn("kube: unexpected {} event type '{}'", what, type);
            return true;
          }
          if (!apply(kind, type, obj)) {
            event_errors_++;
            spdlog::warn("kube: {} event with a malformed object ignored", what);
            return true;
          }
          if (!new_rv.empty()) rv = new_rv;
          notify();
          return true;
        },
        stop_);
    if (stop_) break;
    if (gone || status == 410) {
      spdlog::info("kube: {} watch: resourceVersion {} is gone (410), relisting", what, rv);
      relists_++;
      need_list = true;
      continue;
    }
    if (status != 0 && status != 200) {
      spdlog::warn("kube: {} watch answered HTTP {}", what, status);
      need_list = status >= 500;
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
      backoff_ms = std::min(backoff_ms * 2, 5000);
      continue;
    }
    // stream ended (timeout, dropped connection): resume from the last resourceVersion
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
    backoff_ms = status == 200 ? 100 : std::min(backoff_ms * 2, 5000);
  }
}

}  // namespace podsteer::kube
