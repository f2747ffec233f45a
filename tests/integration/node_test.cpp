// The node agent, CNI hook, ZDS handoff and podsteer-proxy, with the real CNI plugins run
// the way a runtime runs them.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <fstream>
#include <thread>

#include "node.h"
#include "wire.h"
#include "zds.pb.h"

using namespace podsteer::test;
namespace pb = istio::workload::zds;

namespace {

class NodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_PRIVILEGES();
    node = std::make_unique<Node>();
  }
  json connect_from(const Pod& pod, const std::string& to, int port, const std::string& text = "hello") {
    return peer_once({testpeer_bin(), "--netns", pod.netns, "--cgroup", node->app_cgroup, "connect", "--to", to, "--port",
                      std::to_string(port), "--send", text, "--timeout-ms", "2000"});
  }
  std::vector<json> proxy_connections() {
    std::vector<json> out;
    for (const auto& j : node->proxy->lines())
      if (j.value("event", "") == "connection") out.push_back(j);
    return out;
  }
  std::unique_ptr<Node> node;
};

bool got(const json& c, const std::string& text) {
  return c.value("reply", "").find("got=" + text) != std::string::npos;
}

TEST_F(NodeTest, CniAddCapturesPodAndProxySeesOriginalDestinations) {
  node->start_agent();
  node->start_proxy();
  Pod web, other;
  auto r = node->add_pod(web, "ambient", "web");
  ASSERT_EQ(r.rc, 0) << r.out << "\nagent:\n" << node->agent->output();
  auto r2 = node->add_pod(other, "default", "other");  // not enrolled: passes straight through
  ASSERT_EQ(r2.rc, 0) << r2.out;

  // prevResult is passed through unchanged: the chain's result equals the bridge's
  EXPECT_EQ(r.result["ips"], web.result["ips"]);
  EXPECT_EQ(r.result["interfaces"].size(), 3u);
  auto st = node->status();
  ASSERT_EQ(st["pods"].size(), 1u);
  EXPECT_EQ(st["pods"][0]["pod"], "ambient/web");
  EXPECT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "pod_added"; }).is_null());

  Peer server({testpeer_bin(), "--netns", other.netns, "serve", "--port", "8080"});
  // the pod's app runs under the hook cgroup, as a kubelet's pods run under kubepods
  Peer app({testpeer_bin(), "--netns", web.netns, "--cgroup", node->app_cgroup, "serve", "--port", "9090"});
  ASSERT_FALSE(server.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  ASSERT_FALSE(app.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  auto out = connect_from(web, other.ip, 8080, "out");
  EXPECT_TRUE(got(out, "out")) << out;
  EXPECT_EQ(out["peer"], other.ip + ":8080");
  auto in = connect_from(other, web.ip, 9090, "in");
  EXPECT_TRUE(got(in, "in")) << in;
  auto seen = node->proxy->wait_for([&](const json& j) { return j.value("direction", "") == "inbound"; });
  ASSERT_FALSE(seen.is_null()) << node->proxy->output();
  EXPECT_EQ(seen["original_dst"], web.ip + ":9090");
  EXPECT_EQ(seen["src"], in["local"]);
  auto conns = proxy_connections();
  ASSERT_GE(conns.size(), 2u);
  bool outbound_seen = false;
  for (const auto& c : conns) {
    if (c["direction"] != "outbound") continue;
    outbound_seen = true;
    EXPECT_EQ(c["original_dst"], other.ip + ":8080");
    EXPECT_EQ(c["src"], out["local"]);
    EXPECT_EQ(c["pod"], "ambient/web");
    EXPECT_EQ(c["bytes_up"], 4);  // "out\n"
  }
  EXPECT_TRUE(outbound_seen);
  // the pod that is not enrolled goes direct
  auto conns_before = proxy_connections().size();
  Peer other_app({testpeer_bin(), "--netns", other.netns, "serve", "--port", "9091"});
  other_app.wait_for([](const json& j) { return j.value("event", "") == "ready"; });
  auto plain = connect_from(other, other.ip, 9091, "plain");
  EXPECT_TRUE(got(plain, "plain"));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(proxy_connections().size(), conns_before) << "the other pod's own traffic is not captured";
}

TEST_F(NodeTest, CniDelTwiceCheckAndVersion) {
  node->start_agent();
  node->start_proxy();
  Pod web;
  ASSERT_EQ(node->add_pod(web, "ambient", "web").rc, 0);
  auto check = node->chain("CHECK", web);
  EXPECT_EQ(check.rc, 0) << check.out;
  EXPECT_EQ(check.out, "");

  auto del = node->chain("DEL", web);
  EXPECT_EQ(del.rc, 0) << del.out;
  EXPECT_TRUE(node->status()["pods"].empty());
  EXPECT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "pod_removed"; }).is_null());
  auto del2 = node->chain("DEL", web);
  EXPECT_EQ(del2.rc, 0) << "DEL is idempotent: " << del2.out;

  // CHECK of an enrolled pod that is not captured fails with a CNI error
  json conf = node->conflist["plugins"][1];
  conf["cniVersion"] = "1.0.0";
  conf["name"] = "podnet";
  conf["prevResult"] = web.result;
  auto bad_check = node->plugin("podsteer-cni", "CHECK", web, conf.dump());
  EXPECT_NE(bad_check.rc, 0);
  auto err = json::parse(bad_check.out, nullptr, false);
  ASSERT_FALSE(err.is_discarded()) << bad_check.out;
  EXPECT_EQ(err["code"], 100);
  EXPECT_NE(err.value("details", "").find("should be captured"), std::string::npos) << err;

  auto version = node->plugin("podsteer-cni", "VERSION", web, "");
  EXPECT_EQ(version.rc, 0);
  auto v = json::parse(version.out);
  EXPECT_EQ(v["supportedVersions"], json({"0.3.0", "0.3.1", "0.4.0", "1.0.0"}));
}

TEST_F(NodeTest, CniBadInputGivesErrorJsonAndAttachesNothing) {
  node->start_agent();
  node->start_proxy();
  Pod web;
  web.name = "web";
  web.namespace_ = "ambient";
  web.container_id = "ctr-" + node->id;
  web.netns_name = "pst-" + node->id + "-web";
  web.netns = "/var/run/netns/" + web.netns_name;
  ASSERT_EQ(sh("ip netns add " + web.netns_name).rc, 0);
  json prev = {{"cniVersion", "1.0.0"}, {"ips", {{{"address", "10.211.0.9/24"}}}}};
  auto conf = [&](const std::string& version, const std::string& socket) {
    return json{{"cniVersion", version}, {"name", "podnet"}, {"type", "podsteer-cni"}, {"agentSocket", socket},
                {"enrollNamespaces", {"ambient"}}, {"prevResult", prev}}
        .dump();
  };
  struct Case {
    std::string name, stdin_data;
    int code;
    Pod pod;
  };
  Pod missing = web;
  missing.netns = "/var/run/netns/does-not-exist-" + node->id;
  std::vector<Case> cases = {
      {"bad stdin", "{not json", 6, web},
      {"unknown version", conf("9.9.9", node->cni_socket), 1, web},
      {"missing netns", conf("1.0.0", node->cni_socket), 4, missing},
      {"dead agent", conf("1.0.0", node->dir + "/nobody-listens.sock"), 11, web},
      {"not chained", json{{"cniVersion", "1.0.0"}, {"name", "n"}, {"type", "podsteer-cni"}}.dump(), 7, web},
  };
  for (const auto& c : cases) {
    auto r = node->plugin("podsteer-cni", "ADD", c.pod, c.stdin_data);
    EXPECT_NE(r.rc, 0) << c.name;
    auto j = json::parse(r.out, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << c.name << ": not a CNI error object: " << r.out;
    EXPECT_EQ(j["code"], c.code) << c.name << ": " << j;
    EXPECT_TRUE(j.contains("msg")) << c.name;
    EXPECT_TRUE(node->status()["pods"].empty()) << c.name << " left a pod attached";
  }
  auto tc = sh("nsenter --net=" + web.netns + " bpftool net show");
  EXPECT_EQ(tc.out.find("podsteer"), std::string::npos) << tc.out;
  sh("ip netns del " + web.netns_name);
}

// Hand-encoded protobuf, independent of the protobuf library, pins the field numbers.
std::string field(int number, const std::string& bytes) {
  std::string out;
  out += static_cast<char>((number << 3) | 2);
  out += static_cast<char>(bytes.size());  // every test message is < 128 bytes
  return out + bytes;
}

TEST_F(NodeTest, ZdsWireFormatAndNetnsFdPassing) {
  node->start_agent();
  Pod web;
  // no proxy connected: an enrolled pod's ADD fails (the runtime retries) and nothing stays attached
  auto early = node->add_pod(web, "ambient", "web");
  EXPECT_NE(early.rc, 0);
  EXPECT_NE(early.out.find("no node proxy"), std::string::npos) << early.out;
  EXPECT_TRUE(node->status()["pods"].empty());

  // A hand-written ZDS client in place of the proxy.
  podsteer::Fd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, node->zds_socket.c_str(), sizeof(addr.sun_path) - 1);
  ASSERT_EQ(connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const std::string hello = {0x08, 0x01};  // ZdsHello{version: V1}
  ASSERT_EQ(send(sock.get(), hello.data(), hello.size(), 0), 2);
  auto snap = podsteer::zds::receive(sock.get(), 3000);
  ASSERT_TRUE(snap.ok()) << snap.error().message();
  EXPECT_EQ(snap->bytes, field(3, "")) << "empty snapshot: just SnapshotSent";
  pb::WorkloadResponse ack;
  ack.mutable_ack();
  ASSERT_TRUE(podsteer::zds::send(sock.get(), ack).ok());

  std::atomic<bool> done{false};
  podsteer::zds::Packet add_pkt;
  std::thread proxy_side([&] {
    auto p = podsteer::zds::receive(sock.get(), 10000);
    if (p) {
      add_pkt = std::move(*p);
      (void)podsteer::zds::send(sock.get(), ack);
    }
    done = true;
  });
  node->chain("DEL", web);  // the runtime cleans up the failed ADD before retrying
  auto r = node->add_pod(web, "ambient", "web");
  proxy_side.join();
  ASSERT_EQ(r.rc, 0) << r.out;
  // CNI_ARGS never carry the service account (containerd and CRI-O do not pass it); without
  // an API to ask, it is Kubernetes' own default: ztunnel needs one to find the workload
  std::string info = field(1, "web") + field(2, "ambient") + field(3, "default");
  std::string expected = field(1, field(1, "uid-web") + field(2, info));
  EXPECT_EQ(add_pkt.bytes, expected) << "AddWorkload on the wire";
  // and the protobuf library reads the same message
  auto req = podsteer::zds::parse<pb::WorkloadRequest>(add_pkt);
  ASSERT_TRUE(req.ok());
  EXPECT_EQ(req->add().uid(), "uid-web");
  EXPECT_EQ(req->add().workload_info().namespace_(), "ambient");
  // the fd that came with it is the pod's network namespace
  ASSERT_TRUE(add_pkt.fd.valid());
  struct stat passed {}, real {};
  ASSERT_EQ(fstat(add_pkt.fd.get(), &passed), 0);
  ASSERT_EQ(stat(web.netns.c_str(), &real), 0);
  EXPECT_EQ(passed.st_ino, real.st_ino);

  // a proxy that reconnects gets the pod in a snapshot, then SnapshotSent
  sock.reset();
  podsteer::Fd again(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  ASSERT_EQ(connect(again.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  pb::ZdsHello h;
  h.set_version(pb::V1);
  ASSERT_TRUE(podsteer::zds::send(again.get(), h).ok());
  auto s1 = podsteer::zds::receive(again.get(), 3000);
  ASSERT_TRUE(s1.ok());
  EXPECT_EQ(s1->bytes, expected);
  EXPECT_TRUE(s1->fd.valid());
  ASSERT_TRUE(podsteer::zds::send(again.get(), ack).ok());
  auto s2 = podsteer::zds::receive(again.get(), 3000);
  ASSERT_TRUE(s2.ok());
  EXPECT_EQ(s2->bytes, field(3, ""));
  ASSERT_TRUE(podsteer::zds::send(again.get(), ack).ok());

  // DEL reaches the proxy as DelWorkload{uid} (field 2 in DelWorkload, field 2 in the request)
  podsteer::zds::Packet del_pkt;
  std::thread proxy_del([&] {
    auto p = podsteer::zds::receive(again.get(), 10000);
    if (p) {
      del_pkt = std::move(*p);
      (void)podsteer::zds::send(again.get(), ack);
    }
  });
  auto d = node->chain("DEL", web);
  proxy_del.join();
  EXPECT_EQ(d.rc, 0) << d.out;
  EXPECT_EQ(del_pkt.bytes, field(2, field(2, "uid-web")));
}

TEST_F(NodeTest, AgentKilledUnderLoadLosesNoConnectionAndCatchesUp) {
  node->start_agent();
  node->start_proxy();
  Pod web, other, late;
  ASSERT_EQ(node->add_pod(web, "ambient", "web").rc, 0);
  ASSERT_EQ(node->add_pod(other, "default", "other").rc, 0);
  Peer server({testpeer_bin(), "--netns", other.netns, "serve", "--port", "8080"});
  ASSERT_FALSE(server.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::string first_failure;
  std::thread client([&] {
    while (!stop) {
      auto c = connect_from(web, other.ip, 8080, "load");
      if (got(c, "load")) ok++;
      else if (failed++ == 0) first_failure = c.dump();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  node->agent->stop();  // SIGKILL
  // a pod created while the agent is down: ADD fails, it never runs uncaptured
  auto down = node->add_pod(late, "ambient", "late");
  EXPECT_NE(down.rc, 0);
  EXPECT_EQ(json::parse(down.out, nullptr, false).value("code", 0), 11) << down.out;
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  node->start_agent();
  // the runtime retries (DEL, then ADD) until the agent, with its proxy reconnected, says yes
  ChainResult retried;
  for (int attempt = 0; attempt < 25; ++attempt) {
    node->chain("DEL", late);
    retried = node->add_pod(late, "ambient", "late");
    if (retried.rc == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(retried.rc, 0) << retried.out;
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  stop = true;
  client.join();
  EXPECT_EQ(failed, 0) << "first failure: " << first_failure;
  fprintf(stderr, "connections through the captured pod while the agent was killed and restarted: %d ok, %d failed\n",
          ok.load(), failed.load());
  EXPECT_GT(ok, 10);
  auto st = node->status();
  EXPECT_EQ(st["pods"].size(), 2u);
  auto late_out = connect_from(late, other.ip, 8080, "late");
  EXPECT_TRUE(got(late_out, "late"));
  EXPECT_FALSE(node->proxy->wait_for([&](const json& j) { return j.value("pod", "") == "ambient/late" && j.value("event", "") == "connection"; }).is_null())
      << "the late pod's traffic goes through the proxy";
  auto ready = node->http_get("/readyz");
  EXPECT_NE(ready.find("200 OK"), std::string::npos) << ready;
  auto metrics = node->http_get("/metrics");
  EXPECT_NE(metrics.find("podsteer_pods_captured 2"), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("podsteer_pod_connections_total{kind=\"redirected_out\",namespace=\"ambient\",pod=\"web\"}"), std::string::npos)
      << metrics;
}

TEST_F(NodeTest, ProxyRestartNeverBypassesAndResumesAfterSnapshot) {
  node->start_agent();
  node->start_proxy();
  Pod web, other;
  ASSERT_EQ(node->add_pod(web, "ambient", "web").rc, 0);
  ASSERT_EQ(node->add_pod(other, "default", "other").rc, 0);
  Peer server({testpeer_bin(), "--netns", other.netns, "serve", "--port", "8080"});
  ASSERT_FALSE(server.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  EXPECT_TRUE(got(connect_from(web, other.ip, 8080, "before"), "before"));
  node->proxy->stop();
  auto accepts_before = 0;
  for (const auto& j : server.lines()) accepts_before += j.value("event", "") == "accept";
  auto during = connect_from(web, other.ip, 8080, "during");
  EXPECT_FALSE(during.value("connected", true)) << "fail closed: " << during;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  int accepts_after = 0;
  for (const auto& j : server.lines()) accepts_after += j.value("event", "") == "accept";
  EXPECT_EQ(accepts_after, accepts_before) << "nothing reached the server around the proxy";
  auto notready = node->http_get("/readyz");
  EXPECT_NE(notready.find("503"), std::string::npos) << notready;

  node->start_proxy();
  EXPECT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "pod_added"; }).is_null());
  auto after = connect_from(web, other.ip, 8080, "after");
  EXPECT_TRUE(got(after, "after")) << after;
  EXPECT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("direction", "") == "outbound"; }).is_null());
}

}  // namespace

namespace {

TEST_F(NodeTest, CniInstallerChainsKeepsAndRemovesThePlugin) {
  std::string bin = node->dir + "/opt-cni-bin", conf = node->dir + "/etc-cni-net.d";
  ASSERT_EQ(sh("mkdir -p " + bin + " " + conf).rc, 0);
  json primary = {{"cniVersion", "1.0.0"}, {"name", "kindnet"}, {"plugins", {{{"type", "ptp"}}, {{"type", "portmap"}}}}};
  auto write_primary = [&] { std::ofstream(conf + "/10-kindnet.conflist") << primary.dump(2); };
  write_primary();
  std::ofstream(conf + "/99-other.conflist") << json{{"cniVersion", "1.0.0"}, {"name", "z"}, {"plugins", json::array()}}.dump();
  auto read_primary = [&] { return json::parse(read_file(conf + "/10-kindnet.conflist"), nullptr, false); };
  node->start_agent({"--install-cni", "--cni-bin-dir", bin, "--cni-conf-dir", conf, "--cni-plugin",
                     std::string(CNI_PLUGIN_DIR) + "/podsteer-cni"});
  auto has_ours = [&] {
    auto j = read_primary();
    return !j.is_discarded() && j["plugins"].size() == 3 && j["plugins"][2]["type"] == "podsteer-cni";
  };
  for (int i = 0; i < 100 && !has_ours(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(has_ours()) << read_file(conf + "/10-kindnet.conflist");
  EXPECT_EQ(read_primary()["plugins"][0]["type"], "ptp") << "the primary's plugins stay first and unchanged";
  EXPECT_EQ(read_primary()["plugins"][2]["agentSocket"], node->cni_socket);
  EXPECT_EQ(access((bin + "/podsteer-cni").c_str(), X_OK), 0);
  EXPECT_EQ(json::parse(read_file(conf + "/99-other.conflist"))["plugins"].size(), 0u) << "only the primary is touched";

  // the primary CNI rewrites its file: the agent puts us back
  write_primary();
  bool back = false;
  for (int i = 0; i < 150 && !back; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    back = has_ours();
  }
  EXPECT_TRUE(back) << "not re-added after the primary CNI rewrote its conflist";

  node->agent->stop();
  // podsteer uninstall takes the CNI entries with everything else, when told where they are
  auto r = run({podsteer_bin(), "--state-dir", node->state_dir, "uninstall", "--cni-conf-dir", conf, "--cni-bin-dir", bin});
  EXPECT_EQ(r.rc, 0) << r.out;
  auto again = run({AGENT_BIN, "--uninstall-cni", "--cni-bin-dir", bin, "--cni-conf-dir", conf});
  EXPECT_EQ(again.rc, 0) << "and the agent's own --uninstall-cni is idempotent: " << again.out;
  EXPECT_EQ(read_primary()["plugins"].size(), 2u) << read_file(conf + "/10-kindnet.conflist");
  EXPECT_NE(access((bin + "/podsteer-cni").c_str(), F_OK), 0);
}

// A new node: the agent starts before the primary CNI has written its config. It waits,
// not ready, instead of exiting into a crash loop, and chains in once the config is there.
TEST_F(NodeTest, AgentWaitsForThePrimaryCniConfigAndIsNotReadyMeanwhile) {
  std::string bin = node->dir + "/opt-cni-bin", conf = node->dir + "/etc-cni-net.d";
  ASSERT_EQ(sh("mkdir -p " + bin + " " + conf).rc, 0);
  node->start_agent({"--install-cni", "--cni-bin-dir", bin, "--cni-conf-dir", conf, "--cni-plugin",
                     std::string(CNI_PLUGIN_DIR) + "/podsteer-cni"});
  node->start_proxy();  // the one other thing readiness waits for
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  EXPECT_EQ(kill(node->agent->pid(), 0), 0) << "the agent exited instead of waiting:\n" << node->agent->output();
  auto early = node->http_get("/readyz");
  EXPECT_NE(early.find("503"), std::string::npos) << early;
  EXPECT_NE(early.find("primary CNI"), std::string::npos) << early;
  std::ofstream(conf + "/10-kindnet.conflist")
      << json{{"cniVersion", "1.0.0"}, {"name", "kindnet"}, {"plugins", {{{"type", "ptp"}}}}}.dump();
  bool chained = false, ready = false;
  for (int i = 0; i < 100 && !(chained && ready); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto j = json::parse(read_file(conf + "/10-kindnet.conflist"), nullptr, false);
    chained = !j.is_discarded() && j["plugins"].size() == 2 && j["plugins"][1]["type"] == "podsteer-cni";
    ready = node->http_get("/readyz").find("200 OK") != std::string::npos;
  }
  EXPECT_TRUE(chained) << read_file(conf + "/10-kindnet.conflist");
  EXPECT_TRUE(ready) << node->http_get("/readyz") << node->agent->output();
  node->agent->stop();
  EXPECT_EQ(run({AGENT_BIN, "--uninstall-cni", "--cni-bin-dir", bin, "--cni-conf-dir", conf}).rc, 0);
}

}  // namespace

namespace {

TEST_F(NodeTest, DnsIsCapturedAndForwardedByTheProxy) {
  node->start_agent({"--dns"});
  Pod web, other;
  ASSERT_EQ(node->add_pod(other, "default", "other").rc, 0);
  // podsteer-proxy sends captured DNS to the real resolver (in the other pod); the pod asks an
  // address where nothing listens, so only the capture can answer
  node->proxy = std::make_unique<Peer>(
      std::vector<std::string>{PROXY_BIN, "--zds-socket", node->zds_socket, "--dns-upstream", other.ip + ":53"}, false,
      node->proxy_cgroup);
  ASSERT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "snapshot_received"; }).is_null());
  ASSERT_EQ(node->add_pod(web, "ambient", "web").rc, 0);
  Peer resolver({testpeer_bin(), "--netns", other.netns, "serve-udp", "--port", "53"});
  ASSERT_FALSE(resolver.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  std::string nowhere = "10.211.0.250";
  auto q = peer_once({testpeer_bin(), "--netns", web.netns, "--cgroup", node->app_cgroup, "udp", "--to", nowhere, "--port",
                      "53", "--send", "example.org?"});
  EXPECT_EQ(q["reply"], "resolver:example.org?") << q;
  EXPECT_EQ(q["from"], nowhere + ":53") << "the reply appears to come from the resolver the pod asked";
  EXPECT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "dns"; }).is_null());
  EXPECT_EQ(node->status()["pods"][0]["counters"]["dns_redirected"], 1);
}

}  // namespace

namespace {

// With the agent away, podsteer-cni asks the API server itself, as istio-cni's plugin
// does: a pod the agent would not capture starts; an ambient pod, and any pod the API
// cannot tell about, does not. The API server runs in the node's netns, where the plugin
// runs (a kubelet's plugins reach the API from the node's own netns).
TEST_F(NodeTest, WithTheAgentAwayOnlyPodsItWouldCaptureWaitForIt) {
  std::string token = node->dir + "/api-token";
  std::ofstream(token) << "s3cret\n";
  KubeApi api(node->dir, "/var/run/netns/" + node->node_ns_name, {"--token-file", token});
  ASSERT_FALSE(api.port.empty()) << api.server->output();
  auto curl_auth = [&](const std::string& method, const std::string& path, const json& body) {
    return run({"nsenter", "--net=/var/run/netns/" + node->node_ns_name, "curl", "-s", "-X", method, "-H",
                "Authorization: Bearer s3cret", "-H", "Content-Type: application/json", "-d", body.dump(),
                "http://127.0.0.1:" + api.port + path});
  };
  for (const auto& [ns, ambient] :
       std::vector<std::pair<std::string, bool>>{{"plain", false}, {"mesh", true}, {"infra", true}}) {
    json labels = ambient ? json{{"istio.io/dataplane-mode", "ambient"}} : json::object();
    ASSERT_EQ(curl_auth("POST", "/api/v1/namespaces", {{"metadata", {{"name", ns}, {"labels", labels}}}}).rc, 0);
  }
  auto api_pod = [&](const std::string& ns, const std::string& name, const json& labels) {
    json pod = {{"metadata", {{"name", name}, {"uid", "uid-" + name}, {"labels", labels}}},
                {"spec", {{"nodeName", node->id}, {"containers", {{{"name", "app"}, {"image", "app"}}}}}},
                {"status", {{"phase", "Pending"}}}};
    ASSERT_EQ(curl_auth("POST", "/api/v1/namespaces/" + ns + "/pods", pod).rc, 0);
  };
  api_pod("plain", "web", json::object());
  api_pod("plain", "labelled", {{"istio.io/dataplane-mode", "ambient"}});
  api_pod("mesh", "app", json::object());
  api_pod("mesh", "optout", {{"istio.io/dataplane-mode", "none"}});
  api_pod("infra", "dns", {{"istio.io/dataplane-mode", "ambient"}});
  // podsteer-cni as the agent's installer writes it: no agent listens on agentSocket
  std::string plugin_token = node->dir + "/podsteer-cni.token";  // the agent's copy of its token
  std::ofstream(plugin_token) << "s3cret\n";
  node->conflist["plugins"][1]["kubernetes"] = {{"server", "http://127.0.0.1:" + api.port}, {"tokenFile", plugin_token}};
  node->conflist["plugins"][1]["enrollment"] = {
      {"label", "istio.io/dataplane-mode=ambient"}, {"systemNamespace", "istio-system"}, {"excludeNamespaces", {"infra"}}};

  Pod web, labelled, app, optout, excluded;
  auto r = node->add_pod(web, "plain", "web");
  EXPECT_EQ(r.rc, 0) << "a pod no one captures starts without the agent: " << r.out;
  EXPECT_FALSE(web.ip.empty()) << "prevResult passed on unchanged: " << r.out;
  r = node->add_pod(optout, "mesh", "optout");
  EXPECT_EQ(r.rc, 0) << "labelled none in an ambient namespace: " << r.out;
  r = node->add_pod(excluded, "infra", "dns");
  EXPECT_EQ(r.rc, 0) << "an excluded namespace is never captured, labelled or not: " << r.out;
  r = node->add_pod(labelled, "plain", "labelled");
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("the pod is ambient"), std::string::npos) << r.out;
  EXPECT_EQ(r.result.value("code", 0), 11) << "try again later: " << r.out;
  r = node->add_pod(app, "mesh", "app");
  EXPECT_NE(r.rc, 0) << "an ambient pod never starts uncaptured: " << r.out;

  // another pod of the same name in the API (the old one, not yet gone): cannot tell
  Pod again;
  again.uid = "uid-of-a-newer-web";
  again.netns_name = "pst-" + node->id + "-web2";
  again.container_id = "ctr-" + node->id + "-web2";
  r = node->add_pod(again, "plain", "web");
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("another pod of this name"), std::string::npos) << r.out;

  // the API down too: nobody can say, so the pod waits
  api.testctl("down?on=true");
  Pod later;
  later.netns_name = "pst-" + node->id + "-web3";
  later.container_id = "ctr-" + node->id + "-web3";
  r = node->add_pod(later, "plain", "web");  // a name the API knows, had it answered
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("cannot say"), std::string::npos) << r.out;

  // a wrong token is a refusal, not a yes
  std::ofstream(plugin_token) << "wrong\n";
  api.testctl("down?on=false");
  Pod refused;
  refused.netns_name = "pst-" + node->id + "-web4";
  refused.container_id = "ctr-" + node->id + "-web4";
  r = node->add_pod(refused, "plain", "web");
  EXPECT_NE(r.rc, 0) << "the API refused us: " << r.out;
  EXPECT_NE(r.out.find("HTTP 401"), std::string::npos) << r.out;

  // without API access in its config (the CNI-only pod source), the agent's absence fails ADD
  node->conflist["plugins"][1].erase("kubernetes");
  Pod no_api;
  no_api.netns_name = "pst-" + node->id + "-web5";
  no_api.container_id = "ctr-" + node->id + "-web5";
  r = node->add_pod(no_api, "plain", "web");
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("podsteer agent is not reachable"), std::string::npos) << r.out;
  for (Pod* p : {&web, &optout, &excluded, &labelled, &app, &again, &later, &refused, &no_api}) node->chain("DEL", *p);
}

}  // namespace

namespace {

// The kubelet's probes on a real node: the agent, told which netns is the node's, leaves
// the connections the node itself opens (a client in the node's netns, under no hook
// cgroup, as the kubelet is) to the app, even while the proxy refuses every plaintext
// inbound connection (ztunnel under STRICT). Traffic forwarded through the node - a
// NodePort, DNATed and masqueraded to the node's own address - has no socket there and
// stays captured: refused by the STRICT proxy, as ztunnel would refuse it.
TEST_F(NodeTest, KubeletProbesReachTheAppWhileNodePortTrafficIsCaptured) {
  std::string node_ns = "/var/run/netns/" + node->node_ns_name;
  node->start_agent({"--node-netns", node_ns});
  node->proxy = std::make_unique<Peer>(std::vector<std::string>{PROXY_BIN, "--zds-socket", node->zds_socket, "--strict"},
                                       false, node->proxy_cgroup);
  ASSERT_FALSE(node->proxy->wait_for([](const json& j) { return j.value("event", "") == "snapshot_received"; }).is_null());
  Pod web;
  ASSERT_EQ(node->add_pod(web, "ambient", "web").rc, 0) << node->agent->output();
  Peer app({testpeer_bin(), "--netns", web.netns, "--cgroup", node->app_cgroup, "serve", "--port", "9090"});
  ASSERT_FALSE(app.wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  auto hook = node->status()["pods"][0]["inbound"]["tc_ingress"];
  ASSERT_EQ(hook.size(), 1u) << hook;
  EXPECT_TRUE(hook[0]["attached"].get<bool>()) << hook;

  // the kubelet: httpGet/tcpSocket probes are plain connections from the node
  for (int i = 0; i < 3; ++i) {
    auto probe = peer_once({testpeer_bin(), "--netns", node_ns, "connect", "--to", web.ip, "--port", "9090", "--send",
                            "probe", "--timeout-ms", "2000"});
    EXPECT_TRUE(got(probe, "probe")) << "probe " << i << " did not reach the app: " << probe;
    EXPECT_NE(probe.value("reply", "").find("peer=10.211.0.1:"), std::string::npos) << probe;
  }
  for (const auto& c : proxy_connections())
    EXPECT_EQ(c.value("original_dst", "").find(web.ip + ":9090"), std::string::npos) << "a probe reached the proxy: " << c;
  auto dump = run({podsteer_bin(), "--state-dir", node->state_dir, "dump", "node"});
  EXPECT_NE(dump.out.find(web.ip + ":9090"), std::string::npos) << dump.out;

  // a client outside the node, through a NodePort (DNAT + MASQUERADE in the node's netns)
  std::string outside = "pst-" + node->id + "-out";
  ASSERT_TRUE(node->make_netns(outside));
  std::string setup = fmt::format(
      "set -e\n"
      "ip -n {out} link add eth0 type veth peer name to-out netns {n}\n"
      "ip -n {n} addr add 10.212.0.1/24 dev to-out && ip -n {n} link set to-out up\n"
      "ip -n {out} addr add 10.212.0.2/24 dev eth0 && ip -n {out} link set eth0 up\n"
      "ip -n {out} route add default via 10.212.0.1\n"
      "nsenter --net={ns} sysctl -qw net.ipv4.ip_forward=1\n"
      "nsenter --net={ns} iptables -w -t nat -A PREROUTING -p tcp -d 10.212.0.1 --dport 30090 -j DNAT --to-destination {pod}:9090\n"
      "nsenter --net={ns} iptables -w -t nat -A POSTROUTING -p tcp -d {pod} --dport 9090 -j MASQUERADE\n",
      fmt::arg("out", outside), fmt::arg("n", node->node_ns_name), fmt::arg("ns", node_ns), fmt::arg("pod", web.ip));
  auto s = run({"/bin/bash", "-c", setup});
  ASSERT_EQ(s.rc, 0) << s.out;
  auto np = peer_once({testpeer_bin(), "--netns", "/var/run/netns/" + outside, "connect", "--to", "10.212.0.1", "--port",
                       "30090", "--send", "nodeport", "--timeout-ms", "2000"});
  EXPECT_FALSE(got(np, "nodeport")) << "NodePort traffic went around the proxy: " << np;
  auto refused = node->proxy->wait_for([&](const json& j) {
    return j.value("event", "") == "connection" && j.value("original_dst", "") == web.ip + ":9090" &&
           j.value("error", "").find("refused") != std::string::npos;
  });
  EXPECT_FALSE(refused.is_null()) << "the proxy never saw the NodePort connection:\n" << node->proxy->output();
  node->chain("DEL", web);
}

}  // namespace

namespace {

// The same, against an API server that speaks TLS (as every real one does): podsteer-cni
// trusts it only through the cluster CA the agent left for it, and only under the name or
// address its certificate carries.
TEST_F(NodeTest, WithTheAgentAwayThePluginChecksTheApiServersCertificate) {
  std::string d = node->dir, ns = "/var/run/netns/" + node->node_ns_name;
  auto pki = run({"/bin/bash", "-c",
                  "set -e; cd " + d + "\n"
                  "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca 2>/dev/null\n"
                  "openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.crt -days 2 -subj /CN=other 2>/dev/null\n"
                  "openssl req -newkey rsa:2048 -nodes -keyout api.key -out api.csr -subj /CN=kube-apiserver 2>/dev/null\n"
                  "printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext\n"
                  "openssl x509 -req -in api.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out api.crt -days 2 "
                  "-extfile san.ext 2>/dev/null\n"});
  ASSERT_EQ(pki.rc, 0) << pki.out;
  KubeApi api(d, ns, {"--tls-cert", d + "/api.crt", "--tls-key", d + "/api.key"});
  ASSERT_FALSE(api.port.empty()) << api.server->output();
  ASSERT_EQ(api.call("POST", "/api/v1/namespaces", {{"metadata", {{"name", "plain"}}}}).rc, 0);
  ASSERT_EQ(api.call("POST", "/api/v1/namespaces/plain/pods",
                     {{"metadata", {{"name", "web"}, {"uid", "uid-web"}}},
                      {"spec", {{"nodeName", node->id}, {"containers", {{{"name", "app"}, {"image", "app"}}}}}}})
                .rc,
            0);
  int n = 0;
  auto add = [&](const std::string& server, const std::string& ca) {
    node->conflist["plugins"][1]["kubernetes"] = {{"server", server}, {"caFile", ca}};
    Pod p;
    p.netns_name = "pst-" + node->id + "-tls" + std::to_string(++n);
    p.container_id = "ctr-" + node->id + "-tls" + std::to_string(n);
    p.uid = "uid-web";
    auto r = node->add_pod(p, "plain", "web");
    node->chain("DEL", p);
    return r;
  };
  auto r = add("https://127.0.0.1:" + api.port, d + "/ca.crt");
  EXPECT_EQ(r.rc, 0) << "the cluster CA vouches for the server: " << r.out;
  r = add("https://127.0.0.1:" + api.port, d + "/other-ca.crt");
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("certificate"), std::string::npos) << r.out;
  r = add("https://localhost:" + api.port, d + "/ca.crt");
  EXPECT_NE(r.rc, 0) << "the certificate names 127.0.0.1, not localhost: " << r.out;
}

}  // namespace
