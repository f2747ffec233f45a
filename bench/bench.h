// The benchmark's parts, by what each measures:
//   setup.cpp      the pod and server netns, cgroups, cleanup on any exit, report helpers
//   traffic.cpp    connections through each mode: the server, the load, the SYN flood,
//                  switching a mode on and off (podsteer, Istio's rules, direct)
//   bpf_costs.cpp  what the programs cost: bpf_stats under load, the sk_lookup and TC
//                  programs and the tuple maps under BPF_PROG_TEST_RUN
//   main.cpp       the run: modes interleaved over rounds, results.json, RESULTS.md, the plot
#pragma once

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <netinet/in.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#ifndef TCP_NODELAY
#define TCP_NODELAY 1  // netinet/tcp.h clashes with linux/tcp.h, needed for the test packet
#endif
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <net/if.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "podsteer_abi.h"
#include "lookup_cookie.h"
#include "pod_netns.h"
#include "podsteer_empty.skel.h"
#include "podsteer_lookup.skel.h"
#include "podsteer_tuplemap.skel.h"
#include "wire.h"
#include "zds.pb.h"

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

namespace bench {

struct Setup {
  std::string id, pod_ns, srv_ns, cgroup, proxy_cg, app_cg, state_dir, dir;
  std::string pod_ip = "10.230.0.2", srv_ip = "10.230.0.1";
  uint16_t port = 8080;      // the server in the other netns (outbound)
  uint16_t app_port = 9090;  // the app in the pod (inbound)
  pid_t app_pid = -1;
  std::string podsteer, proxy_bin;
  pid_t server_pid = -1, proxy_pid = -1;
  double settle = 0.5;  // seconds every mode waits after its switch, before it is measured
};

// ---- setup.cpp
int sh(const std::string& cmd);
extern std::function<void()> g_cleanup;  // set once there is something to clean up
// Once, whoever gets there first (a failed step, a stop signal, the end of the run).
void clean_up();
void must(bool ok, const std::string& what);
// SIGINT and SIGTERM clean up too.
void clean_up_on_signals();
std::string cg2_root();
void enter(const std::string& netns, const std::string& cgroup);
sockaddr_in addr4(const std::string& ip, uint16_t port);
bool read_n(int fd, char* buf, size_t n);
double busy_cpu_ns();
double median(std::vector<double> v);
std::string spread(const std::vector<double>& v, int prec = 0);
std::string machine();

// ---- traffic.cpp
struct LoadResult {
  double conn_per_sec = 0, p50_us = 0, p99_us = 0, gbit_per_sec = 0;
  uint64_t errors = 0, count = 0;
};

void run_server(uint16_t port);
int connect_to(const std::string& ip, uint16_t port);
LoadResult load(const std::string& kind, const std::string& ip, uint16_t port, double seconds, int threads,
                uint64_t bulk_bytes);
// load() run from netns (in cgroup, when given), in a child process
LoadResult load_in(const std::string& netns, const std::string& cgroup, const std::string& kind, const std::string& ip,
                   uint16_t port, double seconds, int threads, uint64_t bulk_bytes);
// load_in() from the pod's app cgroup
LoadResult load_in_pod(const Setup& s, const std::string& kind, const std::string& ip, uint16_t port, double seconds,
                       int threads, uint64_t bulk_bytes);
uint64_t syn_flood(const std::string& ip, uint16_t port, double seconds);
// inbound load while a flooder sends SYNs from spoofed addresses; returns the SYNs sent
std::pair<LoadResult, uint64_t> inbound_under_flood(const Setup& s, const std::string& ip, uint16_t port, double seconds,
                                                    int threads);
std::string istio_rules(int exclusions);
std::string cidr_list(int n);
void mode_on(const Setup& s, const std::string& mode, int exclusions);
void mode_off(const Setup& s, const std::string& mode);
std::pair<std::string, uint16_t> target(const Setup& s, const std::string& mode);
std::pair<std::string, uint16_t> inbound_target(const Setup& s, const std::string& mode);

// ---- bpf_costs.cpp
struct ProgStat {
  uint64_t ns = 0, cnt = 0;
};

bool read_prog_stat(int prog_fd, ProgStat& st);
std::map<std::string, ProgStat> prog_stats(const Setup& s);
// Programs that do nothing, one of each type of podsteer's, attached next to them while
// bpf_stats runs: the cost bpf_stats reports for a run of a program that does nothing.
class EmptyProgs {
 public:
  explicit EmptyProgs(const Setup& s) : pod_ns_(s.pod_ns) {
    skel_ = podsteer_empty__open_and_load();
    must(skel_ != nullptr, "load the empty programs");
    podsteer::Fd cg(open(s.cgroup.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    podsteer::Fd ns(open(s.pod_ns.c_str(), O_RDONLY | O_CLOEXEC));
    bpf_program* p;
    bpf_object__for_each_program(p, skel_->obj) {
      if (bpf_program__type(p) == BPF_PROG_TYPE_SCHED_CLS) {
        tc_egress(ns.get(), bpf_program__fd(p), true);
        continue;
      }
      bool lookup = bpf_program__type(p) == BPF_PROG_TYPE_SK_LOOKUP;
      bpf_link* l = lookup ? bpf_program__attach_netns(p, ns.get()) : bpf_program__attach_cgroup(p, cg.get());
      must(l != nullptr, std::string("attach ") + bpf_program__name(p));
      links_.push_back(l);
    }
  }
  ~EmptyProgs() {
    for (auto* l : links_) bpf_link__destroy(l);
    podsteer::Fd ns(open(pod_ns_.c_str(), O_RDONLY | O_CLOEXEC));
    if (ns.valid()) tc_egress(ns.get(), -1, false);
    podsteer_empty__destroy(skel_);
  }
  EmptyProgs(const EmptyProgs&) = delete;
  EmptyProgs& operator=(const EmptyProgs&) = delete;
  // by podsteer's program name: "sockops", "connect4", ..., "lookup"
  std::map<std::string, ProgStat> stats() const {
    std::map<std::string, ProgStat> out;
    bpf_program* p;
    bpf_object__for_each_program(p, skel_->obj) {
      ProgStat st;
      if (read_prog_stat(bpf_program__fd(p), st)) out[std::string(bpf_program__name(p)).substr(6)] = st;  // strip "empty_"
    }
    return out;
  }

 private:
  // The empty TC program at egress on the pod's eth0, a cls_bpf filter after podsteer's
  // (attach), or removed (!attach); in a thread of its own inside the pod's netns.
  void tc_egress(int ns, int prog, bool attach) {
    bool ok = false;
    std::thread t([&] {
      if (setns(ns, CLONE_NEWNET) != 0) return;
      bpf_tc_hook hook{};
      hook.sz = sizeof(hook);
      hook.ifindex = static_cast<int>(if_nametoindex("eth0"));
      hook.attach_point = BPF_TC_EGRESS;
      bpf_tc_opts opts{};
      opts.sz = sizeof(opts);
      opts.handle = 0xe0;
      opts.priority = 0xd000;
      if (!attach) {
        ok = bpf_tc_detach(&hook, &opts) == 0;
        return;
      }
      opts.prog_fd = prog;
      ok = bpf_tc_attach(&hook, &opts) == 0;
      if (!ok && bpf_tc_hook_create(&hook) == 0) ok = bpf_tc_attach(&hook, &opts) == 0;  // no clsact yet (tcx)
    });
    t.join();
    if (attach) must(ok, "attach empty_tc_egress");
  }

  std::string pod_ns_;
  podsteer_empty* skel_ = nullptr;
  std::vector<bpf_link*> links_;
};

json lookup_test_run(bool smoke);
json tc_test_run(bool smoke);
json tuple_map_test_run(bool smoke);

}  // namespace bench
