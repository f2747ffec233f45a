// testpeer: the processes of the integration tests - a test proxy, servers and clients -
// each joining a given network namespace and cgroup before it does anything, and
// reporting what it saw as one JSON line per event on stdout.
//
//   testpeer [--netns P] [--cgroup D] [--as-user-with-net-raw UID] proxy [--mark M] [--ports 15001,15006,15008] [--dns-port 15053]
//                                          [--no-orig-src]   a proxy that behaves like ztunnel
//   testpeer ... serve --port P [--addr A]           line echo server, reports local/peer
//   testpeer ... serve-udp --port P [--addr A]       UDP echo ("resolver:" + payload)
//   testpeer ... connect --to A --port P [--send T] [--mark M] [--bind A] [--v6] [--timeout-ms N]
//   testpeer ... session --to A --port P             one connection; each stdin line is a request
//   testpeer ... udp --to A --port P --send T [--connected]
//   testpeer ... connect-many --to A --ports P,P --count N --parallel K   short connections
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <linux/capability.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
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
  std::string h6 = host;
  if (auto pct = h6.find('%'); pct != std::string::npos) {  // fe80::1%eth0
    s6->sin6_scope_id = if_nametoindex(h6.substr(pct + 1).c_str());
    h6 = h6.substr(0, pct);
  }
  if (inet_pton(AF_INET6, h6.c_str(), &s6->sin6_addr) != 1) {
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

int listen_tcp(const std::string& addr, uint16_t port, uint32_t mark, bool transparent = false) {
  sockaddr_storage ss;
  socklen_t len;
  bool v6 = addr.empty() || addr.find(':') != std::string::npos;
  if (!make_addr(addr.empty() ? "::" : addr, port, v6, ss, len)) die("bad address " + addr);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1, zero = 0;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (ss.ss_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
  if (mark) {
    // what ztunnel does in a pod: the mark on every socket, SO_REUSEPORT on listeners
    // (INPOD_PORT_REUSE), IP_TRANSPARENT on the inbound ones
    if (setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) die("SO_MARK");
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (transparent && setsockopt(fd, SOL_IP, IP_TRANSPARENT, &one, sizeof(one)) != 0) die("IP_TRANSPARENT");
  }
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

// v4-mapped addresses (a dual-stack listener's peers) as plain IPv4
sockaddr_storage canonical(const sockaddr_storage& ss) {
  if (ss.ss_family != AF_INET6) return ss;
  auto* s6 = reinterpret_cast<const sockaddr_in6*>(&ss);
  if (!IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) return ss;
  sockaddr_storage out{};
  auto* s4 = reinterpret_cast<sockaddr_in*>(&out);
  s4->sin_family = AF_INET;
  s4->sin_port = s6->sin6_port;
  std::memcpy(&s4->sin_addr, &s6->sin6_addr.s6_addr[12], 4);
  return out;
}

socklen_t sa_len(const sockaddr_storage& ss) { return ss.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6); }

struct ProxyConfig {
  bool quiet = false;  // only errors: for runs of many connections
  bool strict = false; // refuse plaintext inbound (15006), as ztunnel under STRICT mTLS
  uint32_t mark = 0;
  uint16_t outbound = 15001, inbound = 15006, hbone = 15008, dns = 15053;
  bool orig_src = true;  // connect to the app from the client's address, as ztunnel does
};

// ztunnel's upstream connect: the mark, and for inbound (orig_src) IP_TRANSPARENT +
// IP_FREEBIND bound to the client's address, port 0.
int connect_upstream(const sockaddr_storage& dst, const sockaddr_storage* from, uint32_t mark, std::string& err) {
  int u = socket(dst.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  setsockopt(u, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
  if (from) {
    int one = 1;
    setsockopt(u, SOL_IP, IP_TRANSPARENT, &one, sizeof(one));
    setsockopt(u, SOL_IP, IP_FREEBIND, &one, sizeof(one));
    sockaddr_storage b = *from;
    if (b.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&b)->sin_port = 0;
    else reinterpret_cast<sockaddr_in6*>(&b)->sin6_port = 0;
    if (b.ss_family != dst.ss_family || bind(u, reinterpret_cast<sockaddr*>(&b), sa_len(b)) != 0) {
      err = std::string("bind to the client's address: ") + std::strerror(errno);
      close(u);
      return -1;
    }
  }
  if (connect(u, reinterpret_cast<const sockaddr*>(&dst), sa_len(dst)) != 0) {
    err = std::strerror(errno);
    close(u);
    return -1;
  }
  return u;
}

// The test proxy: what ztunnel does in a pod's netns, in miniature. Outbound (15001) goes
// to SO_ORIGINAL_DST from the pod's address; inbound (15006) to SO_ORIGINAL_DST, falling
// back to the local address, from the client's address; HBONE (15008) is a stand-in for
// the tunnel ztunnel terminates: the first line names the destination ("CONNECT
// host:port"), then the stream goes there from the client's address.
void proxy_conn(int c, uint16_t listener, const ProxyConfig& cfg) {
  sockaddr_storage peer{}, local{};
  socklen_t plen = sizeof(peer), llen = sizeof(local);
  getpeername(c, reinterpret_cast<sockaddr*>(&peer), &plen);
  getsockname(c, reinterpret_cast<sockaddr*>(&local), &llen);
  json ev = {{"event", "accept"}, {"listener", listener}, {"peer", sock_name(c, true)}, {"local", sock_name(c, false)}};
  bool v4 = local.ss_family == AF_INET || IN6_IS_ADDR_V4MAPPED(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
  sockaddr_storage orig{};
  socklen_t olen = sizeof(orig);
  int r = v4 ? getsockopt(c, SOL_IP, 80 /* SO_ORIGINAL_DST */, &orig, &olen)
             : getsockopt(c, SOL_IPV6, 80 /* IP6T_SO_ORIGINAL_DST */, &orig, &olen);
  if (r == 0) {
    ev["orig_dst"] = addr_str(orig);
  } else {
    ev["orig_dst_error"] = std::strerror(errno);
    orig = local;  // ztunnel: orig_dst_addr_or_default
  }
  std::string first_reply;
  if (listener == cfg.hbone) {
    std::string line, host;
    uint16_t port = 0;
    if (read_line(c, line, 5000) && line.rfind("CONNECT ", 0) == 0) {
      auto hp = line.substr(8);
      auto colon = hp.rfind(':');
      host = hp.substr(0, colon);
      if (!host.empty() && host.front() == '[') host = host.substr(1, host.size() - 2);
      port = colon == std::string::npos ? 0 : std::stoi(hp.substr(colon + 1));
    }
    socklen_t unused;
    if (!port || !make_addr(host, port, false, orig, unused)) {
      ev["error"] = "bad HBONE request: " + line;
      emit(ev);
      close(c);
      return;
    }
    ev["hbone_target"] = addr_str(orig);
    first_reply = "HTTP/1.1 200 OK\n";
  }
  orig = canonical(orig);
  uint16_t dport = ntohs(orig.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&orig)->sin_port
                                                   : reinterpret_cast<sockaddr_in6*>(&orig)->sin6_port);
  if (dport == cfg.outbound || dport == cfg.inbound || dport == cfg.hbone || dport == cfg.dns) {
    // ztunnel refuses calls to its own ports: they would loop
    ev["error"] = "call to the proxy itself";
    emit(ev);
    close(c);
    return;
  }
  if (cfg.strict && listener == cfg.inbound) {
    // ztunnel under a STRICT PeerAuthentication: plaintext inbound is refused
    ev["error"] = "plaintext refused (STRICT)";
    emit(ev);
    linger lg{1, 0};
    setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(c);
    return;
  }
  if (!cfg.quiet) emit(ev);
  bool from_client = cfg.orig_src && listener != cfg.outbound && listener != cfg.dns;
  sockaddr_storage client = canonical(peer);
  std::string err;
  int u = connect_upstream(orig, from_client ? &client : nullptr, cfg.mark, err);
  if (u < 0) {
    emit({{"event", "upstream_error"}, {"orig_dst", ev.value("orig_dst", "")}, {"upstream", addr_str(orig)}, {"error", err}});
    close(c);
    return;
  }
  if (!cfg.quiet)
    emit({{"event", "upstream"}, {"listener", listener}, {"upstream", addr_str(orig)}, {"local", sock_name(u, false)}});
  if (!first_reply.empty()) write_all(c, first_reply);
  std::atomic<uint64_t> up{0}, down{0};
  std::thread t([&] { pump(u, c, down); });
  pump(c, u, up);
  t.join();
  if (!cfg.quiet)
    emit({{"event", "close"}, {"orig_dst", ev.value("orig_dst", "")}, {"listener", listener}, {"bytes_up", up.load()},
          {"bytes_down", down.load()}});
  close(u);
  close(c);
}

int udp_dns_listener(int family, uint32_t mark, uint16_t port) {
  sockaddr_storage ss;
  socklen_t len;
  make_addr(family == AF_INET ? "127.0.0.1" : "::1", port, family == AF_INET6, ss, len);
  int u = socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  setsockopt(u, SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
  if (bind(u, reinterpret_cast<sockaddr*>(&ss), len) != 0) die("bind dns");
  return u;
}

int cmd_proxy(const ProxyConfig& cfg, const std::vector<uint16_t>& ports) {
  std::vector<std::thread> threads;
  for (uint16_t p : ports) {
    // the DNS listener is on 127.0.0.1 and [::1], the others on [::] (dual stack)
    std::vector<std::string> addrs = p == cfg.dns ? std::vector<std::string>{"127.0.0.1", "::1"}
                                                  : std::vector<std::string>{""};
    for (const auto& addr : addrs) {
      int fd = listen_tcp(addr, p, cfg.mark, p == cfg.inbound || p == cfg.hbone);
      threads.emplace_back([fd, p, &cfg] {
        while (true) {
          int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
          if (c < 0) continue;
          std::thread(proxy_conn, c, p, cfg).detach();
        }
      });
    }
  }
  if (cfg.dns) {
    // ztunnel's DNS proxy listens on 127.0.0.1 and [::1]
    for (int family : {AF_INET, AF_INET6}) {
      int u = udp_dns_listener(family, cfg.mark, cfg.dns);
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
  }
  emit({{"event", "ready"}});
  for (auto& t : threads) t.join();
  return 0;
}

// close_first: close after the first reply, so this side closes first (and the peer that
// talked to us, the proxy, ends in TIME_WAIT)
int cmd_serve(const std::string& addr, uint16_t port, bool close_first) {
  int fd = listen_tcp(addr, port, 0);
  emit({{"event", "ready"}});
  while (true) {
    int c = accept4(fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) continue;
    std::thread([c, close_first] {
      std::string local = sock_name(c, false), peer = sock_name(c, true), line;
      emit({{"event", "accept"}, {"local", local}, {"peer", peer}});
      while (read_line(c, line, 30000)) {
        if (!write_all(c, "server local=" + local + " peer=" + peer + " got=" + line + "\n")) break;
        if (close_first) break;
      }
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

// How a client shapes its packets (what an unprivileged or a root client can ask for).
struct ClientShape {
  uint32_t mark = 0;
  std::string bind_addr;
  uint16_t bind_port = 0;
  bool ip_options = false;   // four NOP IPv4 options: no privilege needed
  bool v6_dstopts = false;   // an IPv6 destination-options header
  bool v6_hopopts = false;   // an IPv6 hop-by-hop header
};
ClientShape g_shape;
bool g_wait_eof = false;
// connect: print the socket's cookie and CPU, then wait for a stdin line before connect()
bool g_hold_before_connect = false;

void shape_socket(int fd, int family) {
  const ClientShape& c = g_shape;
  if (c.mark && setsockopt(fd, SOL_SOCKET, SO_MARK, &c.mark, sizeof(c.mark)) != 0) die("SO_MARK");
  if (c.ip_options) {
    uint8_t nops[4] = {1, 1, 1, 1};
    if (setsockopt(fd, IPPROTO_IP, IP_OPTIONS, nops, sizeof(nops)) != 0) die("IP_OPTIONS");
  }
  // an 8-byte extension header: next header, length 0, one PadN option of 4 zero bytes
  uint8_t ext[8] = {0, 0, 1, 4, 0, 0, 0, 0};
  if (c.v6_dstopts && (family != AF_INET6 || setsockopt(fd, IPPROTO_IPV6, IPV6_DSTOPTS, ext, sizeof(ext)) != 0))
    die("IPV6_DSTOPTS");
  if (c.v6_hopopts && (family != AF_INET6 || setsockopt(fd, IPPROTO_IPV6, IPV6_HOPOPTS, ext, sizeof(ext)) != 0))
    die("IPV6_HOPOPTS");
  if (!c.bind_addr.empty() || c.bind_port) {
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    sockaddr_storage b;
    socklen_t bl;
    make_addr(c.bind_addr.empty() ? (family == AF_INET6 ? "::" : "0.0.0.0") : c.bind_addr, c.bind_port,
              family == AF_INET6, b, bl);
    if (bind(fd, reinterpret_cast<sockaddr*>(&b), bl) != 0) die("bind " + c.bind_addr);
  }
}

int open_client(const std::string& to, uint16_t port, bool v6, int timeout_ms, json& out) {
  sockaddr_storage ss;
  socklen_t len;
  if (!make_addr(to, port, v6, ss, len)) die("bad address " + to);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  shape_socket(fd, ss.ss_family);
  if (g_hold_before_connect) {
    uint64_t cookie = 0;
    socklen_t cl = sizeof(cookie);
    getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &cl);
    emit({{"cookie", cookie}, {"cpu", sched_getcpu()}});
    std::string go;
    std::getline(std::cin, go);
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

// Each request line gets one reply line; "reply" is the last one, "replies" all of them.
int cmd_connect(const std::string& to, uint16_t port, bool v6, const std::vector<std::string>& requests, int timeout_ms) {
  json out;
  int fd = open_client(to, port, v6, timeout_ms, out);
  if (fd >= 0) {
    json replies = json::array();
    for (const auto& req : requests) {
      std::string line;
      if (!write_all(fd, req + "\n") || !read_line(fd, line, timeout_ms)) break;
      replies.push_back(line);
      out["reply"] = line;
    }
    if (requests.size() > 1) out["replies"] = replies;
    if (g_wait_eof) {  // let the other side close first
      char buf[256];
      pollfd p{fd, POLLIN, 0};
      while (poll(&p, 1, timeout_ms) > 0 && read(fd, buf, sizeof(buf)) > 0) {
      }
    }
    close(fd);
  }
  emit(out);
  return 0;
}

// Many short connections, `parallel` at a time, each a request and its reply, which must
// come from the server at the address and port connected to ("local=ADDR:PORT").
int cmd_connect_many(const std::string& to, const std::vector<uint16_t>& ports, int count, int parallel,
                     int timeout_ms) {
  std::atomic<int> next{0}, ok{0}, failed{0}, wrong{0};
  std::mutex first_mu;
  std::string first_error;
  auto worker = [&] {
    for (int i = next++; i < count; i = next++) {
      uint16_t port = ports[i % ports.size()];
      sockaddr_storage ss;
      socklen_t len;
      make_addr(to, port, false, ss, len);
      int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
      std::string line, err;
      if (connect(fd, reinterpret_cast<sockaddr*>(&ss), len) != 0) err = std::strerror(errno);
      else if (!write_all(fd, "x\n") || !read_line(fd, line, timeout_ms)) err = "no reply";
      close(fd);
      std::string want = "local=" + addr_str(ss) + " ";
      if (!err.empty()) failed++;
      else if (line.find(want) == std::string::npos) wrong++, err = "reply from the wrong server: " + line;
      else ok++;
      if (!err.empty()) {
        std::lock_guard<std::mutex> g(first_mu);
        if (first_error.empty()) first_error = err;
      }
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < parallel; ++i) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  emit({{"ok", ok.load()}, {"failed", failed.load()}, {"wrong_destination", wrong.load()}, {"first_error", first_error}});
  return 0;
}

int cmd_session(const std::string& to, uint16_t port, int timeout_ms) {
  json out;
  int fd = open_client(to, port, false, timeout_ms, out);
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
  // After joining the netns and cgroup: run as this uid and gid with CAP_NET_RAW alone (an
  // app container's root-less process that kept the capability containerd grants)
  int as_user = -1;
  app.add_option("--as-user-with-net-raw", as_user);

  std::vector<uint16_t> ports = {15001, 15006, 15008};
  ProxyConfig pcfg;
  bool no_orig_src = false;
  uint16_t port = 0;
  std::string addr, to, send_text;
  std::vector<std::string> requests;
  bool v6 = false, connected = false;
  int timeout_ms = 3000;

  auto* proxy = app.add_subcommand("proxy");
  proxy->add_option("--mark", pcfg.mark);
  proxy->add_option("--ports", ports)->delimiter(',');
  proxy->add_option("--hbone-port", pcfg.hbone);
  proxy->add_option("--dns-port", pcfg.dns);
  proxy->add_flag("--no-orig-src", no_orig_src, "connect to the app from the pod's address (ztunnel ENABLE_ORIG_SRC=false)");
  proxy->add_flag("--quiet", pcfg.quiet, "log errors only");
  proxy->add_flag("--strict", pcfg.strict, "refuse every plaintext inbound connection (15006), as ztunnel under STRICT mTLS");
  auto* serve = app.add_subcommand("serve");
  serve->add_option("--port", port)->required();
  serve->add_option("--addr", addr);
  bool close_first = false;
  serve->add_flag("--close-after-reply", close_first, "close each connection after its first reply");
  auto* serve_udp = app.add_subcommand("serve-udp");
  serve_udp->add_option("--port", port)->required();
  serve_udp->add_option("--addr", addr);
  auto* conn = app.add_subcommand("connect");
  auto* session = app.add_subcommand("session");
  auto* udp = app.add_subcommand("udp");
  auto* many = app.add_subcommand("connect-many");
  std::vector<uint16_t> many_ports;
  int count = 1000, parallel = 4;
  many->add_option("--to", to)->required();
  many->add_option("--ports", many_ports)->delimiter(',')->required();
  many->add_option("--count", count);
  many->add_option("--parallel", parallel);
  many->add_option("--timeout-ms", timeout_ms);
  for (auto* c : {conn, session, udp}) {
    c->add_option("--to", to)->required();
    c->add_option("--port", port)->required();
    c->add_option("--timeout-ms", timeout_ms);
  }
  conn->add_option("--send", requests, "a request line (repeatable: one reply line is read after each)");
  conn->add_option("--mark", g_shape.mark);
  conn->add_option("--bind", g_shape.bind_addr, "source address");
  conn->add_option("--bind-port", g_shape.bind_port, "source port (SO_REUSEADDR)");
  conn->add_flag("--ip-options", g_shape.ip_options, "four NOP IPv4 options (IP_OPTIONS)");
  conn->add_flag("--wait-eof", g_wait_eof, "after the replies, wait for the server to close first");
  conn->add_flag("--hold-before-connect", g_hold_before_connect,
                 "print the socket's cookie and CPU, then connect after a line on stdin");
  int cpu = -1;
  app.add_option("--cpu", cpu, "run on this CPU only");
  conn->add_flag("--v6-dstopts", g_shape.v6_dstopts, "an IPv6 destination-options header (IPV6_DSTOPTS)");
  conn->add_flag("--v6-hopopts", g_shape.v6_hopopts, "an IPv6 hop-by-hop header (IPV6_HOPOPTS)");
  conn->add_flag("--v6", v6, "use an AF_INET6 socket (v4-mapped for IPv4 addresses)");
  udp->add_option("--send", send_text)->required();
  udp->add_flag("--connected", connected);
  CLI11_PARSE(app, argc, argv);
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) die("sched_setaffinity");
  }

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
  if (as_user >= 0) {
    if (prctl(PR_SET_KEEPCAPS, 1) != 0) die("PR_SET_KEEPCAPS");
    if (setgroups(0, nullptr) != 0 || setgid(as_user) != 0 || setuid(as_user) != 0) die("drop to uid " + std::to_string(as_user));
    __user_cap_header_struct h{_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct d[2] = {};
    d[0].effective = d[0].permitted = 1u << CAP_NET_RAW;
    if (syscall(SYS_capset, &h, d) != 0) die("capset CAP_NET_RAW");
  }
  pcfg.orig_src = !no_orig_src;
  if (*proxy) return cmd_proxy(pcfg, ports);
  if (*serve) return cmd_serve(addr, port, close_first);
  if (*serve_udp) return cmd_serve_udp(addr, port);
  if (*conn) return cmd_connect(to, port, v6, requests, timeout_ms);
  if (*session) return cmd_session(to, port, timeout_ms);
  if (*udp) return cmd_udp(to, port, send_text, connected, timeout_ms);
  if (*many) return cmd_connect_many(to, many_ports, count, parallel, timeout_ms);
  return 0;
}
