#include "proxy.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "sockaddr_text.h"

#include <condition_variable>
#include <cstring>
#include <fstream>
#include <future>
#include <iostream>
#include <sstream>

namespace podsteer::proxy {

using json = nlohmann::json;

void log_line(const json& j) {
  static std::mutex mu;
  std::string line = j.dump() + "\n";
  std::lock_guard<std::mutex> g(mu);
  std::cout << line << std::flush;
}
using Clock = std::chrono::steady_clock;
constexpr size_t kBuf = 64 * 1024;
constexpr int kSoOriginalDst = 80;

struct Proxy::Pod {
  std::string uid, name, namespace_, service_account;
  bool known = true;  // ztunnel found the workload (see Config::check_identity)
  Fd netns;
  ino_t netns_ino = 0;
  std::vector<Fd> listeners;
  sockaddr_storage dns_upstream{};
  socklen_t dns_upstream_len = 0;
  std::chrono::steady_clock::time_point dns_looked_up{};
};

struct Proxy::Conn {
  Pod* pod;
  std::string direction, src, dst;
  Fd down, up;
  std::string to_up, to_down;
  bool connecting = true, down_eof = false, up_eof = false, up_shut = false, down_shut = false;
  uint64_t bytes_up = 0, bytes_down = 0;
  std::chrono::steady_clock::time_point last_active = std::chrono::steady_clock::now();
};

struct Proxy::DnsQuery {
  Pod* pod;
  int listener;
  sockaddr_storage client{};
  socklen_t client_len = 0;
  Fd upstream;
  Clock::time_point deadline;
};

namespace {

std::string addr_str(const sockaddr_storage& ss) { return podsteer::sockaddr_text(ss); }

bool out_of_fds(int err) { return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM; }

bool parse_hostport(const std::string& s, sockaddr_storage& out, socklen_t& len) {
  std::memset(&out, 0, sizeof(out));
  std::string host = s;
  uint16_t port = 53;
  if (!s.empty() && s[0] == '[') {
    auto close = s.find(']');
    if (close == std::string::npos) return false;
    host = s.substr(1, close - 1);
    if (close + 1 < s.size() && s[close + 1] == ':') port = std::stoi(s.substr(close + 2));
  } else if (std::count(s.begin(), s.end(), ':') == 1) {
    host = s.substr(0, s.find(':'));
    port = std::stoi(s.substr(s.find(':') + 1));
  }
  auto* s4 = reinterpret_cast<sockaddr_in*>(&out);
  if (inet_pton(AF_INET, host.c_str(), &s4->sin_addr) == 1) {
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    len = sizeof(*s4);
    return true;
  }
  auto* s6 = reinterpret_cast<sockaddr_in6*>(&out);
  if (inet_pton(AF_INET6, host.c_str(), &s6->sin6_addr) == 1) {
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(port);
    len = sizeof(*s6);
    return true;
  }
  return false;
}

std::string resolv_conf_nameserver(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::string key, value;
    ss >> key >> value;
    if (key == "nameserver" && !value.empty()) return value;
  }
  return "";
}

// v4-mapped addresses (peers of a dual-stack listener) as plain IPv4
sockaddr_storage canonical(const sockaddr_storage& ss, socklen_t& len) {
  len = ss.ss_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6);
  if (ss.ss_family != AF_INET6) return ss;
  auto* s6 = reinterpret_cast<const sockaddr_in6*>(&ss);
  if (!IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) return ss;
  sockaddr_storage out{};
  auto* s4 = reinterpret_cast<sockaddr_in*>(&out);
  s4->sin_family = AF_INET;
  s4->sin_port = s6->sin6_port;
  std::memcpy(&s4->sin_addr, &s6->sin6_addr.s6_addr[12], 4);
  len = sizeof(*s4);
  return out;
}

// Listening socket inside the current thread's netns, as ztunnel makes them: the mark,
// SO_REUSEPORT, and IP_TRANSPARENT on the inbound listeners (mark_after_listen: as ztunnel
// with INPOD_PORT_REUSE=false, no SO_REUSEPORT and the mark only once it listens).
Result<Fd> listen_on(int family, int type, const char* addr, uint16_t port, uint32_t mark, bool transparent,
                     bool mark_after_listen) {
  Fd fd(socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return sys_error("socket");
  int one = 1, zero = 0;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (!mark_after_listen) {
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (setsockopt(fd.get(), SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) return sys_error("SO_MARK");
  }
  if (transparent && setsockopt(fd.get(), SOL_IP, IP_TRANSPARENT, &one, sizeof(one)) != 0)
    return sys_error("IP_TRANSPARENT");
  sockaddr_storage ss{};
  socklen_t len;
  if (family == AF_INET6) {
    setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    auto* s6 = reinterpret_cast<sockaddr_in6*>(&ss);
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(port);
    inet_pton(AF_INET6, addr, &s6->sin6_addr);
    len = sizeof(*s6);
    // CNI ADD runs before the runtime's loopback plugin may have brought lo up: ::1
    // does not exist yet, so bind it anyway.
    setsockopt(fd.get(), IPPROTO_IPV6, IPV6_FREEBIND, &one, sizeof(one));
  } else {
    // the same for 127.0.0.1
    setsockopt(fd.get(), IPPROTO_IP, IP_FREEBIND, &one, sizeof(one));
    auto* s4 = reinterpret_cast<sockaddr_in*>(&ss);
    s4->sin_family = AF_INET;
    s4->sin_port = htons(port);
    inet_pton(AF_INET, addr, &s4->sin_addr);
    len = sizeof(*s4);
  }
  if (bind(fd.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) return sys_error("bind port " + std::to_string(port));
  if (type == SOCK_STREAM && listen(fd.get(), 1024) != 0) return sys_error("listen");
  if (mark_after_listen && setsockopt(fd.get(), SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
    return sys_error("SO_MARK");
  return fd;
}

}  // namespace

Proxy::Proxy(Config cfg) : cfg_(std::move(cfg)) {
  epoll_ = Fd(epoll_create1(EPOLL_CLOEXEC));
  wake_ = Fd(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  host_netns_ = Fd(open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
  watch(wake_.get(), Kind::Wakeup, EPOLLIN, nullptr);
}

Proxy::~Proxy() = default;

Proxy::Handle* Proxy::watch(int fd, Kind kind, uint32_t events, Pod* pod, Conn* conn, DnsQuery* dns) {
  auto h = std::make_unique<Handle>(Handle{kind, pod, conn, dns, fd});
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;  // looked up on each event: a handle closed earlier in a batch is skipped
  epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev);
  Handle* raw = h.get();
  handles_[fd] = std::move(h);
  return raw;
}

void Proxy::unwatch(int fd) {
  epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  paused_.erase(fd);
  handles_.erase(fd);
}

Result<Fd> Proxy::socket_in(Pod* pod, int family, int type) {
  // Sockets belong to the netns they are created in: step into the pod's and back.
  if (setns(pod->netns.get(), CLONE_NEWNET) != 0) return sys_error("setns into pod");
  Fd fd(socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  int err = errno;
  if (setns(host_netns_.get(), CLONE_NEWNET) != 0) {
    perror("setns back to the proxy's netns");
    abort();  // continuing in a pod's netns would be worse than dying
  }
  if (!fd.valid()) return Error{"socket", err, pod->namespace_ + "/" + pod->name};
  if (setsockopt(fd.get(), SOL_SOCKET, SO_MARK, &cfg_.mark, sizeof(cfg_.mark)) != 0) return sys_error("SO_MARK");
  return fd;
}

Result<Fd> Proxy::connect_in(Pod* pod, const sockaddr_storage& dst, socklen_t dlen, const sockaddr_storage* from) {
  auto fd = socket_in(pod, dst.ss_family, SOCK_STREAM);
  if (!fd) return fd.error();
  if (from) {
    // ztunnel's freebind_connect: the client's address, any port
    int one = 1;
    sockaddr_storage b = *from;
    socklen_t blen;
    b = canonical(b, blen);
    if (b.ss_family == AF_INET) reinterpret_cast<sockaddr_in*>(&b)->sin_port = 0;
    else reinterpret_cast<sockaddr_in6*>(&b)->sin6_port = 0;
    if (setsockopt(fd->get(), SOL_IP, IP_TRANSPARENT, &one, sizeof(one)) != 0) return sys_error("IP_TRANSPARENT");
    setsockopt(fd->get(), SOL_IP, IP_FREEBIND, &one, sizeof(one));
    // the port is chosen at connect(), for the whole tuple: bound to port 0 here, every
    // connection from a busy client would need a port of its own for that address alone,
    // and TIME_WAIT would soon hold them all (bind then crawls through the range)
    setsockopt(fd->get(), SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    if (b.ss_family != dst.ss_family)
      return invalid("the client's address family differs from the app's", addr_str(b));
    if (bind(fd->get(), reinterpret_cast<sockaddr*>(&b), blen) != 0) return sys_error("bind to the client's address");
  }
  if (connect(fd->get(), reinterpret_cast<const sockaddr*>(&dst), dlen) != 0 && errno != EINPROGRESS)
    return sys_error("connect upstream");
  return fd;
}

template <typename F>
static auto run_on_loop(std::mutex& mu, std::deque<std::function<void()>>& tasks, int wake, F f) {
  auto p = std::make_shared<std::promise<decltype(f())>>();
  auto fut = p->get_future();
  {
    std::lock_guard<std::mutex> g(mu);
    tasks.push_back([p, f]() mutable { p->set_value(f()); });
  }
  uint64_t one = 1;
  (void)!write(wake, &one, sizeof(one));
  return fut.get();
}

Status Proxy::add_workload(Workload w) {
  auto shared = std::make_shared<Workload>(std::move(w));
  return run_on_loop(mu_, tasks_, wake_.get(), [this, shared]() { return do_add(*shared); });
}

Status Proxy::del_workload(const std::string& uid) {
  return run_on_loop(mu_, tasks_, wake_.get(), [this, uid]() -> Status {
    do_del(uid);
    return {};
  });
}

void Proxy::drain() {
  (void)run_on_loop(mu_, tasks_, wake_.get(), [this]() -> Status {
    if (draining_all_) return {};
    draining_all_ = true;
    drain_deadline_ = Clock::now() + std::chrono::milliseconds(cfg_.drain_ms);
    // Accept what each listener has queued before closing it: a listener closed with a
    // queue resets those connections (unless the pod netns has net.ipv4.tcp_migrate_req,
    // which hands them to the next proxy's listener in the SO_REUSEPORT group).
    size_t listeners = 0;
    auto close_all = [&](Pod& pod) {
      for (auto& l : pod.listeners) {
        auto it = handles_.find(l.get());
        if (it != handles_.end() && it->second->kind != Kind::DnsUdpListener) {
          for (int i = 0; i < 4096 && !paused_.count(l.get()); ++i) {
            pollfd p{l.get(), POLLIN, 0};
            if (poll(&p, 1, 0) <= 0) break;
            on_accept(it->second.get());
          }
        }
        unwatch(l.get());
        paused_.erase(l.get());
        ++listeners;
      }
      pod.listeners.clear();
    };
    for (auto& [_, pod] : pods_) close_all(*pod);
    for (auto& pod : draining_) close_all(*pod);
    log_line({{"event", "draining"}, {"listeners_closed", listeners}, {"open_connections", conns_.size()},
              {"deadline_ms", cfg_.drain_ms}});
    return {};
  });
}

std::vector<std::string> Proxy::workloads() {
  return run_on_loop(mu_, tasks_, wake_.get(), [this]() {
    std::vector<std::string> out;
    for (const auto& [uid, _] : pods_) out.push_back(uid);
    return out;
  });
}

Status Proxy::do_add(Workload& w) {
  struct stat st {};
  if (!w.netns.valid() || fstat(w.netns.get(), &st) != 0) return invalid("AddWorkload without a usable netns fd", w.uid);
  if (draining_all_) return invalid("this proxy is shutting down", w.uid);
  auto it = pods_.find(w.uid);
  if (it != pods_.end()) {
    if (it->second->netns_ino == st.st_ino) return {};  // the same pod again (a snapshot): keep it
    do_del(w.uid);
  }
  auto pod = std::make_unique<Pod>();
  pod->uid = w.uid;
  pod->name = w.name;
  pod->namespace_ = w.namespace_;
  pod->netns = std::move(w.netns);
  pod->netns_ino = st.st_ino;
  pod->service_account = w.service_account;
  std::string who = w.namespace_ + "/" + w.name + "/" + w.service_account;
  pod->known = !cfg_.check_identity || cfg_.known_workloads.count(who);
  if (!cfg_.dns_upstream.empty()) parse_hostport(cfg_.dns_upstream, pod->dns_upstream, pod->dns_upstream_len);

  struct Want {
    Kind kind;
    int family, type;
    const char* addr;
    uint16_t port;
    bool transparent;
  };
  const Want wants[] = {
      {Kind::OutboundListener, AF_INET6, SOCK_STREAM, "::", cfg_.outbound_port, false},
      {Kind::InboundListener, AF_INET6, SOCK_STREAM, "::", cfg_.inbound_port, true},
      {Kind::HboneListener, AF_INET6, SOCK_STREAM, "::", cfg_.hbone_port, true},
      {Kind::DnsTcpListener, AF_INET, SOCK_STREAM, "127.0.0.1", cfg_.dns_port, false},
      {Kind::DnsUdpListener, AF_INET, SOCK_DGRAM, "127.0.0.1", cfg_.dns_port, false},
      {Kind::DnsTcpListener, AF_INET6, SOCK_STREAM, "::1", cfg_.dns_port, false},
      {Kind::DnsUdpListener, AF_INET6, SOCK_DGRAM, "::1", cfg_.dns_port, false},
  };
  if (setns(pod->netns.get(), CLONE_NEWNET) != 0) return sys_error("setns into pod", pod->uid);
  Status result;
  std::vector<std::pair<Fd, Kind>> made;
  for (const auto& want : wants) {
    auto fd = listen_on(want.family, want.type, want.addr, want.port, cfg_.mark, want.transparent, cfg_.mark_after_listen);
    if (!fd) {
      result = fd.error().in(pod->namespace_ + "/" + pod->name);
      break;
    }
    made.emplace_back(std::move(*fd), want.kind);
  }
  if (setns(host_netns_.get(), CLONE_NEWNET) != 0) abort();
  if (!result) return result;
  Pod* raw = pod.get();
  for (auto& [fd, kind] : made) {
    watch(fd.get(), kind, EPOLLIN, raw);
    raw->listeners.push_back(std::move(fd));
  }
  pods_[raw->uid] = std::move(pod);
  log_line({{"event", "pod_added"}, {"pod", raw->namespace_ + "/" + raw->name}, {"uid", raw->uid},
            {"service_account", raw->service_account}, {"identity", raw->known ? "found" : "unknown"}});
  return {};
}

void Proxy::do_del(const std::string& uid) {
  auto it = pods_.find(uid);
  if (it == pods_.end()) return;
  for (auto& l : it->second->listeners) unwatch(l.get());
  it->second->listeners.clear();  // no new connections
  // Connections already open carry on (a pod leaving the mesh keeps its connections); the
  // pod record stays until the last of them is done.
  bool busy = false;
  for (auto& [c, _] : conns_) busy |= c->pod == it->second.get();
  std::vector<DnsQuery*> queries;
  for (auto& [q, _] : dns_)
    if (q->pod == it->second.get()) queries.push_back(q);
  for (auto* q : queries) {
    unwatch(q->upstream.get());
    dns_.erase(q);
  }
  log_line({{"event", "pod_removed"}, {"pod", it->second->namespace_ + "/" + it->second->name}, {"uid", uid},
            {"open_connections", busy}});
  if (busy) draining_.push_back(std::move(it->second));
  pods_.erase(it);
}

void Proxy::log_conn(const Conn* c, const std::string& error) {
  if (cfg_.quiet && error.empty()) return;
  json j = {{"event", "connection"}, {"pod", c->pod->namespace_ + "/" + c->pod->name}, {"direction", c->direction},
            {"src", c->src},         {"original_dst", c->dst}, {"bytes_up", c->bytes_up}, {"bytes_down", c->bytes_down}};
  if (!error.empty()) j["error"] = error;
  log_line(j);
}

// Out of fds (or socket memory): the connections stay queued and the listener stays
// readable; without a pause the loop would spin on it. Out of the loop for 100 ms, while
// the backlog waits.
void Proxy::pause_listener(Handle* h, int err) {
  if (!paused_.count(h->fd))
    log_line({{"event", "accept_paused"}, {"error", std::strerror(err)}, {"pod", h->pod->namespace_ + "/" + h->pod->name}});
  epoll_event e{};
  e.data.fd = h->fd;
  epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, h->fd, &e);
  paused_[h->fd] = Clock::now() + std::chrono::milliseconds(100);
}

void Proxy::on_accept(Handle* h) {
  sockaddr_storage peer{};
  socklen_t plen = sizeof(peer);
  Fd down(accept4(h->fd, reinterpret_cast<sockaddr*>(&peer), &plen, SOCK_NONBLOCK | SOCK_CLOEXEC));
  if (!down.valid()) {
    if (out_of_fds(errno)) pause_listener(h, errno);
    return;
  }
  auto c = std::make_unique<Conn>();
  c->pod = h->pod;
  c->src = addr_str(peer);
  c->direction = h->kind == Kind::OutboundListener ? "outbound"
                 : h->kind == Kind::InboundListener ? "inbound"
                 : h->kind == Kind::HboneListener   ? "hbone"
                                                    : "dns-tcp";
  if (!h->pod->known) {
    c->dst = "-";
    log_conn(c.get(), "unknown workload " + h->pod->namespace_ + "/" + h->pod->name + " (service account \"" +
                          h->pod->service_account + "\"): no identity, no certificate");
    return;
  }
  if (h->kind == Kind::HboneListener) {
    // HBONE (mTLS + HTTP/2 CONNECT) is ztunnel's; this proxy does not speak it.
    c->dst = "-";
    log_conn(c.get(), "HBONE is not implemented by podsteer-proxy");
    return;
  }
  sockaddr_storage local{};
  socklen_t llen = sizeof(local);
  getsockname(down.get(), reinterpret_cast<sockaddr*>(&local), &llen);
  bool v4 = local.ss_family == AF_INET ||
            IN6_IS_ADDR_V4MAPPED(&reinterpret_cast<sockaddr_in6*>(&local)->sin6_addr);
  sockaddr_storage orig{};
  socklen_t olen = sizeof(orig);
  int r = v4 ? getsockopt(down.get(), SOL_IP, kSoOriginalDst, &orig, &olen)
             : getsockopt(down.get(), SOL_IPV6, kSoOriginalDst, &orig, &olen);
  // A connection made straight to the listener has itself as "original destination"
  // (inbound ones handed over by sk_lookup keep the app's port as local address, so they differ).
  uint16_t listen_port = h->kind == Kind::OutboundListener  ? cfg_.outbound_port
                         : h->kind == Kind::InboundListener ? cfg_.inbound_port
                                                            : cfg_.dns_port;
  uint16_t local_port = ntohs(local.ss_family == AF_INET ? reinterpret_cast<sockaddr_in*>(&local)->sin_port
                                                         : reinterpret_cast<sockaddr_in6*>(&local)->sin6_port);
  bool to_self = r == 0 && local_port == listen_port && addr_str(orig) == addr_str(local);
  bool by_default = r != 0 || to_self;
  if (by_default) {
    const std::string& dflt = h->kind == Kind::InboundListener && !cfg_.default_inbound_upstream.empty()
                                  ? cfg_.default_inbound_upstream
                                  : cfg_.default_upstream;
    if (dflt.empty() || !parse_hostport(dflt, orig, olen)) {
      c->dst = "?";
      log_conn(c.get(), r != 0 ? std::string("SO_ORIGINAL_DST: ") + std::strerror(errno) : "no original destination");
      return;
    }
  }
  c->dst = addr_str(orig);
  if (cfg_.strict && h->kind == Kind::InboundListener) {
    // ztunnel under a STRICT PeerAuthentication: plaintext inbound is refused (reset)
    linger reset{1, 0};
    setsockopt(down.get(), SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    log_conn(c.get(), "plaintext inbound refused (strict)");
    return;
  }
  orig = canonical(orig, olen);
  // nothing redirected a connection to the default upstream: no return path for the
  // client's address either, so it goes from the pod's own
  bool from_client = cfg_.orig_src && h->kind == Kind::InboundListener && !by_default;
  auto up = connect_in(h->pod, orig, olen, from_client ? &peer : nullptr);
  if (!up) {
    log_conn(c.get(), up.error().message());
    if (out_of_fds(up.error().err)) pause_listener(h, up.error().err);  // the next ones would fail too
    return;
  }
  c->down = std::move(down);
  c->up = std::move(*up);
  Conn* raw = c.get();
  conns_[raw] = std::move(c);
  watch(raw->down.get(), Kind::ConnDown, 0, raw->pod, raw);
  watch(raw->up.get(), Kind::ConnUp, EPOLLOUT, raw->pod, raw);
  update_interest(raw);
}

void Proxy::update_interest(Conn* c) {
  auto set = [&](int fd, uint32_t ev) {
    epoll_event e{};
    e.events = ev;
    e.data.fd = fd;
    epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &e);
  };
  uint32_t down_ev = 0, up_ev = 0;
  if (c->connecting) {
    up_ev = EPOLLOUT;
  } else {
    if (!c->down_eof && c->to_up.size() < kBuf) down_ev |= EPOLLIN;
    if (!c->up_eof && c->to_down.size() < kBuf) up_ev |= EPOLLIN;
    if (!c->to_up.empty()) up_ev |= EPOLLOUT;
    if (!c->to_down.empty()) down_ev |= EPOLLOUT;
  }
  set(c->down.get(), down_ev);
  set(c->up.get(), up_ev);
}

void Proxy::finish(Conn* c, const std::string& error) {
  log_conn(c, error);
  unwatch(c->down.get());
  unwatch(c->up.get());
  Pod* pod = c->pod;
  conns_.erase(c);
  for (auto it = draining_.begin(); it != draining_.end(); ++it) {
    if (it->get() != pod) continue;
    bool busy = false;
    for (auto& [other, _] : conns_) busy |= other->pod == pod;
    if (!busy) {
      log_line({{"event", "pod_netns_closed"}, {"pod", pod->namespace_ + "/" + pod->name}, {"uid", pod->uid}});
      draining_.erase(it);
    }
    break;
  }
}

void Proxy::on_conn(Handle* h, uint32_t events) {
  Conn* c = h->conn;
  c->last_active = Clock::now();
  bool is_up = h->kind == Kind::ConnUp;
  if (is_up && c->connecting) {
    int err = 0;
    socklen_t el = sizeof(err);
    getsockopt(c->up.get(), SOL_SOCKET, SO_ERROR, &err, &el);
    if (err) return finish(c, std::string("connect upstream: ") + std::strerror(err));
    if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
    c->connecting = false;
  }
  char buf[16384];
  auto pump_in = [&](int from, std::string& into, bool& eof, uint64_t& counter) -> bool {
    while (into.size() < kBuf) {
      ssize_t n = read(from, buf, sizeof(buf));
      if (n > 0) {
        into.append(buf, n);
        counter += n;
        continue;
      }
      if (n == 0) eof = true;
      else if (errno != EAGAIN && errno != EWOULDBLOCK) return false;
      break;
    }
    return true;
  };
  auto flush = [&](int to, std::string& from) -> bool {
    while (!from.empty()) {
      ssize_t n = send(to, from.data(), from.size(), MSG_NOSIGNAL);
      if (n > 0) {
        from.erase(0, n);
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
      return false;
    }
    return true;
  };
  if (!pump_in(c->down.get(), c->to_up, c->down_eof, c->bytes_up) ||
      !pump_in(c->up.get(), c->to_down, c->up_eof, c->bytes_down))
    return finish(c, std::string("read: ") + std::strerror(errno));
  if (!flush(c->up.get(), c->to_up) || !flush(c->down.get(), c->to_down))
    return finish(c, std::string("write: ") + std::strerror(errno));
  if (c->down_eof && c->to_up.empty() && !c->up_shut) {
    shutdown(c->up.get(), SHUT_WR);
    c->up_shut = true;
  }
  if (c->up_eof && c->to_down.empty() && !c->down_shut) {
    shutdown(c->down.get(), SHUT_WR);
    c->down_shut = true;
  }
  if (c->up_shut && c->down_shut) return finish(c);
  update_interest(c);
}

void Proxy::on_dns_query(Handle* h) {
  char buf[4096];
  auto q = std::make_unique<DnsQuery>();
  q->pod = h->pod;
  q->listener = h->fd;
  q->client_len = sizeof(q->client);
  ssize_t n = recvfrom(h->fd, buf, sizeof(buf), 0, reinterpret_cast<sockaddr*>(&q->client), &q->client_len);
  if (n < 0) return;
  if (dns_.size() >= cfg_.max_dns_queries) {
    log_line({{"event", "dns_dropped"}, {"pod", h->pod->namespace_ + "/" + h->pod->name}, {"why", "too many queries in flight"}});
    return;  // the client retries, as it would after a lost datagram
  }
  if (!dns_upstream(h->pod)) {
    log_line({{"event", "dns_dropped"}, {"pod", h->pod->namespace_ + "/" + h->pod->name}, {"why", "no resolver known for the pod"}});
    return;
  }
  auto up = socket_in(h->pod, h->pod->dns_upstream.ss_family, SOCK_DGRAM);
  if (!up) return;
  if (sendto(up->get(), buf, n, 0, reinterpret_cast<sockaddr*>(&h->pod->dns_upstream), h->pod->dns_upstream_len) < 0)
    return;
  q->upstream = std::move(*up);
  q->deadline = Clock::now() + std::chrono::seconds(5);
  DnsQuery* raw = q.get();
  dns_[raw] = std::move(q);
  watch(raw->upstream.get(), Kind::DnsUpstream, EPOLLIN, raw->pod, nullptr, raw);
  log_line({{"event", "dns"}, {"pod", raw->pod->namespace_ + "/" + raw->pod->name}, {"src", addr_str(raw->client)},
                    {"upstream", addr_str(raw->pod->dns_upstream)}});
}

void Proxy::on_dns_reply(Handle* h) {
  DnsQuery* q = h->dns;
  char buf[4096];
  ssize_t n = recv(q->upstream.get(), buf, sizeof(buf), 0);
  if (n > 0) sendto(q->listener, buf, n, 0, reinterpret_cast<sockaddr*>(&q->client), q->client_len);
  unwatch(q->upstream.get());
  dns_.erase(q);
}

// The pod's own resolver: the nameserver of /etc/resolv.conf as a process in the pod's
// netns sees it (the runtime bind-mounts the pod's resolv.conf into its containers). The
// node's file is no substitute: it often names 127.0.0.53, which means nothing in a pod.
bool Proxy::dns_upstream(Pod* pod) {
  if (pod->dns_upstream_len) return true;
  auto now = Clock::now();
  if (now - pod->dns_looked_up < std::chrono::seconds(1)) return false;
  pod->dns_looked_up = now;
  // A container has a mount namespace of its own; a process that merely entered the
  // pod's netns (setns, nsenter --net) shares ours and sees the node's file: skipped.
  struct stat own_mnt {};
  stat("/proc/self/ns/mnt", &own_mnt);
  DIR* d = opendir("/proc");
  if (!d) return false;
  std::string found;
  while (dirent* e = readdir(d)) {
    if (!std::isdigit(static_cast<unsigned char>(e->d_name[0]))) continue;
    std::string base = std::string("/proc/") + e->d_name;
    struct stat net {}, mnt {};
    if (stat((base + "/ns/net").c_str(), &net) != 0 || net.st_ino != pod->netns_ino) continue;
    if (stat((base + "/ns/mnt").c_str(), &mnt) != 0 || mnt.st_ino == own_mnt.st_ino) continue;
    found = resolv_conf_nameserver(base + "/root/etc/resolv.conf");
    if (!found.empty()) break;
  }
  closedir(d);
  if (found.empty()) return false;
  if (!parse_hostport(found, pod->dns_upstream, pod->dns_upstream_len)) return false;
  log_line({{"event", "dns_upstream"}, {"pod", pod->namespace_ + "/" + pod->name}, {"upstream", found}});
  return true;
}

void Proxy::expire_idle() {
  auto now = Clock::now();
  if (now - last_sweep_ < std::chrono::seconds(1) && cfg_.idle_timeout_ms >= 1000) return;
  last_sweep_ = now;
  std::vector<Conn*> idle;
  for (auto& [c, _] : conns_)
    if (now - c->last_active > std::chrono::milliseconds(cfg_.idle_timeout_ms)) idle.push_back(c);
  for (auto* c : idle) finish(c, "idle timeout");
}

void Proxy::resume_listeners() {
  auto now = Clock::now();
  for (auto it = paused_.begin(); it != paused_.end();) {
    if (it->second > now) {
      ++it;
      continue;
    }
    if (handles_.count(it->first)) {
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.fd = it->first;
      epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, it->first, &e);
    }
    it = paused_.erase(it);
  }
}

void Proxy::expire_dns() {
  auto now = Clock::now();
  std::vector<DnsQuery*> old;
  for (auto& [q, _] : dns_)
    if (q->deadline < now) old.push_back(q);
  for (auto* q : old) {
    unwatch(q->upstream.get());
    dns_.erase(q);
  }
}

void Proxy::run() {
  epoll_event events[64];
  for (;;) {
    if (draining_all_ && (conns_.empty() || Clock::now() >= drain_deadline_)) {
      log_line({{"event", "drained"}, {"connections_cut", conns_.size()}});
      return;
    }
    int timeout = paused_.empty() ? std::min(1000, std::max(cfg_.idle_timeout_ms / 2, 10)) : 50;
    int n = epoll_wait(epoll_.get(), events, 64, timeout);
    for (int i = 0; i < n; ++i) {
      auto it = handles_.find(events[i].data.fd);
      if (it == handles_.end()) continue;  // removed by an earlier event in this batch
      Handle* h = it->second.get();
      switch (h->kind) {
        case Kind::Wakeup: {
          uint64_t v;
          (void)!read(wake_.get(), &v, sizeof(v));
          std::deque<std::function<void()>> todo;
          {
            std::lock_guard<std::mutex> g(mu_);
            todo.swap(tasks_);
          }
          for (auto& t : todo) t();
          break;
        }
        case Kind::OutboundListener:
        case Kind::InboundListener:
        case Kind::HboneListener:
        case Kind::DnsTcpListener:
          on_accept(h);
          break;
        case Kind::DnsUdpListener:
          on_dns_query(h);
          break;
        case Kind::DnsUpstream:
          on_dns_reply(h);
          break;
        case Kind::ConnDown:
        case Kind::ConnUp:
          on_conn(h, events[i].events);
          break;
      }
    }
    expire_dns();
    expire_idle();
    resume_listeners();
  }
}

}  // namespace podsteer::proxy
