// podsteer: enroll/unenroll pods into the capture datapath, and inspect or remove it.
// Every command is a short-lived process: the datapath lives on in pins.
#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "cni_config.h"
#include "datapath.h"
#include "kernel_features.h"
#include "log.h"
#include "map.h"
#include "netns.h"
#include "system.h"
#include "node_flags.h"
#include "version.h"

using namespace podsteer;
using json = nlohmann::json;

namespace {

int fail(const Error& e) {
  spdlog::error("{}", e.message());
  return 1;
}

std::string flags_text(uint32_t f) {
  std::string s;
  auto add = [&](const char* w) { s += s.empty() ? w : std::string(",") + w; };
  if (f & PODSTEER_POD_DNS) add("dns");
  add((f & PODSTEER_POD_FAIL_OPEN) ? "fail-open" : "fail-closed");
  if (f & PODSTEER_POD_NO_INBOUND) add("outbound-only");
  return s;
}

json return_path_json(const PodStatus& p) {
  const auto& rp = p.return_path;
  return {{"rule4", rp.rule4},   {"rule6", rp.rule6},
          {"route4", rp.route4}, {"route6", rp.route6},
          {"ipv6", rp.ipv6},     {"tcp_fwmark_accept", rp.fwmark_accept},
          {"made_by_podsteer", p.meta.netns_setup}};
}

json tc_json(const std::vector<TcHook>& tc) {
  json hooks = json::array();
  for (const auto& h : tc)
    hooks.push_back({{"ifindex", h.ifindex}, {"mode", h.mode}, {h.mode == "tcx" ? "link_id" : "prog_id", h.id},
                     {"priority", h.prio}, {"attached", h.attached}});
  return hooks;
}

json pod_json(const PodStatus& p) {
  json j = {
      {"pod", p.full_name()},
      {"uid", p.meta.uid},
      {"service_account", p.meta.service_account},
      {"netns", p.meta.netns_path},
      {"netns_cookie", p.cookie},
      {"netns_alive", p.netns_alive},
      {"active", p.has_entry},
      {"inbound",
       {{"sk_lookup_link_id", p.inbound.link_id},
        {"sk_lookup_prog_id", p.inbound.prog_id},
        {"attached", p.inbound.attached},
        {"proxy_listening", p.inbound.proxy_listening},
        {"tc_ingress", tc_json(p.inbound.node_in)},
        {"tc_egress", tc_json(p.inbound.pod_out)}}},
      {"return_path", return_path_json(p)},
      {"missing", p.missing()},
      {"dns", bool(p.entry.flags & PODSTEER_POD_DNS)},
      {"fail_open", bool(p.entry.flags & PODSTEER_POD_FAIL_OPEN)},
      {"bypass_inbound", bool(p.entry.flags & PODSTEER_POD_NO_INBOUND)},
      {"addresses", p.addresses},
      {"excluded_inbound_ports", p.excluded_inbound_ports},
      {"excluded_outbound_ports", p.excluded_outbound_ports},
      {"excluded_outbound_cidrs", p.excluded_cidrs},
      {"counters",
       {{"redirected_out", p.counters.redirected_out},
        {"redirected_in", p.counters.redirected_in},
        {"dns_redirected", p.counters.dns_redirected},
        {"bypassed", p.counters.bypassed},
        {"proxy_missing", p.counters.proxy_missing}}},
      {"guard",
       {{"forged_mark", p.guard.forged_mark},
        {"bind_refused", p.guard.bind_refused},
        {"unsteered_dropped", p.hole.dropped},
        {"unsteered_passed", p.hole.passed}}},
  };
  if (p.entry.flags & PODSTEER_POD_HAS_IP4) j["ip4"] = format_ip(in_addr{p.entry.ip4});
  if (p.entry.flags & PODSTEER_POD_HAS_IP6) j["ip6"] = format_ip16(p.entry.ip6);
  return j;
}

std::string yes_no(bool b) { return b ? "yes" : "NO"; }

int cmd_proxy(Datapath& dp, const std::string& what, uint32_t pid, const std::string& cgroup) {
  if (what == "list") {
    auto px = dp.proxies();
    if (!px) return fail(px.error());
    fmt::print("proxy identity: {}\n", dp.proxy_identity() == NodeConfig::ProxyIdentity::Mark ? "mark" : "process");
    for (const auto& p : *px)
      fmt::print("{} cgroup id {}{}\n", p.pid ? fmt::format("pid {}", p.pid) : std::string("by hand:"), p.cgroup_id,
                 still_running(p) ? "" : " (gone)");
    return 0;
  }
  auto p = cgroup.empty() ? proxy_process_of(pid) : proxy_cgroup_of(cgroup);
  if (what == "trust") {
    if (!p) return fail(p.error());
    auto st = dp.trust_proxy(*p);
    if (!st) return fail(st.error());
    if (p->pid) fmt::print("trusted pid {} (cgroup {}, id {})\n", p->pid, p->cgroup, p->cgroup_id);
    else fmt::print("trusted cgroup {} (id {}) until forgotten\n", p->cgroup, p->cgroup_id);
    return 0;
  }
  // forget: by the entry's pid, also when the process is gone, or by its cgroup
  auto px = dp.proxies();
  if (!px) return fail(px.error());
  for (const auto& e : *px)
    if (cgroup.empty() ? e.pid == pid : p && e.cgroup_id == p->cgroup_id) {
      auto st = dp.forget_proxy(e.cgroup_id);
      if (!st) return fail(st.error());
      fmt::print("forgot pid {} (cgroup id {})\n", pid, e.cgroup_id);
      return 0;
    }
  return fail(invalid(cgroup.empty() ? fmt::format("no trusted proxy with pid {}", pid) : "no trusted proxy in cgroup " + cgroup,
                      "", ErrorCode::kNotFound));
}

// The agent's own view (GET /status on its loopback listener): its version, the proxies
// connected to it, the Kubernetes watch, the CNI chain. Unreachable is said, not an error:
// the datapath works without the agent.
json agent_status(const std::string& url) {
  if (url.empty() || url == "none") return nullptr;
  httplib::Client cli(url);
  cli.set_connection_timeout(1);
  cli.set_read_timeout(3);
  auto r = cli.Get("/status");
  if (!r) return {{"reachable", false}, {"url", url}, {"error", httplib::to_string(r.error())}};
  if (r->status != 200) return {{"reachable", false}, {"url", url}, {"error", fmt::format("HTTP {}", r->status)}};
  auto j = json::parse(r->body, nullptr, false);
  if (!j.is_object()) return {{"reachable", false}, {"url", url}, {"error", "the answer is not a JSON object"}};
  j["reachable"] = true;
  j["url"] = url;
  return j;
}

// Unix ms as UTC ISO 8601 to the second ("never" for 0)
std::string utc(int64_t ms) {
  if (ms <= 0) return "never";
  time_t t = static_cast<time_t>(ms / 1000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

void print_agent(const json& a) {
  if (a.is_null()) return;
  if (!a.value("reachable", false)) {
    fmt::print("agent       not reachable at {} ({}): the datapath below works without it\n", a.value("url", ""),
               a.value("error", ""));
    return;
  }
  fmt::print("agent       {} pid {}, up since {}, {}{}\n", a.value("version", "?"), a.value("pid", 0),
             utc(a.value("started_ms", int64_t(0))),
             a.value("ready", false) ? "ready" : "NOT READY: " + a.value("not_ready", std::string()),
             a.value("healthy", true) ? "" : ", UNHEALTHY: " + a.value("not_healthy", std::string()));
  const auto& px = a.contains("proxies") && a["proxies"].is_array() ? a["proxies"] : json::array();
  fmt::print("proxies     {} connected on {}, each told {} workload(s){}", px.size(), a.value("zds_socket", ""),
             a.value("workloads", 0), px.empty() ? ": new ambient pods wait for one\n" : "\n");
  for (const auto& p : px)
    fmt::print("            #{} {} pid {} since {}, {} ack(s), last {}\n", p.value("id", 0), p.value("name", "?"),
               p.value("pid", 0), utc(p.value("since_ms", int64_t(0))), p.value("acks", 0),
               utc(p.value("last_ack_ms", int64_t(0))));
  if (a.contains("kube") && a["kube"].is_object()) {
    const auto& k = a["kube"];
    fmt::print("kubernetes  node {}: {}, last event {}, {} malformed event(s), {} relist(s)\n", k.value("node", ""),
               k.value("synced", false) ? (k.value("reconciled", false) ? "synced" : "synced, first pass not done")
                                        : "NOT SYNCED",
               utc(k.value("last_event_ms", int64_t(0))), k.value("event_errors", 0), k.value("relists", 0));
  } else {
    fmt::print("kubernetes  not watched (pods come from CNI requests only)\n");
  }
  if (a.contains("cni") && a["cni"].is_object()) {
    const auto& c = a["cni"];
    if (c.contains("error"))
      fmt::print("cni chain   {}: {}\n", c.value("conf_dir", ""), c.value("error", ""));
    else
      fmt::print("cni chain   {}: {} ({})\n", c.value("file", ""),
                 fmt::join(c.value("plugins", std::vector<std::string>{}), " -> "),
                 c.value("chained", false) ? "podsteer-cni chained last"
                                           : (c.value("install", false) ? "NOT CHAINED" : "not chained: not installed by the agent"));
  }
}

int cmd_status(Datapath& dp, bool as_json, const std::string& agent_url) {
  json agent = agent_status(agent_url);
  auto pods = dp.pods();
  if (!pods) return fail(pods.error());
  auto links = dp.cgroup_links();
  if (!links) return fail(links.error());
  const auto& c = dp.config();
  if (as_json) {
    json out;
    out["state_dir"] = dp.state_dir();
    out["hook_cgroup"] = c.hook_cgroup;
    out["versions"] = {{"cli", kVersion}, {"programs_id", fmt::format("{:016x}", c.programs_id)}};
    if (agent.value("reachable", false)) out["versions"]["agent"] = agent.value("version", "");
    out["config"] = {{"outbound_port", c.outbound_port}, {"inbound_port", c.inbound_port},
                     {"hbone_port", c.hbone_port},       {"dns_port", c.dns_port},
                     {"proxy_mark", c.proxy_mark},       {"proxy_mark_mask", c.proxy_mark_mask},
                     {"app_mark", c.app_mark},           {"route_table", c.route_table},
                     {"rule_pref", c.rule_pref},         {"abi_version", c.abi_version}};
    json jl = json::array();
    for (const auto& l : *links)
      jl.push_back({{"program", l.program}, {"link_id", l.link_id}, {"prog_id", l.prog_id}, {"cgroup_id", l.cgroup_id}});
    out["cgroup_links"] = jl;
    out["missing_hooks"] = dp.missing_hooks();
    auto ev = dp.events();
    auto full = dp.full();
    out["events"] = {{"stash_migrated", ev.stash_migrated}, {"stash_missing", ev.stash_missing},
                     {"orig_full", full.orig},            {"transit_full", full.transit}};
    json jp = json::array();
    for (const auto& p : *pods) jp.push_back(pod_json(p));
    out["pods"] = jp;
    out["proxy_identity"] = dp.proxy_identity() == NodeConfig::ProxyIdentity::Mark ? "mark" : "process";
    json jx = json::array();
    if (auto px = dp.proxies(); px)
      for (const auto& p : *px)
        jx.push_back({{"cgroup_id", p.cgroup_id}, {"pid", p.pid}, {"running", still_running(p)}});
    out["proxies"] = jx;
    out["agent"] = agent;
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  fmt::print("state dir   {} (map ABI {})\n", dp.state_dir(), c.abi_version);
  // (opening the state has upgraded programs an earlier build pinned: they are this build's now)
  fmt::print("versions    cli {}, pinned programs {:016x}{}\n", kVersion, c.programs_id,
             agent.value("reachable", false) ? ", agent " + agent.value("version", std::string("?")) : "");
  print_agent(agent);
  fmt::print("hook cgroup {}\n", c.hook_cgroup);
  auto ev = dp.events();
  fmt::print("connect4 -> sock_ops handoffs found on another CPU {}, missing {}\n", ev.stash_migrated, ev.stash_missing);
  if (auto full = dp.full(); full.orig || full.transit)
    fmt::print("TABLES FULL: {} outbound connection(s) got no podsteer_orig entry (the proxy refuses them), {} inbound "
               "no podsteer_transi entry (they came back to the proxy)\n",
               full.orig, full.transit);
  if (auto gone = dp.missing_hooks(); !gone.empty())
    fmt::print("socket hooks NOT ATTACHED: {} (podsteer-agent puts them back within a second)\n",
               fmt::join(gone, ", "));
  fmt::print("listeners   outbound {}  inbound {}  hbone {} (never redirected)  dns 127.0.0.1/[::1]:{}  proxy mark {:#x}/{:#x}\n",
             c.outbound_port, c.inbound_port, c.hbone_port, c.dns_port, c.proxy_mark, c.proxy_mark_mask);
  fmt::print("return path app mark {:#x}/{:#x} -> rule pref {} -> table {} (local default route)\n", c.app_mark,
             c.proxy_mark_mask, c.rule_pref, c.route_table);
  if (dp.proxy_identity() == NodeConfig::ProxyIdentity::Mark) {
    fmt::print("proxy       whoever sets the proxy mark (--proxy-identity mark)\n");
  } else {
    std::string who;
    if (auto px = dp.proxies(); px)
      for (const auto& p : *px)
        who += fmt::format(" {} (cgroup id {}{})", p.pid ? fmt::format("pid {}", p.pid) : std::string("by hand"),
                           p.cgroup_id, still_running(p) ? "" : ", GONE");
    fmt::print("proxy       a node proxy's process with the proxy mark:{}\n", who.empty() ? " none known yet" : who);
  }
  fmt::print("socket hooks ({} bpf_links at the hook cgroup):", links->size());
  for (const auto& l : *links) fmt::print(" {}[link {}]", l.program.substr(sizeof("podsteer_") - 1), l.link_id);
  fmt::print("\n\n{} pod(s) enrolled\n", pods->size());
  for (const auto& p : *pods) {
    auto j = pod_json(p);
    std::string name = p.full_name();
    fmt::print("- {} netns {} (cookie {}{}){}\n", name.empty() ? "(unnamed)" : name, p.meta.netns_path, p.cookie,
               p.netns_alive ? "" : ", GONE", p.has_entry ? "" : " [half-removed: run unenroll]");
    fmt::print("    addresses {}  {}\n", json(p.addresses).dump(), flags_text(p.entry.flags));
    fmt::print("    inbound: sk_lookup link {} attached {}  proxy listening {}\n", p.inbound.link_id,
               yes_no(p.inbound.attached), yes_no(p.inbound.proxy_listening));
    auto hooks = [](const std::vector<TcHook>& tc) {
      std::string out;
      for (const auto& h : tc)
        out += fmt::format(" ifindex {} {} {} attached {}", h.ifindex, h.mode,
                           h.mode == "tcx" ? fmt::format("link {}", h.id) : fmt::format("prio {:#x} prog {}", h.prio, h.id),
                           yes_no(h.attached));
      return out.empty() ? std::string(" none") : out;
    };
    fmt::print("    node-opened connections (tc ingress):{}\n", hooks(p.inbound.node_in));
    fmt::print("    unsteered connections (tc egress):{}\n", hooks(p.inbound.pod_out));
    const auto& rp = p.return_path;
    fmt::print("    return path: rule v4 {} v6 {}  local route v4 {} v6 {}  tcp_fwmark_accept={}\n", yes_no(rp.rule4),
               rp.ipv6 ? yes_no(rp.rule6) : "-", yes_no(rp.route4), rp.ipv6 ? yes_no(rp.route6) : "-", rp.fwmark_accept);
    auto missing = p.missing();
    if (!missing.empty()) fmt::print("    NOT WHOLE, missing: {}\n", fmt::join(missing, ", "));
    if (!p.excluded_inbound_ports.empty() || !p.excluded_outbound_ports.empty() || !p.excluded_cidrs.empty())
      fmt::print("    excluded: inbound ports {} outbound ports {} outbound cidrs {}\n",
                 json(p.excluded_inbound_ports).dump(), json(p.excluded_outbound_ports).dump(),
                 p.excluded_cidrs.size() > 8 ? fmt::format("({} entries)", p.excluded_cidrs.size())
                                             : json(p.excluded_cidrs).dump());
    fmt::print("    counters: out {}  in {}  dns {}  bypassed {}  proxy missing {}\n", p.counters.redirected_out,
               p.counters.redirected_in, p.counters.dns_redirected, p.counters.bypassed, p.counters.proxy_missing);
    if (p.guard.forged_mark || p.guard.bind_refused)
      fmt::print("    GUARDS: {} connection(s) with the proxy mark by a process not the proxy's (captured), {} bind(s) "
                 "to a proxy port refused\n",
                 p.guard.forged_mark, p.guard.bind_refused);
    if (p.hole.dropped)
      fmt::print("    HOLE: {} TCP connection(s) left the pod unsteered (not from a proxy, not excluded: a process outside "
                 "the hook cgroup, or socket hooks detached): stopped at the interface\n",
                 p.hole.dropped);
    if (p.hole.passed)
      fmt::print("    unsteered: {} TCP connection(s) went direct while the proxy was not listening (fail-open)\n",
                 p.hole.passed);
  }
  return 0;
}

template <typename K, typename V>
int dump_map(const std::string& state_dir, const std::string& name, const std::function<json(const K&, const V&)>& fmt_entry) {
  std::string pin = map_pin(state_dir, name);
  fmt::print("== {}   (bpftool map dump pinned {})\n", name, pin);
  auto m = Map<K, V>::open(pin);
  if (!m) return fail(m.error());
  auto keys = m->keys();
  if (!keys) return fail(keys.error());
  for (const auto& k : *keys) {
    auto v = m->lookup(k);
    if (v && v->has_value()) fmt::print("{}\n", fmt_entry(k, **v).dump());
  }
  fmt::print("({} entries)\n", keys->size());
  return 0;
}

int cmd_dump(Datapath& dp, const std::string& which) {
  const std::string& sd = dp.state_dir();
  auto want = [&](const char* n) { return which.empty() || which == n || which == std::string("podsteer_") + n; };
  bool any = false;
  int rc = 0;
  auto pods = dp.pods();
  if (!pods) return fail(pods.error());
  if (want("pods")) {
    any = true;
    rc |= dump_map<__u64, podsteer_pod>(sd, "podsteer_pods", [](const __u64& k, const podsteer_pod& v) {
      json j = {{"netns_cookie", k}, {"flags", flags_text(v.flags)}};
      if (v.flags & PODSTEER_POD_HAS_IP4) j["ip4"] = format_ip(in_addr{v.ip4});
      if (v.flags & PODSTEER_POD_HAS_IP6) j["ip6"] = format_ip16(v.ip6);
      return j;
    });
  }
  if (want("meta")) {
    any = true;
    rc |= dump_map<__u64, podsteer_pod_meta>(sd, "podsteer_meta", [](const __u64& k, const podsteer_pod_meta& v) {
      return json{{"netns_cookie", k},          {"namespace", v.namespace_},
                  {"name", v.name},              {"uid", v.uid},
                  {"service_account", v.service_account}, {"container_id", v.container_id},
                  {"netns", v.netns_path},       {"netns_setup", v.netns_setup},
                  {"fwmark_accept_before", v.fwmark_accept_before}};
    });
  }
  if (want("ports")) {
    any = true;
    rc |= dump_map<podsteer_port_key, __u8>(sd, "podsteer_ports", [](const podsteer_port_key& k, const __u8&) {
      return json{{"netns_cookie", k.netns_cookie}, {"port", k.port},
                  {"direction", k.direction == PODSTEER_DIR_INBOUND ? "inbound" : "outbound"}};
    });
  }
  if (want("cidrs")) {
    any = true;
    rc |= dump_map<podsteer_cidr_key, __u8>(sd, "podsteer_cidrs", [](const podsteer_cidr_key& k, const __u8&) {
      uint64_t cookie = cookie_of(k);
      unsigned plen = k.prefixlen - PODSTEER_CIDR_COOKIE_BITS;
      in6_addr a6;
      std::memcpy(&a6, k.addr, 16);
      bool v4 = IN6_IS_ADDR_V4MAPPED(&a6) && plen >= 96;
      return json{{"netns_cookie", cookie}, {"cidr", fmt::format("{}/{}", format_ip16(k.addr), v4 ? plen - 96 : plen)}};
    });
  }
  if (want("stats")) {
    any = true;
    fmt::print("== podsteer_stats   (bpftool map dump pinned {})\n", map_pin(sd, "podsteer_stats"));
    for (const auto& p : *pods) fmt::print("{}\n", json{{"netns_cookie", p.cookie}, {"counters", pod_json(p)["counters"]}}.dump());
  }
  if (want("orig")) {
    any = true;
    rc |= dump_map<podsteer_origdst_key, podsteer_addr>(sd, "podsteer_orig",
                                                        [](const podsteer_origdst_key& k, const podsteer_addr& v) {
      return json{{"netns_cookie", k.netns_cookie},
                  {"peer", fmt::format("{}:{}", format_ip16(k.peer_addr), k.peer_port)},
                  {"listener_port", k.local_port},
                  {"original_dst", fmt::format("{}:{}", format_ip16(v.addr), ntohs(v.port))}};
    });
  }
  if (want("listeners")) {
    any = true;
    rc |= dump_map<podsteer_listener_key, __u64>(sd, "podsteer_listen",
                                                [](const podsteer_listener_key& k, const __u64& socket_cookie) {
      return json{{"netns_cookie", k.netns_cookie}, {"port", k.port},
                  {"family", k.family == AF_INET6 ? "inet6" : "inet"}, {"socket_cookie", socket_cookie}};
    });
  }
  if (want("transit")) {
    any = true;
    rc |= dump_map<podsteer_tuple_key, __u8>(sd, "podsteer_transi", [](const podsteer_tuple_key& k, const __u8&) {
      return json{{"netns_cookie", k.netns_cookie},
                  {"app", fmt::format("{}:{}", format_ip16(k.dst_addr), k.dst_port)},
                  {"from", fmt::format("{}:{}", format_ip16(k.src_addr), k.src_port)}};
    });
  }
  if (want("node")) {
    any = true;
    rc |= dump_map<podsteer_tuple_key, __u64>(sd, "podsteer_node", [](const podsteer_tuple_key& k, const __u64& syn_ns) {
      return json{{"netns_cookie", k.netns_cookie},
                  {"app", fmt::format("{}:{}", format_ip16(k.dst_addr), k.dst_port)},
                  {"from_node", fmt::format("{}:{}", format_ip16(k.src_addr), k.src_port)},
                  {"syn_ktime_ns", syn_ns}};
    });
  }
  if (want("netns")) {
    // not a map: what enroll made in each pod's netns (ip rule / ip route / sysctl)
    any = true;
    fmt::print("== pod netns setup   (nsenter --net=NETNS ip rule; ip route show table {}; sysctl "
               "net.ipv4.tcp_fwmark_accept)\n", dp.config().route_table);
    for (const auto& p : *pods)
      fmt::print("{}\n", json{{"netns_cookie", p.cookie}, {"netns", p.meta.netns_path},
                               {"return_path", return_path_json(p)}}.dump());
  }
  if (want("config")) {
    any = true;
    rc |= dump_map<__u32, podsteer_config>(sd, "podsteer_config", [](const __u32&, const podsteer_config& c) {
      return json{{"abi_version", c.abi_version}, {"outbound_port", c.outbound_port}, {"inbound_port", c.inbound_port},
                  {"hbone_port", c.hbone_port}, {"dns_port", c.dns_port},
                  {"proxy_mark", fmt::format("{:#x}", c.proxy_mark)},
                  {"proxy_mark_mask", fmt::format("{:#x}", c.proxy_mark_mask)},
                  {"app_mark", fmt::format("{:#x}", c.app_mark)}, {"route_table", c.route_table},
                  {"rule_pref", c.rule_pref}, {"hook_cgroup", c.hook_cgroup}};
    });
  }
  if (want("skorig")) {
    any = true;
    fmt::print("== podsteer_skorig   (socket storage: lives on each captured socket; the kernel does not let "
               "userspace list it)\n");
  }
  if (!any) {
    spdlog::error("unknown map '{}': one of pods, meta, ports, cidrs, stats, orig, skorig, listeners, transit, netns, config",
                  which);
    return 1;
  }
  return rc;
}

int cmd_doctor(const std::string& state_dir) {
  bool ok = true;
  for (const auto& f : probe_features(state_dir)) {
    if (f.ok) {
      fmt::print("ok       {:<24} {}\n", f.name, f.detail);
    } else {
      if (f.required) ok = false;
      fmt::print("{} {:<24} {}\n         why it matters: {}\n", f.required ? "MISSING " : "optional", f.name, f.detail, f.why);
    }
  }
  fmt::print("{}", ok ? "\nthis kernel can run podsteer\n" : "\nthis kernel cannot run podsteer: see MISSING above\n");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"podsteer: in-pod traffic redirection for ambient service meshes, with eBPF"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(kVersion));
  std::string state_dir = "/sys/fs/bpf/podsteer";
  NodeConfig node;
  bool verbose = false;
  app.add_option("--state-dir", state_dir, "bpffs directory of our pins")->capture_default_str();
  app.add_option("--tc-mode", node.tc_mode,
                 "how a pod's TC program attaches: clsact (cls_bpf, every kernel) or tcx (6.6+; each attach "
                 "waits for an RCU grace period)")
      ->transform(CLI::CheckedTransformer(std::map<std::string, TcMode>{{"clsact", TcMode::Clsact}, {"tcx", TcMode::Tcx}}));
  app.add_option("--node-netns", node.node_netns,
                 "the node's netns: connections whose socket exists there (kubelet probes) reach the app "
                 "(default: this command's own)");
  app.add_option("--hook-cgroup", node.hook_cgroup,
                 "cgroup v2 directory for the socket hooks (default: kubepods cgroup if present, else the cgroup2 "
                 "root); taken when the state dir is created, remembered after");
  // ports and marks: chosen when the state dir is created; given later, they must match it
  NodeFlags node_flags(app, node, false);
  app.add_flag("-v,--verbose", verbose, "debug output, including libbpf's and the verifier's");

  auto* enroll = app.add_subcommand("enroll", "capture a pod's traffic");
  std::string netns, pod, in_ports, out_ports, out_cidrs;
  bool dns = false, fail_open = false, bypass_inbound = false;
  enroll->add_option("--netns", netns, "the pod's network namespace (e.g. /var/run/netns/NAME, /proc/PID/ns/net)")->required();
  enroll->add_option("--pod", pod, "NAMESPACE/NAME, for status");
  enroll->add_option("--exclude-inbound-ports", in_ports, "P,P,...: inbound ports that go straight to the app");
  enroll->add_option("--exclude-outbound-ports", out_ports, "P,P,...: destination ports that bypass the proxy");
  enroll->add_option("--exclude-outbound-cidrs", out_cidrs, "CIDR,...: destinations that bypass the proxy");
  std::string cidrs_file;
  enroll->add_option("--exclude-outbound-cidrs-file", cidrs_file,
                     "file of more CIDRs (commas or one per line), for lists too long for a command line")
      ->check(CLI::ExistingFile);
  enroll->add_flag("--dns", dns, "redirect DNS (UDP and TCP 53) to 127.0.0.1:DNS port");
  enroll->add_flag("--fail-open", fail_open, "if the proxy is not listening, go direct instead of refusing");
  enroll->add_flag("--bypass-inbound", bypass_inbound,
                   "capture outbound only; inbound goes straight to the app (Istio's bypass-inbound-capture)");

  auto* unenroll = app.add_subcommand("unenroll", "stop capturing a pod's new connections");
  std::string un_netns;
  unenroll->add_option("--netns", un_netns, "the netns path given to enroll")->required();

  auto* status = app.add_subcommand("status", "enrolled pods, attach points, counters");
  bool as_json = false;
  status->add_flag("--json", as_json, "machine-readable output");
  std::string agent_url = "http://127.0.0.1:15099";
  status->add_option("--agent", agent_url, "the agent's loopback listener, for its view (\"none\": skip)")
      ->capture_default_str();

  auto* dump = app.add_subcommand("dump", "readable map contents");
  std::string dump_which;
  dump->add_option("MAP", dump_which, "pods, meta, ports, cidrs, stats, orig, skorig, listeners, transit, node, netns or config");

  auto* proxy = app.add_subcommand("proxy", "the node proxies' processes trusted with the proxy mark");
  auto* trust = proxy->add_subcommand("trust", "trust a proxy's process (the agent does this for its ZDS peers)");
  auto* forget = proxy->add_subcommand("forget", "stop trusting a proxy's process");
  uint32_t proxy_pid = 0;
  std::string proxy_cg;
  for (auto* c : {trust, forget}) {
    auto* by_pid = c->add_option("--pid", proxy_pid, "the proxy's pid (every process in its cgroup is trusted)");
    auto* by_cg = c->add_option("--cgroup", proxy_cg, "a cgroup v2 directory whose processes are trusted (until forgotten)");
    by_pid->excludes(by_cg);
    c->require_option(1);
  }

  auto* doctor = app.add_subcommand("doctor", "kernel feature checks");
  auto* uninstall = app.add_subcommand("uninstall", "remove every program, link, pin and filter of ours");
  cni::InstallOptions cni_opts;
  std::string cni_conf_dir, cni_bin_dir;
  uninstall->add_option("--cni-conf-dir", cni_conf_dir, "also remove podsteer-cni from the conflists here");
  uninstall->add_option("--cni-bin-dir", cni_bin_dir, "also remove the podsteer-cni binary from here");

  CLI11_PARSE(app, argc, argv);
  node_flags.record(node);
  init_logging(verbose);

  if (*doctor) return cmd_doctor(state_dir);
  if (*uninstall) {
    auto st = Datapath::uninstall(state_dir);
    if (!st) return fail(st.error());
    if (!cni_conf_dir.empty() || !cni_bin_dir.empty()) {
      // only where asked: a test's state dir must not take the node's CNI config with it
      cni_opts.conf_dir = cni_conf_dir;
      cni_opts.bin_dir = cni_bin_dir;
      auto c = cni::uninstall(cni_opts);
      if (!c) return fail(c.error());
      fmt::print("removed podsteer-cni from {} {}\n", cni_conf_dir, cni_bin_dir);
    }
    fmt::print("removed {}\n", state_dir);
    return 0;
  }

  if (*enroll) {
    // Validate everything before touching the kernel: bad input changes nothing.
    PodOptions opts;
    opts.dns = dns;
    opts.fail_open = fail_open;
    opts.bypass_inbound = bypass_inbound;
    if (!pod.empty()) {
      auto slash = pod.find('/');
      if (slash == std::string::npos || slash == 0 || slash + 1 == pod.size() || pod.find('/', slash + 1) != std::string::npos)
        return fail(invalid("--pod must be NAMESPACE/NAME", pod));
      opts.namespace_ = pod.substr(0, slash);
      opts.name = pod.substr(slash + 1);
    }
    auto ip = parse_ports(in_ports);
    if (!ip) return fail(ip.error().in("--exclude-inbound-ports"));
    auto op = parse_ports(out_ports);
    if (!op) return fail(op.error().in("--exclude-outbound-ports"));
    if (!cidrs_file.empty()) {
      std::ifstream in(cidrs_file);
      std::string line;
      while (std::getline(in, line)) {
        line.erase(std::remove_if(line.begin(), line.end(), ::isspace), line.end());
        if (line.empty() || line[0] == '#') continue;
        out_cidrs += (out_cidrs.empty() ? "" : ",") + line;
      }
    }
    auto oc = parse_cidrs(out_cidrs);
    if (!oc) return fail(oc.error().in("--exclude-outbound-cidrs"));
    opts.exclude_inbound_ports = *ip;
    opts.exclude_outbound_ports = *op;
    opts.exclude_outbound_cidrs = *oc;
    auto ns = open_netns(netns);
    if (!ns) return fail(ns.error());
    auto dp = Datapath::open(state_dir, node, true);
    if (!dp) return fail(dp.error());
    auto r = dp->enroll(*ns, opts);
    if (!r && r.error().is(ErrorCode::kReplaced)) {
      // another process uninstalled between our open and our enroll: once more, afresh
      dp = Datapath::open(state_dir, node, true);
      if (!dp) return fail(dp.error());
      r = dp->enroll(*ns, opts);
    }
    if (!r) return fail(r.error());
    // a proxy already listening in the pod (started before this enroll) takes inbound now
    if (auto st = dp->find_listeners(*ns); !st)
      spdlog::warn("could not look for a proxy already listening in the pod: {}", st.error().message());
    const char* what = *r == EnrollOutcome::Enrolled ? "enrolled" : *r == EnrollOutcome::Updated ? "updated" : "already enrolled, unchanged:";
    fmt::print("{} {} (netns {}, cookie {})\n", what, pod.empty() ? "pod" : pod, netns, ns->cookie);
    return 0;
  }

  // trusting a proxy may come before the first enroll: it installs
  auto dp = Datapath::open(state_dir, node, proxy->parsed() && *trust);
  if (!dp) return fail(dp.error());
  if (*unenroll) {
    auto cookie = dp->find_pod(un_netns);
    if (!cookie) return fail(cookie.error());
    auto st = dp->unenroll(*cookie);
    if (!st) return fail(st.error());
    fmt::print("unenrolled netns {} (cookie {})\n", un_netns, *cookie);
    return 0;
  }
  if (*status) return cmd_status(*dp, as_json, agent_url);
  if (*proxy) return cmd_proxy(*dp, *trust ? "trust" : *forget ? "forget" : "list", proxy_pid, proxy_cg);
  if (*dump) return cmd_dump(*dp, dump_which);
  return 0;
}
