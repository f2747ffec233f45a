#include "clock.h"
#include "zds_server.h"

#include <poll.h>
#include <sys/socket.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "log.h"
#include "netns.h"
#include "wire.h"
#include "zds.pb.h"

namespace podsteer {

namespace pb = istio::workload::zds;

namespace {


pb::WorkloadRequest add_request(const PodInfo& pod) {
  pb::WorkloadRequest req;
  auto* add = req.mutable_add();
  add->set_uid(pod.uid);
  add->mutable_workload_info()->set_name(pod.name);
  add->mutable_workload_info()->set_namespace_(pod.namespace_);
  // ztunnel finds the workload by name, namespace and service account: never empty
  add->mutable_workload_info()->set_service_account(pod.service_account.empty() ? "default" : pod.service_account);
  return req;
}

}  // namespace

struct ZdsServer::Conn {
  Fd fd;
  uint64_t id = 0;
  uint32_t pid = 0;  // the peer's (SO_PEERCRED), 0 if unknown
  int64_t since_ms = 0;  // Unix ms, set when it joins conns_
  std::atomic<int64_t> last_ack_ms{0};
  std::atomic<uint64_t> acks{0};
  std::mutex io;  // one request in flight on this connection (lockstep)
  std::atomic<bool> dead{false};
};

ZdsServer::ZdsServer(std::string path, int ack_timeout_ms) : path_(std::move(path)), ack_timeout_ms_(ack_timeout_ms) {}

ZdsServer::~ZdsServer() { stop(); }

namespace {
// The process's name (comm), "" when it cannot be read (another pid namespace, gone).
std::string process_name(pid_t pid) {
  if (pid <= 0) return "";
  std::ifstream in("/proc/" + std::to_string(pid) + "/comm");
  std::string name;
  std::getline(in, name);
  return name;
}
}  // namespace

Status ZdsServer::start() {
  auto listen = [this]() -> Status {
    PODSTEER_TRY(listener_.start(path_, SOCK_SEQPACKET, [this](Fd conn) { handshake(std::move(conn)); }));
    spdlog::info("zds: listening on {}", path_);
    return {};
  };
  auto holder = UnixListener::live_server(path_, SOCK_SEQPACKET);
  if (!holder) return listen();
  // An earlier podsteer-agent (an upgrade with maxSurge) hands over: the proxies reconnect
  // to the newest. Anything else (istio-cni's node agent serves ztunnel here) is waited for.
  if (std::string comm = process_name(*holder); comm == "podsteer-agent") {
    spdlog::info("zds: taking {} over from the podsteer-agent before this one (pid {})", path_, *holder);
    return listen();
  }
  spdlog::warn("zds: another live server holds {} ({}; istio-cni's node agent? remove it first: README, "
               "\"Switching from istio-cni\"): waiting for it to go, not ready meanwhile",
               path_, *holder ? fmt::format("pid {}, {}", *holder, process_name(*holder)) : "pid unknown");
  waiting_ = true;
  waiter_ = std::thread([this, listen] {
    while (!stopping_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      if (stopping_ || UnixListener::live_server(path_, SOCK_SEQPACKET)) continue;
      if (auto st = listen(); !st) {
        spdlog::error("zds: {}", st.error().message());
        continue;
      }
      waiting_ = false;
      return;
    }
  });
  return {};
}

void ZdsServer::stop() {
  stopping_ = true;
  if (waiter_.joinable()) waiter_.join();
  listener_.stop();
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& c : all_) shutdown(c->fd.get(), SHUT_RDWR);  // unblocks every handshake
    threads.swap(handshakes_);
    conns_.clear();
    all_.clear();
  }
  for (auto& t : threads) t.join();
}

// Runs on the listener's thread: hands the connection to a thread of its own, so a slow
// proxy never keeps the next one waiting.
void ZdsServer::handshake(Fd fd) {
  auto c = std::make_shared<Conn>();
  c->fd = std::move(fd);
  std::lock_guard<std::mutex> g(mu_);
  c->id = ++counters_.connections;
  all_.push_back(c);
  handshakes_.emplace_back([this, c] {
    // holds the connection until its snapshot is done: requests for it wait behind it
    std::unique_lock<std::mutex> lock(c->io);
    auto pkt = zds::receive(c->fd.get(), ack_timeout_ms_);
    auto hello = pkt ? zds::parse<pb::ZdsHello>(*pkt) : Result<pb::ZdsHello>(pkt.error());
    if (!hello || hello->version() != pb::V1) {
      if (pkt) {
        std::lock_guard<std::mutex> g(mu_);
        counters_.malformed++;
      }
      spdlog::warn("zds: proxy {} rejected: {}", c->id,
                   hello ? "unsupported ZDS version " + std::to_string(hello->version()) : hello.error().message());
      return;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(c->fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.pid > 0)
      c->pid = static_cast<uint32_t>(cred.pid);
    if (peer_check_) {
      if (auto st = peer_check_(c->pid); !st) {
        spdlog::error("zds: proxy {} (pid {}) rejected: {}", c->id, c->pid, st.error().message());
        shutdown(c->fd.get(), SHUT_RDWR);
        return;
      }
    }
    if (snapshot_gate_) snapshot_gate_();
    std::vector<PodInfo> snapshot;
    {
      std::lock_guard<std::mutex> g(mu_);
      c->since_ms = unix_ms();
      conns_.push_back(c);  // from here on, removals reach it too
      for (const auto& [_, p] : workloads_) snapshot.push_back(p);
    }
    size_t adds = 0, keeps = 0;
    for (const auto& p : snapshot) {
      auto ns = open_netns(p.netns);
      Status st;
      if (ns && (p.netns_cookie == 0 || ns->cookie == p.netns_cookie)) {
        st = request(*c, "snapshot add " + p.full_name(), add_request(p), ns->fd.get());
        ++adds;
        if (st) mark_acked(p.uid);
      } else {
        // The pod is ours but its netns does not open now (istio-cni does the same): the
        // proxy keeps what it has instead of dropping it.
        pb::WorkloadRequest keep;
        keep.mutable_keep()->set_uid(p.uid);
        st = request(*c, "snapshot keep " + p.full_name(), keep, -1);
        ++keeps;
        std::lock_guard<std::mutex> g(mu_);
        counters_.keeps++;
      }
      if (!st && c->dead) return;
      if (!st) spdlog::warn("zds: proxy {}: {} (the snapshot goes on)", c->id, st.error().message());
    }
    pb::WorkloadRequest done;
    done.mutable_snapshot_sent();
    auto st = request(*c, "snapshot sent", done, -1);
    if (!st) {
      spdlog::warn("zds: proxy {}: {}", c->id, st.error().message());
      return;
    }
    spdlog::info("zds: proxy {} connected, snapshot of {} pod(s) ({} kept) acked", c->id, adds + keeps, keeps);
  });
}

std::vector<uint32_t> ZdsServer::peer_pids() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<uint32_t> out;
  for (const auto& c : conns_)
    if (!c->dead && c->pid) out.push_back(c->pid);
  return out;
}

Status ZdsServer::request(Conn& c, const std::string& what, const google::protobuf::MessageLite& m, int fd) {
  if (c.dead) return invalid("proxy connection closed", what);
  uint64_t serial;
  {
    std::lock_guard<std::mutex> g(mu_);
    serial = ++serial_;
    pending_[serial] = now_ms();
  }
  auto done = [&](Status st) {
    std::lock_guard<std::mutex> g(mu_);
    pending_.erase(serial);
    if (!st && st.error().is(ErrorCode::kRefused)) counters_.nacks++;
    else if (!st) counters_.failed_requests++;
    return st;
  };
  auto st = zds::send(c.fd.get(), m, fd);
  if (!st) {
    c.dead = true;
    return done(st);
  }
  auto pkt = zds::receive(c.fd.get(), ack_timeout_ms_);
  if (!pkt) {
    c.dead = true;  // lockstep is broken: the proxy reconnects and gets a snapshot
    return done(pkt.error().in(what));
  }
  auto resp = zds::parse<pb::WorkloadResponse>(*pkt);
  if (!resp || !resp->has_ack()) {
    c.dead = true;
    {
      std::lock_guard<std::mutex> g(mu_);
      counters_.malformed++;
    }
    return done(invalid("proxy answered with something other than an ack", what));
  }
  c.last_ack_ms = unix_ms();
  c.acks++;
  if (!resp->ack().error().empty()) return done(invalid("proxy refused: " + resp->ack().error(), what, ErrorCode::kRefused));
  return done({});
}

std::vector<std::shared_ptr<ZdsServer::Conn>> ZdsServer::live() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::shared_ptr<Conn>> out;
  for (auto it = conns_.begin(); it != conns_.end();) {
    pollfd p{(*it)->fd.get(), POLLIN | POLLRDHUP, 0};
    bool hung = poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR));
    if ((*it)->dead || hung) {
      (*it)->dead = true;
      std::erase(all_, *it);
      it = conns_.erase(it);
      continue;
    }
    out.push_back(*it);
    ++it;
  }
  return out;
}

std::shared_ptr<ZdsServer::Conn> ZdsServer::newest() {
  auto all = live();
  return all.empty() ? nullptr : all.back();
}

Status ZdsServer::add(const PodInfo& pod, int netns_fd) {
  {
    std::lock_guard<std::mutex> g(mu_);
    workloads_[pod.uid] = pod;
  }
  auto c = newest();
  Status st = c ? Status() : invalid("no node proxy is connected to " + path_);
  if (c) {
    std::lock_guard<std::mutex> io(c->io);
    st = request(*c, "add " + pod.full_name(), add_request(pod), netns_fd);
  }
  if (!st) {  // the caller rolls the capture back: later snapshots must not name the pod
    std::lock_guard<std::mutex> g(mu_);
    workloads_.erase(pod.uid);
    acked_.erase(pod.uid);
  } else {
    mark_acked(pod.uid);
  }
  return st;
}

std::vector<PodInfo> ZdsServer::workloads() {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<PodInfo> out;
  for (const auto& [_, p] : workloads_) out.push_back(p);
  return out;
}

void ZdsServer::mark_acked(const std::string& uid) {
  std::lock_guard<std::mutex> g(mu_);
  if (workloads_.count(uid)) acked_.insert(uid);  // not one removed while its ack was in flight
}

bool ZdsServer::acked(const std::string& uid) {
  std::lock_guard<std::mutex> g(mu_);
  return acked_.count(uid) > 0;
}

void ZdsServer::upsert(const PodInfo& pod) {
  std::lock_guard<std::mutex> g(mu_);
  workloads_[pod.uid] = pod;
}

void ZdsServer::remove(const std::string& uid) {
  {
    std::lock_guard<std::mutex> g(mu_);
    workloads_.erase(uid);
    acked_.erase(uid);
  }
  pb::WorkloadRequest req;
  req.mutable_del()->set_uid(uid);
  for (auto& c : live()) {
    std::lock_guard<std::mutex> io(c->io);
    auto st = request(*c, "del " + uid, req, -1);
    if (!st) spdlog::warn("zds: proxy {}: {}", c->id, st.error().message());
  }
}

bool ZdsServer::connected() { return !live().empty(); }

size_t ZdsServer::proxies() { return live().size(); }

std::vector<ZdsProxy> ZdsServer::proxy_info() {
  std::vector<ZdsProxy> out;
  for (const auto& c : live())
    out.push_back({c->id, c->pid, process_name(static_cast<pid_t>(c->pid)), c->since_ms, c->last_ack_ms.load(), c->acks.load()});
  return out;
}

ZdsCounters ZdsServer::counters() {
  std::lock_guard<std::mutex> g(mu_);
  return counters_;
}

int64_t ZdsServer::oldest_pending_ms() {
  std::lock_guard<std::mutex> g(mu_);
  int64_t oldest = 0;
  for (const auto& [_, t] : pending_)
    if (!oldest || t < oldest) oldest = t;
  return oldest;
}

}  // namespace podsteer
