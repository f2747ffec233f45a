// podsteer-agent: the node agent. Serves the CNI hook and the node proxy (ZDS), keeps the
// datapath in step with the pods, and exposes /metrics, /healthz and /readyz.
#include <signal.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <atomic>
#include <filesystem>
#include <sstream>
#include <fstream>
#include <thread>

#include "agent.h"
#include "cni_config.h"
#include "log.h"
#include "node_flags.h"
#include "version.h"

using namespace podsteer;

namespace {

// Keeps our plugin in the primary conflist when the primary CNI rewrites it.
void watch_cni_config(cni::InstallOptions& o, const std::atomic<bool>& stop,
                      const std::function<Status(cni::InstallOptions&)>& refresh) {
  int in = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
  if (in >= 0) inotify_add_watch(in, o.conf_dir.c_str(), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE);
  while (!stop) {
    char buf[4096];
    bool changed = false;
    for (int i = 0; i < 10 && !stop; ++i) {  // wake at least every second
      if (in >= 0 && read(in, buf, sizeof(buf)) > 0) {
        changed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (stop) break;
    (void)changed;  // also re-checked on the timer: inotify may miss a replaced directory
    if (auto st = refresh(o); !st) spdlog::warn("cni: podsteer-cni's API access: {}", st.error().message());
    auto r = cni::ensure_chained(o);
    if (r && *r) spdlog::info("cni: re-added podsteer-cni to {}", cni::primary_conflist(o.conf_dir).value());
  }
  if (in >= 0) close(in);
}

// podsteer-cni asks the API server itself when the agent is away: it gets the agent's
// server, token and CA (re-read here, so a rotated token reaches the plugin within a second).
Status refresh_plugin_api_access(const AgentConfig& cfg, const std::string& label, const std::string& system_namespace,
                                 const std::vector<std::string>& exclude_namespaces, cni::InstallOptions& o) {
  if (cfg.kubeconfig.empty() && !cfg.in_cluster) return {};  // the CNI-only source: no API to ask
  auto kc = cfg.kubeconfig.empty() ? kube::in_cluster_config() : kube::load_kubeconfig(cfg.kubeconfig);
  if (!kc) return kc.error();
  auto slurp = [](const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  std::string token = kc->token;
  if (token.empty() && !kc->token_file.empty()) {
    token = slurp(kc->token_file);
    while (!token.empty() && (token.back() == '\n' || token.back() == '\r')) token.pop_back();
  }
  return cni::set_api_access(o, kc->server, token, kc->ca_file.empty() ? "" : slurp(kc->ca_file), label, system_namespace,
                             exclude_namespaces);
}

// The node's CNI chain as the runtime reads it: which file, and whether podsteer-cni is in it
// (and last, where it must be: it prints the primary CNI's result).
nlohmann::json cni_chain_status(const cni::InstallOptions& o, bool install_cni) {
  nlohmann::json j = {{"install", install_cni}, {"conf_dir", o.conf_dir}, {"bin_dir", o.bin_dir}};
  auto file = cni::primary_conflist(o.conf_dir);
  if (!file) {
    j["error"] = file.error().message();
    return j;
  }
  j["file"] = *file;
  std::ifstream in(*file);
  auto conf = nlohmann::json::parse(in, nullptr, false);
  const auto* plugins = conf.is_object() && conf.contains("plugins") && conf["plugins"].is_array() ? &conf["plugins"] : nullptr;
  std::vector<std::string> types;
  if (plugins)
    for (const auto& p : *plugins) types.push_back(p.is_object() && p.contains("type") && p["type"].is_string() ? p["type"].get<std::string>() : "?");
  j["plugins"] = types;
  j["chained"] = !types.empty() && types.back() == "podsteer-cni" && types.size() > 1;
  return j;
}

// `helm uninstall` deletes the DaemonSet and, at once, the RBAC the agents need to clean up
// (the annotations istiod reads). The chart's pre-delete hook runs this first: a foreground
// delete (the DaemonSet stays, with a deletion timestamp, until its pods are gone: each agent
// sees it and cleans up with its account intact), waited for until the DaemonSet is gone.
int remove_daemonset(const AgentConfig& cfg, const std::string& ns_name, int timeout_s) {
  auto slash = ns_name.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == ns_name.size()) {
    spdlog::error("--delete-daemonset wants NAMESPACE/NAME, not '{}'", ns_name);
    return 2;
  }
  auto kc = cfg.kubeconfig.empty() ? kube::in_cluster_config() : kube::load_kubeconfig(cfg.kubeconfig);
  if (!kc) {
    spdlog::error("{}", kc.error().message());
    return 1;
  }
  kube::Client client(*kc);
  std::string path = "/apis/apps/v1/namespaces/" + ns_name.substr(0, slash) + "/daemonsets/" + ns_name.substr(slash + 1);
  auto d = client.del(path + "?propagationPolicy=Foreground");
  if (!d && !d.error().is(ErrorCode::kNotFound)) {
    spdlog::error("delete {}: {}", ns_name, d.error().message());
    return 1;
  }
  spdlog::info("daemonset {} deleted (foreground): waiting for its pods to clean up and go", ns_name);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    auto g = client.get(path);
    if (!g && g.error().is(ErrorCode::kNotFound)) {
      spdlog::info("daemonset {} is gone", ns_name);
      return 0;
    }
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  spdlog::error("daemonset {} still there after {} s", ns_name, timeout_s);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"podsteer-agent: the podsteer node agent"};
  AgentConfig cfg;
  app.set_version_flag("--version", std::string(kVersion));
  bool verbose = false, install_cni = false, uninstall_cni = false;
  std::vector<std::string> enroll_namespaces;
  cni::InstallOptions cni_opts;
  app.add_option("--state-dir", cfg.state_dir, "bpffs directory of our pins")->capture_default_str();
  app.add_option("--hook-cgroup", cfg.node.hook_cgroup, "cgroup v2 directory for the socket hooks (first start only)");
  app.add_option("--tc-mode", cfg.node.tc_mode,
                 "how the pod's TC program attaches: clsact (cls_bpf, every kernel) or tcx (6.6+; each attach "
                 "waits for an RCU grace period, milliseconds per pod start)")
      ->transform(CLI::CheckedTransformer(std::map<std::string, TcMode>{{"clsact", TcMode::Clsact}, {"tcx", TcMode::Tcx}}))
      ->capture_default_str();
  // ports and marks (also PODSTEER_OUTBOUND_PORT etc.: the ConfigMap's keys)
  NodeFlags node_flags(app, cfg.node, true);
  app.add_option("--node-netns", cfg.node.node_netns,
                 "the node's netns: connections whose socket exists there (kubelet probes) reach the app "
                 "(default: the agent's own, hostNetwork)");
  app.add_option("--cni-socket", cfg.cni_socket, "where podsteer-cni reaches the agent")->capture_default_str();
  app.add_option("--zds-socket", cfg.zds_socket, "where the node proxy connects (ZDS)")->capture_default_str();
  app.add_option("--http-addr", cfg.http_addr, "address of /metrics, /healthz, /readyz")->capture_default_str();
  app.add_option("--http-port", cfg.http_port, "port of /metrics, /healthz, /readyz")->capture_default_str();
  app.add_option("--ack-timeout-ms", cfg.ack_timeout_ms, "how long to wait for the proxy's ack")->capture_default_str();
  app.add_option("--repair-interval-ms", cfg.repair_interval_ms, "how often every captured pod is checked and mended")
      ->capture_default_str();
  app.add_option("--watchdog-ms", cfg.watchdog_ms, "a CNI request taking longer makes /healthz fail")->capture_default_str();
  app.add_option("--metrics-addr", cfg.metrics_addr,
                 "also serve /metrics, and nothing else, on this address (with --metrics-port: for Prometheus; the "
                 "chart gives the node's address)");
  app.add_option("--metrics-port", cfg.metrics_port, "port of --metrics-addr (0: no second listener)")
      ->capture_default_str();
  app.add_option("--metrics-token-file", cfg.metrics_token_file,
                 "require 'Authorization: Bearer <first line of this file>' on /metrics");
  app.add_option("--enroll-namespaces", enroll_namespaces, "namespaces whose pods the CNI source enrolls ('*' for all)")->delimiter(',');
  app.add_option("--dns-capture", cfg.dns,
                 "capture DNS of enrolled pods unless a pod's ambient.istio.io/dns-capture says otherwise "
                 "(on by default, as in Istio since 1.25)")
      ->capture_default_str();
  app.add_flag("--dns", cfg.dns, "the same as --dns-capture=true (kept for earlier command lines)");
  app.add_flag("--fail-open", cfg.fail_open, "enrolled pods go direct when the proxy is not listening");
  app.add_flag("--install-cni", install_cni, "install podsteer-cni into the node's CNI config and keep it there");
  app.add_flag("--uninstall-cni", uninstall_cni, "remove podsteer-cni from the node's CNI config and exit");
  app.add_option("--cni-bin-dir", cni_opts.bin_dir)->capture_default_str();
  app.add_option("--cni-conf-dir", cni_opts.conf_dir)->capture_default_str();
  app.add_option("--cni-plugin", cni_opts.plugin_binary, "podsteer-cni binary to install (default: next to this agent)");
  app.add_option("--kubeconfig", cfg.kubeconfig, "watch pods through this kubeconfig");
  app.add_flag("--in-cluster", cfg.in_cluster, "watch pods with the in-cluster service account");
  app.add_option("--node-name", cfg.node_name, "this node's name (default: $NODE_NAME)");
  app.add_option("--daemonset", cfg.daemonset,
                 "NAMESPACE/NAME of this agent's DaemonSet: on exit, podsteer-cni leaves the CNI config only if it "
                 "is gone (default: $POD_NAMESPACE/podsteer-agent)");
  std::string label = "istio.io/dataplane-mode=ambient";
  app.add_option("--enroll-label", label, "KEY=VALUE on a pod or its namespace that enrolls it")->capture_default_str();
  std::string system_namespace = "istio-system";
  app.add_option("--system-namespace", system_namespace,
                 "the node proxy's namespace: its pods (label app=ztunnel or podsteer-proxy) are never captured")
      ->capture_default_str();
  std::vector<std::string> exclude_namespaces;
  app.add_option("--exclude-namespaces", exclude_namespaces,
                 "namespaces whose pods are never captured, whatever their labels (istio-cni's excludeNamespaces; "
                 "comma-separated or repeated)")
      ->delimiter(',');
  std::string log_level = "info", log_format = "text";
  app.add_option("--log-level", log_level,
                 "trace, debug, info, warn, error or off (while it runs: curl -d level=debug "
                 "127.0.0.1:PORT/logging on the node)")
      ->envname("PODSTEER_LOG_LEVEL")
      ->check([](const std::string& v) { return parse_log_level(v) ? std::string() : "not a log level: " + v; })
      ->capture_default_str();
  app.add_option("--log-format", log_format, "text (time, level, message) or json (one object per line)")
      ->envname("PODSTEER_LOG_FORMAT")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_flag("-v,--verbose", verbose, "the same as --log-level trace");
  std::string delete_daemonset;
  int delete_timeout_s = 120;
  app.add_option("--delete-daemonset", delete_daemonset,
                 "NAMESPACE/NAME: delete the agent's DaemonSet and wait until its pods have cleaned up and are gone, "
                 "then exit (the chart's pre-delete hook: the agents still have their RBAC while they clean up)");
  app.add_option("--delete-timeout-s", delete_timeout_s, "how long --delete-daemonset waits")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  node_flags.record(cfg.node);
  init_daemon_logging(verbose ? spdlog::level::trace : *parse_log_level(log_level), *parse_log_format(log_format));
  cfg.enroll_namespaces = {enroll_namespaces.begin(), enroll_namespaces.end()};
  if (cfg.node_name.empty() && getenv("NODE_NAME")) cfg.node_name = getenv("NODE_NAME");
  if (cfg.daemonset.empty() && getenv("POD_NAMESPACE")) cfg.daemonset = std::string(getenv("POD_NAMESPACE")) + "/podsteer-agent";
  cfg.label_policy = kube::LabelPolicy::from(label, system_namespace, exclude_namespaces);
  cni_opts.agent_socket = cfg.cni_socket;
  if (cni_opts.plugin_binary.empty())
    cni_opts.plugin_binary = (std::filesystem::read_symlink("/proc/self/exe").parent_path() / "podsteer-cni").string();

  if (!delete_daemonset.empty()) return remove_daemonset(cfg, delete_daemonset, delete_timeout_s);

  if (uninstall_cni) {
    auto st = cni::uninstall(cni_opts);
    if (!st) {
      spdlog::error("{}", st.error().message());
      return 1;
    }
    spdlog::info("removed podsteer-cni from {} and {}", cni_opts.conf_dir, cni_opts.bin_dir);
    return 0;
  }

  if (install_cni && access(cni_opts.plugin_binary.c_str(), X_OK) != 0) {
    spdlog::error("--install-cni: no podsteer-cni binary at {} (use --cni-plugin)", cni_opts.plugin_binary);
    return 1;
  }

  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);  // threads inherit: only sigwait below sees them
  signal(SIGPIPE, SIG_IGN);

  Agent agent(cfg);
  agent.set_cni_status([&cni_opts, install_cni] { return cni_chain_status(cni_opts, install_cni); });
  auto st = agent.start();
  if (!st) {
    spdlog::error("{}", st.error().message());
    return 1;
  }
  std::atomic<bool> stop{false};
  std::thread watcher;
  if (install_cni) {
    // A new node: the agent may start before the primary CNI has written its config. It
    // waits for it, not ready, instead of exiting into a crash loop.
    agent.set_cni_pending(true);
    for (bool told = false; !cni::primary_conflist(cni_opts.conf_dir); told = true) {
      if (!told)
        spdlog::warn("cni: no primary CNI config in {} yet: waiting for it (not ready until podsteer-cni is chained in)",
                     cni_opts.conf_dir);
      timespec half{0, 500'000'000};
      if (int sig = sigtimedwait(&sigs, nullptr, &half); sig > 0) {
        spdlog::info("signal {} while waiting for the primary CNI config: stopping", sig);
        agent.stop();
        return 0;
      }
    }
    auto refresh = [&](cni::InstallOptions& o) { return refresh_plugin_api_access(cfg, label, system_namespace, exclude_namespaces, o); };
    if (auto st = refresh(cni_opts); !st) spdlog::warn("cni: podsteer-cni's API access: {}", st.error().message());
    auto ist = cni::install(cni_opts);
    if (!ist) {
      spdlog::error("install CNI plugin: {}", ist.error().message());
      return 1;
    }
    spdlog::info("cni: podsteer-cni installed in {} and chained in {}", cni_opts.bin_dir, cni_opts.conf_dir);
    agent.set_cni_pending(false);
    watcher = std::thread([&, refresh] { watch_cni_config(cni_opts, stop, refresh); });
  }
  int sig = 0;
  sigwait(&sigs, &sig);
  spdlog::info("signal {}: stopping", sig);
  stop = true;
  if (watcher.joinable()) watcher.join();
  if (install_cni) {
    // Removed, or restarting? Removed: new pods must start without us, so our plugin
    // leaves the chain. Restarting or upgrading: it stays, so a pod created meanwhile
    // fails ADD and is retried until the next agent captures it.
    if (agent.daemonset_removed()) {
      auto ust = cni::uninstall(cni_opts);
      if (ust) spdlog::info("cni: the agent's DaemonSet is gone: podsteer-cni removed from {}", cni_opts.conf_dir);
      else spdlog::error("cni: remove podsteer-cni: {}", ust.error().message());
      // then the pods and the datapath (new pods already start without us)
      if (auto rst = agent.remove_from_node(); !rst) spdlog::error("remove the datapath: {}", rst.error().message());
    } else {
      spdlog::info("cni: restart or upgrade (the DaemonSet is still there): podsteer-cni stays in the chain");
    }
  }
  agent.stop();
  return 0;
}
