// podsteer-proxy: the stand-in for ztunnel in demos, tests and benchmarks.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>

#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>
#include <thread>

#include "proxy.h"
#include "version.h"
#include "wire.h"

using namespace podsteer;

int main(int argc, char** argv) {
  CLI::App app{"podsteer-proxy: a small L4 node proxy speaking ZDS"};
  proxy::Config cfg;
  app.set_version_flag("--version", std::string(kVersion));
  std::string zds_socket = zds::kDefaultSocket;
  app.add_option("--zds-socket", zds_socket, "the agent's ZDS socket")->capture_default_str();
  app.add_option("--mark", cfg.mark, "SO_MARK of every proxy socket")->capture_default_str();
  app.add_option("--outbound-port", cfg.outbound_port)->capture_default_str();
  app.add_option("--inbound-port", cfg.inbound_port)->capture_default_str();
  app.add_option("--hbone-port", cfg.hbone_port)->capture_default_str();
  app.add_option("--dns-port", cfg.dns_port)->capture_default_str();
  app.add_option("--dns-upstream", cfg.dns_upstream, "resolver for captured UDP DNS (default: /etc/resolv.conf's)");
  app.add_option("--default-inbound-upstream", cfg.default_inbound_upstream,
                 "IP:PORT for connections made straight to the inbound listener (default: --default-upstream)");
  app.add_option("--default-upstream", cfg.default_upstream,
                 "IP:PORT for connections made straight to a listener (no original destination)");
  std::string workloads_file;
  app.add_option("--workloads", workloads_file,
                 "JSON list of {namespace, name, serviceAccount}: the workloads this proxy knows, as ztunnel knows "
                 "them from xDS; an AddWorkload matching none gets its connections failed, as ztunnel fails them")
      ->check(CLI::ExistingFile);
  app.add_option("--idle-timeout-ms", cfg.idle_timeout_ms, "close connections idle this long")->capture_default_str();
  int drain_seconds = cfg.drain_ms / 1000;
  app.add_option("--drain-seconds", drain_seconds,
                 "after SIGTERM or SIGINT, how long open connections may take to finish")
      ->capture_default_str();
  app.add_option("--max-dns-queries", cfg.max_dns_queries, "UDP DNS queries in flight at most")->capture_default_str();
  bool no_orig_src = false;
  app.add_flag("--no-orig-src", no_orig_src,
               "connect to apps from the pod's own address, not the client's (ztunnel: ENABLE_ORIG_SRC=false)");
  app.add_flag("--strict", cfg.strict,
               "refuse every plaintext inbound connection, as ztunnel under a STRICT PeerAuthentication");
  app.add_flag("--mark-after-listen", cfg.mark_after_listen,
               "mark each listener only after listen(), without SO_REUSEPORT (ztunnel: INPOD_PORT_REUSE=false)");
  app.add_flag("--quiet", cfg.quiet, "no per-connection log lines (benchmarks)");
  CLI11_PARSE(app, argc, argv);
  cfg.orig_src = !no_orig_src;
  cfg.drain_ms = drain_seconds * 1000;
  if (!workloads_file.empty()) {
    std::ifstream in(workloads_file);
    auto list = nlohmann::json::parse(in, nullptr, false);
    if (!list.is_array()) {
      std::cerr << "--workloads: " << workloads_file << " is not a JSON array\n";
      return 2;
    }
    cfg.check_identity = true;
    for (const auto& w : list) {
      if (!w.is_object()) continue;
      auto str = [&](const char* k) { return w.contains(k) && w[k].is_string() ? w[k].get<std::string>() : std::string(); };
      cfg.known_workloads.insert(str("namespace") + "/" + str("name") + "/" + str("serviceAccount"));
    }
  }
  signal(SIGPIPE, SIG_IGN);
  std::ios::sync_with_stdio(false);
  // SIGTERM (the kubelet, a rolling upgrade) and SIGINT drain: blocked in every thread,
  // taken by one that asks the event loop to drain
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);

  proxy::Proxy p(cfg);
  std::thread zds([&] { proxy::run_zds_client(p, zds_socket); });
  zds.detach();
  std::thread signals([&] {
    int sig = 0;
    sigwait(&stop, &sig);
    p.drain();
  });
  signals.detach();
  p.run();
  // the ZDS thread may be inside the proxy: leave without running destructors under it
  _exit(0);
}
