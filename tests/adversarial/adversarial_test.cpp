// Attacking the capture on purpose: clients outside the mesh shape their packets, pick
// addresses and reuse connection state to reach an enrolled pod's app without its proxy.
// For an enrolled pod every inbound TCP connection must reach the proxy or be refused,
// never the app directly. Every case also runs under Istio's in-pod rules, the reference:
// a case where Istio holds and podsteer does not fails.
#include <thread>

#include <fmt/format.h>

#include "topology.h"

#ifndef CRAFT_PY
#error "CRAFT_PY must be defined by the build"
#endif

using namespace podsteer::test;

namespace {

class Adversarial : public ::testing::Test {
 protected:
  void SetUp() override { SKIP_WITHOUT_PRIVILEGES(); }
};

bool accepted_from(Peer& p, const std::string& host) {
  for (const auto& j : p.lines())
    if (j.value("event", "") == "accept" && host_of(j.value("peer", "")) == host) return true;
  return false;
}

int accepts(Peer& p) {
  int n = 0;
  for (const auto& j : p.lines()) n += j.value("event", "") == "accept";
  return n;
}

// Where one connection from `client` ended up: at the proxy, at the app without the proxy
// (the bypass), or nowhere; and whether the client got its reply.
json outcome(Peer& proxy, Peer& app, const std::string& client, bool reply) {
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  bool via_proxy = accepted_from(proxy, client);
  return {{"reply", reply}, {"via_proxy", via_proxy}, {"app_reached_directly", !via_proxy && accepted_from(app, client)}};
}

// A real client on another node whose socket is shaped (testpeer connect flags).
Case shaped_client(bool v6, const std::vector<std::string>& flags) {
  return [=](Topology& t) {
    auto proxy = t.start_proxy();
    auto app = t.start_app(9090);
    t.capture();
    auto c = t.connect(From::OtherNode, v6 ? t.app6 : t.app4, 9090, flags);
    return outcome(*proxy, *app, v6 ? t.node2_6 : t.node2_4, c.value("reply", "").find("got=") != std::string::npos);
  };
}

const json kCaptured = {{"reply", true}, {"via_proxy", true}, {"app_reached_directly", false}};
const json kNeverDirect = {{"app_reached_directly", false}};
// reaches the proxy, never the app; whether the proxy can go on to the app is the proxy's
// business (from a link-local client address its transparent connect stalls, under
// Istio's rules as under podsteer's)
json kNeverDirect_viaProxy() { return {{"via_proxy", true}, {"app_reached_directly", false}}; }

TEST_F(Adversarial, ShapedSocketsOfUnprivilegedAndRootClients) {
  compare("IPv4 options on the client's socket (IP_OPTIONS, four NOPs)", shaped_client(false, {"--ip-options"}), kCaptured);
  compare("IPv6 destination-options header (IPV6_DSTOPTS)", shaped_client(true, {"--v6-dstopts"}), kCaptured);
  compare("IPv6 hop-by-hop header (IPV6_HOPOPTS)", shaped_client(true, {"--v6-hopopts"}), kCaptured);
}

// A crafted connection from an address node2 does not have (so its kernel sends no
// resets), by tests/adversarial/craft.py; node1 knows where that address lives.
Case crafted(const std::string& shape, bool v6) {
  return [=](Topology& t) {
    std::string spoofed = v6 ? "fd00:215::66" : "10.215.0.66";
    auto mac = sh("ip -n " + t.node2 + " -br link show eth0 | awk '{print $3}'").out;
    mac.erase(mac.find_last_not_of(" \n") + 1);
    EXPECT_EQ(sh(fmt::format("ip -n {} {} neigh add {} lladdr {} dev to-n2", t.node1, v6 ? "-6" : "", spoofed, mac)).rc, 0);
    auto proxy = t.start_proxy();
    auto app = t.start_app(9090);
    t.capture();
    auto r = peer_once({"nsenter", "--net=" + t.netns(t.node2), "/usr/bin/python3", CRAFT_PY, "--iface", "eth0",
                        "--src", spoofed, "--dst", v6 ? t.app6 : t.app4, "--dport", "9090", "--shape", shape});
    EXPECT_TRUE(r.contains("synack")) << "craft.py: " << r;
    json o = outcome(*proxy, *app, spoofed, r.value("reply", "").find("got=") != std::string::npos);
    o["synack"] = r.value("synack", false);
    return o;
  };
}

TEST_F(Adversarial, CraftedPacketShapes) {
  json captured = kCaptured;
  captured["synack"] = true;
  compare("crafted: IPv4 options on every packet", crafted("ipopts", false), captured);
  compare("crafted: IPv6 hop-by-hop header on every packet", crafted("hopopts", true), captured);
  compare("crafted: IPv6 destination options on every packet", crafted("dstopts", true), captured);
  compare("crafted: IPv6 routing header (type 0, no segments left)", crafted("rthdr", true), kNeverDirect);
  compare("crafted: SYN in 8-byte IPv4 fragments (flags not in the first)", crafted("frag", false), kNeverDirect);
  compare("crafted: SYN in 8-byte IPv6 fragments (header chain split)", crafted("frag6", true), kNeverDirect);
  compare("crafted: SYN with data in IPv6 fragments", crafted("frag6data", true), captured);
  compare("crafted: plain SYN from a spoofed address (control)", crafted("plain", false), captured);
}

TEST_F(Adversarial, MalformedPacketsNeverReachTheApp) {
  json refused = {{"synack", false}, {"app_reached_directly", false}, {"via_proxy", false}};
  compare("crafted: wrong TCP checksum", crafted("badsum", false), refused);
  compare("crafted: TCP data offset below 5", crafted("doff", false), refused);
  compare("crafted: IPv4 header length past the packet", crafted("ihl", false), refused);
}

TEST_F(Adversarial, AddressesAddedAfterCaptureAndLinkLocal) {
  for (bool v6 : {false, true}) {
    compare(v6 ? "secondary IPv6 address added after capture" : "secondary IPv4 address added after capture",
            [v6](Topology& t) {
              auto proxy = t.start_proxy();
              auto app = t.start_app(9090);
              t.capture();
              std::string extra = v6 ? "fd00:214::11" : "10.214.0.11";
              EXPECT_EQ(sh(fmt::format("ip -n {} addr add {}/{} dev eth0 nodad", t.app, extra, v6 ? 64 : 24)).rc, 0);
              auto c = t.connect(From::OtherNode, extra, 9090);
              json o = outcome(*proxy, *app, v6 ? t.node2_6 : t.node2_4,
                               c.value("reply", "").find("got=") != std::string::npos);
              // Once it is gone again, nothing may reach the app through it. (Not compared:
              // under Istio's rules packets still sent to a removed address are rewritten
              // to the pod's primary address by REDIRECT and answered by the proxy; under
              // podsteer the kernel no longer has the address and answers nothing.)
              EXPECT_EQ(sh(fmt::format("ip -n {} addr del {}/{} dev eth0", t.app, extra, v6 ? 64 : 24)).rc, 0);
              int before = accepts(*app);
              t.connect(From::OtherNode, extra, 9090);
              std::this_thread::sleep_for(std::chrono::milliseconds(150));
              EXPECT_EQ(accepts(*app), before) << mode_name(t.mode) << ": the app was reached on a removed address";
              return o;
            },
            kCaptured);
  }
  compare("IPv6 link-local address, from a pod on the same link", [](Topology& t) {
    auto proxy = t.start_proxy();
    auto app = t.start_app(9090);
    t.capture();
    auto ll = sh("ip -n " + t.app + " -6 -br addr show dev eth0 scope link | awk '{print $3}' | cut -d/ -f1").out;
    ll.erase(ll.find_last_not_of(" \n") + 1);
    auto peer_ll = sh("ip -n " + t.peer + " -6 -br addr show dev eth0 scope link | awk '{print $3}' | cut -d/ -f1").out;
    peer_ll.erase(peer_ll.find_last_not_of(" \n") + 1);
    auto c = t.connect(From::SameNodePod, ll + "%eth0", 9090);
    return outcome(*proxy, *app, peer_ll, c.value("reply", "").find("got=") != std::string::npos);
  }, kNeverDirect_viaProxy());
}

TEST_F(Adversarial, SynReusingTheTupleOfATimeWaitSocketIsCaptured) {
  compare("SYN reusing the tuple of the proxy's TIME_WAIT socket", [](Topology& t) {
    auto proxy = t.start_proxy();
    Peer app({testpeer_bin(), "--netns", t.netns(t.app), "--cgroup", t.app_cgroup, "serve", "--port", "9090",
              "--close-after-reply"});
    app.wait_for([](const json& j) { return j.value("event", "") == "ready"; });
    t.capture();
    // the pod side closes first (the app, then the proxy towards the client): the pod
    // keeps the connection's tuple in TIME_WAIT; the client comes back from the same port
    auto first = t.connect(From::OtherNode, t.app4, 9090, {"--bind-port", "43210", "--send", "one", "--wait-eof"});
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    auto tw = sh("nsenter --net=" + t.netns(t.app) + " ss -Htan state time-wait '( dport = :43210 )' | wc -l").out;
    auto second = t.connect(From::OtherNode, t.app4, 9090, {"--bind-port", "43210", "--send", "two"});
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    return json{{"first_reply", first.value("reply", "").find("got=one") != std::string::npos},
                {"time_wait_in_pod", std::stoi(tw) > 0},
                {"second_reply", second.value("reply", "").find("got=two") != std::string::npos},
                {"proxy_accepts", accepts(*proxy)},
                {"app_accepts", accepts(app)}};
  }, {{"first_reply", true}, {"time_wait_in_pod", true}, {"second_reply", true}, {"proxy_accepts", 2}});
}

TEST_F(Adversarial, SynCookieCompletionsReachTheProxy) {
  // tcp_syncookies=2: every handshake completes with a cookie, as under a SYN flood
  compare("SYN cookies: the completing ACK reaches the proxy", [](Topology& t) {
    EXPECT_EQ(sh("nsenter --net=" + t.netns(t.app) + " sysctl -qw net.ipv4.tcp_syncookies=2").rc, 0);
    auto proxy = t.start_proxy();
    auto app = t.start_app(9090);
    t.capture();
    auto c = t.connect(From::OtherNode, t.app4, 9090);
    json o = outcome(*proxy, *app, t.node2_4, c.value("reply", "").find("got=") != std::string::npos);
    auto sent = sh("nsenter --net=" + t.netns(t.app) + " nstat -az TcpExtSyncookiesSent | awk '/Syncookies/ {print $2}'").out;
    o["cookies_sent"] = !sent.empty() && std::stoi(sent) > 0;
    return o;
  }, {{"reply", true}, {"via_proxy", true}, {"app_reached_directly", false}, {"cookies_sent", true}});
}

// ---- apps inside the pod that try to pass for the proxy ----

bool proxy_took(Peer& proxy, const std::string& orig_dst) {
  for (const auto& j : proxy.lines())
    if (j.value("event", "") == "accept" && j.value("orig_dst", "") == orig_dst) return true;
  return false;
}

// podsteer's guard counters of the app pod (the only pod the topology captures)
json guards(Topology& t) {
  auto r = t.podsteer({"status", "--json"});
  auto j = json::parse(r.out, nullptr, false);
  if (j.is_discarded() || j["pods"].empty()) return json();
  return j["pods"][0]["guard"];
}

TEST_F(Adversarial, AnAppWithOnlyCapNetRawCannotPassForTheProxy) {
  // Since Linux 5.17 CAP_NET_RAW is enough to set SO_MARK, and containerd grants it to a
  // container's root. The app here runs as uid 65534 with CAP_NET_RAW alone and marks its
  // socket 0x539, the mark both Istio's rules and ztunnel give the proxy's sockets.
  for (bool v6 : {false, true})
    compare(v6 ? "an app marks its socket as the proxy's (v6)" : "an app marks its socket as the proxy's (v4)",
            [v6](Topology& t) {
              auto proxy = t.start_proxy();
              auto server = t.start_server(t.node2, 8080);
              t.capture();
              std::string dst = v6 ? t.node2_6 : t.node2_4;
              auto argv = t.client_argv(From::AppPod);
              argv.insert(argv.end(), {"--as-user-with-net-raw", "65534", "connect", "--to", dst, "--port", "8080",
                                       "--send", "hello", "--mark", "0x539", "--timeout-ms", "2000"});
              auto c = peer_once(argv);
              std::this_thread::sleep_for(std::chrono::milliseconds(150));
              json o = {{"reply", c.value("reply", "").find("got=hello") != std::string::npos},
                        {"via_proxy", proxy_took(*proxy, v6 ? "[" + dst + "]:8080" : dst + ":8080")}};
              if (c.contains("fatal")) o["client_failed"] = c["fatal"];
              if (t.mode == Mode::Podsteer) o["counted"] = guards(t).value("forged_mark", 0) == 1;
              return o;
            },
            {{"reply", true}, {"via_proxy", true}, {"counted", true}});
}

TEST_F(Adversarial, AnAppCannotTakeTheProxysPortsBeforeTheProxyListens) {
  // An app that binds 15006 before the proxy receives what is meant for the proxy (Istio
  // PR #49078 proposes a cgroup bind program against it). In a captured pod, the app tries
  // each of the proxy's ports first; then the proxy starts and a client calls the app.
  compare("an app binds the proxy's ports before the proxy", [](Topology& t) {
    t.capture();
    json bound = json::array();
    json refusals = json::array();
    auto try_bind = [&](const char* kind, int port) {
      Peer app({testpeer_bin(), "--netns", t.netns(t.app), "--cgroup", t.app_cgroup, kind, "--port", std::to_string(port)});
      auto first = app.wait_for([](const json& j) { return j.contains("fatal") || j.value("event", "") == "ready"; });
      std::string what = std::string(kind == std::string("serve") ? "tcp " : "udp ") + std::to_string(port);
      if (first.value("event", "") == "ready") bound.push_back(what);
      else refusals.push_back(first.value("errno", 0));
    };
    for (int port : {15001, 15006, 15008, 15053}) try_bind("serve", port);
    try_bind("serve-udp", 15053);
    try_bind("serve", 15007);  // not a proxy port: the app's own business
    auto proxy = t.start_proxy();
    auto app = t.start_app(9090);
    auto c = t.connect(From::OtherNode, t.app4, 9090);
    json o = outcome(*proxy, *app, t.node2_4, c.value("reply", "").find("got=") != std::string::npos);
    o["app_bound"] = bound;
    if (t.mode == Mode::Podsteer) {
      o["refused_with_eperm"] = refusals == json::array({EPERM, EPERM, EPERM, EPERM, EPERM});
      o["counted"] = guards(t).value("bind_refused", 0) == 5;
    }
    return o;
  }, {{"app_bound", {"tcp 15007"}}, {"refused_with_eperm", true}, {"counted", true}, {"reply", true}, {"via_proxy", true},
      {"app_reached_directly", false}});
}

// ---- connections the socket hooks do not see ----

// A client in the app pod's netns; outside: in a cgroup that is not below the hook cgroup
// (the topology's node cgroup, the hook cgroup's parent), as a process entered from the node
// or started by a runtime elsewhere.
json connect_from_app_netns(Topology& t, bool outside, const std::string& dst, int port,
                            const std::vector<std::string>& shape = {}) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", t.netns(t.app), "--cgroup",
                                   outside ? t.node_cgroup : t.app_cgroup, "connect", "--to", dst, "--port",
                                   std::to_string(port), "--send", "hello", "--timeout-ms", "2000"};
  argv.insert(argv.end(), shape.begin(), shape.end());
  return peer_once(argv);
}

// Where the connection went: through the proxy, straight to the server, or nowhere; and,
// under podsteer, what the pod's TC egress check counted.
json unsteered_outcome(Topology& t, Peer& proxy, Peer& server, const json& c, const std::string& orig_dst) {
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  bool via_proxy = proxy_took(proxy, orig_dst);
  json o = {{"reply", c.value("reply", "").find("got=hello") != std::string::npos},
            {"via_proxy", via_proxy},
            {"server_reached_directly", !via_proxy && accepts(server) > 0}};
  if (t.mode == Mode::Podsteer) {
    auto g = guards(t);
    o["unsteered_dropped"] = g.value("unsteered_dropped", -1);
    o["unsteered_passed"] = g.value("unsteered_passed", -1);
  }
  return o;
}

TEST_F(Adversarial, AProcessInThePodsNetnsOutsideTheHookCgroupDoesNotLeaveUnseen) {
  // Istio's rules live in the pod's netns and capture it; podsteer's socket hooks do not run
  // for it, so the pod's TC egress program stops its SYN at the pod's interface and counts the
  // connection once (the SYN's retransmission within the client's 2 s is not counted again).
  for (bool v6 : {false, true})
    compare(v6 ? "a process outside the hook cgroup connects out (v6)" : "a process outside the hook cgroup connects out (v4)",
            [v6](Topology& t) {
              auto proxy = t.start_proxy();
              auto server = t.start_server(t.node2, 8080);
              t.capture();
              std::string dst = v6 ? t.node2_6 : t.node2_4;
              auto c = connect_from_app_netns(t, true, dst, 8080);
              json o = unsteered_outcome(t, *proxy, *server, c, v6 ? "[" + dst + "]:8080" : dst + ":8080");
              // and the pod's own processes are untouched by the check
              auto in = connect_from_app_netns(t, false, dst, 8080);
              o["app_in_hook_cgroup_via_proxy"] =
                  in.value("reply", "").find("got=hello") != std::string::npos && proxy_took(*proxy, v6 ? "[" + dst + "]:8080" : dst + ":8080");
              return o;
            },
            {{"reply", false}, {"via_proxy", false}, {"server_reached_directly", false}, {"unsteered_dropped", 1},
             {"unsteered_passed", 0}, {"app_in_hook_cgroup_via_proxy", true}});
}

TEST_F(Adversarial, AProcessOutsideTheHookCgroupCannotHideItsSynBehindIPv6ExtensionHeaders) {
  // The TC check finds the TCP header past the extension headers a socket can add (the same
  // walk for a routing header, which IPV6_RTHDR sets without privilege): a SYN behind them is
  // stopped and counted like any other. Istio's rules (netfilter finds the transport header
  // the same way) send it to the proxy. One SYN behind two headers (hop-by-hop, then
  // destination options): two steps of the walk in one case (each case costs about 45 s under
  // the emulated 6.1 kernel, podsteer's side alone).
  compare("a process outside the hook cgroup connects out behind hop-by-hop and destination options",
          [](Topology& t) {
            auto proxy = t.start_proxy();
            auto server = t.start_server(t.node2, 8080);
            t.capture();
            auto c = connect_from_app_netns(t, true, t.node2_6, 8080, {"--v6-hopopts", "--v6-dstopts"});
            return unsteered_outcome(t, *proxy, *server, c, "[" + t.node2_6 + "]:8080");
          },
          {{"reply", false}, {"via_proxy", false}, {"server_reached_directly", false}, {"unsteered_dropped", 1},
           {"unsteered_passed", 0}});
}

TEST_F(Adversarial, AConnectionAfterTheConnectHookWasDetachedIsStoppedAtThePodsInterface) {
  // Someone detaches podsteer's connect4 link (bpftool link detach); no agent puts it back
  // here. The app's next connection is not steered by the socket hooks; the TC egress check,
  // independent of them, stops it. Excluded ports still go direct. (Istio: nothing to detach.)
  compare("the connect4 hook detached, the app connects out", [](Topology& t) {
    auto proxy = t.start_proxy();
    auto server = t.start_server(t.node2, 8080);
    auto excluded = t.start_server(t.node2, 8081);
    t.capture(false, {"--exclude-outbound-ports", "8081"});
    if (t.mode == Mode::Podsteer) {
      auto r = run({"bpftool", "link", "detach", "pinned", t.state_dir + "/links/podsteer_connect4"});
      EXPECT_EQ(r.rc, 0) << r.out;
    }
    auto c = connect_from_app_netns(t, false, t.node2_4, 8080);
    json o = unsteered_outcome(t, *proxy, *server, c, t.node2_4 + ":8080");
    auto x = connect_from_app_netns(t, false, t.node2_4, 8081);
    o["excluded_port_direct"] = x.value("reply", "").find("got=hello") != std::string::npos;
    return o;
  }, {{"reply", false}, {"via_proxy", false}, {"server_reached_directly", false}, {"unsteered_dropped", 1},
      {"excluded_port_direct", true}});
}

TEST_F(Adversarial, AFailOpenPodWithoutItsProxyOnlyCountsWhatTheHooksMissed) {
  // Fail-open means "go direct while the proxy is missing": the socket hooks let the app's
  // connection through, and the TC check lets a process outside the hook cgroup through too,
  // counted. (Istio's rules have no fail-open: the connection is refused.)
  compare("fail-open, no proxy, a process outside the hook cgroup connects out", [](Topology& t) {
    auto server = t.start_server(t.node2, 8080);
    t.capture(false, {"--fail-open"});
    auto c = connect_from_app_netns(t, true, t.node2_4, 8080);
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    json o = {{"reply", c.value("reply", "").find("got=hello") != std::string::npos}};
    if (t.mode == Mode::Podsteer) {
      auto g = guards(t);
      o["unsteered_dropped"] = g.value("unsteered_dropped", -1);
      o["unsteered_passed"] = g.value("unsteered_passed", -1);
    }
    return o;
  }, {{"reply", true}, {"unsteered_dropped", 0}, {"unsteered_passed", 1}});
}

}  // namespace
