// The agent's side of ZDS: one node proxy connected at a time (a new connection replaces
// the old); every new connection gets the full snapshot, then SnapshotSent; each request
// waits for its ack (strict lockstep).
#pragma once

#include <atomic>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "fd.h"
#include "pod_source.h"
#include "result.h"
#include "unix_listener.h"

namespace google::protobuf {
class MessageLite;
}

namespace podsteer {

struct SnapshotEntry {
  PodInfo pod;
  Fd netns;
};

class ZdsServer {
 public:
  using SnapshotFn = std::function<std::vector<SnapshotEntry>()>;
  ZdsServer(std::string path, int ack_timeout_ms, SnapshotFn snapshot);
  ~ZdsServer();
  Status start();
  void stop();

  // Sends AddWorkload with the netns fd and waits for the ack.
  Status add(const PodInfo& pod, int netns_fd);
  Status del(const std::string& uid);
  bool connected();
  uint64_t connections() const { return connections_; }

 private:
  Status handshake(Fd conn);
  Status request_locked(const std::string& what, const google::protobuf::MessageLite& m, int fd);

  std::string path_;
  int ack_timeout_ms_;
  SnapshotFn snapshot_;
  UnixListener listener_;
  std::mutex mu_;  // one request in flight at a time
  Fd conn_;
  std::atomic<uint64_t> connections_{0};
};

}  // namespace podsteer
