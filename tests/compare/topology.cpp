#include "topology.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#ifndef ISTIO_INPOD_SCRIPT
#error "ISTIO_INPOD_SCRIPT must be defined by the build"
#endif

namespace podsteer::test {

const char* mode_name(Mode m) { return m == Mode::Podsteer ? "podsteer" : "istio"; }

Topology::Topology(Mode m) : mode(m) {
  id = unique_id();
  std::string p = "pst-" + id;
  node1 = p + "-n1";
  node2 = p + "-n2";
  app = p + "-app";
  peer = p + "-peer";
  node_cgroup = cgroup2_root() + "/podsteer-test-" + id;
  cgroup = node_cgroup + "/pods";
  proxy_cgroup = cgroup + "/proxy";
  app_cgroup = cgroup + "/app";
  peer_cgroup = cgroup + "/peer";
  state_dir = "/sys/fs/bpf/podsteer-test-" + id;
  for (const auto& d : {node_cgroup, cgroup, proxy_cgroup, app_cgroup, peer_cgroup})
    EXPECT_EQ(mkdir(d.c_str(), 0755), 0) << d;
  std::string script = fmt::format(
      "set -e\n"
      // no IPv6 duplicate address detection: link-local addresses would stay tentative for
      // a second after setup, and the first connections with them
      "for n in {n1} {n2} {app} {peer}; do ip netns add $n; ip -n $n link set lo up\n"
      "  nsenter --net=/var/run/netns/$n sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0; done\n"
      "ip -n {n1} link add br0 type bridge && ip -n {n1} link set br0 up\n"
      "ip -n {n1} addr add {gw4}/24 dev br0 && ip -n {n1} addr add {gw6}/64 dev br0 nodad\n"
      "pod() {{ ip -n $1 link add eth0 type veth peer name v-$2 netns {n1}\n"
      "  ip -n {n1} link set v-$2 master br0 up\n"
      "  ip -n $1 addr add $3/24 dev eth0 && ip -n $1 addr add $4/64 dev eth0 nodad && ip -n $1 link set eth0 up\n"
      "  ip -n $1 route add default via {gw4} && ip -n $1 -6 route add default via {gw6}; }}\n"
      "pod {app} app {app4} {app6}\n"
      "pod {peer} peer {peer4} {peer6}\n"
      "ip -n {n1} link add to-n2 type veth peer name eth0 netns {n2}\n"
      "ip -n {n1} addr add 10.215.0.1/24 dev to-n2 && ip -n {n1} addr add fd00:215::1/64 dev to-n2 nodad\n"
      "ip -n {n2} addr add {n2_4}/24 dev eth0 && ip -n {n2} addr add {n2_6}/64 dev eth0 nodad\n"
      "ip -n {n1} link set to-n2 up && ip -n {n2} link set eth0 up\n"
      "ip -n {n2} route add 10.214.0.0/24 via 10.215.0.1 && ip -n {n2} -6 route add fd00:214::/64 via fd00:215::1\n"
      "nsenter --net=/var/run/netns/{n1} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n"
      // the kubelet probe source lives on node2, as a host-side SNAT would make it
      "ip -n {n2} addr add 169.254.7.127/32 dev eth0 && ip -n {n2} addr add fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 dev eth0 nodad\n"
      "ip -n {n1} route add 169.254.7.127/32 via {n2_4} && ip -n {n1} -6 route add fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 via {n2_6}\n",
      fmt::arg("n1", node1), fmt::arg("n2", node2), fmt::arg("app", app), fmt::arg("peer", peer), fmt::arg("gw4", gw4),
      fmt::arg("gw6", gw6), fmt::arg("app4", app4), fmt::arg("app6", app6), fmt::arg("peer4", peer4),
      fmt::arg("peer6", peer6), fmt::arg("n2_4", node2_4), fmt::arg("n2_6", node2_6));
  auto r = run({"/bin/bash", "-c", script});
  EXPECT_EQ(r.rc, 0) << "topology setup: " << r.out;
}

Topology::~Topology() {
  if (mode == Mode::Podsteer) {
    auto r = run({podsteer_bin(), "--state-dir", state_dir, "uninstall"});
    if (r.rc != 0) ADD_FAILURE() << "uninstall: " << r.out;
  }
  for (const auto& cg : {proxy_cgroup, app_cgroup, peer_cgroup, cgroup, node_cgroup}) kill_cgroup(cg);
  for (const auto& n : {app, peer, node2, node1}) sh("ip netns del " + n + " 2>/dev/null");
}

std::vector<std::string> Topology::podsteer_argv0() const {
  return {podsteer_bin(), "--state-dir", state_dir, "--hook-cgroup", cgroup, "--node-netns", netns(node1)};
}

CmdResult Topology::podsteer(const std::vector<std::string>& args) {
  auto argv = podsteer_argv0();
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run(argv);
  trust_.settle(state_dir, podsteer_argv0());
  return r;
}

void Topology::capture(bool dns, const std::vector<std::string>& extra) {
  if (mode == Mode::Podsteer) {
    std::vector<std::string> args = {"enroll", "--netns", netns(app), "--pod", "default/app"};
    if (dns) args.push_back("--dns");
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = podsteer(args);
    ASSERT_EQ(r.rc, 0) << r.out;
  } else {
    std::vector<std::string> argv = {ISTIO_INPOD_SCRIPT, "apply", netns(app)};
    if (dns) argv.push_back("--dns");
    auto r = run(argv);
    ASSERT_EQ(r.rc, 0) << r.out;
    // and istio-cni's rule in the node's netns: what the node itself opens to an ambient
    // pod comes from 169.254.7.127, which the in-pod rules leave to the app
    r = run({ISTIO_INPOD_SCRIPT, "host", netns(node1), app4, app6});
    ASSERT_EQ(r.rc, 0) << r.out;
  }
}

std::unique_ptr<Peer> Topology::start_proxy(const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", netns(app), "--cgroup", proxy_cgroup, "proxy", "--mark", "0x539"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  if (mode == Mode::Podsteer) trust_.add(proxy_cgroup, state_dir, podsteer_argv0());
  auto p = std::make_unique<Peer>(argv);
  EXPECT_FALSE(p->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null()) << p->output();
  return p;
}

std::unique_ptr<Peer> Topology::start_server(const std::string& netns_name, int port, const std::string& addr) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", netns(netns_name)};
  if (netns_name == app) argv.insert(argv.end(), {"--cgroup", app_cgroup});
  if (netns_name == peer) argv.insert(argv.end(), {"--cgroup", peer_cgroup});
  argv.insert(argv.end(), {"serve", "--port", std::to_string(port)});
  if (!addr.empty()) argv.insert(argv.end(), {"--addr", addr});
  auto p = std::make_unique<Peer>(argv);
  EXPECT_FALSE(p->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null()) << p->output();
  return p;
}

std::unique_ptr<Peer> Topology::start_app(int port, const std::string& addr) { return start_server(app, port, addr); }

void Topology::node_port(int node_port, int app_port) {
  std::string rules = fmt::format(
      "set -e\n"
      "nsenter --net={n1} iptables -w -t nat -A PREROUTING -p tcp -d 10.215.0.1 --dport {np} -j DNAT --to-destination {a4}:{ap}\n"
      "nsenter --net={n1} iptables -w -t nat -A POSTROUTING -p tcp -d {a4} --dport {ap} -j MASQUERADE\n"
      "nsenter --net={n1} ip6tables -w -t nat -A PREROUTING -p tcp -d fd00:215::1 --dport {np} -j DNAT --to-destination [{a6}]:{ap}\n"
      "nsenter --net={n1} ip6tables -w -t nat -A POSTROUTING -p tcp -d {a6} --dport {ap} -j MASQUERADE\n",
      fmt::arg("n1", netns(node1)), fmt::arg("np", node_port), fmt::arg("ap", app_port), fmt::arg("a4", app4),
      fmt::arg("a6", app6));
  auto r = run({"/bin/bash", "-c", rules});
  ASSERT_EQ(r.rc, 0) << r.out;
}

std::vector<std::string> Topology::client_argv(From from) const {
  switch (from) {
    case From::Node:
      return {testpeer_bin(), "--netns", netns(node1)};
    case From::OtherNode:
      return {testpeer_bin(), "--netns", netns(node2)};
    case From::SameNodePod:
      return {testpeer_bin(), "--netns", netns(peer), "--cgroup", peer_cgroup};
    case From::AppPod:
      return {testpeer_bin(), "--netns", netns(app), "--cgroup", app_cgroup};
  }
  return {};
}

json Topology::connect(From from, const std::string& to, int port, const std::vector<std::string>& extra) {
  auto argv = client_argv(from);
  argv.insert(argv.end(), {"connect", "--to", to, "--port", std::to_string(port), "--timeout-ms", "2000"});
  if (std::find(extra.begin(), extra.end(), "--send") == extra.end()) argv.insert(argv.end(), {"--send", "hello"});
  argv.insert(argv.end(), extra.begin(), extra.end());
  return peer_once(argv);
}

std::string host_of(const std::string& addr) {
  if (!addr.empty() && addr[0] == '[') return addr.substr(1, addr.find(']') - 1);
  return addr.substr(0, addr.rfind(':'));
}

std::string app_saw(const json& c) {
  std::string reply = c.value("reply", "");
  auto at = reply.find(" peer=");
  if (at == std::string::npos) return "";
  std::string peer = reply.substr(at + 6, reply.find(' ', at + 6) - at - 6);
  return host_of(peer);
}

// ---- the side-by-side report ----

namespace {

struct Row {
  std::string name;
  json podsteer, istio;
  bool reference_run = true, reference_holds = true, same = true;
};

std::mutex report_mu;
std::vector<Row>& rows() {
  static std::vector<Row> r;
  return r;
}

bool subset_of(const json& want, const json& got) {
  for (const auto& [k, v] : want.items())
    if (!got.contains(k) || got[k] != v) return false;
  return true;
}

class Report : public ::testing::Environment {
 public:
  void TearDown() override {
    std::lock_guard<std::mutex> g(report_mu);
    if (rows().empty()) return;
    json out = json::array();
    std::string table = "\ncase | podsteer | istio in-pod rules | same\n---|---|---|---\n";
    for (const auto& r : rows()) {
      json entry = {{"case", r.name}, {"podsteer", r.podsteer}, {"istio", r.istio}, {"reference_run", r.reference_run}};
      if (r.reference_run) entry.update({{"reference_holds", r.reference_holds}, {"same", r.same}});
      out.push_back(entry);
      table += fmt::format("{} | {} | {} | {}\n", r.name, r.podsteer.dump(), r.istio.dump(),
                           !r.reference_run      ? "reference not run"
                           : !r.reference_holds ? "reference does not hold"
                           : r.same             ? "yes"
                                                : "NO");
    }
    const char* path = getenv("PODSTEER_COMPARE_REPORT");
    std::string file = path ? path : std::string(program_invocation_short_name) + "-report.json";
    std::ofstream(file) << out.dump(2) << "\n";
    fprintf(stderr, "%s\n(written to %s)\n", table.c_str(), file.c_str());
  }
};
const auto* const kReport = ::testing::AddGlobalTestEnvironment(new Report);

}  // namespace

// PODSTEER_COMPARE_REFERENCE=skip runs podsteer's side alone, checked against the case's
// expected outcome (the emulated-kernel run: Istio's rules are netfilter's, not podsteer's,
// and the oracle already ran on this machine's kernel; each side costs ~40 s under TCG).
static bool reference_skipped() {
  const char* v = getenv("PODSTEER_COMPARE_REFERENCE");
  return v && std::string(v) == "skip";
}

void compare(const std::string& name, const Case& body, const json& expected) {
  const bool skip = reference_skipped();
  if (skip && expected.is_null()) {
    ADD_FAILURE() << name << ": no expected outcome, so nothing is checked without Istio's rules";
    return;
  }
  json obs[2];
  for (Mode m : {Mode::Podsteer, Mode::Istio}) {
    if (m == Mode::Istio && skip) continue;
    auto t0 = std::chrono::steady_clock::now();
    json& o = obs[m == Mode::Podsteer ? 0 : 1];
    {
      Topology t(m);
      o = body(t);
    }
    // one line per side as it ends: what a timed-out test did last is in its output
    fprintf(stderr, "compare: %s, under %s: %s (%.1f s)\n", name.c_str(),
            m == Mode::Podsteer ? "podsteer" : "Istio's rules", o.dump().c_str(),
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  Row row{name, obs[0], obs[1]};
  row.reference_run = !skip;
  if (row.reference_run) {
    row.reference_holds = expected.is_null() || subset_of(expected, obs[1]);
    row.same = obs[0] == obs[1];
  }
  if (!expected.is_null()) {
    EXPECT_TRUE(subset_of(expected, obs[0])) << name << ": podsteer " << obs[0].dump() << ", expected " << expected.dump();
  }
  if (skip) {
    fprintf(stderr, "compare: %s: Istio's rules not run (PODSTEER_COMPARE_REFERENCE=skip)\n", name.c_str());
  } else if (row.reference_holds) {
    json keys = obs[0];
    keys.update(obs[1]);
    for (const auto& [k, _] : keys.items())
      EXPECT_EQ(obs[0].value(k, json()), obs[1].value(k, json())) << name << ": '" << k << "' differs from Istio's";
  } else {
    fprintf(stderr, "%s: Istio's rules do not meet %s either (%s): reported, not failed\n", name.c_str(),
            expected.dump().c_str(), obs[1].dump().c_str());
  }
  std::lock_guard<std::mutex> g(report_mu);
  rows().push_back(row);
}

}  // namespace podsteer::test
