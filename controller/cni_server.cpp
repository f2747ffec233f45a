#include "cni_server.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>

#include "log.h"

namespace podsteer {

CniServer::~CniServer() { stop(); }

Status CniServer::start() {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path_).parent_path(), ec);
  unlink(path_.c_str());
  listener_ = Fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listener_.valid()) return sys_error("socket(AF_UNIX)");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path_.size() >= sizeof(addr.sun_path)) return invalid("CNI socket path too long", path_);
  std::strncpy(addr.sun_path, path_.c_str(), sizeof(addr.sun_path) - 1);
  mode_t old = umask(0177);  // created 0600: no window where others could connect
  int r = bind(listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  umask(old);
  if (r != 0) return sys_error("bind", path_);
  if (listen(listener_.get(), 64) != 0) return sys_error("listen", path_);
  acceptor_ = std::thread([this] { accept_loop(); });
  spdlog::info("cni: listening on {}", path_);
  return {};
}

void CniServer::stop() {
  if (stopping_.exchange(true)) return;
  if (listener_.valid()) shutdown(listener_.get(), SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  listener_.reset();
  unlink(path_.c_str());
}

void CniServer::accept_loop() {
  while (!stopping_) {
    pollfd p{listener_.get(), POLLIN, 0};
    if (poll(&p, 1, 200) <= 0) continue;
    Fd conn(accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) continue;
    std::thread([this, c = std::move(conn)]() mutable { serve(std::move(c)); }).detach();
  }
}

void CniServer::serve(Fd conn) {
  auto reply = [&](const nlohmann::json& j) {
    std::string s = j.dump() + "\n";
    (void)!write(conn.get(), s.data(), s.size());
  };
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || cred.uid != 0) {
    spdlog::warn("cni: refused a caller with uid {} (pid {})", cred.uid, cred.pid);
    reply({{"status", "error"}, {"message", "only root may call the podsteer agent"}});
    return;
  }
  std::string line;
  char c;
  while (line.size() < (1 << 20)) {
    pollfd p{conn.get(), POLLIN, 0};
    if (poll(&p, 1, 5000) <= 0) return;
    if (read(conn.get(), &c, 1) != 1 || c == '\n') break;
    line += c;
  }
  auto req = nlohmann::json::parse(line, nullptr, false);
  if (req.is_discarded() || !req.is_object()) {
    reply({{"status", "error"}, {"message", "malformed request: not a JSON object"}});
    return;
  }
  reply(handler_(req));
}

}  // namespace podsteer
