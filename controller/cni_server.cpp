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
  PODSTEER_TRY(listener_.start(path_, SOCK_STREAM, [this](Fd conn) {
    std::thread([this, c = std::move(conn)]() mutable { serve(std::move(c)); }).detach();
  }));
  spdlog::info("cni: listening on {}", path_);
  return {};
}

void CniServer::stop() { listener_.stop(); }

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
