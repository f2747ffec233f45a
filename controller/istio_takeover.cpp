#include "istio_takeover.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <sstream>

namespace podsteer::istio {
namespace {

struct FrontEnd {
  std::string bin, save;  // iptables-nft and iptables-nft-save, ...
};
// The iptables front ends Istio may have used (its iptables-nft or iptables-legacy
// detection) that are present here; legacy ones only with their kernel module loaded (no
// netns can hold legacy rules without it, and asking would load it).
std::vector<FrontEnd> front_ends() {
  std::vector<FrontEnd> out;
  for (const char* b : {"iptables-nft", "ip6tables-nft", "iptables-legacy", "ip6tables-legacy"}) {
    std::string name = b;
    if (name.find("legacy") != std::string::npos &&
        access(name[2] == '6' ? "/sys/module/ip6_tables" : "/sys/module/ip_tables", F_OK) != 0)
      continue;
    for (const char* dir : {"/usr/sbin/", "/sbin/"})
      if (access((dir + name).c_str(), X_OK) == 0 && access((dir + name + "-save").c_str(), X_OK) == 0) {
        out.push_back({dir + name, dir + name + "-save"});
        break;
      }
  }
  return out;
}

// The front end's rules in the netns hold Istio's chains (one iptables-save, not a call per
// table and chain)
bool has_istio(int fd, const FrontEnd& fe, const char* table = nullptr) {
  std::vector<std::string> argv = {fe.save};
  if (table) argv.insert(argv.end(), {"-t", table});
  auto r = run_in_netns(fd, argv);
  return r && r->rc == 0 && r->out.find(":ISTIO_") != std::string::npos;
}

// Unhooks and deletes one of Istio's chains; absent pieces are fine.
void drop_chain(int fd, const FrontEnd& fe, const char* table, const char* hook, const char* chain) {
  const std::string& bin = fe.bin;
  for (int i = 0; i < 8; ++i) {  // every jump to it (istio-cni adds one)
    auto r = run_in_netns(fd, {bin, "-w", "5", "-t", table, "-D", hook, "-j", chain});
    if (!r || r->rc != 0) break;
  }
  (void)run_in_netns(fd, {bin, "-w", "5", "-t", table, "-F", chain});
  (void)run_in_netns(fd, {bin, "-w", "5", "-t", table, "-X", chain});
}

}  // namespace

Result<CommandResult> run_in_netns(int netns_fd, const std::vector<std::string>& argv, int timeout_ms) {
  int pipefd[2];
  if (pipe2(pipefd, O_CLOEXEC) != 0) return sys_error("pipe2");
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = fork();
  if (pid < 0) {
    close(pipefd[0]);
    close(pipefd[1]);
    return sys_error("fork", argv[0]);
  }
  if (pid == 0) {  // only async-signal-safe calls from here
    if (setns(netns_fd, CLONE_NEWNET) != 0) _exit(126);
    dup2(pipefd[1], 1);
    dup2(pipefd[1], 2);
    execv(args[0], args.data());
    _exit(127);
  }
  close(pipefd[1]);
  CommandResult res;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  char buf[4096];
  for (;;) {
    int left = int(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    if (left <= 0) {
      kill(pid, SIGKILL);
      break;
    }
    pollfd p{pipefd[0], POLLIN, 0};
    if (poll(&p, 1, left) <= 0) continue;
    ssize_t n = read(pipefd[0], buf, sizeof(buf));
    if (n <= 0) break;
    res.out.append(buf, size_t(n));
  }
  close(pipefd[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  res.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return res;
}

bool has_inpod_rules(int netns_fd) {
  for (const auto& fe : front_ends())
    if (has_istio(netns_fd, fe)) return true;
  return false;
}

Result<Takeover> remove_redirects(int netns_fd) {
  Takeover t;
  for (const auto& fe : front_ends()) {
    if (!has_istio(netns_fd, fe)) continue;
    t.found = true;
    for (const char* table : {"nat", "raw"}) {
      drop_chain(netns_fd, fe, table, "PREROUTING", "ISTIO_PRERT");
      drop_chain(netns_fd, fe, table, "OUTPUT", "ISTIO_OUTPUT");
    }
    drop_chain(netns_fd, fe, "mangle", "PREROUTING", "ISTIO_PRERT");
    if (has_istio(netns_fd, fe, "nat")) return invalid("Istio's nat chains are still there after their removal", fe.bin);
    if (has_istio(netns_fd, fe, "mangle")) t.restore_pending = true;
  }
  return t;
}

Result<bool> remove_restore_if_unused(int netns_fd) {
  // Connections with Istio's connmark that may still send (not TIME_WAIT or CLOSE: those
  // linger in conntrack for minutes with nothing left to route)
  auto ct = run_in_netns(netns_fd, {"/usr/sbin/conntrack", "-L", "-m", "0x111/0xfff"});
  if (!ct) return ct.error();
  if (ct->rc != 0) return invalid("conntrack -L failed: " + ct->out);
  std::istringstream lines(ct->out);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("conntrack ", 0) == 0 || line.empty()) continue;  // its summary line
    if (line.find("TIME_WAIT") != std::string::npos || line.find(" CLOSE ") != std::string::npos) continue;
    return false;
  }
  for (const auto& fe : front_ends())
    if (has_istio(netns_fd, fe, "mangle")) drop_chain(netns_fd, fe, "mangle", "OUTPUT", "ISTIO_OUTPUT");
  return true;
}

}  // namespace podsteer::istio
