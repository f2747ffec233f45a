// The flags (and, for the agent, environment variables: the ConfigMap's keys) that set a
// node's ports and marks, for every binary that opens the datapath. The ones given are
// recorded in NodeConfig::given: they must match a state that already exists.
#pragma once

#include <CLI/CLI.hpp>

#include <vector>

#include "datapath.h"

namespace podsteer {

class NodeFlags {
 public:
  // with_env: also read PODSTEER_<FLAG> (e.g. PODSTEER_OUTBOUND_PORT), as the agent does
  NodeFlags(CLI::App& app, NodeConfig& node, bool with_env) {
    auto add = [&](const char* flag, auto& field, const char* what, NodeConfig::Setting bit) {
      auto* o = app.add_option(flag, field, what)->capture_default_str();
      if (with_env) {
        std::string env = "PODSTEER_";
        for (const char* c = flag + 2; *c; ++c) env += *c == '-' ? '_' : static_cast<char>(std::toupper(*c));
        o->envname(env);
      }
      opts_.push_back({o, bit});
    };
    add("--outbound-port", node.outbound_port, "outbound listener port", NodeConfig::kOutboundPort);
    add("--inbound-port", node.inbound_port, "inbound listener port", NodeConfig::kInboundPort);
    add("--hbone-port", node.hbone_port, "HBONE port, never redirected", NodeConfig::kHbonePort);
    add("--dns-port", node.dns_port, "DNS listener port on 127.0.0.1 and [::1]", NodeConfig::kDnsPort);
    add("--proxy-mark", node.proxy_mark, "socket mark of the proxy: never redirected", NodeConfig::kProxyMark);
    add("--proxy-mark-mask", node.proxy_mark_mask, "mask for --proxy-mark and --app-mark", NodeConfig::kProxyMarkMask);
    add("--app-mark", node.app_mark, "mark of the app's side of connections the proxy makes from a client's address",
        NodeConfig::kAppMark);
    add("--route-table", node.route_table, "routing table of the return path's local route", NodeConfig::kRouteTable);
    add("--rule-pref", node.rule_pref, "preference of the return path's policy rule", NodeConfig::kRulePref);
    add("--proxy-identity", node.proxy_identity,
        "who may use the proxy mark and bind the proxy's ports in a pod: process (a node proxy's process: the "
        "agent's ZDS peers, or `podsteer proxy trust`) or mark (anyone who sets the mark, as Istio's rules)",
        NodeConfig::kProxyIdentity);
    opts_.back().first->transform(CLI::CheckedTransformer(
        std::map<std::string, NodeConfig::ProxyIdentity>{{"process", NodeConfig::ProxyIdentity::Process},
                                                        {"mark", NodeConfig::ProxyIdentity::Mark}},
        CLI::ignore_case));
  }

  // After parsing: which were given (on the command line or in the environment).
  void record(NodeConfig& node) const {
    for (const auto& [o, bit] : opts_)
      if (o->count() > 0) node.given |= bit;
  }

 private:
  std::vector<std::pair<CLI::Option*, NodeConfig::Setting>> opts_;
};

}  // namespace podsteer
