// The agent's CNI socket: podsteer-cni sends one JSON request line per connection and
// waits for one JSON answer line. Only root may call (SO_PEERCRED); the socket is mode
// 0600. Each connection is served on a thread of its own; stop() ends and joins them all,
// so none outlives the agent.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "fd.h"
#include "result.h"
#include "unix_listener.h"

namespace podsteer {

class CniServer {
 public:
  using Handler = std::function<std::string(const std::string& request_line)>;  // the answer line
  CniServer(std::string path, Handler handler) : path_(std::move(path)), handler_(std::move(handler)) {}
  ~CniServer();
  Status start();
  void stop();

 private:
  struct Worker {
    std::thread thread;
    std::atomic<bool> done{false};
    int fd = -1;
  };
  void serve(Worker& w, Fd conn);
  std::string path_;
  Handler handler_;
  UnixListener listener_;
  std::mutex mu_;
  std::list<std::unique_ptr<Worker>> workers_;
  bool stopping_ = false;
};

}  // namespace podsteer
