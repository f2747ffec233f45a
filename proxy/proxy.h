// podsteer-proxy: a small, real L4 node proxy. For every pod the ZDS server hands it, it
// opens the in-pod listeners (outbound, inbound, HBONE, DNS) inside the pod's netns and
// forwards connections to their original destinations, from inside the pod netns, with
// the proxy mark. One epoll loop, no thread per connection.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fd.h"
#include "result.h"

namespace podsteer::proxy {

struct Config {
  uint16_t outbound_port = 15001;
  uint16_t inbound_port = 15006;
  uint16_t hbone_port = 15008;
  uint16_t dns_port = 15053;
  uint32_t mark = 0x539;
  std::string dns_upstream;  // "ip:port" for UDP DNS; empty: the pod's /etc/resolv.conf nameserver
  // Where a connection goes when it has no original destination (nothing redirected it:
  // a client connected to the listener itself). Empty: such connections are closed.
  // The benchmarks' "direct" mode uses it.
  std::string default_upstream;
  std::string default_inbound_upstream;  // the same for the inbound listener (default: default_upstream)
  // Inbound connections go to the app from the client's address (IP_TRANSPARENT +
  // IP_FREEBIND), as ztunnel does by default (ENABLE_ORIG_SRC): the app sees who called.
  bool orig_src = true;
  // Refuse every plaintext inbound connection (15006), as ztunnel does under a STRICT
  // PeerAuthentication: whatever reaches the inbound listener fails.
  bool strict = false;
  // ztunnel with INPOD_PORT_REUSE=false binds its listeners with std's TcpListener::bind and
  // sets the mark afterwards (src/inpod/linux/config.rs): a listener then carries no mark
  // when listen() runs, and no SO_REUSEPORT. This does the same.
  bool mark_after_listen = false;
  bool quiet = false;
  // ztunnel finds the workload of an AddWorkload by namespace, name and service account
  // in its xDS workload store; one it cannot find gets no certificate and every
  // connection of the pod fails. When check_identity is set, known_workloads is that
  // store ("namespace/name/service-account"), and this proxy fails the same way.
  bool check_identity = false;
  std::set<std::string> known_workloads;
  // A connection with no bytes either way for this long is closed: a deleted pod's
  // connections must not pin its netns (and this process's memory) forever.
  int idle_timeout_ms = 3600 * 1000;
  size_t max_dns_queries = 1024;  // UDP DNS queries in flight, all pods together
  // After SIGTERM: how long open connections may take to finish before the proxy exits.
  int drain_ms = 30 * 1000;
};

struct Workload {
  std::string uid, name, namespace_, service_account;
  Fd netns;
};

class Proxy {
 public:
  explicit Proxy(Config cfg);
  ~Proxy();
  // Thread-safe: run on the event loop, and wait for the result.
  Status add_workload(Workload w);
  Status del_workload(const std::string& uid);
  std::vector<std::string> workloads();
  // Thread-safe. Stops accepting (what the listeners already queued is accepted first),
  // lets open connections finish, and makes run() return once they have or drain_ms has
  // passed - as ztunnel drains on SIGTERM during a rolling upgrade.
  void drain();
  void run();  // the event loop; returns after drain()

 private:
  struct Pod;
  struct Conn;
  struct DnsQuery;
  enum class Kind { OutboundListener, InboundListener, HboneListener, DnsTcpListener, DnsUdpListener, ConnDown, ConnUp, DnsUpstream, Wakeup };
  struct Handle {
    Kind kind;
    Pod* pod = nullptr;
    Conn* conn = nullptr;
    DnsQuery* dns = nullptr;
    int fd = -1;
  };

  Status do_add(Workload& w);
  void do_del(const std::string& uid);
  void on_accept(Handle* h);
  void pause_listener(Handle* h, int err);
  void on_dns_query(Handle* h);
  void on_dns_reply(Handle* h);
  void on_conn(Handle* h, uint32_t events);
  void update_interest(Conn* c);
  void finish(Conn* c, const std::string& error = "");
  Result<Fd> socket_in(Pod* pod, int family, int type);
  // An upstream TCP connection in the pod's netns to dst, from `from` when given.
  Result<Fd> connect_in(Pod* pod, const sockaddr_storage& dst, socklen_t dlen, const sockaddr_storage* from);
  Handle* watch(int fd, Kind kind, uint32_t events, Pod* pod, Conn* conn = nullptr, DnsQuery* dns = nullptr);
  void unwatch(int fd);
  void expire_dns();
  void expire_idle();
  void resume_listeners();
  bool dns_upstream(Pod* pod);
  void log_conn(const Conn* c, const std::string& error);

  Config cfg_;
  Fd epoll_;
  Fd wake_;
  Fd host_netns_;
  std::mutex mu_;
  std::deque<std::function<void()>> tasks_;
  std::map<std::string, std::unique_ptr<Pod>> pods_;
  // removed pods whose connections are still open: they finish undisturbed
  std::vector<std::unique_ptr<Pod>> draining_;
  std::map<int, std::unique_ptr<Handle>> handles_;
  std::map<Conn*, std::unique_ptr<Conn>> conns_;
  std::map<DnsQuery*, std::unique_ptr<DnsQuery>> dns_;
  // listeners taken out of the loop after accept() ran out of fds, and when they return
  std::map<int, std::chrono::steady_clock::time_point> paused_;
  std::chrono::steady_clock::time_point last_sweep_{};
  bool draining_all_ = false;
  std::chrono::steady_clock::time_point drain_deadline_{};
};

// The ZDS client: connects (and reconnects) to the agent, says hello, and applies each
// request to the proxy, acking in lockstep. After a snapshot, pods it did not include are
// closed.
void run_zds_client(Proxy& proxy, const std::string& socket_path);

// One JSON line on stdout; the ZDS thread and the event loop both log, whole lines only.
void log_line(const nlohmann::json& j);

}  // namespace podsteer::proxy
