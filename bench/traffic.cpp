// Connections through each mode (bench.h).
#include "bench.h"

namespace bench {

// The server: each connection sends a mode byte: 'r' = 64-byte request/response until EOF,
// 's' = sink until EOF, then an 8-byte count back.
void run_server(uint16_t port) {
  int l = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  auto a = addr4("0.0.0.0", port);
  if (bind(l, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(l, 4096) != 0) _exit(4);
  while (true) {
    int c = accept(l, nullptr, nullptr);
    if (c < 0) continue;
    std::thread([c] {
      int one = 1;
      setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      char mode;
      if (read(c, &mode, 1) == 1) {
        if (mode == 'r') {
          char buf[64];
          while (read_n(c, buf, sizeof(buf)))
            if (write(c, buf, sizeof(buf)) != sizeof(buf)) break;
        } else {
          static thread_local char big[1 << 16];
          uint64_t total = 0;
          ssize_t n;
          while ((n = read(c, big, sizeof(big))) > 0) total += n;
          (void)!write(c, &total, sizeof(total));
        }
      }
      close(c);
    }).detach();
  }
}


int connect_to(const std::string& ip, uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  auto a = addr4(ip, port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Runs in a child in the pod netns and app cgroup; the parent reads the result.
LoadResult load(const std::string& kind, const std::string& ip, uint16_t port, double seconds, int threads, uint64_t bulk_bytes) {
  LoadResult r;
  std::atomic<uint64_t> count{0}, errors{0};
  std::vector<std::vector<double>> lat(threads);
  auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> ts;
  auto t0 = Clock::now();
  if (kind == "bulk") {
    int fd = connect_to(ip, port);
    if (fd < 0) {
      r.errors = 1;
      return r;
    }
    std::vector<char> buf(1 << 16, 'x');
    (void)!write(fd, "s", 1);
    uint64_t sent = 0;
    while (sent < bulk_bytes) {
      ssize_t n = write(fd, buf.data(), std::min<uint64_t>(buf.size(), bulk_bytes - sent));
      if (n <= 0) break;
      sent += n;
    }
    shutdown(fd, SHUT_WR);
    uint64_t got = 0;
    read_n(fd, reinterpret_cast<char*>(&got), sizeof(got));
    close(fd);
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    r.gbit_per_sec = got * 8 / secs / 1e9;
    r.errors = got != bulk_bytes;
    return r;
  }
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      char buf[65] = "r";
      if (kind == "short") {
        while (Clock::now() < deadline) {
          int fd = connect_to(ip, port);
          if (fd < 0) {
            errors++;
            continue;
          }
          buf[0] = 'r';
          bool ok = write(fd, buf, 65) == 65 && read_n(fd, buf + 1, 64);
          close(fd);
          ok ? count++ : errors++;
        }
      } else {  // rr: one kept-open connection per thread
        int fd = connect_to(ip, port);
        if (fd < 0 || write(fd, "r", 1) != 1) {
          errors++;
          return;
        }
        while (Clock::now() < deadline) {
          auto s = Clock::now();
          if (write(fd, buf + 1, 64) != 64 || !read_n(fd, buf + 1, 64)) {
            errors++;
            break;
          }
          lat[t].push_back(std::chrono::duration<double, std::micro>(Clock::now() - s).count());
          count++;
        }
        close(fd);
      }
    });
  }
  for (auto& th : ts) th.join();
  double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  r.conn_per_sec = count / secs;
  r.count = count;
  r.errors = errors;
  std::vector<double> all;
  for (auto& v : lat) all.insert(all.end(), v.begin(), v.end());
  if (!all.empty()) {
    std::sort(all.begin(), all.end());
    r.p50_us = all[all.size() / 2];
    r.p99_us = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  }
  return r;
}

// The load from a child in netns (and cgroup, if given); the parent reads the result.
LoadResult load_in(const std::string& netns, const std::string& cgroup, const std::string& kind, const std::string& ip,
                   uint16_t port, double seconds, int threads, uint64_t bulk_bytes) {
  int p[2];
  must(pipe(p) == 0, "pipe");
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    enter(netns, cgroup);
    LoadResult r = load(kind, ip, port, seconds, threads, bulk_bytes);
    (void)!write(p[1], &r, sizeof(r));
    _exit(0);
  }
  close(p[1]);
  LoadResult r;
  if (read(p[0], &r, sizeof(r)) != sizeof(r)) r.errors = 1;
  close(p[0]);
  waitpid(pid, nullptr, 0);
  return r;
}

// Outbound: the pod's app connects out, to the server in the other netns.
LoadResult load_in_pod(const Setup& s, const std::string& kind, const std::string& ip, uint16_t port, double seconds,
                       int threads, uint64_t bulk_bytes) {
  return load_in(s.pod_ns, s.app_cg, kind, ip, port, seconds, threads, bulk_bytes);
}

// ---- SYN flood ----

uint16_t csum(const void* data, size_t len, uint32_t sum = 0) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i + 1 < len; i += 2) sum += (p[i] << 8) | p[i + 1];
  if (len & 1) sum += p[len - 1] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum);
}

// SYNs from spoofed addresses (198.18.0.0/15, the benchmarking range; the pod has no
// route back, so no handshake ever completes) to ip:port, as fast as one core sends
// them, for `seconds`. Runs in a child in the client's netns. Returns SYNs sent.
uint64_t syn_flood(const std::string& ip, uint16_t port, double seconds) {
  int fd = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
  if (fd < 0) return 0;
  int one = 1;
  setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof(one));
  struct {
    iphdr ip;
    tcphdr tcp;
  } __attribute__((packed)) pkt{};
  auto dst = addr4(ip, port);
  uint64_t sent = 0, rnd = 0x9e3779b97f4a7c15ull;
  auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
  while ((sent & 1023) || Clock::now() < deadline) {
    rnd ^= rnd << 13, rnd ^= rnd >> 7, rnd ^= rnd << 17;
    pkt = {};
    pkt.ip.version = 4;
    pkt.ip.ihl = 5;
    pkt.ip.ttl = 64;
    pkt.ip.protocol = IPPROTO_TCP;
    pkt.ip.saddr = htonl(0xc6120000u | (rnd & 0x1ffff));  // 198.18.0.0/15
    pkt.ip.daddr = dst.sin_addr.s_addr;
    pkt.tcp.source = htons(1024 + (rnd >> 20) % 60000);
    pkt.tcp.dest = htons(port);
    pkt.tcp.seq = static_cast<uint32_t>(rnd >> 32);
    pkt.tcp.doff = 5;
    pkt.tcp.syn = 1;
    pkt.tcp.window = htons(64240);
    struct {
      uint32_t src, dst;
      uint8_t zero, proto;
      uint16_t len;
    } __attribute__((packed)) pseudo{pkt.ip.saddr, pkt.ip.daddr, 0, IPPROTO_TCP, htons(sizeof(tcphdr))};
    uint32_t sum = 0;
    const uint8_t* pp = reinterpret_cast<const uint8_t*>(&pseudo);
    for (size_t i = 0; i < sizeof(pseudo); i += 2) sum += (pp[i] << 8) | pp[i + 1];
    pkt.tcp.check = htons(csum(&pkt.tcp, sizeof(tcphdr), sum));
    if (sendto(fd, &pkt, sizeof(pkt), 0, reinterpret_cast<const sockaddr*>(&dst), sizeof(dst)) > 0) sent++;
    else if (Clock::now() >= deadline) break;
  }
  close(fd);
  return sent;
}

// Completed inbound connections per second from the real client while a flood hits the
// same port. Both run in the client's netns, as separate processes.
std::pair<LoadResult, uint64_t> inbound_under_flood(const Setup& s, const std::string& ip, uint16_t port, double seconds,
                                                    int threads) {
  int p[2];
  must(pipe(p) == 0, "pipe");
  pid_t flooder = fork();
  if (flooder == 0) {
    close(p[0]);
    enter(s.srv_ns, "");
    uint64_t n = syn_flood(ip, port, seconds + 0.5);
    (void)!write(p[1], &n, sizeof(n));
    _exit(0);
  }
  close(p[1]);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the backlog is full by now
  auto r = load_in(s.srv_ns, "", "short", ip, port, seconds, threads, 0);
  uint64_t syns = 0;
  if (read(p[0], &syns, sizeof(syns)) != sizeof(syns)) syns = 0;
  close(p[0]);
  waitpid(flooder, nullptr, 0);
  return {r, syns};
}

// ---- modes ----

std::string istio_rules(int exclusions) {
  // istio-cni's in-pod rules for ambient (iptables-restore form), plus N exclusion RETURNs
  std::string r =
      "*mangle\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
      "-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n"
      "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff\n"
      "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff\n"
      "COMMIT\n"
      "*nat\n:ISTIO_PRERT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n"
      "-A PREROUTING -j ISTIO_PRERT\n-A OUTPUT -j ISTIO_OUTPUT\n"
      "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT\n"
      "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006\n"
      "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT\n"
      "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT\n"
      "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT\n";
  for (int i = 0; i < exclusions; ++i)
    r += fmt::format("-A ISTIO_OUTPUT -d 100.{}.{}.{}/32 -j RETURN\n", 64 + i / 65536 % 64, i / 256 % 256, i % 256);
  r += "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001\nCOMMIT\n";
  return r;
}

std::string cidr_list(int n) {
  std::string out;
  for (int i = 0; i < n; ++i)
    out += fmt::format("{}100.{}.{}.{}/32", i ? "," : "", 64 + i / 65536 % 64, i / 256 % 256, i % 256);
  return out;
}

void mode_on(const Setup& s, const std::string& mode, int exclusions) {
  std::string ns = "nsenter --net=" + s.pod_ns + " ";
  if (mode == "podsteer") {
    // what the agent does for its ZDS peers: the proxy's process may use the proxy mark
    must(sh(fmt::format("{} --state-dir {} --hook-cgroup {} proxy trust --pid {} >/dev/null", s.podsteer, s.state_dir,
                        s.cgroup, s.proxy_pid)) == 0,
         "podsteer proxy trust");
    std::string list = s.dir + "/cidrs";
    std::ofstream(list) << cidr_list(exclusions);
    must(sh(fmt::format("{} --state-dir {} --hook-cgroup {} enroll --netns {} --pod bench/client "
                        "--exclude-outbound-cidrs-file {} >/dev/null",
                        s.podsteer, s.state_dir, s.cgroup, s.pod_ns, list)) == 0,
         "podsteer enroll");
  } else if (mode == "istio-iptables") {
    std::string rules = s.dir + "/rules";
    std::ofstream(rules) << istio_rules(exclusions);
    must(sh(ns + "iptables-restore < " + rules) == 0, "iptables-restore");
    must(sh(ns + "ip rule add fwmark 0x111/0xfff pref 32764 lookup 100 && " + ns +
            "ip route add local 0.0.0.0/0 dev lo table 100") == 0,
         "istio fwmark route");
  }
  // the work a switch leaves behind (enroll's program load, RCU callbacks, iptables' table
  // swap) must not land in a measurement: every mode, direct too, waits the same
  std::this_thread::sleep_for(std::chrono::duration<double>(s.settle));
}

void mode_off(const Setup& s, const std::string& mode) {
  std::string ns = "nsenter --net=" + s.pod_ns + " ";
  if (mode == "podsteer") {
    sh(fmt::format("{} --state-dir {} unenroll --netns {} >/dev/null", s.podsteer, s.state_dir, s.pod_ns));
  } else if (mode == "istio-iptables") {
    // Leave the netns as the other modes found it: no tables (so no conntrack hooks) and
    // no conntrack entries, whose NAT bindings would otherwise clash with later connections.
    sh(ns + "nft delete table ip nat; " + ns + "nft delete table ip mangle; " + ns +
       "ip rule del fwmark 0x111/0xfff pref 32764 lookup 100; " + ns + "ip route flush table 100; " + ns +
       "conntrack -F 2>/dev/null");
  }
}

std::pair<std::string, uint16_t> target(const Setup& s, const std::string& mode) {
  if (mode == "direct") return {s.pod_ip, 15001};
  return {s.srv_ip, s.port};
}

// Inbound: a client in the other netns calls the pod's app. direct: to the proxy's inbound
// listener itself, which forwards to the app (from the pod's own address: nothing set up a
// return path); podsteer and istio-iptables: to the app, captured, and the proxy connects
// on from the client's own address, as ztunnel does.
std::pair<std::string, uint16_t> inbound_target(const Setup& s, const std::string& mode) {
  if (mode == "direct") return {s.pod_ip, 15006};
  return {s.pod_ip, s.app_port};
}

}  // namespace bench
