#include "node.h"

#include <sstream>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <regex>
#include <filesystem>
#include <fstream>
#include <thread>

#include <fmt/format.h>

namespace podsteer::test {

namespace {
const char* kCniDirs[] = {"/usr/lib/cni", CNI_PLUGIN_DIR};

std::string plugin_path(const std::string& type) {
  for (const char* d : kCniDirs) {
    std::string p = std::string(d) + "/" + type;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return type;
}
}  // namespace

Node::Node() {
  id = unique_id();
  dir = "/tmp/podsteer-test-" + id;
  node_ns_name = "pst-" + id + "-node";
  cgroup = cgroup2_root() + "/podsteer-test-" + id;
  proxy_cgroup = cgroup + "/proxy";
  app_cgroup = cgroup + "/app";
  state_dir = "/sys/fs/bpf/podsteer-test-" + id;
  cni_socket = dir + "/cni.sock";
  zds_socket = dir + "/zds.sock";
  http_port = free_loopback_port(getpid() * 7 + std::stoi(id.substr(id.find('x') + 1)));
  std::filesystem::create_directories(dir);
  for (const auto& d : {cgroup, proxy_cgroup, app_cgroup}) mkdir(d.c_str(), 0755);
  auto r = sh("ip netns add " + node_ns_name + " && ip -n " + node_ns_name + " link set lo up");
  EXPECT_EQ(r.rc, 0) << r.out;
  conflist = {{"cniVersion", "1.0.0"},
              {"name", "podnet"},
              {"plugins",
               {{{"type", "bridge"},
                 {"bridge", "cni0"},
                 {"isGateway", true},
                 {"ipMasq", false},
                 {"ipam", {{"type", "host-local"}, {"subnet", "10.211.0.0/24"}, {"dataDir", dir + "/ipam"}}}},
                {{"type", "podsteer-cni"}, {"agentSocket", cni_socket}, {"enrollNamespaces", {"ambient"}}}}}};
}

Node::~Node() {
  std::error_code ec;
  proxy.reset();
  agent.reset();
  auto r = run({podsteer_bin(), "--state-dir", state_dir, "uninstall"});
  if (r.rc != 0) ADD_FAILURE() << "uninstall: " << r.out;
  kill_cgroup(proxy_cgroup);
  kill_cgroup(app_cgroup);
  kill_cgroup(cgroup);
  for (const auto& ns : netns_made_) sh("ip netns del " + ns + " 2>/dev/null");
  for (const auto& p : paths_made_) std::filesystem::remove_all(p, ec);
  sh("ip netns del " + node_ns_name + " 2>/dev/null");
  std::filesystem::remove_all(dir, ec);
}

void Node::start_agent(const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {AGENT_BIN, "--state-dir", state_dir, "--hook-cgroup", cgroup, "--cni-socket",
                                   cni_socket, "--zds-socket", zds_socket, "--enroll-namespaces", "ambient"};
  auto unless_given = [&](const std::string& flag, const std::string& value) {
    if (std::find(extra.begin(), extra.end(), flag) == extra.end()) argv.insert(argv.end(), {flag, value});
  };
  unless_given("--ack-timeout-ms", "2000");
  unless_given("--http-port", std::to_string(http_port));
  argv.insert(argv.end(), extra.begin(), extra.end());
  agent = std::make_unique<Peer>(argv);
  for (int i = 0; i < 250 && agent->output().find("http: /metrics") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_NE(agent->output().find("http: /metrics"), std::string::npos) << "agent did not start:\n" << agent->output();
}

void Node::start_proxy() {
  proxy = std::make_unique<Peer>(std::vector<std::string>{PROXY_BIN, "--zds-socket", zds_socket}, false, proxy_cgroup);
  EXPECT_FALSE(proxy->wait_for([](const json& j) { return j.value("event", "") == "snapshot_received"; }).is_null())
      << "proxy never got a snapshot:\n" << proxy->output();
}

CmdResult Node::plugin(const std::string& type, const std::string& command, const Pod& pod, const std::string& stdin_data,
                       const std::string& args_extra) {
  std::string args = fmt::format("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                                 pod.namespace_, pod.name, pod.container_id, pod.uid.empty() ? "uid-" + pod.name : pod.uid);
  if (!args_extra.empty()) args += ";" + args_extra;
  std::string cni_path = std::string(kCniDirs[0]) + ":" + kCniDirs[1];
  return run({"nsenter", "--net=/var/run/netns/" + node_ns_name, plugin_path(type)},
             {"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + pod.container_id, "CNI_NETNS=" + pod.netns,
              "CNI_IFNAME=eth0", "CNI_PATH=" + cni_path, "CNI_ARGS=" + args},
             stdin_data, true);
}

ChainResult Node::chain(const std::string& command, const Pod& pod, const json& conflist_override,
                        const std::string& args_extra) {
  const json& list = conflist_override.is_null() ? conflist : conflist_override;
  std::vector<json> plugins(list["plugins"].begin(), list["plugins"].end());
  if (command == "DEL") std::reverse(plugins.begin(), plugins.end());
  ChainResult out;
  json prev = command == "ADD" ? json() : pod.result;
  for (const auto& p : plugins) {
    json conf = p;
    conf["cniVersion"] = list["cniVersion"];
    conf["name"] = list["name"];
    if (!prev.is_null()) conf["prevResult"] = prev;
    auto r = plugin(p["type"], command, pod, conf.dump(), args_extra);
    out.rc = r.rc;
    out.out = r.out;
    out.result = json::parse(r.out, nullptr, false);
    if (r.rc != 0) return out;
    if (command == "ADD") prev = out.result;
  }
  return out;
}

ChainResult Node::add_pod(Pod& pod, const std::string& pod_namespace, const std::string& name) {
  pod.name = name;
  pod.namespace_ = pod_namespace;
  if (pod.netns_name.empty()) pod.netns_name = "pst-" + id + "-" + name;
  pod.netns = "/var/run/netns/" + pod.netns_name;
  if (pod.container_id.empty()) pod.container_id = "ctr-" + id + "-" + name;
  if (std::find(netns_made_.begin(), netns_made_.end(), pod.netns_name) == netns_made_.end()) {
    EXPECT_EQ(sh("ip netns add " + pod.netns_name + " && ip -n " + pod.netns_name + " link set lo up").rc, 0);
    netns_made_.push_back(pod.netns_name);
  }
  auto r = chain("ADD", pod);
  if (r.rc == 0) {
    pod.result = r.result;
    std::string cidr = r.result["ips"][0]["address"];
    pod.ip = cidr.substr(0, cidr.find('/'));
  }
  return r;
}

// Starts kube-testserver with dir/port as its port file; returns the port ("" on failure).
std::string start_kube_server(std::unique_ptr<Peer>& server, const std::string& dir,
                              const std::vector<std::string>& extra, const std::string& netns) {
  std::vector<std::string> argv = {KUBE_SERVER_BIN, "--port-file", dir + "/port"};
  if (!netns.empty()) argv.insert(argv.begin(), {"nsenter", "--net=" + netns});
  argv.insert(argv.end(), extra.begin(), extra.end());
  server = std::make_unique<Peer>(argv);
  std::string port;
  for (int i = 0; i < 100 && port.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    port = read_file(dir + "/port");
  }
  port.erase(port.find_last_not_of("\n") + 1);
  return port;
}

// A kubeconfig for the test server; user is the YAML of the user entry (e.g. "{}").
void write_kubeconfig(const std::string& path, const std::string& port, const std::string& user) {
  std::ofstream(path) << fmt::format(
      "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n"
      "    server: http://127.0.0.1:{}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: u\n"
      "    namespace: shop\nusers:\n- name: u\n  user: {}\n",
      port, user);
}

KubeApi::KubeApi(const std::string& dir, const std::string& in_netns, const std::vector<std::string>& extra)
    : netns(in_netns) {
  if (std::find(extra.begin(), extra.end(), "--tls-cert") != extra.end()) scheme = "https";
  port = start_kube_server(server, dir, extra, netns);
  EXPECT_FALSE(port.empty()) << server->output();
  kubeconfig = dir + "/kubeconfig";
  write_kubeconfig(kubeconfig, port, "{}");
}

CmdResult KubeApi::call(const std::string& method, const std::string& path, const json& body) {
  std::vector<std::string> argv = {"curl", "-s", "-k", "-X", method, "-H", "Content-Type: application/json",
                                   scheme + "://127.0.0.1:" + port + path};
  if (!body.is_null()) argv.insert(argv.end() - 1, {"-d", body.dump()});
  if (!netns.empty()) argv.insert(argv.begin(), {"nsenter", "--net=" + netns});
  return run(argv);
}

json KubeApi::get(const std::string& path) { return json::parse(call("GET", path).out, nullptr, false); }

void KubeApi::testctl(const std::string& what) { EXPECT_EQ(call("POST", "/testctl/" + what, json::object()).rc, 0); }

bool Node::make_netns(const std::string& name) {
  netns_made_.push_back(name);
  return sh("ip netns add " + name + " && ip -n " + name + " link set lo up").rc == 0;
}

json Node::status() {
  // this node's agent, never whatever listens on the default port
  auto r = run({podsteer_bin(), "--state-dir", state_dir, "status", "--json", "--agent",
                fmt::format("http://127.0.0.1:{}", http_port)});
  return json::parse(r.out, nullptr, false);
}

std::string Node::http_get(const std::string& path) {
  return run({"curl", "-s", "-i", fmt::format("http://127.0.0.1:{}{}", http_port, path)}).out;
}

std::vector<ListedMetric> readme_metrics() {
  std::istringstream in(read_file(README_PATH));
  std::vector<ListedMetric> out;
  bool inside = false;
  for (std::string line; std::getline(in, line);) {
    if (line == "<!-- metrics -->") inside = true;
    else if (line == "<!-- /metrics -->") break;
    else if (inside && line.rfind("| `", 0) == 0) {
      // | `name` | type | labels | what |
      std::vector<std::string> cells;
      std::istringstream row(line.substr(1));
      for (std::string c; std::getline(row, c, '|');) {
        auto b = c.find_first_not_of(' '), e = c.find_last_not_of(' ');
        cells.push_back(b == std::string::npos ? "" : c.substr(b, e - b + 1));
      }
      if (cells.size() < 4) continue;
      out.push_back({cells[0].substr(1, cells[0].size() - 2), cells[1], cells[3].rfind("*kube*", 0) == 0});
    }
  }
  return out;
}

std::vector<DashboardQuery> dashboard_queries() {
  auto dash = json::parse(read_file(DASHBOARD_PATH));
  std::vector<DashboardQuery> out;
  static const std::regex metric(R"(\b((?:podsteer|process)_[a-z0-9_]+)(\{([^}]*)\})?)");
  static const std::regex matcher(R"re(([a-z_]+)\s*=\s*"([^"]*)")re");
  static const std::regex by(R"(\bby\s*\(([^)]*)\))");
  for (const auto& p : dash["panels"]) {
    if (!p.contains("targets")) continue;
    for (const auto& t : p["targets"]) {
      DashboardQuery q;
      q.panel = p.value("title", "");
      q.expr = t.value("expr", "");
      for (std::sregex_iterator m(q.expr.begin(), q.expr.end(), metric), end; m != end; ++m) {
        std::map<std::string, std::string> labels;
        std::string sel = (*m)[3];
        for (std::sregex_iterator l(sel.begin(), sel.end(), matcher); l != end; ++l) labels[(*l)[1]] = (*l)[2];
        q.metrics.emplace_back((*m)[1], labels);
      }
      for (std::sregex_iterator b(q.expr.begin(), q.expr.end(), by), end; b != end; ++b) {
        std::istringstream names((*b)[1].str());
        for (std::string n; std::getline(names, n, ',');) {
          n.erase(0, n.find_first_not_of(' '));
          n.erase(n.find_last_not_of(' ') + 1);
          if (!n.empty()) q.by.push_back(n);
        }
      }
      out.push_back(q);
    }
  }
  return out;
}

std::map<std::string, std::string> scraped_types(const std::string& scrape) {
  std::map<std::string, std::string> out;
  std::istringstream in(scrape);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("# TYPE ", 0) != 0) continue;
    std::istringstream f(line.substr(7));
    std::string name, type;
    f >> name >> type;
    out[name] = type;
  }
  return out;
}


}  // namespace podsteer::test
