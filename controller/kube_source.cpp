#include "kube_source.h"

#include <curl/curl.h>

#include "clock.h"

#include "log.h"

namespace podsteer::kube {

using json = nlohmann::json;

using namespace json_read;


Result<ListAnswer> parse_list(const json& l) {
  const json* items = field(l, "items");
  if (!items || !items->is_array()) return invalid("list answer without items");
  ListAnswer a;
  a.items.assign(items->begin(), items->end());
  a.resource_version = str(obj(l, "metadata"), "resourceVersion");
  return a;
}

Result<WatchEvent> parse_watch_event(const std::string& line) {
  auto ev = json::parse(line, nullptr, false);  // invalid JSON or UTF-8: discarded
  if (ev.is_discarded() || !ev.is_object()) return invalid("not a JSON object");
  WatchEvent w;
  w.type = str(ev, "type");
  const json* o = field(ev, "object");
  if (w.type.empty() || !o || !o->is_object()) return invalid("event without a type or an object");
  w.object = *o;
  w.resource_version = str(obj(*o, "metadata"), "resourceVersion");
  if (w.type == "ERROR") {
    const json* code = field(*o, "code");
    w.error_code = code && code->is_number_integer() ? code->get<int>() : 0;
  } else if (w.type != "ADDED" && w.type != "MODIFIED" && w.type != "DELETED" && w.type != "BOOKMARK") {
    return invalid("unexpected event type '" + w.type + "'");
  }
  return w;
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

std::optional<Pod> Source::pod(const std::string& uid) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = snap_.pods.find(uid);
  if (it == snap_.pods.end()) return std::nullopt;
  return it->second;
}

std::optional<Labels> Source::namespace_labels(const std::string& name) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = snap_.namespaces.find(name);
  if (it == snap_.namespaces.end()) return std::nullopt;
  return it->second;
}

bool Source::synced() {
  std::lock_guard<std::mutex> g(mu_);
  return snap_.synced;
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
  auto l = parse_list(*r);
  if (!l) {
    event_errors_++;
    spdlog::warn("kube: {}", l.error().message());
    return false;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    if (kind == Kind::Pods) {
      snap_.pods.clear();
      for (const auto& item : l->items) {
        auto p = parse_pod(item);
        if (p) snap_.pods[p->uid] = *p;
        else event_errors_++;
      }
      pods_listed_ = true;
    } else {
      snap_.namespaces.clear();
      for (const auto& item : l->items) {
        auto n = parse_namespace(item);
        if (n) snap_.namespaces[n->first] = n->second;
        else event_errors_++;
      }
      ns_listed_ = true;
    }
  }
  rv = l->resource_version;
  notify();
  return true;
}

bool Source::apply(Kind kind, const std::string& type, const json& o) {
  last_event_ms_ = unix_ms();
  std::lock_guard<std::mutex> g(mu_);
  if (kind == Kind::Pods) {
    auto p = parse_pod(o);
    if (!p) return false;
    if (type == "DELETED") snap_.pods.erase(p->uid);
    else snap_.pods[p->uid] = *p;
  } else {
    auto n = parse_namespace(o);
    if (!n) return false;
    if (type == "DELETED") snap_.namespaces.erase(n->first);
    else snap_.namespaces[n->first] = n->second;
  }
  return true;
}

void Source::run(Kind kind) {
  const char* what = kind == Kind::Pods ? "pods" : "namespaces";
  std::string rv;
  int backoff_ms = 100;
  bool need_list = true;
  auto pause = [&] {
    for (int waited = 0; waited < backoff_ms && !stop_; waited += 50)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    backoff_ms = std::min(backoff_ms * 2, 5000);
  };
  while (!stop_) {
    if (need_list) {
      if (!list(kind, rv)) {
        pause();
        continue;
      }
      need_list = false;
    }
    std::string path = path_for(node_, kind == Kind::Pods);
    path += (path.find('?') == std::string::npos ? "?" : "&") +
            std::string("watch=1&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion=") + rv;
    int error_code = 0;  // an ERROR event ended the stream
    size_t events = 0;
    auto status = client_.watch(
        path,
        [&](const std::string& line) {
          auto ev = parse_watch_event(line);
          if (!ev) {
            event_errors_++;
            spdlog::warn("kube: {} watch event ignored ({}): {}", what, ev.error().message(), line.substr(0, 120));
            return true;
          }
          if (ev->type == "ERROR") {
            error_code = ev->error_code ? ev->error_code : -1;
            return false;
          }
          if (ev->type == "BOOKMARK") {
            if (!ev->resource_version.empty()) rv = ev->resource_version;
            return true;
          }
          if (!apply(kind, ev->type, ev->object)) {
            event_errors_++;
            spdlog::warn("kube: {} {} event with a malformed object ignored", what, ev->type);
            return true;
          }
          if (!ev->resource_version.empty()) rv = ev->resource_version;
          ++events;
          notify();
          return true;
        },
        stop_);
    if (stop_) break;
    if (error_code == 410 || status == 410) {
      spdlog::info("kube: {} watch: resourceVersion {} is gone (410), relisting", what, rv);
      relists_++;
      need_list = true;
      backoff_ms = 100;
      continue;
    }
    if (error_code) {
      // Any other ERROR: the stream cannot be trusted to resume; list afresh, not at once.
      event_errors_++;
      relists_++;
      spdlog::warn("kube: {} watch ended with an ERROR event (code {}): relisting in {} ms", what, error_code, backoff_ms);
      need_list = true;
      pause();
      continue;
    }
    if (status != 0 && status != 200) {
      spdlog::warn("kube: {} watch answered HTTP {}", what, status);
      need_list = status >= 500;
      pause();
      continue;
    }
    // stream ended (timeout, dropped connection): resume from the last resourceVersion
    if (events > 0 || status == 200) backoff_ms = 100;
    pause();
  }
}

}  // namespace podsteer::kube
