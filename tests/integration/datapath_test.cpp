// The capture datapath on the real kernel: pod and remote netns joined by a veth, a test
// proxy in a child cgroup of the hook cgroup listening on 15001/15006/15008 with SO_MARK
// 0x539, and the podsteer CLI run as a separate process for every step.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <sys/stat.h>

#include <sstream>

#include <fmt/format.h>

#include <fstream>
#include <map>
#include <set>
#include <filesystem>
#include <thread>

#include "fd.h"
#include "foreign_counter.skel.h"
#include "harness.h"
#include "podsteer_abi.h"

using namespace podsteer::test;

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

class DatapathTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_PRIVILEGES();
    env = std::make_unique<Env>();
  }
  void foreign_programs_around_ours(const std::string& mode);
  void enroll(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {"enroll", "--netns", env->pod_ns, "--pod", "default/web"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto r = env->podsteer(args);
    ASSERT_EQ(r.rc, 0) << r.out;
  }
  int accepts(Peer& proxy) {
    int n = 0;
    for (const auto& j : proxy.lines()) n += j.value("event", "") == "accept";
    return n;
  }
  json counters() {
    auto s = env->status();
    if (s["pods"].empty()) return json::object();
    return s["pods"][0]["counters"];
  }
  std::unique_ptr<Env> env;
};

json wait_accept(Peer& proxy, const std::string& orig_dst, int timeout_ms = 5000) {
  return proxy.wait_for([&](const json& j) { return j.value("event", "") == "accept" && j.value("orig_dst", "") == orig_dst; },
                        timeout_ms);
}

TEST_F(DatapathTest, OutboundIPv4ReachesProxyWithOriginalDestination) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  enroll();
  auto c = env->pod_connect(env->remote_ip4, 8080);
  ASSERT_TRUE(c.value("connected", false)) << c;
  // the application sees the original destination as its peer
  EXPECT_EQ(c["peer"], env->remote_ip4 + ":8080");
  EXPECT_TRUE(starts_with(c.value("reply", ""), "server ")) << c;
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos);
  auto a = wait_accept(*proxy, env->remote_ip4 + ":8080");
  ASSERT_FALSE(a.is_null()) << "proxy never accepted the connection";
  EXPECT_EQ(a["listener"], 15001);
  EXPECT_EQ(a["local"], env->pod_ip4 + ":15001");
  EXPECT_EQ(a["peer"], c["local"]) << "the proxy sees the pod's own address and port as peer";
  auto closed = proxy->wait_for([](const json& j) { return j.value("event", "") == "close"; });
  ASSERT_FALSE(closed.is_null());
  EXPECT_EQ(closed["bytes_up"], 6);  // "hello\n"
  EXPECT_EQ(closed["bytes_down"], c["reply"].get<std::string>().size() + 1);
  EXPECT_EQ(counters()["redirected_out"], 1);
}

TEST_F(DatapathTest, EveryCommandOfTheReadmesBpftoolSectionWorks) {
  // What a user pastes from "Debugging with bpftool", against a node with a captured pod (the
  // default state dir and POD replaced by this test's)
  auto proxy = env->start_proxy();
  enroll();
  std::istringstream in(read_file(README_PATH));
  std::vector<std::string> commands;
  bool section = false, block = false;
  for (std::string line; std::getline(in, line);) {
    if (line == "### Debugging with bpftool") section = true;
    else if (section && line.rfind("```", 0) == 0 && block) break;
    else if (section && line.rfind("```", 0) == 0) block = true;
    else if (block) {
      std::string cmd = line.substr(0, line.find('#'));
      while (!cmd.empty() && cmd.back() == ' ') cmd.pop_back();
      if (cmd.empty()) continue;
      for (size_t at; (at = cmd.find("/sys/fs/bpf/podsteer/")) != std::string::npos;)
        cmd.replace(at, strlen("/sys/fs/bpf/podsteer/"), env->state_dir + "/");
      for (size_t at; (at = cmd.find(" POD ")) != std::string::npos;) cmd.replace(at, 5, " " + env->pod_ns_name + " ");
      commands.push_back(cmd);
    }
  }
  ASSERT_GE(commands.size(), 12u) << "the README's bpftool block did not parse";
  // and status names the versions it shows them with
  auto v = env->status()["versions"];
  EXPECT_FALSE(v.value("cli", "").empty()) << v;
  EXPECT_EQ(v.value("programs_id", "").size(), 16u) << v;
  for (const auto& cmd : commands) {
    auto r = sh(cmd + " 2>&1");
    EXPECT_EQ(r.rc, 0) << cmd << ":\n" << r.out;
    EXPECT_EQ(r.out.find("Error"), std::string::npos) << cmd << ":\n" << r.out;
  }
}

TEST_F(DatapathTest, OutboundIPv6AndV4MappedReachProxy) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  enroll();
  auto c6 = env->pod_connect(env->remote_ip6, 8080);
  ASSERT_TRUE(c6.value("connected", false)) << c6;
  EXPECT_EQ(c6["peer"], "[" + env->remote_ip6 + "]:8080");
  EXPECT_NE(c6.value("reply", "").find("got=hello"), std::string::npos);
  auto a6 = wait_accept(*proxy, "[" + env->remote_ip6 + "]:8080");
  ASSERT_FALSE(a6.is_null());
  EXPECT_EQ(a6["peer"], c6["local"]);
  EXPECT_EQ(a6["local"], "[" + env->pod_ip6 + "]:15001");

  // an AF_INET6 socket connecting to ::ffff:10.201.0.1
  auto cm = env->pod_connect(env->remote_ip4, 8080, {"--v6"});
  ASSERT_TRUE(cm.value("connected", false)) << cm;
  EXPECT_EQ(cm["peer"], env->remote_ip4 + ":8080");
  EXPECT_NE(cm.value("reply", "").find("got=hello"), std::string::npos);
  auto am = wait_accept(*proxy, env->remote_ip4 + ":8080");
  ASSERT_FALSE(am.is_null());
  EXPECT_EQ(am["peer"], cm["local"]);
  EXPECT_EQ(counters()["redirected_out"], 2);
}

TEST_F(DatapathTest, InboundIsAcceptedOnInboundListenerWithOriginalDestination) {
  auto proxy = env->start_proxy();
  auto app = env->start_server(env->pod_ns, 9090);
  enroll();
  for (const auto& [ip, fmt_ip] : {std::pair{env->pod_ip4, env->pod_ip4}, std::pair{env->pod_ip6, "[" + env->pod_ip6 + "]"}}) {
    auto c = env->remote_connect(ip, 9090);
    ASSERT_TRUE(c.value("connected", false)) << c;
    EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
    auto a = wait_accept(*proxy, fmt_ip + ":9090");
    ASSERT_FALSE(a.is_null()) << "inbound to " << ip << " did not reach the proxy";
    EXPECT_EQ(a["listener"], 15006);
    EXPECT_EQ(a["local"], fmt_ip + ":9090") << "getsockname gives the original destination";
    EXPECT_EQ(a["peer"], c["local"]);
    // the app was reached through the proxy, which (as ztunnel does) connects from the
    // client's address: the app sees who really called
    std::string remote = ip == env->pod_ip4 ? env->remote_ip4 : "[" + env->remote_ip6 + "]";
    EXPECT_NE(c.value("reply", "").find("peer=" + remote + ":"), std::string::npos) << c;
  }
  EXPECT_EQ(counters()["redirected_in"], 2);
}

TEST_F(DatapathTest, HboneAndProbeSourcesAreNotRedirected) {
  auto proxy = env->start_proxy();
  auto app = env->start_server(env->pod_ns, 9090);
  enroll();
  // HBONE reaches the proxy's 15008 unredirected; the proxy terminates it and connects on
  // to the app from the client's address
  auto h = env->remote_connect(env->pod_ip4, 15008, {"--send", "CONNECT " + env->pod_ip4 + ":9090", "--send", "hello"});
  ASSERT_TRUE(h.value("connected", false)) << h;
  ASSERT_EQ(h["replies"].size(), 2u) << h;
  EXPECT_EQ(h["replies"][0], "HTTP/1.1 200 OK");
  EXPECT_NE(h.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos) << h;
  auto a = proxy->wait_for([](const json& j) { return j.value("listener", 0) == 15008; });
  ASSERT_FALSE(a.is_null());
  EXPECT_EQ(a["local"], env->pod_ip4 + ":15008");

  auto p = env->remote_connect(env->pod_ip4, 9090, {"--bind", "169.254.7.127"});
  ASSERT_TRUE(p.value("connected", false)) << p;
  EXPECT_NE(p.value("reply", "").find("peer=169.254.7.127:"), std::string::npos) << "probe went to the app directly: " << p;
  for (const auto& j : proxy->lines()) EXPECT_NE(j.value("listener", 0), 15006) << j;
  for (const auto& j : proxy->lines()) EXPECT_FALSE(starts_with(j.value("peer", ""), "169.254.7.127")) << j;
  EXPECT_EQ(counters()["redirected_in"], 0);
  EXPECT_GE(counters()["bypassed"], 1);
}

TEST_F(DatapathTest, MarkedExcludedLoopbackAndOwnAddressGoDirect) {
  ASSERT_EQ(sh("ip -n " + env->remote_ns_name + " addr add 10.201.0.3/24 dev eth0 && ip -n " + env->remote_ns_name +
               " addr add fd00:201::3/64 dev eth0 nodad").rc, 0);
  auto proxy = env->start_proxy();
  auto s8080 = env->start_server(env->remote_ns, 8080);
  auto s8081 = env->start_server(env->remote_ns, 8081);
  auto app = env->start_server(env->pod_ns, 9090);
  auto app2 = env->start_server(env->pod_ns, 9091);
  auto local = env->start_server(env->pod_ns, 7070, "127.0.0.1");
  enroll({"--exclude-outbound-ports", "8081", "--exclude-outbound-cidrs", "10.201.0.3/32,fd00:201::3/128",
          "--exclude-inbound-ports", "9091"});

  auto direct = [&](const json& c) {
    return c.value("connected", false) && c.value("reply", "").find("got=hello") != std::string::npos;
  };
  auto excluded_cidr = env->pod_connect("10.201.0.3", 8080);
  EXPECT_TRUE(direct(excluded_cidr)) << excluded_cidr;
  auto excluded_cidr6 = env->pod_connect("fd00:201::3", 8080);
  EXPECT_TRUE(direct(excluded_cidr6)) << excluded_cidr6;
  auto excluded_port = env->pod_connect(env->remote_ip4, 8081);
  EXPECT_TRUE(direct(excluded_port)) << excluded_port;
  // the proxy's mark from the proxy's process; an app's own use of it is captured
  // (adversarial.AnAppWithOnlyCapNetRawCannotPassForTheProxy)
  auto marked = env->proxy_connect(env->remote_ip4, 8080, {"--mark", "0x539"});
  EXPECT_TRUE(direct(marked)) << marked;
  auto loopback = env->pod_connect("127.0.0.1", 7070);
  EXPECT_TRUE(direct(loopback)) << loopback;
  auto own = env->pod_connect(env->pod_ip4, 9090);
  EXPECT_TRUE(direct(own)) << own;
  auto in_excluded = env->remote_connect(env->pod_ip4, 9091);
  EXPECT_TRUE(direct(in_excluded)) << in_excluded;
  EXPECT_NE(in_excluded.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos)
      << "the app saw the remote client, not the proxy";
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(accepts(*proxy), 0) << "nothing above may reach the proxy";

  // control: the same pod's ordinary traffic is captured
  auto captured = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_TRUE(direct(captured));
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());
  auto c = counters();
  EXPECT_EQ(c["redirected_out"], 1);
  EXPECT_EQ(c["bypassed"], 4);  // two CIDRs, one outbound port, one inbound port
}

TEST_F(DatapathTest, DnsOverUdpReachesDnsListenerAndReplyComesFromResolver) {
  auto proxy = env->start_proxy();
  Peer resolver({testpeer_bin(), "--netns", env->remote_ns, "serve-udp", "--port", "53"});
  ASSERT_FALSE(resolver.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  auto query = [&](bool connected) {
    std::vector<std::string> argv = {testpeer_bin(), "--netns", env->pod_ns, "--cgroup", env->app_cgroup, "udp",
                                     "--to", env->remote_ip4, "--port", "53", "--send", "q1"};
    if (connected) argv.push_back("--connected");
    return peer_once(argv);
  };
  enroll();  // DNS off by default
  EXPECT_EQ(query(false)["reply"], "resolver:q1");

  ASSERT_EQ(env->podsteer({"enroll", "--netns", env->pod_ns, "--dns"}).rc, 0);
  auto u = query(false);
  EXPECT_EQ(u["reply"], "dns-proxy:q1") << u;
  EXPECT_EQ(u["from"], env->remote_ip4 + ":53");
  auto cu = query(true);
  EXPECT_EQ(cu["reply"], "dns-proxy:q1") << cu;
  EXPECT_EQ(cu["peer"], env->remote_ip4 + ":53");
  EXPECT_EQ(cu["from"], env->remote_ip4 + ":53");
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("event", "") == "dns"; }).is_null());
  EXPECT_EQ(counters()["dns_redirected"], 2);
}

TEST_F(DatapathTest, DnsOverTcpReachesDnsListenerWithOriginalDestination) {
  auto proxy = env->start_proxy({"--ports", "15001,15006,15008,15053"});
  auto resolver = env->start_server(env->remote_ns, 53);
  enroll({"--dns"});
  auto c = env->pod_connect(env->remote_ip4, 53);
  ASSERT_TRUE(c.value("connected", false)) << c;
  EXPECT_EQ(c["peer"], env->remote_ip4 + ":53") << "the app sees the resolver it asked";
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
  auto a = proxy->wait_for([](const json& j) { return j.value("listener", 0) == 15053; });
  ASSERT_FALSE(a.is_null()) << "TCP 53 did not reach the DNS listener";
  EXPECT_EQ(a["orig_dst"], env->remote_ip4 + ":53");
  EXPECT_EQ(a["local"], "127.0.0.1:15053");
  EXPECT_EQ(counters()["dns_redirected"], 1);
  EXPECT_EQ(counters()["redirected_out"], 0);
}

TEST_F(DatapathTest, ProxyMissingFailClosedRefusesAndFailOpenGoesDirect) {
  auto server = env->start_server(env->remote_ns, 8080);
  auto app = env->start_server(env->pod_ns, 9090);
  enroll();
  auto out = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_FALSE(out.value("connected", true)) << out;
  EXPECT_EQ(out["error"], "Connection refused");
  auto in = env->remote_connect(env->pod_ip4, 9090, {"--timeout-ms", "1000"});
  EXPECT_FALSE(in.value("connected", true)) << in;
  EXPECT_TRUE(app->wait_for([](const json& j) { return j.value("event", "") == "accept"; }, 300).is_null())
      << "fail closed: the app must not see the connection";
  EXPECT_GE(counters()["proxy_missing"], 2);

  ASSERT_EQ(env->podsteer({"enroll", "--netns", env->pod_ns, "--fail-open"}).rc, 0);
  auto out2 = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(out2.value("reply", "").find("got=hello"), std::string::npos) << out2;
  auto in2 = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(in2.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << in2;
}

TEST_F(DatapathTest, EnrollKeepsOpenConnectionsAndUnenrollStopsCapture) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  auto app = env->start_server(env->pod_ns, 9090);
  auto out_session = open_session(env->pod_ns, env->app_cgroup, env->remote_ip4, 8080);
  auto in_session = open_session(env->remote_ns, "", env->pod_ip4, 9090);
  EXPECT_NE(session_request(*out_session, "before").value("reply", "").find("got=before"), std::string::npos);
  EXPECT_NE(session_request(*in_session, "before").value("reply", "").find("got=before"), std::string::npos);

  enroll();
  auto o = session_request(*out_session, "after");
  EXPECT_NE(o.value("reply", "").find("got=after"), std::string::npos) << o;
  auto i = session_request(*in_session, "after");
  EXPECT_NE(i.value("reply", "").find("got=after"), std::string::npos) << i;
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(accepts(*proxy), 0) << "existing connections must not move to the proxy";

  auto through_proxy = open_session(env->pod_ns, env->app_cgroup, env->remote_ip4, 8080);
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());

  auto r = env->podsteer({"unenroll", "--netns", env->pod_ns});
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_TRUE(env->status()["pods"].empty());
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos);
  auto in2 = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(in2.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << in2;
  EXPECT_EQ(accepts(*proxy), 1) << "after unenroll, new connections go direct";
  // the connection made through the proxy lives on
  EXPECT_NE(session_request(*through_proxy, "still").value("reply", "").find("got=still"), std::string::npos);
}

TEST_F(DatapathTest, SecondEnrollAdoptsPinsAndLeavesFirstPodAlone) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  enroll();
  auto before = env->status();
  ASSERT_EQ(before["cgroup_links"].size(), 12u);  // connect, sendmsg, recvmsg, getpeername, bind x2, sock_ops, getsockopt
  // the remote namespace becomes a second pod, in a separate podsteer process
  // (fail open: the remote pod has no proxy, and it still serves the first pod)
  auto r = env->podsteer({"enroll", "--netns", env->remote_ns, "--pod", "default/other", "--fail-open"});
  ASSERT_EQ(r.rc, 0) << r.out;
  auto after = env->status();
  EXPECT_EQ(after["cgroup_links"], before["cgroup_links"]) << "socket hooks were not re-attached";
  ASSERT_EQ(after["pods"].size(), 2u);
  auto first = [](const json& st) {
    for (const auto& p : st["pods"])
      if (p["pod"] == "default/web") return p;
    return json();
  };
  EXPECT_EQ(first(after)["inbound"], first(before)["inbound"]) << "the first pod's sk_lookup link was not touched";
  EXPECT_NE(first(after)["inbound"]["sk_lookup_link_id"], 0);
  // enrolling the first pod again changes nothing
  auto again = env->podsteer({"enroll", "--netns", env->pod_ns, "--pod", "default/web"});
  EXPECT_EQ(again.rc, 0);
  EXPECT_NE(again.out.find("unchanged"), std::string::npos) << again.out;
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos);
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());
}

// Istio's ambient.istio.io/bypass-inbound-capture ("ingress mode"): outbound is captured,
// inbound reaches the app directly, and the proxy never sees it.
TEST_F(DatapathTest, BypassInboundCapturesOutboundOnly) {
  auto proxy = env->start_proxy();
  auto app = env->start_server(env->pod_ns, 9090);
  auto remote = env->start_server(env->remote_ns, 8080);
  enroll({"--bypass-inbound"});
  auto st = env->status()["pods"][0];
  EXPECT_TRUE(st["bypass_inbound"].get<bool>()) << st;
  EXPECT_TRUE(st["missing"].empty()) << st;
  auto in = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(in.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos) << in;
  auto out = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(out.value("reply", "").find("got=hello"), std::string::npos) << out;
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null()) << "outbound still goes through the proxy";
  EXPECT_TRUE(wait_accept(*proxy, env->pod_ip4 + ":9090", 300).is_null()) << "inbound never reaches the proxy";
  EXPECT_EQ(counters()["redirected_in"], 0);
}

TEST_F(DatapathTest, UninstallLeavesNothingBehind) {
  auto proxy = env->start_proxy();
  enroll();
  auto s = env->status();
  const auto& pod = s["pods"][0];
  EXPECT_TRUE(pod["missing"].empty()) << pod;
  unsigned lookup_link = pod["inbound"]["sk_lookup_link_id"];
  ASSERT_NE(lookup_link, 0u);
  std::string in_pod = "nsenter --net=" + env->pod_ns + " ";
  auto netns_state = [&] {
    return sh(in_pod + "ip rule; " + in_pod + "ip -6 rule; " + in_pod + "ip route show table 100; " + in_pod +
              "ip -6 route show table 100; " + in_pod + "sysctl -n net.ipv4.tcp_fwmark_accept").out;
  };
  auto during = netns_state();
  EXPECT_NE(during.find("fwmark 0x111/0xfff lookup 100 proto 112"), std::string::npos) << during;
  EXPECT_NE(during.find("local default dev lo proto 112"), std::string::npos) << during;
  auto r = env->podsteer({"uninstall"});
  ASSERT_EQ(r.rc, 0) << r.out;
  struct stat st {};
  EXPECT_NE(stat(env->state_dir.c_str(), &st), 0) << "state dir still exists";
  for (const auto& l : s["cgroup_links"])
    EXPECT_NE(sh("bpftool link show id " + std::to_string(l["link_id"].get<unsigned>())).rc, 0) << l;
  EXPECT_NE(sh("bpftool link show id " + std::to_string(lookup_link)).rc, 0) << "sk_lookup link";
  auto after = netns_state();
  EXPECT_EQ(after.find("0x111"), std::string::npos) << after;
  EXPECT_EQ(after.find("proto 112"), std::string::npos) << after;
  EXPECT_NE(after.find("\n0\n"), std::string::npos) << "tcp_fwmark_accept back to 0: " << after;
}

// A CNI's own TC programs on the pod's interface, before and after podsteer's TC program
// (connections the node opens), attached as mode says: in tcx (where the kernel has it)
// first and last, and classic clsact filters at a priority below and above ours. Ours
// gives no verdict, so each of them sees every packet, steered SYNs included; and
// uninstall takes only ours.
void DatapathTest::foreign_programs_around_ours(const std::string& mode) {
  std::unique_ptr<foreign_counter, void (*)(foreign_counter*)> owned(foreign_counter__open_and_load(),
                                                                     foreign_counter__destroy);
  auto* skel = owned.get();
  ASSERT_NE(skel, nullptr);
  std::vector<int> links;
  bool tcx = false;
  auto in_pod = [&](const std::function<void(unsigned)>& fn) {
    std::thread([&] {
      int fd = open(env->pod_ns.c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_EQ(setns(fd, CLONE_NEWNET), 0);
      close(fd);
      fn(if_nametoindex("eth0"));
    }).join();
  };
  auto clsact = [&](unsigned ifindex, bpf_program* prog, uint32_t prio) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = int(ifindex), .attach_point = BPF_TC_INGRESS);
    bpf_tc_hook_create(&hook);
    LIBBPF_OPTS(bpf_tc_opts, opts, .prog_fd = bpf_program__fd(prog), .priority = prio);
    ASSERT_EQ(bpf_tc_attach(&hook, &opts), 0);
  };
  in_pod([&](unsigned ifindex) {
    LIBBPF_OPTS(bpf_link_create_opts, first, .flags = 1u << 3 /* BPF_F_BEFORE */);
    int a = bpf_link_create(bpf_program__fd(skel->progs.foreign_first), ifindex, static_cast<bpf_attach_type>(46), &first);
    tcx = a >= 0;  // tcx: 6.6+
    if (a >= 0) links.push_back(a);
    clsact(ifindex, skel->progs.foreign_clsact, 1);
  });
  if (mode == "tcx" && !tcx) {
    fprintf(stderr, "*** SKIPPING: no tcx on this kernel (6.6+), so no tcx mode to test ***\n");
    GTEST_SKIP();
  }
  auto proxy = env->start_proxy();
  auto app = env->start_server(env->pod_ns, 9090);
  auto r = env->podsteer({"--tc-mode", mode, "enroll", "--netns", env->pod_ns, "--pod", "default/web"});
  ASSERT_EQ(r.rc, 0) << r.out;
  auto ours = env->status()["pods"][0]["inbound"]["tc_ingress"];
  ASSERT_EQ(ours.size(), 1u) << ours;
  EXPECT_EQ(ours[0]["mode"], mode) << ours;
  EXPECT_TRUE(ours[0]["attached"].get<bool>()) << ours;
  in_pod([&](unsigned ifindex) {
    LIBBPF_OPTS(bpf_link_create_opts, last, .flags = 1u << 4 /* BPF_F_AFTER */);
    int b = bpf_link_create(bpf_program__fd(skel->progs.foreign_last), ifindex, static_cast<bpf_attach_type>(46), &last);
    if (b >= 0) links.push_back(b);
    clsact(ifindex, skel->progs.foreign_clsact_after, 0xd000);
  });
  for (const auto& ip : {env->pod_ip4, env->pod_ip6}) {
    auto c = env->remote_connect(ip, 9090);
    EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
  }
  EXPECT_EQ(accepts(*proxy), 2) << "both connections were captured";
  struct Seen {
    uint64_t tcp, syn;
  };
  auto seen = [&](uint32_t slot) {
    Seen v{};
    bpf_map_lookup_elem(bpf_map__fd(skel->maps.foreign_seen), &slot, &v);
    return v;
  };
  std::vector<uint32_t> slots = {2, 3};
  if (tcx) slots = {0, 1, 2, 3};
  else fprintf(stderr, "no tcx on this kernel: only the clsact filters are checked\n");
  for (uint32_t slot : slots) {
    EXPECT_EQ(seen(slot).syn, 2u) << "program " << slot << " missed a SYN";
    EXPECT_EQ(seen(slot).tcp, seen(2).tcp) << "program " << slot << " saw other packets than the first clsact filter";
  }
  EXPECT_GE(seen(2).tcp, 10u);
  auto filters = sh("tc -n " + env->pod_ns_name + " filter show dev eth0 ingress");
  // bpftool 7.1 names no tcx link's program: ours is known by its link id there
  std::string our_link = mode == "tcx" ? std::to_string(ours[0]["link_id"].get<uint32_t>()) : "";
  if (mode == "tcx") EXPECT_EQ(sh("bpftool link show id " + our_link).rc, 0);
  else EXPECT_NE(filters.out.find("podsteer_node"), std::string::npos) << filters.out;

  ASSERT_EQ(env->podsteer({"uninstall"}).rc, 0);
  filters = sh("tc -n " + env->pod_ns_name + " filter show dev eth0 ingress");
  EXPECT_NE(filters.out.find("foreign_clsact "), std::string::npos) << "the foreign filters must survive: " << filters.out;
  EXPECT_NE(filters.out.find("foreign_clsact_"), std::string::npos) << filters.out;  // 15 characters of a name
  EXPECT_EQ(filters.out.find("podsteer"), std::string::npos) << filters.out;
  if (mode == "tcx") {
    EXPECT_NE(sh("bpftool link show id " + our_link + " 2>&1").rc, 0) << "our tcx link is gone";
  }
  for (int l : links) close(l);
}

TEST_F(DatapathTest, ForeignTcProgramsAroundOurClsactFilterSeeEveryPacket) { foreign_programs_around_ours("clsact"); }

TEST_F(DatapathTest, ForeignTcProgramsAroundOurTcxLinkSeeEveryPacket) { foreign_programs_around_ours("tcx"); }

TEST_F(DatapathTest, BadInputGivesClearErrorAndChangesNothing) {
  struct Case {
    std::vector<std::string> args;
    std::string message;
    std::vector<std::string> env = {};
  };
  std::string notbpf = "/tmp/podsteer-notbpf-" + env->id;
  mkdir(notbpf.c_str(), 0700);
  std::vector<Case> before_install = {
      {{"enroll", "--netns", "/var/run/netns/does-not-exist-" + env->id}, "No such file or directory"},
      {{"enroll", "--netns", "/etc/hostname"}, "not a network namespace"},
      {{"enroll", "--netns", "/proc/self/ns/mnt"}, "not a network namespace"},
      {{"enroll", "--netns", "/proc/self/ns/net"}, "host network namespace"},
      {{"enroll", "--netns", env->pod_ns, "--exclude-outbound-cidrs", "10.0.0.0/33"}, "prefix length"},
      {{"enroll", "--netns", env->pod_ns, "--exclude-outbound-cidrs", "10.0.0.0/8,banana"}, "not an IPv4 or IPv6"},
      {{"enroll", "--netns", env->pod_ns, "--exclude-inbound-ports", "80,x"}, "bad port 'x'"},
      {{"enroll", "--netns", env->pod_ns, "--exclude-outbound-ports", "70000"}, "out of range"},
      {{"enroll", "--netns", env->pod_ns, "--pod", "nonamespace"}, "NAMESPACE/NAME"},
      {{"enroll", "--netns", env->pod_ns}, "kernel feature missing: sk_lookup_assign",
       {"PODSTEER_PRETEND_MISSING=sk_lookup_assign"}},
      {{"unenroll", "--netns", env->pod_ns}, "no podsteer datapath installed"},
      {{"status"}, "no podsteer datapath installed"},
  };
  for (const auto& c : before_install) {
    auto r = env->podsteer(c.args, c.env);
    EXPECT_NE(r.rc, 0) << c.args[0] << " " << c.args.back();
    EXPECT_NE(r.out.find(c.message), std::string::npos) << "expected '" << c.message << "' in: " << r.out;
    struct stat st {};
    EXPECT_NE(stat(env->state_dir.c_str(), &st), 0) << "state dir created by a failed call: " << r.out;
  }
  auto r = run({podsteer_bin(), "--state-dir", notbpf + "/state", "--hook-cgroup", env->cgroup, "enroll", "--netns", env->pod_ns});
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("not on a bpf filesystem"), std::string::npos) << r.out;
  r = run({podsteer_bin(), "--state-dir", env->state_dir, "--hook-cgroup", "/tmp", "enroll", "--netns", env->pod_ns});
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("not a cgroup v2 directory"), std::string::npos) << r.out;
  rmdir(notbpf.c_str());

  enroll();
  auto before = env->status();
  std::vector<Case> after_install = {
      {{"unenroll", "--netns", env->remote_ns}, "no pod is enrolled"},
      {{"unenroll", "--netns", "/var/run/netns/gone-" + env->id}, "no pod is enrolled with this path"},
      {{"enroll", "--netns", env->pod_ns, "--exclude-outbound-cidrs", "1.2.3.4/40"}, "prefix length"},
      {{"dump", "nosuchmap"}, "unknown map"},
  };
  for (const auto& c : after_install) {
    auto r2 = env->podsteer(c.args, c.env);
    EXPECT_NE(r2.rc, 0) << r2.out;
    EXPECT_NE(r2.out.find(c.message), std::string::npos) << "expected '" << c.message << "' in: " << r2.out;
  }
  // a different hook cgroup for an existing state dir is refused
  auto other = run({podsteer_bin(), "--state-dir", env->state_dir, "--hook-cgroup", env->app_cgroup, "status"});
  EXPECT_NE(other.rc, 0);
  EXPECT_NE(other.out.find("hook cgroup is chosen when the state dir is made"), std::string::npos) << other.out;
  auto after = env->status();
  EXPECT_EQ(before["pods"].size(), after["pods"].size());
  EXPECT_EQ(before["cgroup_links"], after["cgroup_links"]);
  EXPECT_EQ(before["pods"][0]["excluded_outbound_cidrs"], after["pods"][0]["excluded_outbound_cidrs"]);
}

TEST_F(DatapathTest, DoctorPassesAndBpftoolShowsNamedFields) {
  auto d = env->podsteer({"doctor"});
  EXPECT_EQ(d.rc, 0) << d.out;
  EXPECT_NE(d.out.find("this kernel can run podsteer"), std::string::npos);
  enroll({"--exclude-outbound-cidrs", "192.0.2.0/24"});
  auto pods = sh("bpftool map dump pinned " + env->state_dir + "/maps/podsteer_pods");
  EXPECT_EQ(pods.rc, 0);
  for (const char* field : {"\"flags\"", "\"ip4\"", "\"ip6\"", "\"enrolled_ns\""})
    EXPECT_NE(pods.out.find(field), std::string::npos) << field << " missing from:\n" << pods.out;
  auto by_name = sh("bpftool map dump name podsteer_meta");
  EXPECT_NE(by_name.out.find("\"netns_path\""), std::string::npos) << by_name.out;
  auto dump = env->podsteer({"dump", "cidrs"});
  EXPECT_EQ(dump.rc, 0) << dump.out;
  EXPECT_NE(dump.out.find("192.0.2.0/24"), std::string::npos) << dump.out;
  EXPECT_NE(dump.out.find("bpftool map dump pinned"), std::string::npos);
}

}  // namespace

namespace {

TEST_F(DatapathTest, FullMapIsAClearErrorAndLeavesNothingBehind) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  // more exclusion CIDRs than podsteer_cidrs holds (262,144), from a file as a user would
  std::string file = "/tmp/podsteer-test-cidrs-" + env->id;
  {
    std::ofstream out(file);
    for (int i = 0; i < 270000; ++i) out << fmt::format("100.{}.{}.{}/32\n", 64 + i / 65536, i / 256 % 256, i % 256);
  }
  auto r = env->podsteer({"enroll", "--netns", env->pod_ns, "--exclude-outbound-cidrs-file", file});
  unlink(file.c_str());
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("podsteer_cidrs"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("No space left on device"), std::string::npos) << r.out;
  auto st = env->status();
  EXPECT_TRUE(st["pods"].empty()) << st;
  auto cidrs = env->podsteer({"dump", "cidrs"});
  EXPECT_NE(cidrs.out.find("(0 entries)"), std::string::npos) << "rolled back: " << cidrs.out.substr(0, 300);
  // and the pod still goes direct, then enrolls fine with a list that fits
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos);
  std::string small = "/tmp/podsteer-test-cidrs-small-" + env->id;
  std::ofstream(small) << "192.0.2.0/24\n# a comment\n198.51.100.0/24, 203.0.113.0/24\n";
  auto ok = env->podsteer({"enroll", "--netns", env->pod_ns, "--exclude-outbound-cidrs-file", small});
  unlink(small.c_str());
  ASSERT_EQ(ok.rc, 0) << ok.out;
  EXPECT_EQ(env->status()["pods"][0]["excluded_outbound_cidrs"].size(), 3u);
}

}  // namespace

namespace {

TEST_F(DatapathTest, SoOriginalDstDefersToARealRedirectButNotToConntrackAlone) {
  auto proxy = env->start_proxy();
  auto s8080 = env->start_server(env->remote_ns, 8080);
  auto s8082 = env->start_server(env->remote_ns, 8082);
  enroll({"--exclude-outbound-ports", "8082"});
  // someone else's NAT rule in the pod: conntrack is now active for every connection, and
  // 8082 (which podsteer leaves alone) is redirected to the proxy by iptables
  auto rule = sh("nsenter --net=" + env->pod_ns + " iptables -t nat -A OUTPUT -p tcp --dport 8082 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001");
  ASSERT_EQ(rule.rc, 0) << rule.out;
  auto ours = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(ours.value("reply", "").find("got=hello"), std::string::npos) << ours;
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null())
      << "with conntrack active, the kernel's answer (the proxy's own address) must not hide ours";
  auto theirs = env->pod_connect(env->remote_ip4, 8082);
  EXPECT_NE(theirs.value("reply", "").find("got=hello"), std::string::npos) << theirs;
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8082").is_null())
      << "the kernel's answer for a connection iptables redirected stands";
}

// getsockopt answers SO_ORIGINAL_DST only in an enrolled pod: there, for a connection it
// did not redirect, with the local address as conntrack would; elsewhere the kernel's own
// answer stands (no conntrack here: an error). Both of the program's exits that use no
// entry: a listener port that has entries (15001) and one that never has (15006).
TEST_F(DatapathTest, SoOriginalDstIsAnsweredOnlyInAnEnrolledPod) {
  auto proxy = env->start_proxy();
  enroll();
  // the proxy refuses a call to itself; what getsockopt told it is in its newest accept
  auto event_for = [&](int port) {
    auto is_it = [&](const json& j) {
      return j.value("event", "") == "accept" && j.value("local", "") == env->pod_ip4 + ":" + std::to_string(port);
    };
    auto seen = [&] {
      std::vector<json> out;
      for (const auto& j : proxy->lines())
        if (is_it(j)) out.push_back(j);
      return out;
    };
    size_t before = seen().size();
    env->pod_connect(env->pod_ip4, port);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (;;) {
      auto now = seen();
      if (now.size() > before) return now.back();
      if (std::chrono::steady_clock::now() > deadline) return json();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  };
  for (int port : {15001, 15006}) {
    auto ev = event_for(port);
    ASSERT_FALSE(ev.is_null()) << port;
    EXPECT_EQ(ev.value("orig_dst", ""), env->pod_ip4 + ":" + std::to_string(port)) << ev;
  }
  ASSERT_EQ(env->podsteer({"unenroll", "--netns", env->pod_ns}).rc, 0);
  for (int port : {15001, 15006}) {
    auto ev = event_for(port);
    ASSERT_FALSE(ev.is_null()) << port;
    EXPECT_FALSE(ev.contains("orig_dst")) << "unenrolled, the kernel answers: " << ev;
    EXPECT_TRUE(ev.contains("orig_dst_error")) << ev;
  }
}

// A full podsteer_orig (262,144 live outbound connections on the node) is counted, and the
// connection that did not fit fails closed: the proxy is told its own listener's address.
// Room again, connections go through again.
TEST_F(DatapathTest, AFullTupleTableIsCountedAndFailsClosed) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  enroll();
  int fd = bpf_obj_get((env->state_dir + "/maps/podsteer_orig").c_str());
  ASSERT_GE(fd, 0);
  bpf_map_info info{};
  __u32 len = sizeof(info);
  ASSERT_EQ(bpf_obj_get_info_by_fd(fd, &info, &len), 0);
  std::vector<podsteer_origdst_key> keys(info.max_entries);
  std::vector<podsteer_addr> values(info.max_entries);
  for (uint32_t i = 0; i < info.max_entries; ++i) {
    keys[i].netns_cookie = 1;  // no netns has cookie 1: these entries are no one's
    memcpy(keys[i].peer_addr, &i, sizeof(i));
    keys[i].local_port = 15001;
  }
  __u32 count = info.max_entries;
  ASSERT_EQ(bpf_map_update_batch(fd, keys.data(), values.data(), &count, nullptr), 0) << strerror(errno);
  ASSERT_EQ(count, info.max_entries);
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_EQ(c.value("reply", "").find("got=hello"), std::string::npos) << "no entry, yet it went through: " << c;
  auto refused = proxy->wait_for([&](const json& j) { return j.value("error", "") == "call to the proxy itself"; });
  EXPECT_FALSE(refused.is_null()) << "the proxy should have been told its own address";
  auto ev = env->status()["events"];
  EXPECT_EQ(ev.value("orig_full", 0ull), 1u) << ev;
  EXPECT_EQ(ev.value("transit_full", 0ull), 0u) << ev;
  EXPECT_NE(env->podsteer({"status"}).out.find("TABLES FULL: 1 outbound"), std::string::npos);

  count = 1000;
  ASSERT_EQ(bpf_map_delete_batch(fd, keys.data(), &count, nullptr), 0) << strerror(errno);
  auto again = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(again.value("reply", "").find("got=hello"), std::string::npos) << again;
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());
  count = info.max_entries - 1000;
  bpf_map_delete_batch(fd, keys.data() + 1000, &count, nullptr);
  close(fd);
}

// The proxy's connection from a client's address needs its podsteer_transi entry only
// until the app's side has the connection: the entry is gone while the connection lives,
// so the table is bounded by handshakes in flight, not by live inbound connections. Also
// when the app's side answers with SYN cookies, whose completing ACK needs the entry.
TEST_F(DatapathTest, TransitEntriesLastOnlyForTheHandshake) {
  auto proxy = env->start_proxy();
  auto app = env->start_server(env->pod_ns, 9090);
  enroll();
  auto transit_entries = [&] { return env->podsteer({"dump", "transit"}).out; };
  for (bool cookies : {false, true}) {
    SCOPED_TRACE(cookies ? "with SYN cookies" : "without SYN cookies");
    if (cookies) {
      ASSERT_EQ(sh("nsenter --net=" + env->pod_ns + " sysctl -qw net.ipv4.tcp_syncookies=2").rc, 0);
    }
    auto in = open_session(env->remote_ns, "", env->pod_ip4, 9090);
    auto r = session_request(*in, "held");
    ASSERT_NE(r.value("reply", "").find("got=held"), std::string::npos) << r;
    EXPECT_NE(r.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos) << r;
    auto d = transit_entries();
    EXPECT_NE(d.find("(0 entries)"), std::string::npos) << "the connection is open, its handshake done: " << d.substr(0, 400);
    EXPECT_NE(session_request(*in, "still").value("reply", "").find("got=still"), std::string::npos);
  }
  auto sent = sh("nsenter --net=" + env->pod_ns + " nstat -az TcpExtSyncookiesRecv | awk '/Syncookies/ {print $2}'").out;
  EXPECT_GT(atoi(sent.c_str()), 0) << "the app's side never took a cookie: " << sent;
}

TEST_F(DatapathTest, OriginalDestinationsLeaveNoEntriesBehindAndNeverMixUp) {
  // A long run through one pod: every entry goes when its connection closes (nothing
  // ages out of an LRU), and each proxy lookup finds its own connection's destination.
  const char* env_count = getenv("PODSTEER_TEST_CONNECTIONS");
  int count = env_count ? atoi(env_count) : 200000;
  for (const auto& ns : {env->pod_ns, env->remote_ns})
    ASSERT_EQ(sh("nsenter --net=" + ns + " sysctl -qw net.ipv4.ip_local_port_range='1024 65000' net.ipv4.tcp_tw_reuse=1").rc, 0);
  auto proxy = env->start_proxy({"--quiet"});
  auto s1 = env->start_server(env->remote_ns, 8080);
  auto s2 = env->start_server(env->remote_ns, 8081);
  enroll();
  // Meanwhile the client's threads are moved between CPUs all the time, so that some move
  // between connect4 (which stashes the original destination on its CPU) and sock_ops
  // (which takes it, from another CPU's ring if it must).
  Peer client({testpeer_bin(), "--netns", env->pod_ns, "--cgroup", env->app_cgroup, "connect-many", "--to",
               env->remote_ip4, "--ports", "8080,8081", "--count", std::to_string(count), "--parallel", "4"});
  long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
  long moves = 0;
  json r;
  while ((r = client.wait_for([](const json& j) { return j.contains("ok"); }, 1)).is_null()) {
    if (ncpu < 2) continue;
    std::error_code ec;
    for (const auto& t : std::filesystem::directory_iterator("/proc/" + std::to_string(client.pid()) + "/task", ec)) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(moves % ncpu, &set);
      sched_setaffinity(std::stoi(t.path().filename()), sizeof(set), &set);
      moves++;
    }
  }
  auto ev = env->status()["events"];
  fprintf(stderr, "%d connections, %ld thread moves; handoffs found on another CPU: %llu, missing: %llu\n", count,
          moves, ev.value("stash_migrated", 0ull), ev.value("stash_missing", 0ull));
  EXPECT_EQ(ev.value("stash_missing", 1ull), 0u) << ev;
  EXPECT_EQ(r.value("ok", 0), count) << r;
  EXPECT_EQ(r.value("wrong_destination", -1), 0) << r;
  EXPECT_EQ(counters()["redirected_out"], count);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (const char* map : {"orig", "transit"}) {
    auto d = env->podsteer({"dump", map});
    EXPECT_NE(d.out.find("(0 entries)"), std::string::npos) << map << ": " << d.out.substr(0, 600);
  }
}

// A chain may run before the runtime brings the pod's loopback up; the IPv6 local route of
// the return path needs it (found by bench/cni_add_latency.sh, whose pods have lo down).
TEST_F(DatapathTest, EnrollWorksBeforeTheRuntimeBringsLoopbackUp) {
  ASSERT_EQ(sh("ip -n " + env->pod_ns_name + " link set lo down").rc, 0);
  enroll();
  auto pod = env->status()["pods"][0];
  EXPECT_TRUE(pod["missing"].empty()) << pod;
  EXPECT_TRUE(pod["return_path"]["route6"].get<bool>()) << pod;
  EXPECT_NE(sh("ip -n " + env->pod_ns_name + " link show lo").out.find("UP"), std::string::npos);
}

// connect4 stashes the original destination on its CPU's ring; if the task moves to another
// CPU before sock_ops runs, sock_ops must find it there. Made deterministic: a socket that
// connect4 leaves alone (the app connects to the outbound listener itself) and a stash for
// it planted on another CPU's ring, as if connect4 had run there.
TEST_F(DatapathTest, SockOpsFindsTheOriginalDestinationOnAnotherCpusRing) {
  if (sysconf(_SC_NPROCESSORS_ONLN) < 2) GTEST_SKIP() << "needs two CPUs";
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  enroll();
  Peer client({testpeer_bin(), "--netns", env->pod_ns, "--cgroup", env->app_cgroup, "--cpu", "0", "connect", "--to",
               env->pod_ip4, "--port", "15001", "--send", "hello", "--hold-before-connect"},
              true);
  auto held = client.wait_for([](const json& j) { return j.contains("cookie"); });
  ASSERT_FALSE(held.is_null()) << client.output();
  ASSERT_EQ(held["cpu"], 0);
  podsteer::Fd conns(bpf_obj_get((env->state_dir + "/maps/podsteer_conns").c_str()));
  ASSERT_TRUE(conns.valid());
  int ncpu = libbpf_num_possible_cpus();
  std::vector<podsteer_conn_ring> rings(ncpu);  // all empty but CPU 1's
  podsteer_conn_slot& slot = rings[1].slot[2];
  slot.sock_cookie = held["cookie"].get<uint64_t>();
  in_addr remote{};
  inet_pton(AF_INET, env->remote_ip4.c_str(), &remote);
  uint32_t* w = reinterpret_cast<uint32_t*>(slot.orig.addr);
  w[2] = htonl(0xffff);
  w[3] = remote.s_addr;
  slot.orig.port = htons(8080);
  slot.orig.family = AF_INET;
  uint32_t zero = 0;
  ASSERT_EQ(bpf_map_update_elem(conns.get(), &zero, rings.data(), BPF_ANY), 0);
  client.send_line("go");
  auto r = client.wait_for([](const json& j) { return j.contains("connected"); });
  EXPECT_NE(r.value("reply", "").find("got=hello"), std::string::npos) << r;
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null()) << "the proxy got the stashed destination";
  auto ev = env->status()["events"];
  EXPECT_EQ(ev.value("stash_migrated", 0ull), 1u) << ev;
  EXPECT_EQ(ev.value("stash_missing", 1ull), 0u) << ev;
  // and without any stash, such a connection is counted as missing, not guessed at
  Peer again({testpeer_bin(), "--netns", env->pod_ns, "--cgroup", env->app_cgroup, "connect", "--to", env->pod_ip4,
              "--port", "15001", "--send", "hello"});
  again.wait_for([](const json& j) { return j.contains("connected"); });
  EXPECT_EQ(env->status()["events"].value("stash_missing", 0ull), 1u);
}

TEST_F(DatapathTest, DnsFailsOpenWithoutProxyAndTcp53RespectsLoopbackAndExclusions) {
  Peer udp({testpeer_bin(), "--netns", env->remote_ns, "serve-udp", "--port", "53"});
  ASSERT_FALSE(udp.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  auto tcp = env->start_server(env->remote_ns, 53);
  auto local = env->start_server(env->pod_ns, 53, "127.0.0.1");
  auto query = [&] {
    return peer_once({testpeer_bin(), "--netns", env->pod_ns, "--cgroup", env->app_cgroup, "udp", "--to",
                      env->remote_ip4, "--port", "53", "--send", "q1"});
  };
  // fail open, no proxy: DNS keeps working, straight to the resolver
  enroll({"--dns", "--fail-open"});
  auto q = query();
  EXPECT_EQ(q["reply"], "resolver:q1") << q;
  auto t = env->pod_connect(env->remote_ip4, 53);
  EXPECT_NE(t.value("reply", "").find("got=hello"), std::string::npos) << t;
  EXPECT_GE(counters()["proxy_missing"], 2);

  // with a proxy: TCP 53 to an excluded resolver and to loopback stays direct
  auto proxy = env->start_proxy({"--ports", "15001,15006,15008,15053"});
  ASSERT_EQ(env->podsteer({"enroll", "--netns", env->pod_ns, "--dns", "--exclude-outbound-cidrs", env->remote_ip4 + "/32"}).rc, 0);
  auto excluded = env->pod_connect(env->remote_ip4, 53);
  EXPECT_NE(excluded.value("reply", "").find("local=" + env->remote_ip4 + ":53"), std::string::npos) << excluded;
  auto loopback = env->pod_connect("127.0.0.1", 53);
  EXPECT_NE(loopback.value("reply", "").find("local=127.0.0.1:53"), std::string::npos) << loopback;
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  EXPECT_EQ(accepts(*proxy), 0);
  // the control: an unexcluded resolver is captured
  auto captured = env->pod_connect(env->remote_ip6, 53);
  EXPECT_NE(captured.value("reply", "").find("got=hello"), std::string::npos) << captured;
  EXPECT_EQ(accepts(*proxy), 1);
}

TEST_F(DatapathTest, ConcurrentEnrollUnenrollAndUninstallNeverLeaveAHalfWrittenPod) {
  // Three processes at once for a few seconds: two enroll and unenroll a pod each, the
  // third looks at the state and now and then uninstalls everything. The state lock
  // serializes them; every pod that ends up enrolled is whole, every pod that is not
  // has nothing of ours left in its netns.
  std::string base = podsteer_bin() + " --state-dir " + env->state_dir + " --hook-cgroup " + env->cgroup;
  auto loop = [&](const std::string& body) {
    return std::thread([body] { sh("for i in $(seq 25); do " + body + " >/dev/null 2>&1; done"); });
  };
  std::vector<std::thread> workers;
  workers.push_back(loop(base + " enroll --netns " + env->pod_ns + "; " + base + " unenroll --netns " + env->pod_ns));
  workers.push_back(loop(base + " enroll --netns " + env->remote_ns + " --fail-open; " + base + " unenroll --netns " +
                         env->remote_ns + "; " + base + " enroll --netns " + env->remote_ns + " --fail-open"));
  workers.push_back(loop(base + " status; [ $((i % 4)) = 0 ] && " + base + " uninstall"));
  for (auto& w : workers) w.join();

  auto st = env->status();
  std::set<std::string> enrolled;
  if (!st.is_null() && st.contains("pods")) {
    for (const auto& p : st["pods"]) {
      EXPECT_TRUE(p["missing"].empty()) << "half-written: " << p.dump();
      EXPECT_TRUE(p["active"].get<bool>()) << p.dump();
      enrolled.insert(p["netns"]);
    }
  }
  for (const auto& ns : {env->pod_ns, env->remote_ns}) {
    if (enrolled.count(ns)) continue;
    auto rules = sh("nsenter --net=" + ns + " ip rule; nsenter --net=" + ns + " sysctl -n net.ipv4.tcp_fwmark_accept");
    EXPECT_EQ(rules.out.find("proto 112"), std::string::npos) << ns << " keeps our rule:\n" << rules.out;
    EXPECT_NE(rules.out.find("\n0\n"), std::string::npos) << ns << ": tcp_fwmark_accept left at 1";
  }
}

}  // namespace

namespace {

// The programs_id the pinned state records: another value makes the next podsteer treat
// the pinned programs as another build's.
void set_pinned_programs_id(const std::string& state_dir, uint64_t id) {
  int fd = bpf_obj_get((state_dir + "/maps/podsteer_config").c_str());
  ASSERT_GE(fd, 0);
  __u32 zero = 0;
  podsteer_config c{};
  ASSERT_EQ(bpf_map_lookup_elem(fd, &zero, &c), 0);
  c.programs_id = id;
  ASSERT_EQ(bpf_map_update_elem(fd, &zero, &c, BPF_ANY), 0);
  close(fd);
}

TEST_F(DatapathTest, UpgradeReplacesProgramsInPlaceWithoutTouchingConnections) {
  auto proxy = env->start_proxy();
  auto server = env->start_server(env->remote_ns, 8080);
  auto app = env->start_server(env->pod_ns, 9090);
  enroll();
  auto out = open_session(env->pod_ns, env->app_cgroup, env->remote_ip4, 8080);
  auto in = open_session(env->remote_ns, "", env->pod_ip4, 9090);
  EXPECT_NE(session_request(*out, "before").value("reply", "").find("got=before"), std::string::npos);
  EXPECT_NE(session_request(*in, "before").value("reply", "").find("got=before"), std::string::npos);
  ASSERT_EQ(accepts(*proxy), 2);
  auto before = env->status();

  set_pinned_programs_id(env->state_dir, 42);
  auto r = env->podsteer({"status"});  // any podsteer that opens the state upgrades it
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("upgraded the programs in place"), std::string::npos) << r.out;
  auto after = env->status();
  ASSERT_EQ(after["cgroup_links"].size(), before["cgroup_links"].size());
  for (size_t i = 0; i < before["cgroup_links"].size(); ++i) {
    EXPECT_EQ(after["cgroup_links"][i]["link_id"], before["cgroup_links"][i]["link_id"]) << "link replaced, not updated";
    EXPECT_NE(after["cgroup_links"][i]["prog_id"], before["cgroup_links"][i]["prog_id"]) << "program not replaced";
  }
  const auto &ib = before["pods"][0]["inbound"], &ia = after["pods"][0]["inbound"];
  EXPECT_EQ(ia["sk_lookup_link_id"], ib["sk_lookup_link_id"]);
  EXPECT_NE(ia["sk_lookup_prog_id"], ib["sk_lookup_prog_id"]);
  EXPECT_TRUE(ia["attached"].get<bool>());
  EXPECT_EQ(after["pods"][0]["counters"]["redirected_out"], 1) << "the maps (and counters) are the same";

  // open connections never noticed, new ones are captured by the new programs
  EXPECT_NE(session_request(*out, "after").value("reply", "").find("got=after"), std::string::npos);
  EXPECT_NE(session_request(*in, "after").value("reply", "").find("got=after"), std::string::npos);
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
  auto i = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(i.value("reply", "").find("got=hello"), std::string::npos) << i;
  EXPECT_EQ(accepts(*proxy), 4);
  // and the next podsteer finds nothing to upgrade
  EXPECT_EQ(env->podsteer({"status"}).out.find("upgraded"), std::string::npos);
}

}  // namespace

namespace {

// An earlier release's CLI, built by scripts/build-previous.sh; empty (said loudly) if absent.
std::string earlier_release(const char* path) {
  if (access(path, X_OK) == 0) return path;
  fprintf(stderr, "\n*** SKIPPING: no earlier podsteer at %s (scripts/build-previous.sh builds it from git history) ***\n\n",
          path);
  return "";
}

// The release before this one re-marked every ingress packet with a cgroup_skb program;
// this build gives the proxy's transparent socket the app mark in sock_ops instead. Upgrading
// in place must take the old program away without breaking an open connection that kept
// the client's address, and new ones must still reach the app from the client's address.
// The flags a pinned map was made with (BPF_F_NO_PREALLOC: entries allocated one by one)
bpf_map_info pinned_map(const std::string& state_dir, const std::string& name) {
  bpf_map_info info{};
  int fd = bpf_obj_get((state_dir + "/maps/" + name).c_str());
  if (fd < 0) return info;  // id 0
  __u32 len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) info = {};
  close(fd);
  return info;
}
uint32_t pinned_map_flags(const std::string& state_dir, const std::string& name) {
  auto info = pinned_map(state_dir, name);
  return info.id ? info.map_flags : ~0u;
}

TEST_F(DatapathTest, TupleMapsArePreallocated) {
  enroll();
  for (const char* m : {"podsteer_orig", "podsteer_transi"})
    EXPECT_EQ(pinned_map_flags(env->state_dir, m), 0u) << m;
}

TEST_F(DatapathTest, UpgradeFromTheReleaseWithAPerPacketProgramKeepsTheClientsAddress) {
  const std::string old = earlier_release(PREVIOUS_CGROUP_SKB_BIN);
  if (old.empty()) GTEST_SKIP();
  auto proxy = env->start_proxy();  // connects to the app from the client's address
  auto app = env->start_server(env->pod_ns, 9090);
  auto server = env->start_server(env->remote_ns, 8080);
  auto r = run({old, "--state-dir", env->state_dir, "--hook-cgroup", env->cgroup, "enroll", "--netns", env->pod_ns});
  ASSERT_EQ(r.rc, 0) << r.out;
  unsigned remark_prog = 0;  // asked of the earlier release: this build's status would upgrade first
  auto old_status = json::parse(run({old, "--state-dir", env->state_dir, "status", "--json"}).out, nullptr, false);
  ASSERT_FALSE(old_status.is_discarded());
  for (const auto& l : old_status["cgroup_links"])
    if (l["program"] == "podsteer_remark") remark_prog = l["prog_id"];
  ASSERT_NE(remark_prog, 0u) << "the earlier release has its per-packet program";
  auto in = open_session(env->remote_ns, "", env->pod_ip4, 9090);
  auto before = session_request(*in, "before");
  EXPECT_NE(before.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos) << before;

  // that release made its tuple maps without preallocation; the upgrade keeps them. Two of
  // its maps had names longer than the kernel keeps (map ABI 2): the upgrade renames their
  // pins to the names the kernel gave them, and they stay the same maps.
  for (const char* name : {"podsteer_orig", "podsteer_transit"})
    ASSERT_EQ(pinned_map_flags(env->state_dir, name), uint32_t(BPF_F_NO_PREALLOC)) << name;
  std::map<std::string, uint32_t> ids;
  for (const char* name : {"podsteer_transit", "podsteer_listeners"}) {
    auto info = pinned_map(env->state_dir, name);
    ASSERT_NE(info.id, 0u) << name << " is the earlier release's pin";
    EXPECT_EQ(std::string(info.name), std::string(name).substr(0, 15)) << "the kernel keeps 15 characters";
    ids[name] = info.id;
  }
  auto out = open_session(env->pod_ns, env->app_cgroup, env->remote_ip4, 8080);
  ASSERT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());

  auto m = env->podsteer({"status"});  // this build opens the state: it upgrades in place
  ASSERT_EQ(m.rc, 0) << m.out;
  for (const char* name : {"podsteer_orig", "podsteer_transi"})
    EXPECT_EQ(pinned_map_flags(env->state_dir, name), uint32_t(BPF_F_NO_PREALLOC)) << name << ": the same map, kept";
  EXPECT_NE(m.out.find("map ABI 2 to 3"), std::string::npos) << m.out;
  for (const auto& [old_name, now] : std::map<std::string, std::string>{{"podsteer_transit", "podsteer_transi"},
                                                                         {"podsteer_listeners", "podsteer_listen"}}) {
    EXPECT_EQ(pinned_map(env->state_dir, now).id, ids[old_name]) << now << ": the same map under its new pin";
    EXPECT_EQ(pinned_map(env->state_dir, old_name).id, 0u) << old_name << "'s pin is gone";
    auto dump = sh("bpftool map dump name " + now);
    EXPECT_EQ(dump.rc, 0) << dump.out;
  }
  EXPECT_EQ(env->status()["config"]["abi_version"], PODSTEER_ABI_VERSION);
  // the outbound connection made before lives on, and so does its entry
  EXPECT_NE(session_request(*out, "after").value("reply", "").find("got=after"), std::string::npos);
  auto d = env->podsteer({"dump", "orig"});
  EXPECT_EQ(d.out.find("(0 entries)"), std::string::npos) << d.out.substr(0, 400);
  auto c_out = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_EQ(c_out.value("peer", ""), env->remote_ip4 + ":8080") << c_out;
  EXPECT_NE(m.out.find("detached only what this build no longer has: podsteer_remark"), std::string::npos) << m.out;
  auto st = env->status();
  for (const auto& l : st["cgroup_links"]) EXPECT_NE(l["program"], "podsteer_remark");
  EXPECT_TRUE(st["missing_hooks"].empty()) << st;
  EXPECT_TRUE(st["pods"][0]["missing"].empty()) << st;
  int left = 0;
  for (int i = 0; i < 40 && (left = sh("bpftool prog show id " + std::to_string(remark_prog)).rc == 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(left) << "the per-packet program is still loaded";

  auto after = session_request(*in, "after");
  EXPECT_NE(after.value("reply", "").find("got=after"), std::string::npos) << "the open connection broke: " << after;
  auto c = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(c.value("reply", "").find("peer=" + env->remote_ip4 + ":"), std::string::npos)
      << "a new connection must reach the app from the client's address, and its answers the proxy: " << c;
  EXPECT_EQ(accepts(*proxy), 4);  // inbound before and after, outbound before and after
}

TEST_F(DatapathTest, UninstallWorksWhenThePinnedStateCannotBeAdopted) {
  auto proxy = env->start_proxy();
  enroll();
  auto s = env->status();
  // a state made by another map ABI (or damaged): this build cannot adopt it
  int fd = bpf_obj_get((env->state_dir + "/maps/podsteer_config").c_str());
  ASSERT_GE(fd, 0);
  __u32 zero = 0;
  podsteer_config c{};
  ASSERT_EQ(bpf_map_lookup_elem(fd, &zero, &c), 0);
  c.abi_version = 99;
  ASSERT_EQ(bpf_map_update_elem(fd, &zero, &c, BPF_ANY), 0);
  close(fd);
  auto st = env->podsteer({"status"});
  EXPECT_NE(st.rc, 0);
  EXPECT_NE(st.out.find("map ABI 99"), std::string::npos) << st.out;

  auto r = env->podsteer({"uninstall"});
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("cannot adopt"), std::string::npos) << r.out;
  struct stat sb {};
  EXPECT_NE(stat(env->state_dir.c_str(), &sb), 0);
  for (const auto& l : s["cgroup_links"])
    EXPECT_NE(sh("bpftool link show id " + std::to_string(l["link_id"].get<unsigned>())).rc, 0) << l;
  EXPECT_NE(sh("bpftool link show id " + std::to_string(s["pods"][0]["inbound"]["sk_lookup_link_id"].get<unsigned>())).rc, 0);
  auto rules = sh("nsenter --net=" + env->pod_ns + " ip rule; nsenter --net=" + env->pod_ns +
                  " sysctl -n net.ipv4.tcp_fwmark_accept");
  EXPECT_EQ(rules.out.find("proto 112"), std::string::npos) << rules.out;
  EXPECT_NE(rules.out.find("\n0\n"), std::string::npos) << rules.out;
}

}  // namespace

namespace {

TEST_F(DatapathTest, MigratesAStateMadeByTheAbi1ReleaseWithoutUncapturingAnyone) {
  const std::string old = earlier_release(PREVIOUS_ABI1_BIN);
  if (old.empty()) GTEST_SKIP();
  // ABI 1 had no return path for connections from a client's address (issue 8)
  auto proxy = env->start_proxy({"--no-orig-src"});
  auto server = env->start_server(env->remote_ns, 8080);
  auto excluded = env->start_server(env->remote_ns, 8081);
  auto app = env->start_server(env->pod_ns, 9090);
  // the ABI 1 release enrolls the pod, with TC (clsact) for inbound
  auto r = run({old, "--state-dir", env->state_dir, "--hook-cgroup", env->cgroup, "enroll", "--netns", env->pod_ns,
                "--pod", "shop/web", "--tc-mode", "clsact", "--dns", "--exclude-outbound-ports", "8081"});
  ASSERT_EQ(r.rc, 0) << r.out;
  auto out = open_session(env->pod_ns, env->app_cgroup, env->remote_ip4, 8080);
  auto in = open_session(env->remote_ns, "", env->pod_ip4, 9090);
  EXPECT_NE(session_request(*out, "before").value("reply", "").find("got=before"), std::string::npos);
  EXPECT_NE(session_request(*in, "before").value("reply", "").find("got=before"), std::string::npos);
  ASSERT_EQ(accepts(*proxy), 2) << "the ABI 1 datapath captures both";

  auto m = env->podsteer({"status"});  // this build opens the ABI 1 state: it migrates
  ASSERT_EQ(m.rc, 0) << m.out;
  EXPECT_NE(m.out.find("migrated 1 pod(s) from map ABI 1"), std::string::npos) << m.out;
  auto st = env->status();
  ASSERT_EQ(st["pods"].size(), 1u) << st;
  const auto& pod = st["pods"][0];
  EXPECT_TRUE(pod["missing"].empty()) << pod;
  EXPECT_EQ(pod["pod"], "shop/web");
  EXPECT_TRUE(pod["dns"].get<bool>());
  EXPECT_EQ(pod["excluded_outbound_ports"], json::array({8081}));
  EXPECT_EQ(st["config"]["abi_version"], PODSTEER_ABI_VERSION);
  auto filters = sh("tc -n " + env->pod_ns_name + " filter show dev eth0 ingress");
  EXPECT_EQ(filters.out.find("podsteer_tc_ing"), std::string::npos) << "the ABI 1 TC filter is gone: " << filters.out;
  EXPECT_NE(filters.out.find("podsteer_node_i"), std::string::npos) << "this build's TC filter is there: " << filters.out;
  // tc releases a removed filter's program from a workqueue, a moment later
  std::string left;
  for (int i = 0; i < 40 && (left = sh("bpftool prog show | grep -c podsteer_tc_ing").out) != "0\n"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(left, "0\n") << "the ABI 1 TC program is still loaded";

  // open connections never noticed; new ones are captured by this build
  EXPECT_NE(session_request(*out, "after").value("reply", "").find("got=after"), std::string::npos);
  EXPECT_NE(session_request(*in, "after").value("reply", "").find("got=after"), std::string::npos);
  auto c = env->pod_connect(env->remote_ip4, 8080);
  EXPECT_FALSE(wait_accept(*proxy, env->remote_ip4 + ":8080").is_null());
  auto i = env->remote_connect(env->pod_ip4, 9090);
  EXPECT_NE(i.value("reply", "").find("got=hello"), std::string::npos) << i;
  EXPECT_FALSE(wait_accept(*proxy, env->pod_ip4 + ":9090").is_null());
  auto x = env->pod_connect(env->remote_ip4, 8081);
  EXPECT_NE(x.value("reply", "").find("local=" + env->remote_ip4 + ":8081"), std::string::npos) << x;
  EXPECT_EQ(accepts(*proxy), 4) << "the excluded port still goes direct";
}

}  // namespace
