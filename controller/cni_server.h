// The agent's CNI socket: podsteer-cni sends one JSON request per connection and waits
// for one JSON answer. Only root may call (SO_PEERCRED); the socket is mode 0600.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <functional>
#include <string>
#include <thread>

#include "fd.h"
#include "result.h"
#include "unix_listener.h"

namespace podsteer {

class CniServer {
 public:
  using Handler = std::function<nlohmann::json(const nlohmann::json& request)>;
  CniServer(std::string path, Handler handler) : path_(std::move(path)), handler_(std::move(handler)) {}
  ~CniServer();
  Status start();
  void stop();

 private:
  void serve(Fd conn);
  std::string path_;
  Handler handler_;
  UnixListener listener_;
};

}  // namespace podsteer
