// A Unix socket the agent serves (the CNI hook's, the node proxy's): created mode 0600 with
// no window where others could connect, accepted on a thread that stops on request.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <thread>

#include "fd.h"
#include "result.h"

namespace podsteer {

class UnixListener {
 public:
  ~UnixListener() { stop(); }
  // type: SOCK_STREAM or SOCK_SEQPACKET. on_conn runs on the accept thread.
  Status start(const std::string& path, int type, std::function<void(Fd)> on_conn);
  void stop();
  // Does a live server answer at path (a connect succeeds, or the socket is of another
  // type)? A file left by a server that exited refuses the connect. Its pid as SO_PEERCRED
  // gives it (0 when unknown), nullopt when no server answers.
  static std::optional<pid_t> live_server(const std::string& path, int type);

 private:
  std::string path_;
  ino_t ino_ = 0;  // our socket file: stop() leaves one a newer agent bound at path_ alone
  Fd fd_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
};

}  // namespace podsteer
