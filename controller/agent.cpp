#include "agent.h"

#include <httplib.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <dirent.h>
#include <sys/stat.h>

#include <condition_variable>
#include <fstream>
#include <set>
#include <sstream>

#include "log.h"
#include "netns.h"

namespace podsteer {

using json = nlohmann::json;

struct Agent::Http {
  httplib::Server server;
  std::thread thread;
};

Agent::Agent(AgentConfig cfg) : cfg_(std::move(cfg)), policy_(cfg_.enroll_namespaces) {}

Agent::~Agent() { stop(); }

static PodInfo pod_from_meta(const PodStatus& s) {
  PodInfo p;
  p.uid = s.meta.uid;
  p.namespace_ = s.meta.namespace_;
  p.name = s.meta.name;
  p.service_account = s.meta.service_account;
  p.container_id = s.meta.container_id;
  p.netns = s.meta.netns_path;
  return p;
}

Status Agent::start() {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto dp = Datapath::open(cfg_.state_dir, cfg_.node, true);
    if (!dp) return dp.error();
    dp_.emplace(std::move(*dp));
    // Pods whose netns is gone were deleted while no agent ran: clean them up. Every
    // other pinned pod stays captured; it is never detached because we restarted.
    auto pods = dp_->pods(Datapath::Detail::Summary);
    if (!pods) return pods.error();
    size_t kept = 0;
    for (const auto& p : *pods) {
      if (!p.netns_alive) {
        spdlog::info("adopt: pod {} (netns {}) is gone, removing its entries", p.full_name(), p.meta.netns_path);
        auto st = dp_->unenroll(p.cookie);
        if (!st) spdlog::warn("adopt: {}", st.error().message());
      } else {
        ++kept;
      }
    }
    spdlog::info("adopted {} captured pod(s) from {}", kept, cfg_.state_dir);
  }
  adopted_ = true;
  zds_ = std::make_unique<ZdsServer>(cfg_.zds_socket, cfg_.ack_timeout_ms, [this] { return snapshot(); });
  PODSTEER_TRY(zds_->start());
  cni_ = std::make_unique<CniServer>(cfg_.cni_socket, [this](const json& r) { return handle_cni(r); });
  PODSTEER_TRY(cni_->start());

  if (!cfg_.kubeconfig.empty() || cfg_.in_cluster) {
    auto kc = cfg_.kubeconfig.empty() ? kube::in_cluster_config() : kube::load_kubeconfig(cfg_.kubeconfig);
    if (!kc) return kc.error();
    if (cfg_.node_name.empty()) return invalid("the Kubernetes pod source needs --node-name or NODE_NAME");
    kube_client_ = std::make_unique<kube::Client>(*kc);
    kube_source_ = std::make_unique<kube::Source>(*kube_client_, cfg_.node_name, [this] {
      std::lock_guard<std::mutex> g(kube_mu_);
      kube_dirty_ = true;
      kube_cv_.notify_all();
    });
    kube_source_->start();
    kube_thread_ = std::thread([this] { kube_worker(); });
    spdlog::info("kube: watching pods of node {} at {}", cfg_.node_name, kc->server);
  }

  http_ = std::make_unique<Http>();
  http_->server.Get("/healthz", [](const httplib::Request&, httplib::Response& res) { res.set_content("ok\n", "text/plain"); });
  http_->server.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    bool r = ready();
    res.status = r ? 200 : 503;
    res.set_content(r ? "ready\n" : (adopted_ ? "no node proxy connected\n" : "adopting state\n"), "text/plain");
  });
  http_->server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(metrics(), "text/plain; version=0.0.4");
  });
  if (!http_->server.bind_to_port(cfg_.http_addr.c_str(), cfg_.http_port))
    return invalid("cannot listen on " + cfg_.http_addr + ":" + std::to_string(cfg_.http_port));
  http_->thread = std::thread([this] { http_->server.listen_after_bind(); });
  spdlog::info("http: /metrics /healthz /readyz on {}:{}", cfg_.http_addr, cfg_.http_port);
  return {};
}

void Agent::stop() {
  if (stopping_.exchange(true)) return;
  if (kube_source_) kube_source_->stop();
  {
    std::lock_guard<std::mutex> g(kube_mu_);
    kube_cv_.notify_all();
  }
  if (kube_thread_.joinable()) kube_thread_.join();
  if (cni_) cni_->stop();
  if (zds_) zds_->stop();
  if (http_) {
    http_->server.stop();
    if (http_->thread.joinable()) http_->thread.join();
  }
}

bool Agent::ready() { return adopted_ && zds_ && zds_->connected(); }

std::vector<SnapshotEntry> Agent::snapshot() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<SnapshotEntry> out;
  auto pods = dp_->pods(Datapath::Detail::Summary);
  if (!pods) return out;
  for (const auto& p : *pods) {
    if (!p.has_entry || p.meta.uid[0] == 0) continue;  // enrolled by hand, not a workload
    auto ns = open_netns(p.meta.netns_path);
    if (!ns || ns->cookie != p.cookie) continue;
    out.push_back(SnapshotEntry{pod_from_meta(p), std::move(ns->fd)});
  }
  return out;
}

void Agent::count(const std::string& command, const std::string& result) {
  std::lock_guard<std::mutex> g(count_mu_);
  cni_requests_[{command, result}]++;
}

static PodInfo pod_from_request(const json& r) {
  PodInfo p;
  p.uid = r.value("pod_uid", "");
  p.name = r.value("pod_name", "");
  p.namespace_ = r.value("pod_namespace", "");
  p.service_account = r.value("service_account", "");
  p.container_id = r.value("container_id", "");
  p.netns = r.value("netns", "");
  p.ifname = r.value("ifname", "");
  if (r.contains("ips") && r["ips"].is_array())
    for (const auto& ip : r["ips"])
      if (ip.is_string()) p.ips.push_back(ip);
  if (r.contains("enroll") && r["enroll"].is_boolean()) p.enroll_hint = r["enroll"].get<bool>();
  if (r.contains("enroll_namespaces") && r["enroll_namespaces"].is_array())
    for (const auto& ns : r["enroll_namespaces"])
      if (ns.is_string()) p.enroll_namespaces.push_back(ns);
  return p;
}

json Agent::handle_cni(const json& req) {
  std::string command = req.value("command", "");
  PodInfo pod = pod_from_request(req);
  auto started = std::chrono::steady_clock::now();
  json out;
  if (command == "ADD") out = cni_add(pod);
  else if (command == "DEL") out = cni_del(pod);
  else if (command == "CHECK") out = cni_check(pod);
  else out = {{"status", "error"}, {"message", "unknown command '" + command + "'"}};
  count(command.empty() ? "unknown" : command, out.value("status", "error"));
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
  spdlog::info("cni {} pod={} container={} -> {} {} ({} us)", command, pod.full_name(), pod.container_id.substr(0, 12),
               out.value("status", ""), out.value("message", ""), us);
  return out;
}

std::optional<PodStatus> Agent::find_locked(const PodInfo& pod) {
  auto pods = dp_->pods(Datapath::Detail::Summary);
  if (!pods) return std::nullopt;
  for (auto& p : *pods) {
    if ((!pod.container_id.empty() && pod.container_id == p.meta.container_id) ||
        (!pod.uid.empty() && pod.uid == p.meta.uid && pod.netns == p.meta.netns_path))
      return std::move(p);
  }
  return std::nullopt;
}

bool Agent::enrolled(const PodInfo& pod) { return kube_source_ ? kube_enrolled(pod) : policy_.enrolled(pod); }

// With the Kubernetes source, the pod's labels decide (the pod may take a moment to show
// up in the watch); without it, the CNI policy does.
bool Agent::kube_enrolled(const PodInfo& pod) {
  for (int i = 0; i < 30; ++i) {
    auto snap = kube_source_->snapshot();
    auto it = snap.pods.find(pod.uid);
    if (it != snap.pods.end()) {
      auto ns = snap.namespaces.find(it->second.namespace_);
      return cfg_.label_policy.enrolled(it->second, ns == snap.namespaces.end() ? nullptr : &ns->second);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return policy_.enrolled(pod);
}

json Agent::cni_add(const PodInfo& pod) {
  if (pod.netns.empty() || pod.container_id.empty())
    return {{"status", "error"}, {"message", "request lacks netns or container_id"}};
  if (!enrolled(pod)) return {{"status", "not_enrolled"}};
  if (pod.uid.empty() || pod.name.empty() || pod.namespace_.empty())
    return {{"status", "error"}, {"message", "an enrolled pod needs K8S_POD_UID, K8S_POD_NAME and K8S_POD_NAMESPACE"}};
  auto ns = open_netns(pod.netns);
  if (!ns) return {{"status", "error"}, {"message", ns.error().message()}};
  std::lock_guard<std::mutex> g(mu_);
  PodOptions opts;
  opts.namespace_ = pod.namespace_;
  opts.name = pod.name;
  opts.uid = pod.uid;
  opts.service_account = pod.service_account;
  opts.container_id = pod.container_id;
  opts.dns = cfg_.dns;
  opts.fail_open = cfg_.fail_open;
  auto r = dp_->enroll(*ns, opts);
  if (!r) return {{"status", "error"}, {"message", r.error().message()}};
  auto st = zds_->add(pod, ns->fd.get());
  if (!st) {
    // Not captured with the proxy's ack: undo, so the runtime's retry starts clean and the
    // application never runs half-captured.
    if (*r == EnrollOutcome::Enrolled) (void)dp_->unenroll(ns->cookie);
    return {{"status", "error"}, {"message", "node proxy did not take the pod: " + st.error().message()}};
  }
  return {{"status", "captured"}, {"netns_cookie", ns->cookie}};
}

json Agent::cni_del(const PodInfo& pod) {
  std::lock_guard<std::mutex> g(mu_);
  auto found = find_locked(pod);
  if (!found) return {{"status", "ok"}, {"message", "not captured"}};  // DEL is idempotent
  std::string uid = found->meta.uid;
  if (!uid.empty() && zds_->connected()) {
    auto st = zds_->del(uid);
    if (!st) spdlog::warn("zds del {}: {}", uid, st.error().message());
  }
  auto st = dp_->unenroll(found->cookie);
  if (!st) return {{"status", "error"}, {"message", st.error().message()}};
  return {{"status", "ok"}, {"message", "removed"}};
}

json Agent::cni_check(const PodInfo& pod) {
  if (!enrolled(pod)) return {{"status", "ok"}, {"message", "not enrolled"}};
  std::lock_guard<std::mutex> g(mu_);
  auto found = find_locked(pod);
  if (!found) return {{"status", "error"}, {"message", "pod should be captured but is not"}};
  if (!found->has_entry || !found->netns_alive)
    return {{"status", "error"}, {"message", "pod capture is incomplete or its netns is gone"}};
  return {{"status", "ok"}, {"message", "captured"}};
}

std::string Agent::metrics() {
  prometheus::Registry reg;
  auto& up = prometheus::BuildGauge().Name("podsteer_agent_ready").Help("1 when state is adopted and a proxy is connected").Register(reg);
  up.Add({}).Set(ready() ? 1 : 0);
  auto& conns = prometheus::BuildCounter().Name("podsteer_zds_connections_total").Help("node proxy connections accepted").Register(reg);
  conns.Add({}).Increment(zds_ ? double(zds_->connections()) : 0);
  auto& reqs = prometheus::BuildCounter().Name("podsteer_cni_requests_total").Help("CNI requests by command and result").Register(reg);
  {
    std::lock_guard<std::mutex> g(count_mu_);
    for (const auto& [k, v] : cni_requests_) reqs.Add({{"command", k.first}, {"result", k.second}}).Increment(double(v));
  }
  if (kube_source_) {
    auto& ke = prometheus::BuildCounter().Name("podsteer_kube_event_errors_total").Help("malformed or unexpected watch events").Register(reg);
    ke.Add({}).Increment(double(kube_source_->event_errors()));
    auto& kr = prometheus::BuildCounter().Name("podsteer_kube_relists_total").Help("relists after 410 Gone").Register(reg);
    kr.Add({}).Increment(double(kube_source_->relists()));
  }
  auto& pods_g = prometheus::BuildGauge().Name("podsteer_pods_captured").Help("pods with a pod entry").Register(reg);
  auto& traffic = prometheus::BuildCounter().Name("podsteer_pod_connections_total").Help("per-pod datapath counters").Register(reg);
  {
    std::lock_guard<std::mutex> g(mu_);
    auto pods = dp_ ? dp_->pods(Datapath::Detail::Summary) : Result<std::vector<PodStatus>>(invalid("no datapath"));
    size_t n = 0;
    if (pods) {
      for (const auto& p : *pods) {
        n += p.has_entry;
        std::string name = p.full_name();
        traffic.Add({{"pod", name}, {"kind", "redirected_out"}}).Increment(double(p.counters.redirected_out));
        traffic.Add({{"pod", name}, {"kind", "redirected_in"}}).Increment(double(p.counters.redirected_in));
        traffic.Add({{"pod", name}, {"kind", "dns_redirected"}}).Increment(double(p.counters.dns_redirected));
        traffic.Add({{"pod", name}, {"kind", "bypassed"}}).Increment(double(p.counters.bypassed));
        traffic.Add({{"pod", name}, {"kind", "proxy_missing"}}).Increment(double(p.counters.proxy_missing));
      }
    }
    pods_g.Add({}).Set(double(n));
  }
  return prometheus::TextSerializer().Serialize(reg.Collect());
}

}  // namespace podsteer

namespace podsteer {

std::optional<std::string> find_pod_netns(const kube::Pod& pod, const std::string& proc_root) {
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

void Agent::annotate(const kube::Pod& pod, bool captured) {
  const std::string key = "podsteer.io/captured";
  bool has = pod.annotations.count(key) && pod.annotations.at(key) == "true";
  if (has == captured) return;
  json patch = {{"metadata", {{"annotations", {{key, captured ? json("true") : json(nullptr)}}}}}};
  auto r = kube_client_->merge_patch("/api/v1/namespaces/" + pod.namespace_ + "/pods/" + pod.name, patch);
  if (!r) spdlog::warn("kube: annotate {}/{}: {}", pod.namespace_, pod.name, r.error().message());
}

void Agent::kube_worker() {
  while (!stopping_) {
    {
      std::unique_lock<std::mutex> g(kube_mu_);
      // also on a timer: a pod whose netns was not found yet, or a proxy that was away
      kube_cv_.wait_for(g, std::chrono::seconds(2), [this] { return kube_dirty_ || stopping_.load(); });
      kube_dirty_ = false;
    }
    if (stopping_) break;
    auto snap = kube_source_->snapshot();
    if (snap.synced) reconcile_kube(snap);
  }
}

void Agent::reconcile_kube(const kube::Snapshot& snap) {
  std::vector<std::pair<kube::Pod, bool>> annotations;
  {
    std::lock_guard<std::mutex> g(mu_);
    auto current = dp_->pods(Datapath::Detail::Summary);
    if (!current) return;
    std::map<std::string, const PodStatus*> by_uid;
    for (const auto& p : *current)
      if (p.meta.uid[0]) by_uid[p.meta.uid] = &p;
    for (const auto& [uid, pod] : snap.pods) {
      auto ns = snap.namespaces.find(pod.namespace_);
      bool want = cfg_.label_policy.enrolled(pod, ns == snap.namespaces.end() ? nullptr : &ns->second) &&
                  (pod.phase == "Running" || pod.phase == "Pending") && !pod.ips.empty();
      auto have = by_uid.find(uid);
      PodInfo info;
      info.uid = uid;
      info.name = pod.name;
      info.namespace_ = pod.namespace_;
      info.service_account = pod.service_account;
      if (want && have == by_uid.end()) {
        if (!zds_->connected()) continue;  // captured only with a proxy to take it: retried on the timer
        auto path = find_pod_netns(pod, cfg_.proc_root);
        if (!path) {
          spdlog::debug("kube: no netns found yet for {}/{}", pod.namespace_, pod.name);
          continue;
        }
        auto nsr = open_netns(*path);
        if (!nsr) continue;
        PodOptions opts;
        opts.namespace_ = info.namespace_;
        opts.name = info.name;
        opts.uid = uid;
        opts.service_account = pod.service_account;
        opts.dns = cfg_.dns;
        opts.fail_open = cfg_.fail_open;
        auto r = dp_->enroll(*nsr, opts);
        if (!r) {
          spdlog::warn("kube: capture {}: {}", info.full_name(), r.error().message());
          continue;
        }
        info.netns = *path;
        auto st = zds_->add(info, nsr->fd.get());
        if (!st) {
          (void)dp_->unenroll(nsr->cookie);
          spdlog::warn("kube: proxy did not take {}: {}", info.full_name(), st.error().message());
          continue;
        }
        spdlog::info("kube: captured running pod {} (netns {})", info.full_name(), *path);
        annotations.push_back({pod, true});
      } else if (!want && have != by_uid.end()) {
        if (zds_->connected()) (void)zds_->del(uid);
        auto st = dp_->unenroll(have->second->cookie);
        if (!st) spdlog::warn("kube: release {}: {}", info.full_name(), st.error().message());
        else spdlog::info("kube: released pod {} (new connections go direct)", info.full_name());
        annotations.push_back({pod, false});
      } else if (want) {
        annotations.push_back({pod, true});
      }
    }
  }
  for (const auto& [pod, captured] : annotations) annotate(pod, captured);
}

}  // namespace podsteer
