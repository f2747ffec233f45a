// Beside a CNI's socket load balancer (Cilium's kube-proxy replacement, at the cgroup root):
// it rewrites a service VIP to a backend inside connect(), before any packet and before
// netfilter, so under Istio's in-pod rules ztunnel learns the backend, not the service
// (istio #49149; Istio tells Cilium users to set socketLB.hostNamespaceOnly). podsteer's
// hooks sit at the pods' cgroup, below the LB's, and the kernel runs a cgroup's programs
// before its parents': the app's connect() reaches podsteer first. A socket LB of the
// test's own (tests/bpf/socket_lb.bpf.c) runs at the topology's node cgroup.
#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <thread>

#include "fd.h"
#include "socket_lb.skel.h"
#include "topology.h"

using namespace podsteer::test;

namespace {

class SocketLb : public ::testing::Test {
 protected:
  void SetUp() override { SKIP_WITHOUT_PRIVILEGES(); }
};

TEST_F(SocketLb, TheProxyLearnsTheServiceTheAppAskedForAndStillGoesThroughTheLb) {
  const std::string vip = "10.96.0.50";
  compare("a socket LB at a parent cgroup, service VIP -> backend", [&](Topology& t) {
    std::unique_ptr<socket_lb, void (*)(socket_lb*)> lb(socket_lb__open(), socket_lb__destroy);
    if (!lb) {
      ADD_FAILURE() << "socket_lb open";
      return json();
    }
    inet_pton(AF_INET, vip.c_str(), const_cast<uint32_t*>(&lb->rodata->vip));
    inet_pton(AF_INET, t.node2_4.c_str(), const_cast<uint32_t*>(&lb->rodata->backend));
    lb->rodata->port = htons(8080);
    EXPECT_EQ(socket_lb__load(lb.get()), 0);
    podsteer::Fd cg(open(t.node_cgroup.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    // links, detached when they are destroyed here (before the topology's cgroups go)
    std::unique_ptr<bpf_link, int (*)(bpf_link*)> c4(bpf_program__attach_cgroup(lb->progs.lb_connect4, cg.get()),
                                                     bpf_link__destroy);
    std::unique_ptr<bpf_link, int (*)(bpf_link*)> p4(bpf_program__attach_cgroup(lb->progs.lb_getpeername4, cg.get()),
                                                     bpf_link__destroy);
    EXPECT_TRUE(c4 && p4) << "attach the socket LB at " << t.node_cgroup;

    auto proxy = t.start_proxy();
    auto server = t.start_server(t.node2, 8080);
    t.capture();
    auto c = t.connect(From::AppPod, vip, 8080);
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    json accepted;
    for (const auto& j : proxy->lines())
      if (j.value("event", "") == "accept" && j.value("listener", 0) == 15001) accepted = j;
    json o = {{"reply", c.value("reply", "").find("got=hello") != std::string::npos},
              {"app_peer", c.value("peer", "")},
              {"via_proxy", !accepted.is_null()},
              // podsteer: the proxy's own connection to the VIP; Istio: the app's
              {"lb_balanced", lb->bss->balanced}};
    if (!accepted.is_null()) o["orig_dst"] = accepted.value("orig_dst", "");
    return o;
  }, {{"reply", true}, {"app_peer", vip + ":8080"}, {"via_proxy", true}, {"orig_dst", vip + ":8080"}, {"lb_balanced", 1}});
}

}  // namespace
