#include "cni_server.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "log.h"

namespace podsteer {

CniServer::~CniServer() { stop(); }

Status CniServer::start() {
  PODSTEER_TRY(listener_.start(path_, SOCK_STREAM, [this](Fd conn) {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return;
    for (auto it = workers_.begin(); it != workers_.end();) {  // reap the finished
      if ((*it)->done) {
        (*it)->thread.join();
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
    auto w = std::make_unique<Worker>();
    Worker* raw = w.get();
    raw->fd = conn.get();
    raw->thread = std::thread([this, raw, c = std::move(conn)]() mutable {
      serve(*raw, std::move(c));
      raw->done = true;
    });
    workers_.push_back(std::move(w));
  }));
  spdlog::info("cni: listening on {}", path_);
  return {};
}

void CniServer::stop() {
  listener_.stop();
  std::list<std::unique_ptr<Worker>> all;
  {
    std::lock_guard<std::mutex> g(mu_);
    stopping_ = true;
    for (auto& w : workers_)
      if (!w->done) shutdown(w->fd, SHUT_RDWR);  // a request still being read ends now
    all.swap(workers_);
  }
  for (auto& w : all) w->thread.join();
}

void CniServer::serve(Worker&, Fd conn) {
  auto reply = [&](const std::string& line) {
    std::string s = line + "\n";
    (void)!write(conn.get(), s.data(), s.size());
  };
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != 0) {
    spdlog::warn("cni: refused a caller with uid {} (pid {})", cred.uid, cred.pid);
    reply(nlohmann::json{{"status", "error"}, {"message", "only root may call the podsteer agent"}}.dump());
    return;
  }
  std::string line;
  char buf[4096];
  while (line.find('\n') == std::string::npos) {
    if (line.size() > (1 << 20)) {
      reply(nlohmann::json{{"status", "error"}, {"message", "request longer than 1 MiB"}}.dump());
      return;
    }
    pollfd p{conn.get(), POLLIN, 0};
    if (poll(&p, 1, 5000) <= 0) return;
    ssize_t n = read(conn.get(), buf, sizeof(buf));
    if (n <= 0) break;
    line.append(buf, n);
  }
  line = line.substr(0, line.find('\n'));
  reply(handler_(line));
}

}  // namespace podsteer
