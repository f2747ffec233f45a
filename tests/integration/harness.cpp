#include "harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#ifndef PODSTEER_BIN
#error "PODSTEER_BIN must be defined by the build"
#endif

namespace podsteer::test {
namespace {

std::atomic<int> g_counter{0};

}  // namespace

std::string unique_id() { return fmt::format("{}x{}", getpid() % 100000, g_counter++); }

int free_loopback_port(int seed) {
  for (int i = 0; i < 500; ++i) {
    int port = 10000 + ((seed % 20000 + 20000) % 20000 + i * 97) % 20000;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) break;
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bool free = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    close(fd);
    if (free) return port;
  }
  ADD_FAILURE() << "no free port on 127.0.0.1";
  return 0;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string cgroup2_root() {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    auto dash = line.find(" - cgroup2 ");
    if (dash == std::string::npos) continue;
    std::istringstream head(line.substr(0, dash));
    std::string a, b, c, d, mp;
    head >> a >> b >> c >> d >> mp;
    return mp;
  }
  return "";
}

void kill_cgroup(const std::string& cg) {
  std::istringstream procs(read_file(cg + "/cgroup.procs"));
  int pid;
  while (procs >> pid) kill(pid, SIGKILL);
  for (int i = 0; i < 100 && !read_file(cg + "/cgroup.procs").empty(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  rmdir(cg.c_str());
}

std::string podsteer_bin() { return PODSTEER_BIN; }
std::string testpeer_bin() { return TESTPEER_BIN; }

CmdResult run(const std::vector<std::string>& argv, const std::vector<std::string>& env,
              const std::string& stdin_data, bool split_stderr) {
  int pipefd[2], in_pipe[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0 || pipe2(in_pipe, O_CLOEXEC) != 0) return {};
  pid_t pid = fork();
  if (pid == 0) {
    dup2(pipefd[1], 1);
    if (split_stderr) {
      int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, 2);
    } else {
      dup2(pipefd[1], 2);
    }
    dup2(in_pipe[0], 0);
    for (const auto& e : env) putenv(strdup(e.c_str()));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  close(in_pipe[0]);
  if (!stdin_data.empty()) (void)!write(in_pipe[1], stdin_data.data(), stdin_data.size());
  close(in_pipe[1]);
  CmdResult r;
  char buf[4096];
  ssize_t n;
  while ((n = read(pipefd[0], buf, sizeof(buf))) > 0) r.out.append(buf, n);
  close(pipefd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

CmdResult sh(const std::string& line) { return run({"/bin/sh", "-c", line}); }

Peer::Peer(const std::vector<std::string>& argv, bool with_stdin, const std::string& cgroup) {
  char tmpl[] = "/tmp/podsteer-peer-XXXXXX";
  int out = mkstemp(tmpl);
  out_path_ = tmpl;
  int in_pipe[2] = {-1, -1};
  if (with_stdin && pipe2(in_pipe, O_CLOEXEC) != 0) return;
  pid_t parent = getpid();
  pid_ = fork();
  if (pid_ == 0) {
    // a test that aborts must not leave its agent or proxy running (an agent left behind
    // keeps repairing its pins after a cleanup removed them)
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    setpgid(0, 0);
    if (!cgroup.empty()) {
      std::ofstream procs(cgroup + "/cgroup.procs");
      procs << getpid() << std::endl;
    }
    dup2(out, 1);
    dup2(out, 2);
    if (with_stdin) {
      dup2(in_pipe[0], 0);
    } else {
      int devnull = open("/dev/null", O_RDONLY);
      dup2(devnull, 0);
    }
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(out);
  if (with_stdin) {
    close(in_pipe[0]);
    stdin_fd_ = in_pipe[1];
  }
}

Peer::~Peer() { stop(); }

void Peer::stop() {
  if (stdin_fd_ >= 0) close(stdin_fd_);
  stdin_fd_ = -1;
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  if (!out_path_.empty()) unlink(out_path_.c_str());
}

int Peer::terminate(int timeout_ms) {
  if (pid_ <= 0) return -1;
  kill(pid_, SIGTERM);
  for (int waited = 0; waited < timeout_ms; waited += 20) {
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;  // still running: stop() kills it
}

void Peer::send_line(const std::string& s) {
  std::string l = s + "\n";
  if (write(stdin_fd_, l.data(), l.size()) < 0) ADD_FAILURE() << "write to peer stdin failed";
}

std::unique_ptr<Peer> open_session(const std::string& ns, const std::string& cg, const std::string& to, int port) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", ns};
  if (!cg.empty()) argv.insert(argv.end(), {"--cgroup", cg});
  argv.insert(argv.end(), {"session", "--to", to, "--port", std::to_string(port)});
  auto p = std::make_unique<Peer>(argv, true);
  EXPECT_TRUE(p->wait_for([](const json& j) { return j.contains("connected"); }).value("connected", false))
      << "session to " << to << ":" << port << " did not connect:\n" << p->output();
  return p;
}

json session_request(Peer& session, const std::string& req) {
  session.send_line(req);
  auto line = session.wait_for([&](const json& j) { return j.value("request", "") == req; });
  return line.is_object() ? line : json::object();
}

std::string Peer::output() { return read_file(out_path_); }

std::vector<json> Peer::lines() {
  std::vector<json> out;
  std::istringstream in(read_file(out_path_));
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (!j.is_discarded()) out.push_back(j);
  }
  return out;
}

json Peer::wait_for(const std::function<bool(const json&)>& pred, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {  // looks at least once, also with no time to wait
    for (const auto& j : lines())
      if (pred(j)) return j;
    if (std::chrono::steady_clock::now() >= deadline) return json();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

json peer_once(const std::vector<std::string>& argv) {
  auto r = run(argv);
  std::istringstream in(r.out);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty()) last = line;
  auto j = json::parse(last, nullptr, false);
  if (j.is_discarded()) return json{{"unparsed", r.out}};
  return j;
}

bool have_privileges(std::string& why) {
  if (geteuid() != 0) {
    why = "not root";
    return false;
  }
  struct statfs fs {};
  if (statfs("/sys/fs/bpf", &fs) != 0 || fs.f_type != 0xcafe4a11) {
    why = "/sys/fs/bpf is not a mounted bpffs (scripts/setup.sh mounts it)";
    return false;
  }
  if (cgroup2_root().empty()) {
    why = "no cgroup2 mount";
    return false;
  }
  auto r = run({podsteer_bin(), "--state-dir", "/sys/fs/bpf/podsteer-probe", "doctor"});
  if (r.rc != 0) {
    why = "podsteer doctor fails on this kernel:\n" + r.out;
    return false;
  }
  return true;
}

Env::Env() {
  id = unique_id();
  pod_ns_name = "pst-" + id + "-pod";
  remote_ns_name = "pst-" + id + "-rem";
  pod_ns = "/var/run/netns/" + pod_ns_name;
  remote_ns = "/var/run/netns/" + remote_ns_name;
  cgroup = cgroup2_root() + "/podsteer-test-" + id;
  proxy_cgroup = cgroup + "/proxy";
  app_cgroup = cgroup + "/app";
  state_dir = "/sys/fs/bpf/podsteer-test-" + id;
  std::string P = pod_ns_name, R = remote_ns_name;
  // Everything is made inside the two namespaces (ip -n): nothing lands in the host's.
  auto r = sh(fmt::format(
      "set -e; ip netns add {P}; ip netns add {R};"
      "ip -n {P} link add {ifn} type veth peer name {ifn} netns {R};"
      "ip -n {P} addr add {p4}/24 dev {ifn}; ip -n {R} addr add {r4}/24 dev {ifn};"
      "ip -n {P} addr add {p6}/64 dev {ifn} nodad; ip -n {R} addr add {r6}/64 dev {ifn} nodad;"
      "ip -n {P} link set lo up; ip -n {R} link set lo up;"
      "ip -n {P} link set {ifn} up; ip -n {R} link set {ifn} up;"
      // kubelet's probe source lives on the remote side, routed back from the pod
      "ip -n {R} addr add 169.254.7.127/32 dev {ifn}; ip -n {P} route add 169.254.7.127/32 dev {ifn}",
      fmt::arg("P", P), fmt::arg("R", R), fmt::arg("ifn", pod_if), fmt::arg("p4", pod_ip4), fmt::arg("r4", remote_ip4),
      fmt::arg("p6", pod_ip6), fmt::arg("r6", remote_ip6)));
  EXPECT_EQ(r.rc, 0) << "netns setup: " << r.out;
  for (const auto& d : {cgroup, proxy_cgroup, app_cgroup})
    EXPECT_EQ(mkdir(d.c_str(), 0755), 0) << d << ": " << std::strerror(errno);
}

Env::~Env() {
  auto r = run({podsteer_bin(), "--state-dir", state_dir, "uninstall"});
  if (r.rc != 0) ADD_FAILURE() << "uninstall in teardown failed: " << r.out;
  kill_cgroup(proxy_cgroup);
  kill_cgroup(app_cgroup);
  kill_cgroup(cgroup);
  sh("ip netns del " + pod_ns_name + " 2>/dev/null; ip netns del " + remote_ns_name + " 2>/dev/null");
}

void ProxyTrust::add(const std::string& cgroup, const std::string& state_dir, const std::vector<std::string>& argv0) {
  if (done_.count(cgroup) && access((state_dir + "/maps/podsteer_config").c_str(), F_OK) == 0) return;
  pending_.push_back(cgroup);
  settle(state_dir, argv0);
}

void ProxyTrust::settle(const std::string& state_dir, const std::vector<std::string>& argv0) {
  if (pending_.empty() || access((state_dir + "/maps/podsteer_config").c_str(), F_OK) != 0) return;
  for (const auto& cg : pending_) {
    done_.insert(cg);
    auto argv = argv0;
    argv.insert(argv.end(), {"proxy", "trust", "--cgroup", cg});
    auto r = run(argv);
    EXPECT_EQ(r.rc, 0) << "podsteer proxy trust: " << r.out;
  }
  pending_.clear();
}

CmdResult Env::podsteer(const std::vector<std::string>& args, const std::vector<std::string>& env) {
  std::vector<std::string> argv0 = {podsteer_bin(), "--state-dir", state_dir, "--hook-cgroup", cgroup};
  auto argv = argv0;
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = run(argv, env);
  trust_.settle(state_dir, argv0);
  return r;
}

json Env::status() {
  auto r = run({podsteer_bin(), "--state-dir", state_dir, "status", "--json"});
  auto j = json::parse(r.out, nullptr, false);
  if (j.is_discarded()) ADD_FAILURE() << "status --json: " << r.out;
  return j;
}

std::unique_ptr<Peer> Env::start_proxy(const std::vector<std::string>& extra) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", pod_ns, "--cgroup", proxy_cgroup, "proxy", "--mark", "0x539"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  trust_.add(proxy_cgroup, state_dir, {podsteer_bin(), "--state-dir", state_dir, "--hook-cgroup", cgroup});
  auto p = std::make_unique<Peer>(argv);
  EXPECT_FALSE(p->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null())
      << "proxy did not start";
  return p;
}

std::unique_ptr<Peer> Env::start_server(const std::string& netns, int port, const std::string& addr) {
  std::vector<std::string> argv = {testpeer_bin(), "--netns", netns};
  // the pod's apps run under the hook cgroup, as a kubelet's pods run under kubepods
  if (netns == pod_ns) argv.insert(argv.end(), {"--cgroup", app_cgroup});
  argv.insert(argv.end(), {"serve", "--port", std::to_string(port)});
  if (!addr.empty()) {
    argv.push_back("--addr");
    argv.push_back(addr);
  }
  auto p = std::make_unique<Peer>(argv);
  EXPECT_FALSE(p->wait_for([](const json& j) { return j.value("event", "") == "ready"; }).is_null())
      << "server did not start";
  return p;
}

// A one-shot client: sends "hello" unless extra has requests of its own (--send).
static json connect_once(std::vector<std::string> argv, const std::string& to, int port,
                         const std::vector<std::string>& extra) {
  argv.insert(argv.end(), {"connect", "--to", to, "--port", std::to_string(port)});
  if (std::find(extra.begin(), extra.end(), "--send") == extra.end()) argv.insert(argv.end(), {"--send", "hello"});
  argv.insert(argv.end(), extra.begin(), extra.end());
  return peer_once(argv);
}

json Env::pod_connect(const std::string& to, int port, const std::vector<std::string>& extra) {
  return connect_once({testpeer_bin(), "--netns", pod_ns, "--cgroup", app_cgroup}, to, port, extra);
}

json Env::proxy_connect(const std::string& to, int port, const std::vector<std::string>& extra) {
  return connect_once({testpeer_bin(), "--netns", pod_ns, "--cgroup", proxy_cgroup}, to, port, extra);
}

json Env::remote_connect(const std::string& to, int port, const std::vector<std::string>& extra) {
  return connect_once({testpeer_bin(), "--netns", remote_ns}, to, port, extra);
}

}  // namespace podsteer::test

namespace podsteer::test {
namespace {

// After every test process: nothing of this process's environments may remain.
class ResidueCheck : public ::testing::Environment {
 public:
  void TearDown() override {
    std::string tag = fmt::format("{}x", getpid() % 100000);
    auto r = sh("ls -d /sys/fs/bpf/podsteer-test-" + tag + "* /var/run/netns/pst-" + tag + "* " + cgroup2_root() +
                "/podsteer-test-" + tag + "* /tmp/podsteer-test-" + tag + "* /tmp/podsteer-deploy-" + tag +
                "* /tmp/podsteer-kubectl-" + tag + "* 2>/dev/null");
    EXPECT_TRUE(r.out.empty()) << "left behind:\n" << r.out;
  }
};
const auto* const kResidue = ::testing::AddGlobalTestEnvironment(new ResidueCheck);

}  // namespace
}  // namespace podsteer::test
