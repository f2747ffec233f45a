// testpeer: the processes of the integration tests - a test proxy, servers and clients -
// each joining a given network namespace and cgroup before it does anything, and
// reporting what it saw as one JSON line per event on stdout.
//
//   testpeer [--netns P] [--cgroup D] proxy [--mark M] [--ports 15001,15006,15008] [--dns-port 15053]
//   testpeer ... serve --port P [--addr A]           line echo server, reports local/peer
//   testpeer ... serve-udp --port P [--addr A]       UDP echo ("resolver:" + payload)
//   testpeer ... connect --to A --port P [--send T] [--mark M] [--bind A] [--v6] [--timeout-ms N]
//   testpeer ... session --to A --port P             one connection; each stdin line is a request
//   testpeer ... udp --to A --port P --send T [--connected]
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "sockaddr_text.h"

#include <atomic>
#include <cstring>
#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

using json = nlohmann::json;

namespace {

std::mutex out_mu;
void emit(const json& j) {
  std::lock_guard<std::mutex> g(out_mu);
  std::cout << j.dump() << std::endl;
}

[[noreturn]] void die(const std::string& what) {
  emit({{"fatal", what}, {"errno", errno}, {"error", std::strerror(errno)}});
  _exit(2);
}

std::string addr_str(const sockaddr_storage& ss) { return podsteer::sockaddr_text(ss); }

bool make_addr(const std::string& host, uint16_t port, bool force_v6, sockaddr_storage& ss, socklen_t& len) {
  std::memset(&ss, 0, sizeof(ss));
  in_addr a4{};
  if (!force_v6 && inet_pton(AF_INET, host.c_str(), &a4) == 1) {
    auto* s = reinterpret_cast<sockaddr_in*>(&ss);
    s->sin_family = AF_INET;
    s->sin_port = htons(port);
    s->sin_addr = a4;
    len = sizeof(*s);
    return true;
  }
  auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
  s6->sin6_family = AF_INET6;
  s6->sin6_port = htons(port);
  if (inet_pton(AF_INET6, host.c_str(), &s6->sin6_addr) != 1) {
    if (inet_pton(AF_INET, host.c_str(), &a4) != 1) return false;
    s6->sin6_addr.s6_addr[10] = s6->sin6_addr.s6_addr[11] = 0xff;  // v4-mapped
    std::memcpy(&s6->sin6_addr.s6_addr[12], &a4, 4);
  }
  len = sizeof(*s6);
  return true;
}

std::string sock_name(int fd, bool peer) {
  sockaddr_storage ss{};
  socklen_t len = sizeof(ss);
  int r = peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) : getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  return r == 0 ? addr_str(ss) : "error:" + std::string(std::strerror(errno));
}

bool read_line(int fd, std::string& line, int timeout_ms) {
  line.clear();
  char c;
  while (true) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    ssize_t n = read(fd, &c, 1);
    if (n <= 0) return !line.empty();
    if (c == '\n') return true;
    line += c;
  }
}

bool write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += n;
  }
  return true;
}

int listen_tcp(const std::string& addr, uint16_t port, uint32_t mark) {
  sockaddr_storage ss;
  socklen_t len;
  bool v6 = addr.empty() || addr.find(':') != std::string::npos;
  if (!make_addr(addr.empty() ? "::" : addr, port, v6, ss, len)) die("bad address " + addr);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) die("SO_MARK");
  if (bind(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) die("bind " + std::to_string(port));
  if (listen(fd, 128) != 0) die("listen");
  return fd;
}

void pump(int from, int to, std::atomic<uint64_t>& bytes) {
  char buf[16384];
  while (true) {
    ssize_t n = read(from, buf, sizeof(buf));
    if (n <= 0) break;
    if (!write_all(to, std::string(buf, n))) break;
    bytes += n;
  }
  shutdown(to, SHUT_WR);
}

// The test proxy: what a node proxy does under Istio's in-pod rules, in miniature.
void proxy_conn(int c, uint16_t listener, uint16_t hbone, uint32_t mark) {
  json ev = {{"event", "accept"}, {"listener", listener}, {"peer", sock_name(c, true)}, {"local", sock_name(c, false)}};
  sockaddr_storage local{};
  socklen_t llen = sizeof(local);
  getsockname(c, reinterpret_cast<sockaddr*>(&local), &llen);
  bool v4 = local.ss_family == AF_INET ||
            IN6_IS_ADDR_V4MAPPED(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
  sockaddr_storage orig{};
  socklen_t olen = sizeof(orig);
  int r = v4 ? getsockopt(c, SOL_IP, 80 /* SO_ORIGINAL_DST */, &orig, &olen)
             : getsockopt(c, SOL_IPV6, 80 /* IP6T_SO_ORIGINAL_DST */, &orig, &olen);
  if (r == 0) {
    ev["orig_dst"] = addr_str(orig);
  } else {
    ev["orig_dst_error"] = std::strerror(errno);
  }
  emit(ev);
  if (listener == hbone || r != 0) {
    // HBONE stand-in: answer each line ourselves
    std::string line;
    while (read_line(c, line, 10000)) write_all(c, "hbone got=" + line + "\n");
    close(c);
    return;
  }
  int u = socket(orig.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  setsockopt(u, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
  if (connect(u, reinterpret_cast<sockaddr*>(&orig), olen) != 0) {
    emit({{"event", "upstream_error"}, {"orig_dst", ev["orig_dst"]}, {"error", std::strerror(errno)}});
    close(u);
    close(c);
    return;
  }
  std::atomic<uint64_t> up{0}, down{0};
  std::thread t([&] { pump(u, c, down); });
  pump(c, u, up);
  t.join();
  emit({{"event", "close"}, {"orig_dst", ev["orig_dst"]}, {"bytes_up", up.load()}, {"bytes_down", down.load()}});
  close(u);
  close(c);
}

int cmd_proxy(uint32_t mark, const std::vector<uint16_t>& ports, uint16_t hbone, uint16_t dns_port) {
  std::vector<std::thread> threads;
  for (uint16_t p : ports) {
    int fd = listen_tcp("", p, mark);
    threads.emplace_back([fd, p, hbone, mark] {
      while (true) {
        int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) continue;
        std::thread(proxy_conn, c, p, hbone, mark).detach();
      }
    });
  }
  if (dns_port) {
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    setsockopt(u, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(dns_port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(u, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) die("bind dns");
    threads.emplace_back([u] {
      char buf[2048];
      while (true) {
        sockaddr_storage from{};
        socklen_t fl = sizeof(from);
        ssize_t n = recvfrom(u, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &fl);
        if (n < 0) continue;
        emit({{"event", "dns"}, {"from", addr_str(from)}, {"query", std::string(buf, n)}});
        std::string reply = "dns-proxy:" + std::string(buf, n);
        sendto(u, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from), fl);
      }
    });
  }
  emit({{"event", "ready"}});
  for (auto& t : threads) t.join();
  return 0;
}

int cmd_serve(const std::string& addr, uint16_t port) {
  int fd = listen_tcp(addr, port, 0);
  emit({{"event", "ready"}});
  while (true) {
    int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    std::thread([c] {
      std::string local = sock_name(c, false), peer = sock_name(c, true), line;
      emit({{"event", "accept"}, {"local", local}, {"peer", peer}});
      while (read_line(c, line, 30000))
        if (!write_all(c, "server local=" + local + " peer=" + peer + " got=" + line + "\n")) break;
      close(c);
    }).detach();
  }
}

int cmd_serve_udp(const std::string& addr, uint16_t port) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(addr.empty() ? "0.0.0.0" : addr, port, false, ss, len)) die("bad address");
  int u = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (bind(u, reinterpret_cast<sockaddr*>(&ss), len) != 0) die("bind udp");
  emit({{"event", "ready"}});
  char buf[2048];
  while (true) {
    sockaddr_storage from{};
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(u, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &fl);
    if (n < 0) continue;
    std::string reply = "resolver:" + std::string(buf, n);
    sendto(u, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from), fl);
  }
}

int open_client(const std::string& to, uint16_t port, bool v6, uint32_t mark, const std::string& bind_addr,
                int timeout_ms, json& out) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(to, port, v6, ss, len)) die("bad address " + to);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) die("SO_MARK");
  if (!bind_addr.empty()) {
    sockaddr_storage b;
    socklen_t bl;
    make_addr(bind_addr, 0, ss.ss_family == AF_INET6, b, bl);
    if (bind(fd, reinterpret_cast<sockaddr*>(&b), bl) != 0) die("bind " + bind_addr);
  }
  int flags = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, flags | O_NONBLOCK);
  int r = connect(fd, reinterpret_cast<sockaddr*>(&ss), len);
  int err = r == 0 ? 0 : errno;
  if (err == EINPROGRESS) {
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, timeout_ms) <= 0) {
      err = ETIMEDOUT;
    } else {
      socklen_t el = sizeof(err);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
    }
  }
  fcntl(fd, F_SETFL, flags);
  out["connected"] = err == 0;
  if (err) {
    out["error"] = std::strerror(err);
    close(fd);
    return -1;
  }
  out["peer"] = sock_name(fd, true);
  out["local"] = sock_name(fd, false);
  return fd;
}

int cmd_connect(const std::string& to, uint16_t port, bool v6, uint32_t mark, const std::string& bind_addr,
                const std::string& send_text, int timeout_ms) {
  json out;
  int fd = open_client(to, port, v6, mark, bind_addr, timeout_ms, out);
  if (fd >= 0 && !send_text.empty()) {
    write_all(fd, send_text + "\n");
    std::string line;
    if (read_line(fd, line, timeout_ms)) out["reply"] = line;
    close(fd);
  }
  emit(out);
  return 0;
}

int cmd_session(const std::string& to, uint16_t port, int timeout_ms) {
  json out;
  int fd = open_client(to, port, false, 0, "", timeout_ms, out);
  emit(out);
  if (fd < 0) return 1;
  std::string req;
  while (std::getline(std::cin, req)) {
    std::string line;
    json r = {{"request", req}};
    if (write_all(fd, req + "\n") && read_line(fd, line, timeout_ms)) r["reply"] = line;
    else r["error"] = "no reply";
    emit(r);
  }
  close(fd);
  return 0;
}

int cmd_udp(const std::string& to, uint16_t port, const std::string& text, bool connected, int timeout_ms) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(to, port, false, ss, len)) die("bad address");
  int u = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  json out;
  if (connected) {
    if (connect(u, reinterpret_cast<sockaddr*>(&ss), len) != 0) die("connect udp");
    out["peer"] = sock_name(u, true);
    send(u, text.data(), text.size(), 0);
  } else {
    sendto(u, text.data(), text.size(), 0, reinterpret_cast<sockaddr*>(&ss), len);
  }
  pollfd p{u, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) > 0) {
    char buf[2048];
    sockaddr_storage from{};
    socklen_t fl = sizeof(from);
    ssize_t n = recvfrom(u, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&from), &fl);
    if (n >= 0) {
      out["reply"] = std::string(buf, n);
      out["from"] = addr_str(from);
    } else {
      out["error"] = std::strerror(errno);
    }
  } else {
    out["error"] = "timeout";
  }
  emit(out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"podsteer integration test peer"};
  app.require_subcommand(1);
  std::string netns, cgroup;
  app.add_option("--netns", netns);
  app.add_option("--cgroup", cgroup);

  uint32_t mark = 0;
  std::vector<uint16_t> ports = {15001, 15006, 15008};
  uint16_t hbone = 15008, dns_port = 15053, port = 0;
  std::string addr, to, send_text, bind_addr;
  bool v6 = false, connected = false;
  int timeout_ms = 3000;

  auto* proxy = app.add_subcommand("proxy");
  proxy->add_option("--mark", mark);
  proxy->add_option("--ports", ports)->delimiter(',');
  proxy->add_option("--hbone-port", hbone);
  proxy->add_option("--dns-port", dns_port);
  auto* serve = app.add_subcommand("serve");
  serve->add_option("--port", port)->required();
  serve->add_option("--addr", addr);
  auto* serve_udp = app.add_subcommand("serve-udp");
  serve_udp->add_option("--port", port)->required();
  serve_udp->add_option("--addr", addr);
  auto* conn = app.add_subcommand("connect");
  auto* session = app.add_subcommand("session");
  auto* udp = app.add_subcommand("udp");
  for (auto* c : {conn, session, udp}) {
    c->add_option("--to", to)->required();
    c->add_option("--port", port)->required();
    c->add_option("--timeout-ms", timeout_ms);
  }
  conn->add_option("--send", send_text);
  conn->add_option("--mark", mark);
  conn->add_option("--bind", bind_addr);
  conn->add_flag("--v6", v6, "use an AF_INET6 socket (v4-mapped for IPv4 addresses)");
  udp->add_option("--send", send_text)->required();
  udp->add_flag("--connected", connected);
  CLI11_PARSE(app, argc, argv);

  // cgroup first (sockets take the creating task's cgroup), then the netns.
  if (!cgroup.empty()) {
    std::ofstream procs(cgroup + "/cgroup.procs");
    procs << getpid() << std::endl;
    if (!procs) die("join cgroup " + cgroup);
  }
  if (!netns.empty()) {
    int fd = open(netns.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) die("setns " + netns);
    close(fd);
  }
  if (*proxy) return cmd_proxy(mark, ports, hbone, dns_port);
  if (*serve) return cmd_serve(addr, port);
  if (*serve_udp) return cmd_serve_udp(addr, port);
  if (*conn) return cmd_connect(to, port, v6, mark, bind_addr, send_text, timeout_ms);
  if (*session) return cmd_session(to, port, timeout_ms);
  if (*udp) return cmd_udp(to, port, send_text, connected, timeout_ms);
  return 0;
}
