#include "unix_listener.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace podsteer {

Status UnixListener::start(const std::string& path, int type, std::function<void(Fd)> on_conn) {
  path_ = path;
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  unlink(path.c_str());
  fd_ = Fd(socket(AF_UNIX, type | SOCK_CLOEXEC, 0));
  if (!fd_.valid()) return sys_error("socket(AF_UNIX)", path);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return invalid("socket path too long", path);
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  mode_t old = umask(0177);
  int r = bind(fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  umask(old);
  if (r != 0) return sys_error("bind", path);
  struct stat st {};
  if (stat(path.c_str(), &st) == 0) ino_ = st.st_ino;
  if (listen(fd_.get(), 64) != 0) return sys_error("listen", path);
  thread_ = std::thread([this, on_conn = std::move(on_conn)] {
    while (!stopping_) {
      pollfd p{fd_.get(), POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      Fd conn(accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (conn.valid()) on_conn(std::move(conn));
    }
  });
  return {};
}

std::optional<pid_t> UnixListener::live_server(const std::string& path, int type) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return std::nullopt;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  Fd probe(socket(AF_UNIX, type | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!probe.valid()) return std::nullopt;
  if (connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(probe.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) return cred.pid;
    return 0;
  }
  if (errno == EPROTOTYPE || errno == EAGAIN) return 0;  // live, of another type, or its backlog full
  return std::nullopt;
}

void UnixListener::stop() {
  if (stopping_.exchange(true)) return;
  if (fd_.valid()) shutdown(fd_.get(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
  fd_.reset();
  struct stat st {};
  if (!path_.empty() && stat(path_.c_str(), &st) == 0 && st.st_ino == ino_) unlink(path_.c_str());
}

}  // namespace podsteer
