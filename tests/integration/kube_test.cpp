// The Kubernetes pod source against kube-testserver, driven with the real kubectl: label a
// running pod and see it captured, label it none and see new connections go direct, find
// running pods through /proc after a restart, and converge through watch-stream faults.
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "node.h"

using namespace podsteer::test;

#ifndef ISTIO_INPOD_SCRIPT
#error "ISTIO_INPOD_SCRIPT must be defined by the build"
#endif

namespace {

class KubeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_PRIVILEGES();
    if (access("/usr/bin/kubectl", X_OK) != 0 && run({"sh", "-c", "command -v kubectl"}).rc != 0) {
      fprintf(stderr, "\n*** SKIPPING KUBERNETES TEST: no kubectl on this machine ***\n\n");
      GTEST_SKIP() << "kubectl missing";
    }
    env = std::make_unique<Env>();
    dir = "/tmp/podsteer-test-" + env->id + "-kube";
    std::filesystem::create_directories(dir);
    node = "node-" + env->id;
    uid = "0a1b2c3d-" + env->id + "-web";
    std::ofstream(dir + "/token") << "token-one\n";
    port = start_kube_server(server, dir, {"--token-file", dir + "/token"});
    ASSERT_FALSE(port.empty()) << server->output();
    write_kubeconfig(dir + "/kubeconfig", port, "{tokenFile: " + dir + "/token}");
    // kubectl, as the test's user: client-go sends no token over plain http, and the test
    // server lets anonymous requests in
    write_kubeconfig(dir + "/kubectl-config", port, "{}");
    api("POST", "/api/v1/namespaces", R"({"metadata":{"name":"shop"}})");
    api("POST", "/api/v1/namespaces/shop/pods",
        json{{"metadata", {{"name", "web"}, {"uid", uid}, {"labels", {{"app", "web"}}}}},
             {"spec", {{"nodeName", node}, {"serviceAccountName", "web-sa"}}},
             {"status", {{"phase", "Running"}, {"podIP", env->pod_ip4}, {"podIPs", {{{"ip", env->pod_ip4}}, {{"ip", env->pod_ip6}}}}}}}
            .dump());
    // another node's pod, which this agent must never touch
    api("POST", "/api/v1/namespaces/shop/pods",
        json{{"metadata", {{"name", "elsewhere"}, {"labels", {{"istio.io/dataplane-mode", "ambient"}}}}},
             {"spec", {{"nodeName", "other-node"}}}, {"status", {{"phase", "Running"}, {"podIP", env->remote_ip4}}}}
            .dump());
    // the pod's "containers": a process in a kubelet-like cgroup that names the pod UID
    pod_cgroup = env->cgroup + "/kubepods/pod" + uid;
    std::filesystem::create_directories(pod_cgroup);
    app = std::make_unique<Peer>(std::vector<std::string>{testpeer_bin(), "--netns", env->pod_ns, "serve", "--port", "9090"},
                                 false, pod_cgroup);
    ASSERT_FALSE(app->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
    proxy_zds = dir + "/zds.sock";
  }
  void TearDown() override {
    agent.reset();
    proxy.reset();
    app.reset();
    server.reset();
    if (!pod_cgroup.empty()) {
      kill_cgroup(pod_cgroup);
      rmdir((env->cgroup + "/kubepods").c_str());
    }
    std::error_code ec;
    if (!dir.empty()) std::filesystem::remove_all(dir, ec);
  }
  CmdResult api(const std::string& method, const std::string& path, const std::string& body = "") {
    std::vector<std::string> argv = {"curl", "-s", "-X", method, "-H", "Authorization: Bearer " + token(), "-H",
                                     "Content-Type: application/json", "http://127.0.0.1:" + port + path};
    if (!body.empty()) argv.insert(argv.end() - 1, {"-d", body});
    return run(argv);
  }
  std::string token() {
    auto t = read_file(dir + "/token");
    return t.substr(0, t.find('\n'));
  }
  CmdResult kubectl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"kubectl"};
    argv.insert(argv.end(), args.begin(), args.end());
    return run(argv, {"KUBECONFIG=" + dir + "/kubectl-config"});
  }
  // The agent alone; start_agent also starts a proxy if none runs (ensure_proxy) and waits
  // for its snapshot.
  void launch_agent() {
    agent = std::make_unique<Peer>(std::vector<std::string>{
        AGENT_BIN, "--state-dir", env->state_dir, "--hook-cgroup", env->cgroup, "--cni-socket", dir + "/cni.sock",
        "--zds-socket", proxy_zds, "--http-port", std::to_string(http_port), "--kubeconfig",
        dir + "/kubeconfig", "--node-name", node});
  }
  void start_agent(const std::vector<std::string>& proxy_flags = {}) {
    launch_agent();
    ensure_proxy(proxy_flags);
  }
  void ensure_proxy(const std::vector<std::string>& proxy_flags = {}) {
    if (!proxy) {
      std::vector<std::string> argv = {PROXY_BIN, "--zds-socket", proxy_zds};
      argv.insert(argv.end(), proxy_flags.begin(), proxy_flags.end());
      proxy = std::make_unique<Peer>(argv, false, env->proxy_cgroup);
    }
    EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("event", "") == "snapshot_received"; }, 8000).is_null())
        << agent->output();
  }
  // Waits until podsteer status shows `want` pods captured.
  bool captured(size_t want, int timeout_ms = 8000) {
    for (int waited = 0;; waited += 100) {
      auto st = env->status();
      if (st.is_object() && st["pods"].size() == want) return true;
      if (waited >= timeout_ms) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  int proxy_inbound() {
    int n = 0;
    for (const auto& j : proxy->lines()) n += j.value("direction", "") == "inbound";
    return n;
  }
  json remote_call() { return env->remote_connect(env->pod_ip4, 9090); }

  std::unique_ptr<Env> env;
  std::unique_ptr<Peer> server, agent, proxy, app;
  std::string dir, node, uid, port, pod_cgroup, proxy_zds;
  int http_port = free_loopback_port(getpid());
};

TEST_F(KubeTest, KubectlLabelCapturesRunningPodAndNoneReleasesIt) {
  // The proxy connects to the app from the pod's own address here: such a connection
  // outlives the pod's release. (One made from the client's address does not, under
  // podsteer as under Istio's rules: releasing removes the return path it needs.)
  start_agent({"--no-orig-src"});
  auto before = remote_call();
  EXPECT_NE(before.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << "not enrolled: direct";
  EXPECT_TRUE(captured(0, 300));

  auto l = kubectl({"label", "pod", "web", "istio.io/dataplane-mode=ambient"});
  ASSERT_EQ(l.rc, 0) << l.out;
  ASSERT_TRUE(captured(1)) << agent->output();
  auto st = env->status();
  EXPECT_EQ(st["pods"][0]["pod"], "shop/web");
  auto c = remote_call();
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("direction", "") == "inbound"; }).is_null())
      << "inbound now goes through the proxy";
  std::string annotations;
  for (int i = 0; i < 50; ++i) {
    annotations = kubectl({"get", "pod", "web", "-o", "jsonpath={.metadata.annotations}"}).out;
    if (annotations.find("ambient.istio.io/redirection") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(annotations.find("\"ambient.istio.io/redirection\":\"enabled\""), std::string::npos) << annotations;
  // the README's metrics that only an agent with the Kubernetes source has
  auto types = scraped_types(run({"curl", "-s", fmt::format("http://127.0.0.1:{}/metrics", http_port)}).out);
  for (const auto& m : readme_metrics()) {
    if (!m.kube_only) continue;
    EXPECT_EQ(types[m.name], m.type) << m.name;
  }
  // the agent's view of its watch, as `podsteer status` shows it
  auto view = json::parse(run({"curl", "-s", fmt::format("http://127.0.0.1:{}/status", http_port)}).out, nullptr, false);
  ASSERT_TRUE(view.is_object() && view["kube"].is_object()) << view;
  EXPECT_EQ(view["kube"]["node"], node);
  EXPECT_TRUE(view["kube"].value("synced", false)) << view;
  EXPECT_GT(view["kube"].value("last_event_ms", int64_t(0)), 0) << "the label's MODIFIED event: " << view;

  // a connection open through the proxy survives the opt-out
  auto session = std::make_unique<Peer>(
      std::vector<std::string>{testpeer_bin(), "--netns", env->remote_ns, "session", "--to", env->pod_ip4, "--port", "9090"}, true);
  ASSERT_TRUE(session->wait_for([](const json& j) { return j.contains("connected"); }).value("connected", false));
  auto l2 = kubectl({"label", "--overwrite", "pod", "web", "istio.io/dataplane-mode=none"});
  ASSERT_EQ(l2.rc, 0) << l2.out;
  ASSERT_TRUE(captured(0)) << agent->output();
  int through_proxy = proxy_inbound();
  auto after = remote_call();
  EXPECT_NE(after.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << "direct again: " << after;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(proxy_inbound(), through_proxy);
  session->send_line("still");
  EXPECT_NE(session->wait_for([](const json& j) { return j.value("request", "") == "still"; }).value("reply", "").find("got=still"),
            std::string::npos)
      << "the open connection was not reset";
  auto gone = kubectl({"get", "pod", "web", "-o", "jsonpath={.metadata.annotations}"}).out;
  for (int i = 0; i < 50 && gone.find("ambient.istio.io/redirection") != std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gone = kubectl({"get", "pod", "web", "-o", "jsonpath={.metadata.annotations}"}).out;
  }
  EXPECT_EQ(gone.find("ambient.istio.io/redirection"), std::string::npos) << "removed on release: " << gone;
}

// The switch from istio-cni (README, "Switching from istio-cni"). Before it, Istio's in-pod
// rules (tests/lib/istio-inpod.sh) send the running pod's traffic to the node proxy, which
// serves the pod; istio-cni then goes, and a podsteer-agent starts. It takes the pod over:
// connections open across the switch keep working, new ones pass the proxy once, and Istio's
// chains leave the netns once podsteer's capture is live (mangle's connmark restore once the
// connections that need it have closed).
TEST_F(KubeTest, TakesOverAPodThatIstioCniCaptured) {
  auto far = std::make_unique<Peer>(std::vector<std::string>{testpeer_bin(), "--netns", env->remote_ns, "serve", "--port", "9091"});
  ASSERT_FALSE(far->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null());
  // istio-cni's time, made with podsteer and then its capture taken away: the proxy keeps
  // the pod (as it keeps every pod while no ZDS server is there), Istio's rules take over
  start_agent();
  ASSERT_EQ(kubectl({"label", "pod", "web", "istio.io/dataplane-mode=ambient"}).rc, 0);
  ASSERT_TRUE(captured(1)) << agent->output();
  agent.reset();  // SIGKILL: no DelWorkload
  auto un = env->podsteer({"unenroll", "--netns", env->pod_ns});
  ASSERT_EQ(un.rc, 0) << un.out;
  auto ist = run({ISTIO_INPOD_SCRIPT, "apply", env->pod_ns});
  ASSERT_EQ(ist.rc, 0) << ist.out;
  auto istio_chains = [&](const char* table) {
    return run({"nsenter", "--net=" + env->pod_ns, "iptables-save", "-t", table}).out.find(":ISTIO_") != std::string::npos;
  };
  ASSERT_TRUE(istio_chains("nat"));
  auto count_conns = [&](const char* dir) {
    int n = 0;
    for (const auto& j : proxy->lines()) n += j.value("event", "") == "connection" && j.value("direction", "") == dir;
    return n;
  };
  // open connections through Istio's rules and the proxy: into the pod, and out of it
  auto in = std::make_unique<Peer>(
      std::vector<std::string>{testpeer_bin(), "--netns", env->remote_ns, "session", "--to", env->pod_ip4, "--port", "9090"}, true);
  ASSERT_TRUE(in->wait_for([](const json& j) { return j.contains("connected"); }).value("connected", false));
  auto out = std::make_unique<Peer>(
      std::vector<std::string>{testpeer_bin(), "--netns", env->pod_ns, "session", "--to", env->remote_ip4, "--port", "9091"}, true,
      pod_cgroup);
  ASSERT_TRUE(out->wait_for([](const json& j) { return j.contains("connected"); }).value("connected", false));
  in->send_line("before");
  out->send_line("before");
  ASSERT_NE(in->wait_for([](const json& j) { return j.value("request", "") == "before"; }).value("reply", "").find("got=before"),
            std::string::npos);
  ASSERT_NE(out->wait_for([](const json& j) { return j.value("request", "") == "before"; }).value("reply", "").find("got=before"),
            std::string::npos);
  int in0 = count_conns("inbound"), out0 = count_conns("outbound");  // logged as they close

  // the switch: the agent starts; the proxy reconnects and keeps the pod
  launch_agent();
  ASSERT_TRUE(captured(1)) << agent->output();
  for (int i = 0; i < 50 && istio_chains("nat"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(istio_chains("nat")) << agent->output();
  EXPECT_FALSE(istio_chains("raw"));
  for (int i = 0; i < 20 && agent->output().find("took shop/web over") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_NE(agent->output().find("took shop/web over from istio-cni"), std::string::npos) << agent->output();
  int removed = 0;
  for (const auto& j : proxy->lines()) removed += j.value("event", "") == "pod_removed";
  EXPECT_EQ(removed, 0) << "the proxy never dropped the pod";
  // the open connections go on
  in->send_line("after");
  out->send_line("after");
  EXPECT_NE(in->wait_for([](const json& j) { return j.value("request", "") == "after"; }).value("reply", "").find("got=after"),
            std::string::npos)
      << "the inbound session across the switch";
  EXPECT_NE(out->wait_for([](const json& j) { return j.value("request", "") == "after"; }).value("reply", "").find("got=after"),
            std::string::npos)
      << "the outbound session across the switch";
  // new connections pass the proxy once
  auto c = remote_call();
  EXPECT_NE(c.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << "the client's address kept: " << c;
  auto o = env->pod_connect(env->remote_ip4, 9091);
  EXPECT_NE(o.value("reply", "").find("got="), std::string::npos) << o;
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(count_conns("inbound"), in0 + 1);
  EXPECT_EQ(count_conns("outbound"), out0 + 1);
  // mangle's restore goes once the sessions that need it have closed
  EXPECT_TRUE(istio_chains("mangle")) << "kept while the Istio-era connections are open";
  in.reset();
  out.reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(count_conns("inbound"), in0 + 2) << "the inbound session went through the proxy (Istio's rules)";
  EXPECT_EQ(count_conns("outbound"), out0 + 2) << "and the outbound one";
  for (int i = 0; i < 100 && istio_chains("mangle"); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(istio_chains("mangle")) << agent->output();
}

TEST_F(KubeTest, RestartedAgentFindsRunningPodsThroughProc) {
  // enrolled through its namespace before any agent runs
  auto l = kubectl({"label", "namespace", "shop", "istio.io/dataplane-mode=ambient"});
  ASSERT_EQ(l.rc, 0) << l.out;
  start_agent();
  ASSERT_TRUE(captured(1)) << agent->output();
  auto st = env->status();
  EXPECT_EQ(st["pods"][0]["pod"], "shop/web");
  EXPECT_NE(st["pods"][0]["netns"].get<std::string>().find("/proc/"), std::string::npos) << st;
  // kill -9 and start again: nothing is detached, nothing is captured twice
  agent->stop();
  start_agent();
  std::this_thread::sleep_for(std::chrono::milliseconds(1000));
  EXPECT_TRUE(captured(1, 100));
  auto c = remote_call();
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos);
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("direction", "") == "inbound"; }).is_null());
  // the pod's own opt-out beats its namespace
  ASSERT_EQ(kubectl({"label", "pod", "web", "istio.io/dataplane-mode=none"}).rc, 0);
  EXPECT_TRUE(captured(0)) << agent->output();
}

// The annotation istiod reads, through a proxy's comings and goings: "enabled" once a proxy
// acked the pod, kept while that proxy is away (istiod must not flip the pod's peers to
// plaintext for a proxy restart); "pending" for a captured pod no proxy has acked yet (an
// agent that restarts without a proxy finds one), "enabled" again at the proxy's ack.
TEST_F(KubeTest, RedirectionAnnotationIsPendingUntilAProxyAcksAndNeverGoesBack) {
  auto annotation = [&] {
    return kubectl({"get", "pod", "web", "-o", "jsonpath={.metadata.annotations.ambient\\.istio\\.io/redirection}"}).out;
  };
  auto wait_for = [&](const std::string& want) {
    for (int i = 0; i < 100 && annotation() != want; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    return annotation();
  };
  ASSERT_EQ(kubectl({"label", "namespace", "shop", "istio.io/dataplane-mode=ambient"}).rc, 0);
  start_agent();
  ASSERT_TRUE(captured(1)) << agent->output();
  EXPECT_EQ(wait_for("enabled"), "enabled") << agent->output();

  proxy.reset();  // the proxy goes away (a ztunnel restart)
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));  // past a reconcile round
  EXPECT_EQ(annotation(), "enabled") << "not back to pending while the proxy is away";

  // a new agent, no proxy yet, and the annotation gone meanwhile: captured, not acked
  agent->stop();
  ASSERT_EQ(kubectl({"annotate", "pod", "web", "ambient.istio.io/redirection-"}).rc, 0);
  launch_agent();
  EXPECT_EQ(wait_for("pending"), "pending") << agent->output();
  ensure_proxy();  // the agent's snapshot, the proxy's ack

  EXPECT_EQ(wait_for("enabled"), "enabled") << agent->output();
}

// Open fds of pid that refer to the netns at path.
int netns_fds(int pid, const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return -1;
  std::string want = "net:[" + std::to_string(st.st_ino) + "]";
  int n = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    char buf[64] = {};
    if (readlink(e.path().c_str(), buf, sizeof(buf) - 1) > 0 && want == buf) n++;
  }
  return n;
}

TEST_F(KubeTest, PodCapturedThroughTheApiIsReleasedWhenDeleted) {
  ASSERT_EQ(kubectl({"label", "namespace", "shop", "istio.io/dataplane-mode=ambient"}).rc, 0);
  start_agent();
  ASSERT_TRUE(captured(1)) << agent->output();
  ASSERT_FALSE(proxy->wait_for([](const json& j) { return j.value("event", "") == "pod_added"; }).is_null());
  EXPECT_GT(netns_fds(proxy->pid(), env->pod_ns), 0) << "the proxy holds the pod's netns while it serves it";
  auto del = kubectl({"delete", "pod", "web", "--wait=false"});
  ASSERT_EQ(del.rc, 0) << del.out;
  EXPECT_TRUE(captured(0)) << agent->output();
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("event", "") == "pod_removed"; }).is_null())
      << "DelWorkload reached the proxy";
  EXPECT_EQ(netns_fds(agent->pid(), env->pod_ns), 0) << "the agent keeps no fd of a released pod's netns";
  for (int i = 0; i < 20 && netns_fds(proxy->pid(), env->pod_ns) > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(netns_fds(proxy->pid(), env->pod_ns), 0) << "nor does the proxy, once told";
  auto c = remote_call();
  EXPECT_NE(c.value("reply", "").find("peer=" + env->remote_ip4), std::string::npos) << "direct again: " << c;
}

TEST_F(KubeTest, RebootedNodeCapturesItsPodsAgainBeforeReady) {
  ASSERT_EQ(kubectl({"label", "namespace", "shop", "istio.io/dataplane-mode=ambient"}).rc, 0);
  start_agent();
  ASSERT_TRUE(captured(1)) << agent->output();
  // A reboot: bpffs is empty, nothing is attached, the proxy is gone; the pods (here: the
  // app process, in its netns) come back before the agent does.
  agent->stop();
  proxy.reset();
  auto un = env->podsteer({"uninstall"});
  ASSERT_EQ(un.rc, 0) << un.out;
  ASSERT_FALSE(std::filesystem::exists(env->state_dir + "/maps")) << "bpffs state is gone";
  start_agent();
  std::string url = fmt::format("http://127.0.0.1:{}/readyz", http_port);
  bool ready = false;
  for (int i = 0; i < 100 && !ready; ++i) {
    ready = run({"curl", "-s", "-i", url}).out.find("200 OK") != std::string::npos;
    if (!ready) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(ready) << agent->output();
  // at the moment it first says ready, the pod is captured again
  EXPECT_TRUE(captured(1, 0)) << agent->output();
  auto c = remote_call();
  EXPECT_NE(c.value("reply", "").find("got=hello"), std::string::npos) << c;
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("direction", "") == "inbound"; }).is_null());
}

TEST_F(KubeTest, WatchFaultsConverge) {
  start_agent();
  ASSERT_TRUE(captured(0, 300));
  std::string base = "http://127.0.0.1:" + port;
  auto flip = [&](const std::string& value) {
    auto r = kubectl({"label", "--overwrite", "pod", "web", "istio.io/dataplane-mode=" + value});
    EXPECT_EQ(r.rc, 0) << r.out;
  };
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // watches established

  // the connection drops in the middle of an event
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/cut-watches?mid_event=true"}).rc, 0);
  flip("ambient");
  EXPECT_TRUE(captured(1)) << "after a watch cut mid-event\n" << agent->output();

  // 410 Gone: history compacted past the agent's resourceVersion
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/compact"}).rc, 0);
  flip("none");
  EXPECT_TRUE(captured(0)) << "after 410 Gone\n" << agent->output();
  EXPECT_NE(agent->output().find("410"), std::string::npos);

  // events split across chunks at awkward places, and malformed events in the stream
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/split-chunks?on=true"}).rc, 0);
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/garbage"}).rc, 0);
  flip("ambient");
  EXPECT_TRUE(captured(1)) << "with split chunks and garbage\n" << agent->output();
  EXPECT_NE(agent->output().find("malformed"), std::string::npos);
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/split-chunks?on=false"}).rc, 0);

  // the token file is replaced: the old token stops working, the agent reads the new one
  std::ofstream(dir + "/token.new") << "token-two\n";
  std::filesystem::rename(dir + "/token.new", dir + "/token");
  ASSERT_EQ(run({"curl", "-s", "-d", "", base + "/testctl/cut-watches"}).rc, 0);
  flip("none");
  EXPECT_TRUE(captured(0)) << "after token rotation\n" << agent->output();
  auto metrics = run({"curl", "-s", fmt::format("http://127.0.0.1:{}/metrics", http_port)}).out;
  EXPECT_EQ(metrics.find("podsteer_kube_relists_total 0"), std::string::npos) << "410 made both watches relist: " << metrics;
  EXPECT_EQ(metrics.find("podsteer_kube_event_errors_total 0"), std::string::npos) << "malformed events are counted";
}

}  // namespace

namespace {

// The manifests in deploy/ pass kubectl's client-side apply as the README installs them
// (apply -k), namespace first; the proxy is not among them. scripts/cluster-e2e.sh applies
// them to a real API server and kubelet.
TEST(Deploy, ManifestsPassKubectlClientDryRun) {
  if (run({"sh", "-c", "command -v kubectl"}).rc != 0) GTEST_SKIP() << "no kubectl";
  std::string dir = "/tmp/podsteer-deploy-" + unique_id();
  std::filesystem::create_directories(dir);
  std::unique_ptr<Peer> server;
  std::string port = start_kube_server(server, dir);
  ASSERT_FALSE(port.empty()) << server->output();
  write_kubeconfig(dir + "/kubeconfig", port, "{}");
  auto r = run({"kubectl", "apply", "--dry-run=client", "--validate=false", "-k", DEPLOY_DIR},
               {"KUBECONFIG=" + dir + "/kubeconfig"});
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out.find("namespace/podsteer-system created"), 0u) << "the namespace first:\n" << r.out;
  EXPECT_EQ(r.out.find("podsteer-proxy"), std::string::npos) << "a second node proxy beside ztunnel:\n" << r.out;
  for (const char* obj : {"daemonset.apps/podsteer-agent created", "clusterrole.rbac.authorization.k8s.io/podsteer-agent created",
                          "serviceaccount/podsteer-agent created", "configmap/podsteer-config created",
                          "role.rbac.authorization.k8s.io/podsteer-agent created"})
    EXPECT_NE(r.out.find(obj), std::string::npos) << obj << " in:\n" << r.out;
  // least privilege: no patch on pods themselves, only on their status subresource
  auto rbac = read_file(std::string(DEPLOY_DIR) + "/podsteer.yaml");  // rendered from the chart
  EXPECT_NE(rbac.find("resources: [\"pods/status\"]\n  verbs: [\"patch\"]"), std::string::npos) << rbac;
  EXPECT_NE(rbac.find("resources: [\"pods\"]\n  verbs: [\"get\", \"list\", \"watch\"]\n"), std::string::npos) << rbac;
  // the probes and the log level on localhost; /metrics alone on the node's address
  const std::string& ds = rbac;
  EXPECT_EQ(ds.find("0.0.0.0"), std::string::npos);
  EXPECT_EQ(ds.find("--http-addr"), std::string::npos);
  EXPECT_NE(ds.find("--metrics-addr \"$HOST_IP\""), std::string::npos);
  EXPECT_NE(ds.find("httpGet: {host: 127.0.0.1, path: /healthz"), std::string::npos);
  server.reset();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace

namespace {

// kubectl as a user runs it against the test API server: get -w streams the change a
// label makes, annotate and label round-trip.
TEST(KubeTestServer, KubectlGetWatchLabelAnnotate) {
  if (run({"sh", "-c", "command -v kubectl"}).rc != 0) GTEST_SKIP() << "no kubectl";
  std::string dir = "/tmp/podsteer-kubectl-" + unique_id();
  std::filesystem::create_directories(dir);
  std::unique_ptr<Peer> server;
  std::string port = start_kube_server(server, dir);
  ASSERT_FALSE(port.empty()) << server->output();
  write_kubeconfig(dir + "/kubeconfig", port, "{}");
  std::vector<std::string> env = {"KUBECONFIG=" + dir + "/kubeconfig"};
  run({"curl", "-s", "-d", R"({"metadata":{"name":"shop"}})", "http://127.0.0.1:" + port + "/api/v1/namespaces"});
  run({"curl", "-s", "-d", R"({"metadata":{"name":"web"},"spec":{"nodeName":"n1"},"status":{"phase":"Running","podIP":"10.0.0.5"}})",
       "http://127.0.0.1:" + port + "/api/v1/namespaces/shop/pods"});
  std::ofstream(dir + "/watch.sh") << "export KUBECONFIG=" << dir << "/kubeconfig\nexec kubectl get pods -w\n";
  Peer watch({"/bin/sh", dir + "/watch.sh"});
  for (int i = 0; i < 100 && watch.output().find("web") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto label = run({"kubectl", "label", "pod", "web", "istio.io/dataplane-mode=ambient"}, env);
  EXPECT_EQ(label.rc, 0) << label.out;
  EXPECT_NE(label.out.find("pod/web labeled"), std::string::npos) << label.out;
  auto annotate = run({"kubectl", "annotate", "pod", "web", "team=payments"}, env);
  EXPECT_EQ(annotate.rc, 0) << annotate.out;
  int rows = 0;
  for (int i = 0; i < 100 && rows < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    auto out = watch.output();
    rows = 0;
    for (size_t at = out.find("web"); at != std::string::npos; at = out.find("web", at + 1)) rows++;
  }
  EXPECT_GE(rows, 3) << "get -w shows the pod, then each change:\n" << watch.output();
  auto got = run({"kubectl", "get", "pod", "web", "-o", "jsonpath={.metadata.labels.istio\\.io/dataplane-mode} {.metadata.annotations.team}"}, env);
  EXPECT_EQ(got.out, "ambient payments");
  auto filtered = run({"kubectl", "get", "pods", "-l", "istio.io/dataplane-mode=ambient", "-o", "name"}, env);
  EXPECT_EQ(filtered.out, "pod/web\n");
  watch.stop();
  server.reset();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
