// The Kubernetes pod source at work: pods that are enrolled by their labels but not
// captured (they ran before the agent, or were labelled later) are captured through their
// netns found in /proc; captured pods whose labels now say no are released. A pod is never
// released because the API does not show it yet, lacks IPs, or is Pending: the CNI path
// may have captured it a moment ago, and a deleted pod's netns goes away with it (drift
// repair releases those).
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>

#include "agent.h"
#include "istio_takeover.h"
#include "log.h"
#include "netns.h"

namespace podsteer {

using json = nlohmann::json;

std::optional<std::string> find_pod_netns(const kube::Pod& pod, const std::string& proc_root) {
  if (pod.ips.empty()) return std::nullopt;  // nothing to confirm the netns by
  std::string uid_us = pod.uid;
  std::replace(uid_us.begin(), uid_us.end(), '-', '_');  // systemd slice names
  std::set<ino_t> tried;
  DIR* d = opendir(proc_root.c_str());
  if (!d) return std::nullopt;
  std::optional<std::string> found;
  while (dirent* e = readdir(d)) {
    if (!std::isdigit(static_cast<unsigned char>(e->d_name[0]))) continue;
    std::string base = proc_root + "/" + e->d_name;
    std::ifstream cg(base + "/cgroup");
    std::stringstream ss;
    ss << cg.rdbuf();
    std::string text = ss.str();
    if (text.find("pod" + pod.uid) == std::string::npos && text.find("pod" + uid_us) == std::string::npos) continue;
    std::string ns_path = base + "/ns/net";
    struct stat st {};
    if (stat(ns_path.c_str(), &st) != 0 || !tried.insert(st.st_ino).second) continue;
    auto ns = open_netns(ns_path);
    if (!ns) continue;
    auto ifaces = list_interfaces(ns->fd.get());
    if (!ifaces) continue;
    for (const auto& i : *ifaces) {
      for (const auto& a : i.ip4)
        if (std::find(pod.ips.begin(), pod.ips.end(), format_ip(a)) != pod.ips.end()) found = ns_path;
      for (const auto& a : i.ip6)
        if (std::find(pod.ips.begin(), pod.ips.end(), format_ip(a)) != pod.ips.end()) found = ns_path;
    }
    if (found) break;
  }
  closedir(d);
  return found;
}

std::optional<std::string> find_netns_by_inode(uint64_t ino, const std::string& proc_root) {
  if (!ino) return std::nullopt;
  DIR* d = opendir(proc_root.c_str());
  if (!d) return std::nullopt;
  std::optional<std::string> found;
  while (dirent* e = readdir(d)) {
    if (!std::isdigit(static_cast<unsigned char>(e->d_name[0]))) continue;
    std::string p = proc_root + "/" + e->d_name + "/ns/net";
    struct stat st {};
    if (stat(p.c_str(), &st) == 0 && st.st_ino == ino) {
      found = p;
      break;
    }
  }
  closedir(d);
  return found;
}

// The annotation istiod reads, written as istio-cni writes it (cni/pkg/util/podutil.go):
// "enabled" once the pod is captured and a proxy acked it, "pending" while it is captured
// and no proxy has, removed when it is not captured. Never from "enabled" back to
// "pending": a proxy restarting (or this agent) must not flip the pod's tunnel protocol
// in istiod for every peer. Through the status subresource: the agent's RBAC grants patch
// on pods/status only, which cannot touch a pod's spec (see deploy/charts/podsteer/templates/rbac.yaml).
void Agent::annotate(const kube::Pod& pod, bool captured) {
  auto it = pod.annotations.find(kube::kRedirectionAnnotation);
  std::string have = it == pod.annotations.end() ? "" : it->second;
  std::string want;
  if (captured)
    want = zds_->acked(pod.uid) || have == kube::kRedirectionEnabled ? kube::kRedirectionEnabled
                                                                      : kube::kRedirectionPending;
  const char* legacy = "podsteer.io/captured";  // what earlier builds wrote: taken away
  bool has_legacy = pod.annotations.count(legacy) > 0;
  if (have == want && !has_legacy) return;
  json annotations = {{kube::kRedirectionAnnotation, want.empty() ? json(nullptr) : json(want)}};
  if (has_legacy) annotations[legacy] = nullptr;
  json patch = {{"metadata", {{"annotations", annotations}}}};
  auto r = kube_client_->merge_patch("/api/v1/namespaces/" + pod.namespace_ + "/pods/" + pod.name + "/status", patch);
  if (!r) spdlog::warn("kube: annotate {}/{} {}: {}", pod.namespace_, pod.name, want.empty() ? "(remove)" : want,
                       r.error().message());
}

void Agent::kick_kube() {
  if (!kube_source_) return;
  {
    std::lock_guard<std::mutex> g(mu_);
    kube_dirty_ = true;
  }
  kube_cv_.notify_all();
}

void Agent::kube_worker() {
  while (!stopping_) {
    {
      std::unique_lock<std::mutex> g(mu_);
      // also on a timer: a pod whose netns was not found yet, or a proxy that was away
      kube_cv_.wait_for(g, std::chrono::seconds(2), [this] { return kube_dirty_ || stopping_.load(); });
      kube_dirty_ = false;
    }
    if (stopping_) break;
    auto snap = kube_source_->snapshot();
    if (!snap.synced) continue;
    // Ready only after a pass that could capture: with a proxy connected (a node that
    // rebooted has pods to capture again before it says ready)
    bool proxy = zds_->connected();
    reconcile_kube(snap);
    if (proxy) kube_reconciled_ = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      kube_first_pass_ = true;
    }
    first_pass_cv_.notify_all();
  }
}

void Agent::reconcile_kube(const kube::Snapshot& snap) {
  if (removing_) return;
  std::map<std::string, PodInfo> captured;  // by uid
  for (auto& p : pods_.all())
    if (!p.uid.empty()) captured[p.uid] = p;
  // Deleted from the API after the cache saw it: released (the kubelet's CNI DEL may
  // never come for a pod captured through /proc). A pod the cache never saw is left
  // alone: the CNI path may have captured it before the API caught up.
  for (const auto& [uid, gone] : captured) {
    if (snap.pods.count(uid) || !kube_seen_.count(uid)) continue;
    auto st = release(gone, "it was deleted from the API");
    if (!st) spdlog::warn("kube: release {}: {}", gone.full_name(), st.error().message());
  }
  for (auto it = kube_seen_.begin(); it != kube_seen_.end();)
    it = snap.pods.count(*it) || captured.count(*it) ? std::next(it) : kube_seen_.erase(it);
  for (const auto& [uid, pod] : snap.pods) kube_seen_.insert(uid);
  for (const auto& [uid, pod] : snap.pods) {
    auto ns = snap.namespaces.find(pod.namespace_);
    bool want = cfg_.label_policy.enrolled(pod, ns == snap.namespaces.end() ? nullptr : &ns->second);
    bool have = captured.count(uid);
    PodInfo info;
    info.identity() = pod.identity();
    info.uid = uid;
    bool now = have;
    if (want && !have) {
      if (pod.phase != "Running" && pod.phase != "Pending") continue;  // Succeeded, Failed: nothing runs
      auto path = find_pod_netns(pod, cfg_.proc_root);
      if (!path) {
        spdlog::debug("kube: no netns found yet for {}/{}", pod.namespace_, pod.name);
        continue;
      }
      // Captured only with a proxy to take it (retried on the timer), except a pod that
      // istio-cni's rules capture: its proxy serves it already, and the first snapshot must
      // name it
      auto pod_ns = open_netns(*path);
      bool istio_captured = pod_ns && istio::has_inpod_rules(pod_ns->fd.get());
      if (!istio_captured && !zds_->connected()) continue;
      info.netns = *path;
      take_overrides(info, pod);
      auto st = capture(info, istio_captured);
      if (!st) {
        spdlog::warn("kube: capture {}: {}", info.full_name(), st.error().message());
        continue;
      }
      spdlog::info("kube: captured running pod {} (netns {})", info.full_name(), *path);
      if (istio_captured) take_over_from_istio(info);  // checked above: no second iptables-save
      now = true;
    } else if (!want && have) {
      auto st = release(info, "its labels no longer enroll it");
      if (!st) spdlog::warn("kube: release {}: {}", info.full_name(), st.error().message());
      else now = false;
    }
    annotate(pod, now);
  }
}

void Agent::take_over_from_istio(const PodInfo& pod) {
  auto ns = open_netns(pod.netns);
  if (!ns) return;
  auto t = istio::remove_redirects(ns->fd.get());
  if (!t) {
    spdlog::warn("istio: {}: removing istio-cni's in-pod rules: {}", pod.full_name(), t.error().message());
    return;
  }
  if (!t->found) return;
  ++istio_takeovers_;
  spdlog::info("istio: took {} over from istio-cni's in-pod rules: their nat, raw and mangle PREROUTING chains are "
               "removed{}",
               pod.full_name(),
               t->restore_pending ? "; mangle OUTPUT's connmark restore stays until the connections it serves close" : "");
  if (t->restore_pending) {
    std::lock_guard<std::mutex> g(mu_);
    istio_pending_[ns->cookie] = pod.netns;
  }
}

void Agent::finish_istio_takeovers() {
  std::map<uint64_t, std::string> pending;
  {
    std::lock_guard<std::mutex> g(mu_);
    pending = istio_pending_;
  }
  for (const auto& [cookie, path] : pending) {
    auto ns = open_netns(path);
    bool done = !ns || ns->cookie != cookie;  // the pod is gone
    if (!done) {
      auto r = istio::remove_restore_if_unused(ns->fd.get());
      if (!r) spdlog::warn("istio: netns {}: {}", path, r.error().message());
      done = r && *r;
      if (done) spdlog::info("istio: netns {}: the last of istio-cni's chains removed (no connection needs it)", path);
    }
    if (done) {
      std::lock_guard<std::mutex> g(mu_);
      istio_pending_.erase(cookie);
    }
  }
}

}  // namespace podsteer
