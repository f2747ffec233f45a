// Hermetic test environment for the real-kernel tests: its own pod and remote netns
// joined by a veth, its own cgroup (the hook cgroup, with child cgroups for the proxy and
// the applications) and its own bpffs state dir, all with unique names and removed in the
// destructor, also when a test fails. Processes are the real podsteer CLI and testpeer.
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace podsteer::test {

using json = nlohmann::json;

struct CmdResult {
  int rc = -1;
  std::string out;  // stdout and stderr together
};

// Runs argv (no shell) and waits; env entries are added to the environment; stdin_data
// is written to its standard input. With split_stderr, out holds stdout only.
CmdResult run(const std::vector<std::string>& argv, const std::vector<std::string>& env = {},
              const std::string& stdin_data = "", bool split_stderr = false);
// Runs a shell line; for ip/tc/bpftool plumbing only.
CmdResult sh(const std::string& line);

std::string podsteer_bin();
std::string testpeer_bin();

// A background process (testpeer proxy/server/session) whose stdout lines are JSON.
class Peer {
 public:
  Peer(const std::vector<std::string>& argv, bool with_stdin = false, const std::string& cgroup = "");
  ~Peer();
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;
  // All JSON lines printed so far.
  std::vector<json> lines();
  // Waits until a line satisfying pred appears; returns it, or null json on timeout.
  json wait_for(const std::function<bool(const json&)>& pred, int timeout_ms = 5000);
  void send_line(const std::string& s);
  std::string output();  // everything printed so far, JSON or not
  void stop();
  // SIGTERM, then waits for the exit; its exit status, or -1 when it did not exit in time.
  int terminate(int timeout_ms = 10000);
  int pid() const { return pid_; }

 private:
  int pid_ = -1;
  int stdin_fd_ = -1;
  std::string out_path_;
};
// A testpeer "session": one TCP connection from netns ns (in cgroup cg when given) to
// to:port, kept open. session_request sends a request on it and returns the peer's line
// for it ({"request", "reply"}; an empty object if none came).
std::unique_ptr<Peer> open_session(const std::string& ns, const std::string& cg, const std::string& to, int port);
json session_request(Peer& session, const std::string& req);

// Runs a one-shot testpeer command and returns its single JSON line.
json peer_once(const std::vector<std::string>& argv);

bool have_privileges(std::string& why);

// A name unique to this test process and call: "<pid>x<n>". The residue check looks for
// leftovers by the "<pid>x" prefix.
std::string unique_id();
// A TCP port free on 127.0.0.1 now, below the ephemeral range (where the tests' own
// connections take ports), tried from one the seed picks.
int free_loopback_port(int seed);
std::string cgroup2_root();
std::string read_file(const std::string& path);

// Kills every process in cg and removes it.
void kill_cgroup(const std::string& cg);

// The test proxy's cgroup, trusted with the proxy mark (`podsteer proxy trust --cgroup`: what
// the agent does for its ZDS peers, before the proxy binds its ports) once a datapath is in
// the state dir, and until then after each podsteer command: a test that installs with an
// earlier release first (the upgrade tests) gets it trusted when this build has adopted the state.
class ProxyTrust {
 public:
  // argv0: podsteer with the test's --state-dir and --hook-cgroup
  void add(const std::string& cgroup, const std::string& state_dir, const std::vector<std::string>& argv0);
  void settle(const std::string& state_dir, const std::vector<std::string>& argv0);

 private:
  std::vector<std::string> pending_;
  std::set<std::string> done_;
};

class Env {
 public:
  Env();
  ~Env();
  Env(const Env&) = delete;
  Env& operator=(const Env&) = delete;

  std::string id;
  std::string pod_ns, remote_ns;  // /var/run/netns/... paths
  std::string pod_ns_name, remote_ns_name;
  std::string cgroup, proxy_cgroup, app_cgroup;
  std::string state_dir;
  std::string pod_ip4 = "10.201.0.2", remote_ip4 = "10.201.0.1";
  std::string pod_ip6 = "fd00:201::2", remote_ip6 = "fd00:201::1";
  std::string pod_if = "eth0";

  // podsteer --state-dir S --hook-cgroup C ARGS...
  CmdResult podsteer(const std::vector<std::string>& args, const std::vector<std::string>& env = {});
  json status();

  std::unique_ptr<Peer> start_proxy(const std::vector<std::string>& extra = {});
  std::unique_ptr<Peer> start_server(const std::string& netns, int port, const std::string& addr = "");
  // A one-shot client in the pod (in the app cgroup).
  json pod_connect(const std::string& to, int port, const std::vector<std::string>& extra = {});
  // The same from the proxy's cgroup (a process of the trusted proxy, as ztunnel's own)
  json proxy_connect(const std::string& to, int port, const std::vector<std::string>& extra = {});
  json remote_connect(const std::string& to, int port, const std::vector<std::string>& extra = {});

 private:
  ProxyTrust trust_;
};


}  // namespace podsteer::test

#define SKIP_WITHOUT_PRIVILEGES()                                                                 \
  do {                                                                                            \
    std::string why_;                                                                             \
    if (!podsteer::test::have_privileges(why_)) {                                                 \
      fprintf(stderr, "\n*** SKIPPING PRIVILEGED TEST: %s ***\n\n", why_.c_str());                \
      GTEST_SKIP() << "needs root and a BPF-capable kernel: " << why_;                            \
    }                                                                                             \
  } while (0)
