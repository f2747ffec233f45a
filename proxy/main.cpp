// podsteer-proxy: the stand-in for ztunnel in demos, tests and benchmarks.
#include <signal.h>

#include <CLI/CLI.hpp>

#include <iostream>
#include <thread>

#include "proxy.h"
#include "wire.h"

using namespace podsteer;

int main(int argc, char** argv) {
  CLI::App app{"podsteer-proxy: a small L4 node proxy speaking ZDS"};
  proxy::Config cfg;
  std::string zds_socket = zds::kDefaultSocket;
  app.add_option("--zds-socket", zds_socket, "the agent's ZDS socket")->capture_default_str();
  app.add_option("--mark", cfg.mark, "SO_MARK of every proxy socket")->capture_default_str();
  app.add_option("--outbound-port", cfg.outbound_port)->capture_default_str();
  app.add_option("--inbound-port", cfg.inbound_port)->capture_default_str();
  app.add_option("--hbone-port", cfg.hbone_port)->capture_default_str();
  app.add_option("--dns-port", cfg.dns_port)->capture_default_str();
  app.add_option("--dns-upstream", cfg.dns_upstream, "resolver for captured UDP DNS (default: /etc/resolv.conf's)");
  app.add_option("--default-upstream", cfg.default_upstream,
                 "IP:PORT for connections made straight to a listener (no original destination)");
  bool no_orig_src = false;
  app.add_flag("--no-orig-src", no_orig_src,
               "connect to apps from the pod's own address, not the client's (ztunnel: ENABLE_ORIG_SRC=false)");
  app.add_flag("--quiet", cfg.quiet, "no per-connection log lines (benchmarks)");
  CLI11_PARSE(app, argc, argv);
  cfg.orig_src = !no_orig_src;
  signal(SIGPIPE, SIG_IGN);
  std::ios::sync_with_stdio(false);

  proxy::Proxy p(cfg);
  std::thread zds([&] { proxy::run_zds_client(p, zds_socket); });
  zds.detach();
  p.run();
  return 0;
}
