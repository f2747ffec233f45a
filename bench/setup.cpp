// The benchmark's netns, cgroups and cleanup, and its report helpers (bench.h).
#include "bench.h"

namespace bench {

int sh(const std::string& cmd) {
  int rc = system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : 1;
}

std::function<void()> g_cleanup;  // set once there is something to clean up
std::once_flag g_cleaned;

// Once, whoever gets there first (a failed step, the signal thread below, the end of the
// run); a second caller waits until the first is done.
void clean_up() {
  std::call_once(g_cleaned, [] {
    if (g_cleanup) g_cleanup();
  });
}

void must(bool ok, const std::string& what) {
  if (!ok) {
    fprintf(stderr, "bench: %s failed\n", what.c_str());
    clean_up();
    exit(1);
  }
}

// SIGINT and SIGTERM clean up too: a bench stopped by hand would otherwise leave its netns,
// cgroups and pinned programs behind. The handler only writes to a pipe; a thread of the
// bench's own runs the cleanup. A forked child (a load, the flooder) just exits.
pid_t g_main_pid = 0;
int g_signal_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  if (getpid() != g_main_pid) _exit(128 + sig);
  char c = static_cast<char>(sig);
  (void)!write(g_signal_pipe[1], &c, 1);
}

void clean_up_on_signals() {
  g_main_pid = getpid();
  must(pipe2(g_signal_pipe, O_CLOEXEC) == 0, "signal pipe");
  std::thread([] {
    char sig = 0;
    while (read(g_signal_pipe[0], &sig, 1) != 1) {
    }
    fprintf(stderr, "bench: stopped by signal %d, cleaning up\n", sig);
    clean_up();
    _exit(128 + sig);
  }).detach();
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

std::string cg2_root() {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    auto d = line.find(" - cgroup2 ");
    if (d == std::string::npos) continue;
    std::istringstream h(line.substr(0, d));
    std::string a, b, c, e, mp;
    h >> a >> b >> c >> e >> mp;
    return mp;
  }
  return "";
}

void enter(const std::string& netns, const std::string& cgroup) {
  if (!cgroup.empty()) std::ofstream(cgroup + "/cgroup.procs") << getpid() << std::endl;
  int fd = open(netns.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) _exit(3);
  close(fd);
}

sockaddr_in addr4(const std::string& ip, uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, ip.c_str(), &a.sin_addr);
  return a;
}

bool read_n(int fd, char* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r <= 0) return false;
    got += r;
  }
  return true;
}


// CPU time the machine spent busy (all CPUs, /proc/stat), in ns
double busy_cpu_ns() {
  std::ifstream in("/proc/stat");
  std::string cpu;
  uint64_t user, nice, sys, idle, iowait, irq, softirq, steal;
  in >> cpu >> user >> nice >> sys >> idle >> iowait >> irq >> softirq >> steal;
  return double(user + nice + sys + irq + softirq) * 1e9 / double(sysconf(_SC_CLK_TCK));
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}


std::string spread(const std::vector<double>& v, int prec) {
  if (v.empty()) return "-";
  auto [mn, mx] = std::minmax_element(v.begin(), v.end());
  return fmt::format("{:.{}f} ({:.{}f}-{:.{}f})", median(v), prec, *mn, prec, *mx, prec);
}

std::string machine() {
  utsname u{};
  uname(&u);
  std::ifstream in("/proc/cpuinfo");
  std::string line, model = "?";
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  return fmt::format("{}, {} CPUs, Linux {}", model, std::thread::hardware_concurrency(), u.release);
}

}  // namespace bench
