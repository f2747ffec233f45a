// The agent's lifecycle, its HTTP endpoints, health, readiness and metrics.
#include "clock.h"
#include "agent.h"

#include <httplib.h>
#include <prometheus/counter.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <sys/resource.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "log.h"
#include "netns.h"
#include "version.h"

namespace podsteer {

using json = nlohmann::json;

namespace {


std::string first_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  return s;
}

// Constant time, so the token cannot be guessed byte by byte.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() != b.size();
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) diff |= a[i] ^ b[i];
  return diff == 0;
}

}  // namespace

struct Agent::Http {
  httplib::Server server;
  std::thread thread;
  httplib::Server metrics_server;  // --metrics-addr: /metrics alone
  std::thread metrics_thread;
};

Agent::Agent(AgentConfig cfg) : cfg_(std::move(cfg)), policy_(cfg_.enroll_namespaces) {}

Agent::~Agent() { stop(); }

nlohmann::json Agent::status_json() {
  using json = nlohmann::json;
  std::string not_ready, not_healthy;
  bool is_ready = ready(&not_ready), is_healthy = healthy(&not_healthy);
  json j = {{"version", kVersion}, {"pid", getpid()}, {"started_ms", started_ms_}, {"ready", is_ready},
            {"healthy", is_healthy}, {"pods", pods_.all().size()}};
  if (!is_ready) j["not_ready"] = not_ready;
  if (!is_healthy) j["not_healthy"] = not_healthy;
  json proxies = json::array();
  if (zds_) {
    for (const auto& p : zds_->proxy_info())
      proxies.push_back({{"id", p.id}, {"pid", p.pid}, {"name", p.name}, {"since_ms", p.since_ms},
                         {"last_ack_ms", p.last_ack_ms}, {"acks", p.acks}});
    j["workloads"] = zds_->workloads().size();
    j["zds_socket"] = cfg_.zds_socket;
  }
  j["proxies"] = proxies;
  if (kube_source_)
    j["kube"] = {{"node", cfg_.node_name},
                 {"synced", kube_source_->synced()},
                 {"reconciled", kube_reconciled_.load()},
                 {"last_event_ms", kube_source_->last_event_ms()},
                 {"event_errors", kube_source_->event_errors()},
                 {"relists", kube_source_->relists()}};
  else
    j["kube"] = nullptr;
  j["cni"] = cni_status_ ? cni_status_() : json(nullptr);
  return j;
}

Status Agent::start() {
  started_ms_ = unix_ms();
  auto opened = Datapath::open(cfg_.state_dir, cfg_.node, true);
  if (!opened) return opened.error();
  dp_.store(std::make_shared<Datapath>(std::move(*opened)));
  zds_ = std::make_unique<ZdsServer>(cfg_.zds_socket, cfg_.ack_timeout_ms);
  // Pods whose netns is gone were deleted while no agent ran: clean them up. Every other
  // pinned pod stays captured (it is never detached because we restarted) and is part of
  // every snapshot.
  auto pods = dp()->pods(Datapath::Detail::Summary);
  if (!pods) return pods.error();
  size_t kept = 0;
  for (const auto& p : *pods) {
    if (!p.netns_alive && !find_netns_by_inode(p.meta.netns_ino, cfg_.proc_root)) {
      spdlog::info("adopt: pod {} (netns {}) is gone, removing its entries", p.full_name(), p.meta.netns_path);
      auto st = dp()->unenroll(p.cookie);
      if (!st) spdlog::warn("adopt: {}", st.error().message());
      continue;
    }
    PodInfo pod = pod_from_meta(p);
    pods_.put(pod);
    if (p.meta.uid[0]) zds_->upsert(pod);
    ++kept;
  }
  spdlog::info("adopted {} captured pod(s) from {}", kept, cfg_.state_dir);
  adopted_ = true;
  if (!cfg_.kubeconfig.empty() || cfg_.in_cluster)
    zds_->set_snapshot_gate([this] {
      std::unique_lock<std::mutex> g(mu_);
      if (!first_pass_cv_.wait_for(g, std::chrono::seconds(3), [this] { return kube_first_pass_ || stopping_.load(); }))
        spdlog::warn("zds: no Kubernetes pass within 3 s: the snapshot goes out without it");
    });
  zds_->set_peer_check([this](uint32_t pid) { return trust_peer(pid); });
  PODSTEER_TRY(zds_->start());
  cni_ = std::make_unique<CniServer>(cfg_.cni_socket, [this](const std::string& line) { return handle_cni(line); });
  PODSTEER_TRY(cni_->start());

  if (!cfg_.kubeconfig.empty() || cfg_.in_cluster) {
    auto kc = cfg_.kubeconfig.empty() ? kube::in_cluster_config() : kube::load_kubeconfig(cfg_.kubeconfig);
    if (!kc) return kc.error();
    if (cfg_.node_name.empty()) return invalid("the Kubernetes pod source needs --node-name or NODE_NAME");
    kube_client_ = std::make_unique<kube::Client>(*kc);
    kube_source_ = std::make_unique<kube::Source>(*kube_client_, cfg_.node_name, [this] { kick_kube(); });
    kube_source_->start();
    kube_thread_ = std::thread([this] { kube_worker(); });
    spdlog::info("kube: watching pods of node {} at {}", cfg_.node_name, kc->server);
  }
  repair_thread_ = std::thread([this] { repair_worker(); });

  http_ = std::make_unique<Http>();
  // SO_REUSEADDR alone: httplib's default adds SO_REUSEPORT, with which a second process
  // binding the same port shares it silently (each scrape reaching one or the other)
  auto exclusive = [](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  };
  http_->server.set_socket_options(exclusive);
  http_->metrics_server.set_socket_options(exclusive);
  http_->server.Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
    std::string why;
    bool ok = healthy(&why);
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "ok\n" : why + "\n", "text/plain");
  });
  http_->server.Get("/status", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(status_json().dump() + "\n", "application/json");
  });
  http_->server.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    std::string why;
    bool ok = ready(&why);
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "ready\n" : why + "\n", "text/plain");
  });
  auto serve_metrics = [this](const httplib::Request& req, httplib::Response& res) {
    if (!cfg_.metrics_token_file.empty() &&
        !same_secret(req.get_header_value("Authorization"), "Bearer " + first_line(cfg_.metrics_token_file))) {
      res.status = 401;
      res.set_content("unauthorized\n", "text/plain");
      return;
    }
    res.set_content(metrics(), "text/plain; version=0.0.4");
  };
  http_->server.Get("/metrics", serve_metrics);
  // the log level, read by anyone who reaches the address, changed only from the node itself
  http_->server.Get("/logging", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("level=" + log_level_name() + "\n", "text/plain");
  });
  http_->server.Post("/logging", [](const httplib::Request& req, httplib::Response& res) {
    if (req.remote_addr != "127.0.0.1" && req.remote_addr != "::1" && req.remote_addr != "::ffff:127.0.0.1") {
      res.status = 403;
      res.set_content("the log level is changed from the node itself (loopback)\n", "text/plain");
      return;
    }
    // level=NAME in the query or as a form body (curl -d level=debug)
    std::string want = req.get_param_value("level");
    if (want.empty() && req.body.rfind("level=", 0) == 0) want = req.body.substr(6);
    while (!want.empty() && (want.back() == '\n' || want.back() == '\r')) want.pop_back();
    auto level = parse_log_level(want);
    if (!level) {
      res.status = 400;
      res.set_content("level must be one of trace, debug, info, warn, error, off\n", "text/plain");
      return;
    }
    std::string was = log_level_name();
    set_log_level(*level);
    spdlog::warn("log level {} -> {} (POST /logging from {})", was, log_level_name(), req.remote_addr);
    res.set_content("level=" + log_level_name() + "\n", "text/plain");
  });
  if (!http_->server.bind_to_port(cfg_.http_addr.c_str(), cfg_.http_port))
    return invalid("cannot listen on " + cfg_.http_addr + ":" + std::to_string(cfg_.http_port));
  if (cfg_.metrics_port > 0) {
    http_->metrics_server.Get("/metrics", serve_metrics);
    std::string addr = cfg_.metrics_addr.empty() ? cfg_.http_addr : cfg_.metrics_addr;
    if (!http_->metrics_server.bind_to_port(addr.c_str(), cfg_.metrics_port))
      return invalid("cannot listen on " + addr + ":" + std::to_string(cfg_.metrics_port) + " (--metrics-addr)");
    http_->metrics_thread = std::thread([this] { http_->metrics_server.listen_after_bind(); });
    spdlog::info("http: /metrics{} on {}:{}", cfg_.metrics_token_file.empty() ? "" : " (bearer token)", addr,
                 cfg_.metrics_port);
  }
  http_->thread = std::thread([this] { http_->server.listen_after_bind(); });
  spdlog::info("http: /metrics /healthz /readyz /logging on {}:{}", cfg_.http_addr, cfg_.http_port);
  return {};
}

void Agent::stop() {
  if (stopping_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> g(mu_);
    first_pass_cv_.notify_all();  // a proxy's handshake waiting for the first pass
    kube_cv_.notify_all();
    repair_cv_.notify_all();
  }
  if (kube_source_) kube_source_->stop();
  if (kube_thread_.joinable()) kube_thread_.join();
  if (repair_thread_.joinable()) repair_thread_.join();
  if (cni_) cni_->stop();
  if (zds_) zds_->stop();
  if (http_) {
    http_->server.stop();
    if (http_->thread.joinable()) http_->thread.join();
    http_->metrics_server.stop();
    if (http_->metrics_thread.joinable()) http_->metrics_thread.join();
  }
}

// The watchdog: red when some path has stopped making progress - a CNI request or a
// proxy's ack outstanding for too long, or a repair pass that never finishes (a stuck
// lock shows as one of these).
bool Agent::healthy(std::string* why) {
  int64_t now = now_ms();
  auto fail = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  int64_t tick = repair_tick_ms_;
  if (tick && now - tick > std::max<int64_t>(10000, 20LL * cfg_.repair_interval_ms))
    return fail(fmt::format("the repair loop has not run for {} ms", now - tick));
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [_, started] : cni_in_flight_) {
      auto age = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
      if (age > cfg_.watchdog_ms) return fail(fmt::format("a CNI request has been in progress for {} ms", age));
    }
  }
  if (zds_) {
    int64_t oldest = zds_->oldest_pending_ms();
    if (oldest && now - oldest > cfg_.ack_timeout_ms + 5000)
      return fail(fmt::format("a node proxy request has waited {} ms for its ack", now - oldest));
  }
  return true;
}

bool Agent::ready(std::string* why) {
  auto fail = [&](const std::string& w) {
    if (why) *why = w;
    return false;
  };
  if (!adopted_) return fail("adopting state");
  std::string sick;
  if (!healthy(&sick)) return fail("unhealthy: " + sick);
  if (kube_source_ && !kube_reconciled_) return fail("waiting for the first list of pods and its capture");
  if (zds_->waiting_for_path()) return fail("another server holds the ZDS socket " + cfg_.zds_socket);
  if (!zds_->connected()) return fail("no node proxy connected");
  if (cni_pending_) return fail("waiting for the primary CNI's config to chain podsteer-cni into");
  return true;
}

bool Agent::daemonset_removed() {
  if (!kube_client_ || cfg_.daemonset.empty()) return false;  // cannot tell: keep the plugin
  auto slash = cfg_.daemonset.find('/');
  if (slash == std::string::npos) return false;
  auto r = kube_client_->get("/apis/apps/v1/namespaces/" + cfg_.daemonset.substr(0, slash) + "/daemonsets/" +
                             cfg_.daemonset.substr(slash + 1));
  if (r) {
    auto meta = r->find("metadata");
    return meta != r->end() && meta->is_object() && meta->contains("deletionTimestamp");
  }
  if (r.error().is(ErrorCode::kNotFound)) return true;
  // `helm uninstall` deletes the DaemonSet, then at once the Role, the bindings and the
  // ServiceAccount that let us ask: denied while our pod is ending means they went with it
  // (a restart or upgrade keeps them). Kept, the plugin could not ask the API either, and
  // the node would start no ambient pod.
  if (r.error().is(ErrorCode::kDenied)) {
    spdlog::warn("cni: the API server denies this agent's own DaemonSet ({}): its account went with it, an uninstall",
                 r.error().message());
    return true;
  }
  return false;  // any other failure: cannot tell, keep it
}

// The standard process_* metrics of Prometheus' client libraries (prometheus-cpp has no
// collector for them), from /proc/self: what a platform team's dashboards already chart.
static void process_metrics(prometheus::Registry& reg) {
  auto gauge = [&](const char* name, const char* help, double v) {
    prometheus::BuildGauge().Name(name).Help(help).Register(reg).Add({}).Set(v);
  };
  std::ifstream stat("/proc/self/stat");
  std::string line;
  std::getline(stat, line);
  auto close_paren = line.rfind(')');
  if (close_paren != std::string::npos) {
    std::istringstream rest(line.substr(close_paren + 2));
    std::vector<std::string> f;  // from field 3 (state) on
    for (std::string x; rest >> x;) f.push_back(x);
    if (f.size() > 21) {
      double tick = double(sysconf(_SC_CLK_TCK)), page = double(sysconf(_SC_PAGESIZE));
      prometheus::BuildCounter()
          .Name("process_cpu_seconds_total")
          .Help("user and system CPU time spent, in seconds")
          .Register(reg)
          .Add({})
          .Increment((std::stod(f[11]) + std::stod(f[12])) / tick);  // utime, stime
      double boot = 0;
      std::ifstream s("/proc/stat");
      for (std::string l; std::getline(s, l);)
        if (l.rfind("btime ", 0) == 0) boot = std::stod(l.substr(6));
      gauge("process_start_time_seconds", "start time of the process since the Unix epoch, in seconds",
            boot + std::stod(f[19]) / tick);
      gauge("process_virtual_memory_bytes", "virtual memory size, in bytes", std::stod(f[20]));
      gauge("process_resident_memory_bytes", "resident memory size, in bytes", std::stod(f[21]) * page);
    }
  }
  std::error_code ec;
  double fds = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec))
    ++fds;
  gauge("process_open_fds", "open file descriptors", fds);
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0) gauge("process_max_fds", "the limit of open file descriptors", double(lim.rlim_cur));
}

std::string Agent::metrics() {
  prometheus::Registry reg;
  auto gauge = [&](const char* name, const char* help, double v) {
    prometheus::BuildGauge().Name(name).Help(help).Register(reg).Add({}).Set(v);
  };
  auto counter = [&](const char* name, const char* help, double v) {
    prometheus::BuildCounter().Name(name).Help(help).Register(reg).Add({}).Increment(v);
  };
  prometheus::BuildGauge()
      .Name("podsteer_build_info")
      .Help("1, with the agent's version as a label")
      .Register(reg)
      .Add({{"version", kVersion}})
      .Set(1);
  gauge("podsteer_agent_ready", "1 when state is adopted, the first capture is done and a proxy is connected",
        ready() ? 1 : 0);
  gauge("podsteer_agent_healthy", "0 when the watchdog sees a path that stopped making progress", healthy() ? 1 : 0);
  auto zc = zds_ ? zds_->counters() : ZdsCounters{};
  counter("podsteer_zds_connections_total", "node proxy connections accepted", zc.connections);
  counter("podsteer_zds_nacks_total", "proxy acks that carried an error", zc.nacks);
  counter("podsteer_zds_keeps_total", "KeepWorkload sent in snapshots (netns not openable)", zc.keeps);
  counter("podsteer_zds_failed_requests_total", "proxy requests without an ack", zc.failed_requests);
  counter("podsteer_zds_malformed_total", "ZDS frames from proxies that were not what the protocol expects",
          zc.malformed);
  counter("podsteer_istio_takeovers_total", "running pods taken over from istio-cni's in-pod rules",
          double(istio_takeovers_.load()));
  counter("podsteer_repair_passes_total", "drift repair passes completed (one every --repair-interval-ms)",
          double(repair_passes_.load()));
  gauge("podsteer_repair_pass_seconds", "how long the last drift repair pass took (it looks at every captured pod)",
        double(repair_pass_us_.load()) / 1e6);
  gauge("podsteer_zds_proxies", "node proxies connected now", zds_ ? zds_->proxies() : 0);
  {
    auto& reqs = prometheus::BuildCounter().Name("podsteer_cni_requests_total").Help("CNI requests by command and result").Register(reg);
    auto& repairs = prometheus::BuildCounter().Name("podsteer_repairs_total").Help("pieces of a capture put back").Register(reg);
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [k, v] : cni_requests_) reqs.Add({{"command", k.first}, {"result", k.second}}).Increment(double(v));
    for (const auto& [piece, v] : repairs_) repairs.Add({{"piece", piece}}).Increment(double(v));
    auto& cni_s = prometheus::BuildHistogram()
                      .Name("podsteer_cni_request_seconds")
                      .Help("how long a CNI request took in the agent, by command (ADD: the pod's start waits for it)")
                      .Register(reg);
    for (const auto& [command, h] : cni_latency_) cni_s.Add({{"command", command}}, Latency::bounds()).ObserveMultiple(h.counts, h.sum);
    prometheus::BuildHistogram()
        .Name("podsteer_enroll_seconds")
        .Help("how long the datapath took to capture one pod (maps, sk_lookup, TC programs, return path)")
        .Register(reg)
        .Add({}, Latency::bounds())
        .ObserveMultiple(enroll_latency_.counts, enroll_latency_.sum);
  }
  if (auto d = dp()) {
    auto full = d->full();
    auto& tf = prometheus::BuildCounter()
                   .Name("podsteer_table_full_total")
                   .Help("connections whose entry did not fit in a full table: orig (the proxy is not told the "
                         "original destination and refuses), transit (the proxy's connection from a client's address "
                         "comes back to it)")
                   .Register(reg);
    tf.Add({{"table", "orig"}}).Increment(double(full.orig));
    tf.Add({{"table", "transit"}}).Increment(double(full.transit));
  }
  process_metrics(reg);
  if (kube_source_) {
    counter("podsteer_kube_event_errors_total", "malformed or unexpected watch input", kube_source_->event_errors());
    counter("podsteer_kube_relists_total", "relists after 410 Gone or an ERROR event", kube_source_->relists());
  }
  auto& pods_g = prometheus::BuildGauge().Name("podsteer_pods_captured").Help("pods with a pod entry").Register(reg);
  auto& whole = prometheus::BuildGauge().Name("podsteer_pods_not_whole").Help("captured pods missing a piece").Register(reg);
  auto& traffic = prometheus::BuildCounter().Name("podsteer_pod_connections_total").Help("per-pod datapath counters").Register(reg);
  auto& guard = prometheus::BuildCounter()
                    .Name("podsteer_pod_guard_total")
                    .Help("per pod, what the proxy's guards stopped: forged_mark (the proxy mark by a process not a "
                          "proxy's: captured), bind_refused (a proxy port bound by one: EPERM), unsteered_dropped (a "
                          "TCP connection leaving the pod that the socket hooks should have steered: a hole, stopped "
                          "at the interface), unsteered_passed (the same in a fail-open pod without its proxy: let "
                          "through)")
                    .Register(reg);
  std::shared_ptr<const std::vector<PodStatus>> cache;  // as the last repair pass saw them
  {
    std::lock_guard<std::mutex> g(mu_);
    cache = cache_;
  }
  size_t n = 0, broken = 0;
  for (const auto& p : *cache) {
    n += p.has_entry;
    broken += !p.missing().empty();
    auto id = p.identity();
    auto add = [&](prometheus::Family<prometheus::Counter>& f, const char* kind, uint64_t v) {
      f.Add({{"namespace", id.namespace_}, {"pod", id.name}, {"kind", kind}}).Increment(double(v));
    };
    add(traffic, "redirected_out", p.counters.redirected_out);
    add(traffic, "redirected_in", p.counters.redirected_in);
    add(traffic, "dns_redirected", p.counters.dns_redirected);
    add(traffic, "bypassed", p.counters.bypassed);
    add(traffic, "proxy_missing", p.counters.proxy_missing);
    add(guard, "forged_mark", p.guard.forged_mark);
    add(guard, "bind_refused", p.guard.bind_refused);
    add(guard, "unsteered_dropped", p.hole.dropped);
    add(guard, "unsteered_passed", p.hole.passed);
  }
  pods_g.Add({}).Set(double(n));
  whole.Add({}).Set(double(broken));
  return prometheus::TextSerializer().Serialize(reg.Collect());
}

}  // namespace podsteer
