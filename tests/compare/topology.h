// Two nodes on one machine, for running the same case under podsteer and under Istio's
// in-pod rules (tests/lib/istio-inpod.sh) and comparing what a user observes.
//
//   node2 (another node: its own clients)  10.215.0.2  fd00:215::2
//     | veth
//   node1 (bridge br0 10.214.0.1 fd00:214::1, forwarding)
//     |-- app pod   10.214.0.10  fd00:214::10   captured; a ztunnel-like test proxy runs here
//     '-- peer pod  10.214.0.20  fd00:214::20   a client on the same node
//
// Everything lives in network namespaces, cgroups and a state dir of the topology's own,
// with unique names, removed in the destructor.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "harness.h"

namespace podsteer::test {

enum class Mode { Podsteer, Istio };
const char* mode_name(Mode m);

// Node: node1 itself, not under the hook cgroup, as the kubelet probes its pods.
enum class From { OtherNode, SameNodePod, AppPod, Node };

class Topology {
 public:
  explicit Topology(Mode mode);
  ~Topology();
  Topology(const Topology&) = delete;
  Topology& operator=(const Topology&) = delete;

  Mode mode;
  std::string id, node1, node2, app, peer;  // netns names
  // node_cgroup stands for the node's cgroup root (where a CNI's socket LB attaches); cgroup,
  // below it, is podsteer's hook cgroup, as kubepods is
  std::string node_cgroup, cgroup, proxy_cgroup, app_cgroup, peer_cgroup, state_dir;
  std::string app4 = "10.214.0.10", app6 = "fd00:214::10";
  std::string peer4 = "10.214.0.20", peer6 = "fd00:214::20";
  std::string node2_4 = "10.215.0.2", node2_6 = "fd00:215::2";
  std::string gw4 = "10.214.0.1", gw6 = "fd00:214::1";

  std::string netns(const std::string& name) const { return "/var/run/netns/" + name; }
  // What `podsteer enroll` or istio-inpod.sh does to the app pod; extra: podsteer flags.
  void capture(bool dns = false, const std::vector<std::string>& extra = {});
  CmdResult podsteer(const std::vector<std::string>& args);
  // kube-proxy's NodePort path in node1: node1's address on to-n2 (10.215.0.1) at
  // node_port is DNATed to the app pod's port and masqueraded to node1's address.
  void node_port(int node_port, int app_port);

  // The ztunnel-like proxy in the app pod (testpeer proxy), in its own cgroup.
  std::unique_ptr<Peer> start_proxy(const std::vector<std::string>& extra = {});
  // A line echo server: in the app pod (as the app, under the hook cgroup) or elsewhere.
  std::unique_ptr<Peer> start_app(int port, const std::string& addr = "");
  std::unique_ptr<Peer> start_server(const std::string& netns_name, int port, const std::string& addr = "");
  // A one-shot client (testpeer connect) from where; returns its JSON line.
  json connect(From from, const std::string& to, int port, const std::vector<std::string>& extra = {});
  std::vector<std::string> client_argv(From from) const;

 private:
  std::vector<std::string> podsteer_argv0() const;
  ProxyTrust trust_;
};

// A case: builds on a fresh topology and returns what a user observes, as JSON.
using Case = std::function<json(Topology&)>;

// Runs the case under podsteer and under Istio's rules, each on a fresh topology, records
// both in the side-by-side report, and fails when podsteer's observation differs from
// Istio's (field by field) or from `expected` (the fields given). A case where Istio's
// rules themselves miss `expected` is reported, not failed: it is not the reference.
void compare(const std::string& name, const Case& body, const json& expected = nullptr);

// The app's view of a connection from a testpeer server's reply line
// ("server local=A peer=B got=..."): the peer's address without its port.
std::string app_saw(const json& client_reply);
// Address without port: "10.0.0.1:80" -> "10.0.0.1", "[fd00::1]:80" -> "fd00::1".
std::string host_of(const std::string& addr);

}  // namespace podsteer::test
