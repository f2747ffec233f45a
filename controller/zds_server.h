// The agent's side of ZDS, as istio-cni serves it. Any number of node proxies may be
// connected at once (a ztunnel rolling upgrade runs two): each connection gets the full
// snapshot (AddWorkload with the netns fd per pod, KeepWorkload for a pod whose netns
// cannot be opened, then SnapshotSent); a new pod goes to the newest proxy, a removed pod
// to every one. Each request waits for its ack (strict lockstep per connection); a nack is
// logged and counted, and a snapshot goes on past it.
//
// The server keeps its own copy of the workloads it should announce, set by the agent
// with upsert/remove: a proxy connecting never needs the agent (or its locks).
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
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

struct ZdsCounters {
  uint64_t connections = 0;     // proxies accepted
  uint64_t nacks = 0;           // acks that carried an error
  uint64_t keeps = 0;           // KeepWorkload sent in snapshots
  uint64_t failed_requests = 0; // no ack (timeout, closed connection)
  uint64_t malformed = 0;       // frames that are not the message the protocol expects there
};

// A connected proxy, as `podsteer status` shows it (times: Unix ms, 0 for never)
struct ZdsProxy {
  uint64_t id = 0;
  uint32_t pid = 0;
  std::string name;  // the process's comm
  int64_t since_ms = 0, last_ack_ms = 0;
  uint64_t acks = 0;
};

class ZdsServer {
 public:
  ZdsServer(std::string path, int ack_timeout_ms);
  ~ZdsServer();
  // Listens at the path; when another live server holds it (istio-cni's node agent, which
  // serves ztunnel the same protocol there, or a second agent), says so and waits for it to
  // go on a thread of its own, instead of taking the path from under it.
  Status start();
  void stop();
  // Called on a proxy's connection thread before its first snapshot is made (the agent holds
  // snapshots until its first Kubernetes pass). Set before start().
  void set_snapshot_gate(std::function<void()> gate) { snapshot_gate_ = std::move(gate); }
  // Called on a proxy's connection thread after its hello, with the peer's pid (SO_PEERCRED),
  // before it is told anything: an error rejects the proxy (the agent cannot trust its
  // process with the proxy mark). Set before start().
  void set_peer_check(std::function<Status(uint32_t pid)> check) { peer_check_ = std::move(check); }
  // The pids of the proxies connected now (past their hello)
  std::vector<uint32_t> peer_pids();
  // Waiting for another server to let go of the path (not ready meanwhile).
  bool waiting_for_path() const { return waiting_; }

  // Sends AddWorkload (with the netns fd) to the newest proxy and waits for its ack; the
  // pod is part of every later snapshot whatever the answer.
  Status add(const PodInfo& pod, int netns_fd);
  // Forgets the pod and sends DelWorkload to every connected proxy.
  void remove(const std::string& uid);
  // Records a pod for snapshots without telling a proxy now (a pod adopted at start).
  void upsert(const PodInfo& pod);
  // The pods every proxy is told about.
  std::vector<PodInfo> workloads();
  // Has a proxy acked this pod's AddWorkload since the pod was added or recorded? (Kept
  // when that proxy goes: istiod's view of the pod must not flip while a proxy restarts.)
  bool acked(const std::string& uid);
  bool connected();
  size_t proxies();
  std::vector<ZdsProxy> proxy_info();
  ZdsCounters counters();
  // Start time of the oldest request still waiting for its ack, 0 if none: a watchdog
  // reads it to tell a stuck ZDS path.
  int64_t oldest_pending_ms();

 private:
  struct Conn;
  void handshake(Fd fd);
  Status request(Conn& c, const std::string& what, const google::protobuf::MessageLite& m, int fd);
  std::shared_ptr<Conn> newest();
  std::vector<std::shared_ptr<Conn>> live();
  void drop(const std::shared_ptr<Conn>& c);
  void mark_acked(const std::string& uid);

  std::string path_;
  int ack_timeout_ms_;
  UnixListener listener_;
  std::atomic<bool> waiting_{false}, stopping_{false};
  std::thread waiter_;  // while another server holds path_
  std::function<void()> snapshot_gate_;
  std::function<Status(uint32_t)> peer_check_;
  std::mutex mu_;  // conns_, workloads_, counters_, pending_
  std::vector<std::shared_ptr<Conn>> conns_;  // proxies past their hello, oldest first
  std::vector<std::shared_ptr<Conn>> all_;    // and those still saying it (for stop)
  std::vector<std::thread> handshakes_;       // one per connection, joined on stop
  // What the proxies are told, by uid: not a copy of the agent's pod table but its own fact.
  // A pod is told before the proxy's ack makes it captured (and is undone if none comes), a
  // pod under istio-cni's rules is told in the next snapshot; a snapshot sends exactly this
  // set, since a proxy drops a pod a snapshot leaves out. Reading the agent's table instead
  // would make this component call back into the agent (agent.h's lock rule).
  std::map<std::string, PodInfo> workloads_;
  std::set<std::string> acked_;               // uids of workloads_ a proxy acked
  ZdsCounters counters_;
  std::map<uint64_t, int64_t> pending_;  // request serial -> start (ms, steady clock)
  uint64_t serial_ = 0;
};

}  // namespace podsteer
