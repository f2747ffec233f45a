#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <iostream>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "proxy.h"
#include "wire.h"
#include "zds.pb.h"

namespace podsteer::proxy {

namespace pb = istio::workload::zds;

static void log_event(const std::string& event, const std::string& detail) {
  log_line({{"event", event}, {"detail", detail}});
}

static Status serve(Proxy& proxy, int sock) {
  pb::ZdsHello hello;
  hello.set_version(pb::V1);
  PODSTEER_TRY(zds::send(sock, hello));
  std::set<std::string> in_snapshot;
  bool snapshot_done = false;
  while (true) {
    // ztunnel's read buffer: a longer message fails here as it fails there
    auto pkt = zds::receive(sock, -1, zds::kZtunnelReadBuffer);
    if (!pkt) return pkt.error();
    auto req = zds::parse<pb::WorkloadRequest>(*pkt);
    pb::WorkloadResponse resp;
    auto* ack = resp.mutable_ack();
    if (!req) {
      ack->set_error(req.error().message());
    } else if (req->has_add()) {
      const auto& info = req->add().workload_info();
      Workload w{req->add().uid(), info.name(), info.namespace_(), info.service_account(), std::move(pkt->fd)};
      auto st = proxy.add_workload(std::move(w));
      if (!st) ack->set_error(st.error().message());
      if (!snapshot_done) in_snapshot.insert(req->add().uid());
    } else if (req->has_keep()) {
      if (!snapshot_done) in_snapshot.insert(req->keep().uid());
    } else if (req->has_del()) {
      (void)proxy.del_workload(req->del().uid());
    } else if (req->has_snapshot_sent()) {
      // pods we still serve that the new snapshot does not name are gone
      for (const auto& uid : proxy.workloads())
        if (!in_snapshot.count(uid)) (void)proxy.del_workload(uid);
      snapshot_done = true;
      log_event("snapshot_received", std::to_string(in_snapshot.size()) + " pod(s)");
    } else {
      ack->set_error("unknown request");
    }
    PODSTEER_TRY(zds::send(sock, resp));
  }
}

void run_zds_client(Proxy& proxy, const std::string& path) {
  int backoff_ms = 100;
  for (;;) {
    Fd sock(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
      backoff_ms = std::min(backoff_ms * 2, 2000);
      continue;
    }
    backoff_ms = 100;
    log_event("zds_connected", path);
    auto st = serve(proxy, sock.get());
    // Listeners stay open while disconnected: the datapath keeps sending pods' traffic
    // here while the agent restarts, and the next snapshot reconciles.
    log_event("zds_disconnected", st.ok() ? "" : st.error().message());
  }
}

}  // namespace podsteer::proxy
