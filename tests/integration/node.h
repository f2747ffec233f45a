// A node on one machine for the agent tests: a "node" netns holding the bridge, pods made
// by the real bridge + host-local CNI plugins with podsteer-cni chained (run the way a
// runtime runs them), podsteer-agent and podsteer-proxy as real processes, and the
// test's own cgroup, state dir and scratch dir, all removed in the destructor.
#pragma once

#include <map>

#include "harness.h"

namespace podsteer::test {

struct Pod {
  // uid (default "uid-<name>"), netns_name and container_id are chosen by add_pod unless set
  std::string name, namespace_, uid, container_id, netns_name, netns, ip;
  json result;  // the chain's ADD result, cached as a runtime does
};

struct ChainResult {
  int rc = -1;
  std::string out;  // the last plugin's stdout
  json result;      // parsed out, when it is JSON
};

class Node {
 public:
  Node();
  ~Node();
  std::string id, dir, node_ns_name, cgroup, proxy_cgroup, app_cgroup, state_dir;
  std::string cni_socket, zds_socket;
  int http_port;
  json conflist;
  std::unique_ptr<Peer> agent, proxy;

  void start_agent(const std::vector<std::string>& extra = {});
  void start_proxy();
  // Creates the pod's netns and runs the chain ADD; pod.result is set on success.
  ChainResult add_pod(Pod& pod, const std::string& pod_namespace, const std::string& name);
  ChainResult chain(const std::string& command, const Pod& pod, const json& conflist_override = nullptr,
                    const std::string& args_extra = "");
  // Runs one plugin binary as a runtime does (env + stdin) inside the node netns.
  CmdResult plugin(const std::string& type, const std::string& command, const Pod& pod, const std::string& stdin_data,
                   const std::string& args_extra = "");
  json status();
  std::string http_get(const std::string& path);
  // A netns (lo up) removed with the node; and a path removed with the node.
  bool make_netns(const std::string& name);
  void remove_later(const std::string& path) { paths_made_.push_back(path); }

 private:
  std::vector<std::string> netns_made_, paths_made_;
};

// Starts kube-testserver with dir/port as its port file; returns the port ("" on failure).
std::string start_kube_server(std::unique_ptr<Peer>& server, const std::string& dir,
                              const std::vector<std::string>& extra = {}, const std::string& netns = "");
// A kubeconfig for the test server; user is the YAML of the user entry (e.g. "{}").
void write_kubeconfig(const std::string& path, const std::string& port, const std::string& user);

// kube-testserver as a node's API server, with a kubeconfig for it in dir.
class KubeApi {
 public:
  // netns: run the server (and the test's calls to it) in that netns instead of the
  // machine's, where a plugin run in a node netns can reach it on 127.0.0.1
  explicit KubeApi(const std::string& dir, const std::string& netns = "", const std::vector<std::string>& extra = {});
  CmdResult call(const std::string& method, const std::string& path, const json& body = nullptr);
  json get(const std::string& path);
  void testctl(const std::string& what);  // POST /testctl/<what>
  std::unique_ptr<Peer> server;
  std::string port, kubeconfig, netns;
  std::string scheme = "http";  // https when started with --tls-cert
};

// The metrics README.md lists (its table between <!-- metrics --> and <!-- /metrics -->):
// name, Prometheus type, and whether only an agent with the Kubernetes source has it.
struct ListedMetric {
  std::string name, type;
  bool kube_only = false;
};
std::vector<ListedMetric> readme_metrics();
// What a scrape says each metric family is ("# TYPE name type" lines)
std::map<std::string, std::string> scraped_types(const std::string& scrape);

// What the Grafana dashboard (deploy/dashboards/podsteer.json) asks of each metric: every
// metric named in a panel's query, the label matchers it is given there (label -> value;
// regex matchers on instance left out) and the labels the query aggregates by.
struct DashboardQuery {
  std::string panel, expr;
  std::vector<std::pair<std::string, std::map<std::string, std::string>>> metrics;  // name, matchers
  std::vector<std::string> by;
};
std::vector<DashboardQuery> dashboard_queries();

}  // namespace podsteer::test
